"""Honest flags on a split's concept units: what a purity figure alone would hide.

A concept unit D_j is flagged when
- ``no exclusive input``: at the best rho no input is exclusive to concept j (D_j is the shared part alone);
- ``constant output``: its activation hardly changes over the validation images (max - min at most 1e-6 of
  its scale), so its "top" images are ties in dataset order and its purity means nothing;
- ``own-concept share <= 0``: on concept j's images (relative attribution >= tau) its mean share of the
  original activation is at or below zero;
- ``purer original``: its top-k purity for concept j is below the original channel's;
- ``top-k mostly outside its concept``: fewer than half of its top-k images are of concept j (the split did
  not give the concept a unit of its own, whatever the original's purity was).
Ties in a top-k are said apart: ``ties at the k-th activation`` when images outside the top-k activate
the unit exactly as much as its k-th image.
"""
from __future__ import annotations

import numpy as np


def topk_ties(scores: np.ndarray, top_values) -> bool:
    """Whether the k-th value of a top-k (``top_values``, best first) is shared by images left out of it."""
    top = np.asarray(top_values, dtype=np.float64)
    if len(top) == 0 or len(top) >= len(scores):
        return False
    kth = np.float32(top[-1])
    return int((np.asarray(scores, dtype=np.float32) == kth).sum()) > int((top.astype(np.float32) == kth).sum())


def concept_flags(j: int, sources: dict, scores: np.ndarray, top_values, share: float | None, before: float,
                  after: float) -> list[str]:
    """The flags of concept unit D_j (``j`` from 1): the best rho's index ``sources``, its activation on every
    validation image (``scores``), its top-k values, its mean share of the original activation on concept j's
    images (``share``, None without rows) and the top-k purity of the original (``before``) and of D_j
    (``after``) for concept j."""
    flags = []
    if not sources.get(f"concept{j}"):
        flags.append("no exclusive input")
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) and np.ptp(scores) <= 1e-6 * max(1.0, float(np.abs(scores).max())):
        flags.append("constant output")
    if share is not None and share <= 0:
        flags.append("own-concept share <= 0")
    if after < before:
        flags.append("purer original")
    if after < 0.5:
        flags.append("top-k mostly outside its concept")
    if topk_ties(scores, top_values):
        flags.append("ties at the k-th activation")
    return flags
