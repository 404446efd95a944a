"""Stage 2: candidate channels and gamma-polysemantic pairs, from the store alone (no images).

Shapes: ``N`` training images, ``C`` channels of the layer ``L``, ``K`` classes, ``C_in x H x W``
the layer's input map, ``T = kh*kw`` kernel taps.

1. ``important``: ``R_i[c] >= tau * sum_c' max(R_i[c'], 0)``, decided exactly (see ``important``);
2. ``count_important``: ``count[t, c]`` = images of class t with c important, streamed in chunks;
3. ``relevant_classes``: ``count[t, c] >= p * n_t`` (classes without images: nothing);
4. ``candidate_channels``: channels relevant to two or more classes;
5. ARVs in closed form from the per-class input sums (``utils.arv``);
6. ``polysemantic_pairs``: ``gamma_low <= cos(ARV(c,t1), ARV(c,t2)) < gamma_high`` in float64.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import store as st
from .errors import UserError
from .files import write_text
from .arv import candidate_arvs

DEFAULT_ROWS = 16384  # rows per step: ~0.5 GB of temporaries for C = 2048


# ---------------------------------------------------------------- steps 1-4: counts and candidates


class Buffers:
    """Work tensors reused from one block to the next: on CPU, allocating (and page-faulting) a fresh
    block-sized tensor per step costs more than the arithmetic done in it."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self._bufs[name] = torch.empty(n, dtype=dtype)
        return b[:n].view(shape)


def important(R: torch.Tensor, tau: float, out_dtype: torch.dtype = torch.bool,
              buffers: Buffers | None = None) -> torch.Tensor:
    """``R_i[c] >= tau * sum_c' max(R_i[c'], 0)`` (B x C, bool or 0/1 in ``out_dtype``) for ``R`` (B x C).

    The positive total is accumulated in float64, which is exact for float16 relevance (a sum of up
    to 2^11 such values needs < 53 bits; the stores of earlier versions) and rounds at ~1e-16 per term for
    the float32 relevance of newer stores; ``tau * total`` is rounded once in float64 and the
    comparison is exact: the float32 copy of R is compared with the smallest float32 >= the threshold.
    With ``buffers`` the result is a view into a reused buffer, overwritten by the next call.
    """
    buf = buffers or Buffers()
    B, C = R.shape
    R32 = R if R.dtype == torch.float32 else buf.get("r32", (B, C), torch.float32).copy_(R)
    total = buf.get("p64", (B, C), torch.float64).copy_(R32).clamp_min_(0).sum(1)
    thr = total * float(tau)
    thr32 = thr.float()
    below = thr32.double() < thr  # rounded down: step to the next float32 up
    thr32 = torch.where(below, torch.nextafter(thr32, torch.full_like(thr32, math.inf)), thr32)
    return torch.ge(R32, thr32[:, None], out=buf.get("imp", (B, C), out_dtype))


def count_important(R: torch.Tensor, targets: torch.Tensor, num_classes: int, tau: float,
                    out: torch.Tensor | None = None, buffers: Buffers | None = None) -> torch.Tensor:
    """Add ``count[t, c]`` (K x C int64) for one block: images of class t (``targets``, B) with c important."""
    if R.shape[0] >= 1 << 24:
        raise ValueError("blocks of 2^24 rows or more: float32 counts would no longer be exact")
    buf = buffers or Buffers()
    if out is None:
        out = torch.zeros(num_classes, R.shape[1], dtype=torch.int64)
    imp = important(R, tau, torch.float32, buf)  # 0/1 as float32: index_add_ is fast and exact (< 2^24 rows)
    acc = buf.get("acc", tuple(out.shape), torch.float32).zero_()
    acc.index_add_(0, targets.long(), imp)
    out += acc.long()
    return out


def npy_rows(path: str, rows: int = DEFAULT_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Stream a 2-D ``.npy`` file as ``(first_row, block)`` pairs of at most ``rows`` rows.

    A reader thread fills one of two reused buffers while the caller works on the other, so disk
    reads overlap the arithmetic and the memory held stays two blocks however large the file (a
    whole-file memory map would keep every page it touched resident). A block is valid until the
    caller asks for the one after next.
    """
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    shape, dtype, offset, c_order = mm.shape, mm.dtype, mm.offset, mm.flags.c_contiguous
    del mm
    if len(shape) != 2 or not c_order:
        raise UserError(f"{path} is not a C-ordered 2-D array")
    n, C = shape
    starts = list(range(0, n, rows))
    bufs = [np.empty((max(1, min(rows, n)), C), dtype) for _ in range(2)]

    def read(i: int) -> np.ndarray:
        lo = starts[i]
        b = bufs[i % 2][: min(rows, n - lo)]
        f.seek(offset + lo * C * dtype.itemsize)
        view = memoryview(b).cast("B")
        if f.readinto(view) != view.nbytes:
            raise UserError(f"{path} is truncated (row {lo} of {n})")
        return b

    with open(path, "rb") as f, ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, 0) if starts else None
        for i, lo in enumerate(starts):
            block = nxt.result()
            if i + 1 < len(starts):
                nxt = pool.submit(read, i + 1)
            yield lo, block


def count_important_all(relevance: np.ndarray | str, targets: np.ndarray, num_classes: int, tau: float,
                        rows: int = DEFAULT_ROWS, progress: bool = False) -> torch.Tensor:
    """``count[t, c]`` (K x C int64) over all N images; ``relevance`` is an N x C array or a ``.npy`` path."""
    if isinstance(relevance, str):
        blocks = npy_rows(relevance, rows)
        n = int(np.load(relevance, mmap_mode="r").shape[0])
    else:
        n = relevance.shape[0]
        blocks = ((lo, relevance[lo:lo + rows]) for lo in range(0, n, rows))
    if len(targets) != n:
        raise UserError(f"relevance has {n} rows but there are {len(targets)} labels")
    counts = None
    buf = Buffers()
    bar = tqdm(total=n, unit="img", desc="stage 2: counts", disable=not progress, dynamic_ncols=True)
    for lo, block in blocks:
        R = torch.from_numpy(np.ascontiguousarray(block))
        if counts is None:
            counts = torch.zeros(num_classes, R.shape[1], dtype=torch.int64)
        count_important(R, torch.from_numpy(np.asarray(targets[lo:lo + len(block)])), num_classes, tau, counts, buf)
        bar.update(len(block))
    bar.close()
    if counts is None:
        raise UserError("the store holds no images")
    return counts


def relevant_classes(counts: torch.Tensor, class_counts: torch.Tensor, p: float) -> torch.Tensor:
    """``relevant[t, c] = count[t, c] >= p * n_t`` (K x C bool), compared in float64; n_t = 0: never."""
    n = class_counts.to(torch.float64)[:, None]
    return (counts.to(torch.float64) >= float(p) * n) & (n > 0)


def candidate_channels(relevant: torch.Tensor) -> dict[int, list[int]]:
    """Channels relevant to two or more classes -> their classes, ascending (from K x C ``relevant``)."""
    many = relevant.sum(0) >= 2
    cs, ts = torch.nonzero(relevant[:, many].T, as_tuple=True)
    ids = torch.nonzero(many).flatten().tolist()
    out: dict[int, list[int]] = {}
    for j, t in zip(cs.tolist(), ts.tolist()):
        out.setdefault(ids[j], []).append(t)
    return out


# ---------------------------------------------------------------- step 6: cosine similarities and pairs


def cosines(A: torch.Tensor, i: torch.Tensor, j: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """s of the row pairs ``(A[i], A[j])`` of ``A`` (float64): ``sum(a * b) / (|a| |b|)``, NaN (0/0) where a row is
    zero. The one formula of every cosine similarity: stage 2's pairs and the layer command's concepts give the
    same pair the same s. ``norms``: the rows' norms, when the caller has them."""
    A = A.double()
    norms = A.norm(dim=1) if norms is None else norms
    return (A[i] * A[j]).sum(1) / (norms[i] * norms[j])


def polysemantic_pairs(arvs: dict[int, torch.Tensor], candidates: dict[int, list[int]],
                       gamma_low: float, gamma_high: float) -> list[dict]:
    """Pairs ``{'channel', 'class1', 'class2', 'cosine_similarity'}`` with ``gamma_low <= s < gamma_high``.

    ``arvs[c]``: the ARVs (m x C_in) of candidate c's classes ``candidates[c]`` in that order. s is the
    float64 cosine similarity; undefined s (a zero ARV) is skipped. Sorted by s from high to low
    (ties: channel, class1, class2 ascending).
    """
    if not candidates:
        return []
    flat = torch.cat([arvs[c].double() for c in candidates])  # all ARVs, candidate after candidate
    norms = flat.norm(dim=1)
    keys, i1, i2 = [], [], []
    base = 0
    for c, classes in candidates.items():
        m = len(classes)
        for a in range(m):
            for b in range(a + 1, m):
                keys.append((c, classes[a], classes[b]))
                i1.append(base + a)
                i2.append(base + b)
        base += m
    pairs = []
    step = 1 << 16
    for lo in range(0, len(keys), step):
        s = cosines(flat, torch.tensor(i1[lo:lo + step]), torch.tensor(i2[lo:lo + step]), norms)
        for (c, t1, t2), v in zip(keys[lo:lo + step], s.tolist()):
            if gamma_low <= v < gamma_high:  # False for NaN
                pairs.append({"channel": c, "class1": t1, "class2": t2, "cosine_similarity": v})
    pairs.sort(key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))
    return pairs


# ---------------------------------------------------------------- the whole stage on a store


@dataclass
class Stage2Result:
    """What stage 2 found, plus seconds per step."""

    pairs: list[dict]
    candidates: dict[int, list[int]]
    counts: torch.Tensor  # K x C int64
    seconds: dict[str, float] = field(default_factory=dict)
    arvs: dict[int, torch.Tensor] = field(default_factory=dict)  # c -> ARVs (m x C_in) of its classes


def check_params(tau: float, p: float, gamma_low: float, gamma_high: float) -> None:
    """Refuse thresholds that make no sense (one line each)."""
    if not (math.isfinite(tau) and tau >= 0):
        raise UserError(f"--proportion_attribution_required must be a number >= 0, not {tau}")
    if not (math.isfinite(p) and 0 <= p <= 1):
        raise UserError(f"--p must be between 0 and 1, not {p}")
    if not gamma_low < gamma_high:
        raise UserError(f"--cos_sim_low ({gamma_low}) must be below --cos_sim_high ({gamma_high})")


def find_pairs(store: st.Store, tau: float, p: float, gamma_low: float = 0.0, gamma_high: float = 1.0,
               rows: int = DEFAULT_ROWS, progress: bool = False) -> Stage2Result:
    """Stage 2 on a stage-1 store: counts, candidates, their ARVs and the gamma-polysemantic pairs."""
    check_params(tau, p, gamma_low, gamma_high)
    sec = {}
    t0 = time.perf_counter()
    targets = store.targets
    K = store.num_classes
    if len(targets) and (targets.min() < 0 or targets.max() >= K):
        raise UserError(f"store {store.path} has labels outside 0..{K - 1}")
    counts = count_important_all(os.path.join(store.path, "relevance.npy"), targets, K, tau, rows, progress)
    sec["counts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = torch.from_numpy(store.class_counts)
    observed = torch.bincount(torch.from_numpy(targets), minlength=K)
    if len(n) != K or not torch.equal(n, observed):
        raise UserError(f"store {store.path}: class counts in meta.json do not match targets.npy")
    candidates = candidate_channels(relevant_classes(counts, n, p))
    sec["candidates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    arvs = candidate_arvs(store, candidates)
    sec["arvs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = polysemantic_pairs(arvs, candidates, gamma_low, gamma_high)
    sec["pairs"] = time.perf_counter() - t0
    return Stage2Result(pairs, candidates, counts, sec, arvs)


# ---------------------------------------------------------------- the results file


def results_path(store_dir: str, head: str, tau: float, p: float, gamma_low: float, gamma_high: float) -> str:
    """``<store_dir>/results_get_cosine_similarities/<model>[_<layer>]_required<tau>_p<p>_cossim<lo>to<hi>.txt``."""
    name = f"{head}_required{float(tau)}_p{float(p)}_cossim{float(gamma_low)}to{float(gamma_high)}.txt"
    return os.path.join(store_dir, "results_get_cosine_similarities", name)


def pairs_text(pairs: list[dict]) -> str:
    """The results file: header ``Channel,Class1,Class2,CosineSimilarity`` and one row per pair (full float64)."""
    rows = ["Channel,Class1,Class2,CosineSimilarity"]
    rows += [f"{d['channel']},{d['class1']},{d['class2']},{float(d['cosine_similarity'])}" for d in pairs]
    return "\n".join(rows) + "\n"


def write_pairs(path: str, pairs: list[dict]) -> None:
    """Write the results file of :func:`pairs_text` to ``path`` (atomically), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, pairs_text(pairs))
