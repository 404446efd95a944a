"""Concepts found from the data (the k-concept extension of the paper): a candidate channel's relevant classes grouped
by complete linkage of their ARVs' cosine similarities.

Start from one group per class; while two groups ``X, Y`` have ``min over t in X, u in Y of s(t, u) >=
gamma_high``, merge the pair with the largest such minimum (ties: the pair whose smallest classes come
first). The remaining groups, ordered by their smallest class, are the channel's concepts; a channel
with one group is not polysemantic. An undefined ``s`` (a zero ARV) never links.
"""
from __future__ import annotations

import math

import torch

from .candidates import cosines


def cosine_matrix(A: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities (m x m, float64) of the rows of ``A`` (m x C_in), by stage 2's
    :func:`utils.method.candidates.cosines` (the same pair gives the same s); NaN where a row is zero."""
    m = len(A)
    i, j = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    return cosines(A, i.flatten(), j.flatten()).view(m, m)


def complete_linkage(classes: list[int], s: torch.Tensor, gamma: float) -> list[list[int]]:
    """Group ``classes`` (m, ascending) by complete linkage of their similarities ``s`` (m x m) at ``gamma``."""
    groups = [[i] for i in range(len(classes))]
    while True:
        best = None  # (link, key, a, b)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                link = min(float(s[i, j]) for i in groups[a] for j in groups[b])
                if math.isnan(link) or link < gamma:
                    continue
                key = (min(groups[a]), min(groups[b]))
                if best is None or link > best[0] or (link == best[0] and key < best[1]):
                    best = (link, key, a, b)
        if best is None:
            break
        _, _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted([sorted(classes[i] for i in g) for g in groups])
