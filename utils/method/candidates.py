"""Stage 2's arithmetic: candidate channels and gamma-polysemantic pairs (the stage on a store:
``utils.stages.candidates``).

Shapes: ``N`` training images, ``C`` channels of the layer ``L``, ``K`` classes, ``C_in x H x W``
the layer's input map, ``T = kh*kw`` kernel taps.

1. ``important``: ``R_i[c] >= tau * sum_c' max(R_i[c'], 0)``, decided exactly (see ``important``);
2. ``count_important``: ``count[t, c]`` = images of class t with c important, streamed in chunks;
3. ``relevant_classes``: ``count[t, c] >= p * n_t`` (classes without images: nothing);
4. ``candidate_channels``: channels relevant to two or more classes;
5. ARVs in closed form from the per-class tap sums (``utils.method.arv``, a store's: ``utils.store.arvs``);
6. ``polysemantic_pairs``: ``gamma_low <= cos(ARV(c,t1), ARV(c,t2)) < gamma_high`` in float64.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

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


def check_params(tau: float, p: float, gamma_low: float, gamma_high: float) -> None:
    """Refuse thresholds that make no sense (one line each)."""
    if not (math.isfinite(tau) and tau >= 0):
        raise UserError(f"--proportion_attribution_required must be a number >= 0, not {tau}")
    if not (math.isfinite(p) and 0 <= p <= 1):
        raise UserError(f"--p must be between 0 and 1, not {p}")
    if not gamma_low < gamma_high:
        raise UserError(f"--cos_sim_low ({gamma_low}) must be below --cos_sim_high ({gamma_high})")
