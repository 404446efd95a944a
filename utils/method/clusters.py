"""Concepts without labels: a unit's concepts found by clustering how its strongest images reach it.

For unit ``c`` and each of the ``N`` images on which it fires most, the *contribution vector* ``v_i`` (C_in) holds
what each input adds to the unit on image ``i`` (:mod:`utils.passes.contributions`). Images of different concepts
reach a unit through different inputs, so their ``v_i`` point in different directions. The concepts are:

1. the rows ``v_i / |v_i|`` clustered into at most ``k0`` groups by k-means (scipy's ``kmeans2``, k-means++
   seeding with ``seed``; no hand-written clustering);
2. groups of fewer than ``min_images`` images dropped (their images belong to no concept);
3. the remaining groups merged by the same complete linkage the labelled path applies to classes
   (:func:`utils.method.linkage.complete_linkage`), on the cosine of the groups' mean contributions, at
   ``gamma``: two groups stay apart unless every pair of them is at least ``gamma`` alike.

A unit is a candidate when two or more concepts of at least ``min_images`` images remain. How separated they are is
the largest cosine between two concepts' mean contributions (lower: more separated; candidates are ranked by it,
as the labelled path ranks them by their least similar classes). A concept's mean contribution is its ARV.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from .linkage import complete_linkage, cosine_matrix
from .search import unit_aucs


@dataclass(frozen=True)
class Clusters:
    """One unit's label-free concepts: ``members[j]`` the rows (of the images clustered) of concept j, in order;
    ``arvs`` (k x C_in, float64) their mean contributions; ``closest`` the largest cosine between two concepts'
    mean contributions (1.0 with fewer than two concepts)."""

    members: list[list[int]]
    arvs: torch.Tensor
    closest: float

    @property
    def k(self) -> int:
        return len(self.members)

    def labels(self, n: int) -> torch.Tensor:
        """Per clustered image (``n`` of them) its concept, 1..k, or 0 for none."""
        out = torch.zeros(n, dtype=torch.int64)
        for j, rows in enumerate(self.members, 1):
            out[rows] = j
        return out


def unit_rows(V: torch.Tensor) -> np.ndarray:
    """The contribution vectors scaled to length 1 (float64, numpy; a zero vector stays zero)."""
    V = V.double()
    return (V / V.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).numpy()


def cluster_concepts(V: torch.Tensor, k0: int = 4, min_images: int = 10, gamma: float = 0.5,
                     seed: int = 0) -> Clusters:
    """The label-free concepts of one unit (module docstring) from the contribution vectors ``V`` (N x C_in) of its
    top-N images; an image whose contributions are all zero reaches the unit by no input and belongs to no
    concept."""
    nonzero = (V != 0).any(1)
    if not bool(nonzero.all()):
        keep = nonzero.nonzero().flatten()
        c = cluster_concepts(V[keep], k0, min_images, gamma, seed)
        return Clusters([keep[m].tolist() for m in c.members], c.arvs, c.closest)
    n = len(V)
    if n < 2 * min_images or k0 < 2:
        return Clusters([list(range(n))] if n else [], V.double().mean(0, keepdim=True) if n else V.double(), 1.0)
    rows = unit_rows(V)
    k = min(k0, n // min_images, len(np.unique(rows.round(12), axis=0)))  # no more clusters than directions
    if k < 2:
        return Clusters([list(range(n))], V.double().mean(0, keepdim=True), 1.0)
    with warnings.catch_warnings():  # an empty cluster is dropped below, as every cluster under min_images is
        warnings.filterwarnings("ignore", "One of the clusters is empty")
        _, assign = kmeans2(rows, k, minit="++", seed=seed)
    groups = [np.flatnonzero(assign == g).tolist() for g in range(k)]
    groups = [g for g in groups if len(g) >= min_images]
    if len(groups) < 2:
        rows = sorted(i for g in groups for i in g) or list(range(n))
        return Clusters([rows], V[rows].double().mean(0, keepdim=True), 1.0)
    means = torch.stack([V[g].double().mean(0) for g in groups])
    merged = complete_linkage(list(range(len(groups))), cosine_matrix(means), gamma)
    members = sorted((sorted(i for g in m for i in groups[g]) for m in merged), key=lambda rows: rows[0])
    arvs = torch.stack([V[rows].double().mean(0) for rows in members])
    s = cosine_matrix(arvs)
    off = [float(s[a, b]) for a in range(len(members)) for b in range(len(members)) if a != b]
    return Clusters(members, arvs, max(off) if off else 1.0)


def nearest_concept(V: torch.Tensor, arvs: torch.Tensor) -> torch.Tensor:
    """Held-out images assigned to concepts without labels (n, int64): each image's contribution vector (a row of
    ``V``, n x C_in) goes to the concept (1..k) whose mean contribution (``arvs``, k x C_in) it is most alike
    (cosine); 0 for an image that reaches the unit by no input."""
    rows = torch.from_numpy(unit_rows(V))
    means = torch.from_numpy(unit_rows(arvs))
    out = (rows @ means.T).argmax(1) + 1
    return torch.where((V != 0).any(1), out, torch.zeros_like(out))


def cluster_aucs(V: torch.Tensor, concept: torch.Tensor, assign: torch.Tensor, k: int) -> list[float]:
    """Per concept j, the ROC AUC of concept unit j's activation for the images of concept j (``concept == j``)
    against every other image (:func:`utils.method.search.unit_aucs`, read upward: without labels there is no
    direction); NaN where either side is empty."""
    return unit_aucs(V, concept, assign, torch.ones(k, dtype=torch.float64)).tolist()
