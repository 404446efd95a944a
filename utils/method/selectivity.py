"""How selective a unit is for a concept, on every validation image: the ROC AUC of its activation for
"an image of the concept" against every other image (all classes).

The AUC is the probability that an image of the concept activates the unit more than an image outside it
(ties count half): the Mann-Whitney U statistic, counted for many units at once by sorting the outside
images' activations (:func:`auc_rows`), divided by the number of (inside, outside) pairs. 1: the unit tells the concept apart perfectly; 0.5: no better than chance; below
0.5: it prefers the other images. Top-k purity looks at the k strongest images only; the AUC at all of them.

The top-k images a pass finds (:class:`TopK`, :func:`utils.passes.topk.stream_topk`) and their purity live here
too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .failures import concept_flags
from .split import Split, reading, sub_names


@dataclass
class TopK:
    """Per sub-channel ``s``: the ``k`` largest activations, best first, over the images searched.

    ``values`` S x k (float32), ``indices`` S x k (dataset index = row of the stage-1 store for train/),
    ``positions`` S x k x 2 (row, column of the maximum of the output map over the grid, in H' x W'),
    ``labels`` S x k; ``out_hw`` = (H', W') of the grid.
    """

    keys: list[tuple[int, str]]
    values: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    out_hw: tuple[int, int]
    every: "EveryImage | None" = None  # with ``keep_all``: every image's activation of every sub-channel

    def scores(self, channel: int, name: str) -> np.ndarray:
        """Every image's activation of one sub-channel (n,), in dataset order (a search with ``keep_all``)."""
        return self.every.values[:, self.keys.index((int(channel), name))]

    def get(self, channel: int, name: str) -> dict:
        """``values``, ``indices``, ``positions``, ``labels`` of one sub-channel (k each)."""
        s = self.keys.index((int(channel), name))
        return {"values": self.values[s], "indices": self.indices[s], "positions": self.positions[s],
                "labels": self.labels[s]}


@dataclass
class EveryImage:
    """Every searched image's ``index`` and ``labels`` (n, numpy) and ``values`` (n x S float64 activations)."""

    index: np.ndarray
    labels: np.ndarray
    values: np.ndarray


def purity(topk_labels, concepts: list[list[int]]) -> dict:
    """Fractions of the top-k images (their labels) in each concept's classes and in other classes:
    ``{"concept1": f1, ..., "conceptk": fk, "other": f, "k": number of images}``."""
    labels = [int(t) for t in (topk_labels.tolist() if hasattr(topk_labels, "tolist") else topk_labels)]
    n = len(labels)
    counts = [sum(t in set(cs) for t in labels) for cs in concepts]
    out = {f"concept{j}": (c / n if n else 0.0) for j, c in enumerate(counts, 1)}
    return {**out, "other": (n - sum(counts)) / n if n else 0.0, "k": n}


def auc_rows(scores: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """ROC AUC (M,) of every row of ``scores`` (M x N) for the columns where ``inside`` (N, bool) holds against
    the others; ties count half. NaN without both kinds of columns."""
    pos, neg = scores[:, inside], scores[:, ~inside]
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        return torch.full((scores.shape[0],), float("nan"), dtype=torch.float64, device=scores.device)
    neg = neg.sort(dim=1).values.contiguous()
    pos = pos.contiguous()
    below = torch.searchsorted(neg, pos, right=False)  # negatives strictly below each positive
    upto = torch.searchsorted(neg, pos, right=True)  # ... and those equal to it
    return (below + upto).sum(1).double() / (2.0 * pos.shape[1] * neg.shape[1])


def pair_auc(scores: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> float:
    """ROC AUC of ``scores`` (N,) for the images where ``first`` holds against those where ``second`` holds (a
    concept's images against another concept's: the split's actual job); NaN without both."""
    keep = first | second
    return float(auc_rows(scores[keep][None], first[keep])[0])


def roc_auc(scores: np.ndarray, inside: np.ndarray) -> float | None:
    """AUC of ``scores`` (n,) for the images where ``inside`` (n, bool) holds (:func:`auc_rows`); None without
    both kinds."""
    auc = float(auc_rows(torch.as_tensor(np.asarray(scores, dtype=np.float64))[None],
                         torch.as_tensor(np.asarray(inside, dtype=bool)))[0])
    return None if auc != auc else auc


def concept_aucs(scores: np.ndarray, labels: np.ndarray, concepts: list[list[int]]) -> dict:
    """AUC of one unit's activations ``scores`` (n,) on images with ``labels`` (n,) for each concept (its
    classes against every other image): ``{"concept1": auc, ..., "images": n, "inside": [n_1, ...]}``."""
    labels = np.asarray(labels)
    inside = [np.isin(labels, cs) for cs in concepts]
    out = {f"concept{j}": roc_auc(scores, m) for j, m in enumerate(inside, 1)}
    return {**out, "images": int(len(labels)), "inside": [int(m.sum()) for m in inside]}


def oriented_selectivity(top: TopK, split: Split, concepts: list[list[int]], signs) -> dict:
    """Per concept j of ``split``, read in its direction ``signs[j]`` (a search of an ``oriented_bank`` with
    ``keep_all``): the top-k purity of the original unit (``before``) and of concept unit j (``after``); their AUC
    for concept j's images against every other image (``auc_before``, ``auc_after``) and against the other
    concepts' images only (``pair_before``, ``pair_after``: the mean over the other concepts of
    :func:`pair_auc`; None for a concept unit without such images); ``inside`` (images per concept) and
    ``images``."""
    labels = top.every.labels
    inside = [torch.as_tensor(np.isin(labels, cs)) for cs in concepts]
    out: dict = {key: [] for key in ("before", "after", "auc_before", "auc_after", "pair_before", "pair_after")}
    for j in range(1, split.k + 1):
        for when, name in (("before", reading(signs, j)), ("after", f"D{j}")):
            scores = torch.as_tensor(top.scores(split.channel, name))
            out[when].append(purity(top.get(split.channel, name)["labels"], concepts)[f"concept{j}"])
            out[f"auc_{when}"].append(roc_auc(scores.numpy(), inside[j - 1].numpy()))
            pairs = [pair_auc(scores, inside[j - 1], inside[l]) for l in range(split.k) if l != j - 1]
            pairs = [v for v in pairs if v == v]
            out[f"pair_{when}"].append(float(np.mean(pairs)) if pairs else None)
    return {**out, "inside": [int(m.sum()) for m in inside], "images": int(len(labels))}


def split_aucs(top: TopK, split: Split, concepts: list[list[int]]) -> dict[str, dict]:
    """:func:`utils.method.selectivity.concept_aucs` of the original channel and every concept channel of ``split`` on
    every image of the pass (a search with ``keep_all``)."""
    return {name: concept_aucs(top.scores(split.channel, name), top.every.labels, concepts)
            for name in ("original",) + sub_names(split.k)[:-1]}


def split_purity(top: TopK, split: Split, concepts: list[list[int]]) -> dict[str, dict]:
    """:func:`purity` of the original channel and every concept channel of ``split``."""
    return {name: purity(top.get(split.channel, name)["labels"], concepts)
            for name in ("original",) + sub_names(split.k)[:-1]}


def split_selectivity(top: TopK, split: Split, concepts: list[list[int]], sources: dict,
                      means: list[list[float] | None]) -> dict:
    """``purity``, ``auc`` (of the original and every concept unit) and each concept unit's ``flags``
    (:func:`utils.method.failures.concept_flags`; ``means``: stage 4's mean rows d_1/orig .. res/orig per concept)."""
    p, a = split_purity(top, split, concepts), split_aucs(top, split, concepts)
    js = range(1, split.k + 1)
    flags = split_flags(top, split, sources, means, [p["original"][f"concept{j}"] for j in js],
                        [p[f"D{j}"][f"concept{j}"] for j in js])
    return {"purity": p, "auc": a, "flags": flags}


def split_flags(top: TopK, split: Split, sources: dict, means: list[list[float] | None], before: list[float],
                after: list[float]) -> list[list[str]]:
    """:func:`utils.method.failures.concept_flags` of every concept unit of ``split``: the index ``sources`` of its rho,
    stage 4's mean rows per concept (``means``), the top-k purity of the original (``before``) and of D_j
    (``after``) per concept."""
    return [concept_flags(j, sources, top.scores(split.channel, f"D{j}"), top.get(split.channel, f"D{j}")["values"],
                          None if not means[j - 1] else means[j - 1][j - 1], before[j - 1], after[j - 1])
            for j in range(1, split.k + 1)]
