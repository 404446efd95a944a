"""Stage 2 on a store: stream the relevance rows into counts, the candidates, their ARVs and the
gamma-polysemantic pairs, timed per step, and the results file; and every candidate's concepts (complete linkage,
the layer command's). The arithmetic is ``utils.method.candidates`` and ``utils.method.linkage``."""
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

from ..errors import UserError
from ..files import write_text
from ..method.candidates import (DEFAULT_ROWS, Buffers, candidate_channels, check_params, count_important,
                                 polysemantic_pairs, relevant_classes)
from ..method.linkage import complete_linkage, cosine_matrix
from ..store import layout as st
from ..store.arvs import candidate_arvs


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


@dataclass
class Stage2Result:
    """What stage 2 found, plus seconds per step."""

    pairs: list[dict]
    candidates: dict[int, list[int]]
    counts: torch.Tensor  # K x C int64
    seconds: dict[str, float] = field(default_factory=dict)
    arvs: dict[int, torch.Tensor] = field(default_factory=dict)  # c -> ARVs (m x C_in) of its classes


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


def channel_concepts(store: st.Store, tau: float, p: float, gamma_high: float, progress: bool = False
                     ) -> tuple[dict[int, list[list[int]]], dict[int, float], dict[int, dict], torch.Tensor]:
    """Every candidate channel's concepts (stage 2's rules and counts): c -> groups of classes; per channel the
    lowest similarity between classes of different concepts (1.0 with one concept); why it is a candidate
    (``evidence``): its relevant ``classes``, each one's ``shares`` of images where the channel is important
    (relevance >= tau) and the cosine ``similarity`` of their ARVs (m x m); and those shares for every class and
    channel (K x C, float64: how relevant each channel is to each class on the training images)."""
    found = find_pairs(store, tau, p, 0.0, gamma_high, progress=progress)
    concepts, least, evidence = {}, {}, {}
    n = store.class_counts
    for c, classes in found.candidates.items():
        s = cosine_matrix(found.arvs[c])
        evidence[c] = {"classes": classes, "shares": [float(found.counts[t, c]) / max(int(n[t]), 1) for t in classes],
                       "similarity": [[round(float(v), 4) for v in row] for row in s]}
        concepts[c] = complete_linkage(classes, s, gamma_high)
        group = {t: j for j, g in enumerate(concepts[c]) for t in g}
        cross = [float(s[a, b]) for a, t in enumerate(classes) for b, u in enumerate(classes)
                 if group[t] != group[u] and not math.isnan(float(s[a, b]))]
        least[c] = min(cross) if cross else 1.0
    shares = found.counts.double() / torch.as_tensor(n, dtype=torch.float64).clamp_min(1)[:, None]
    return concepts, least, evidence, shares
