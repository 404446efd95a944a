"""How selective a unit is for a concept, on every validation image: the ROC AUC of its activation for
"an image of the concept" against every other image (all classes).

The AUC is the probability that an image of the concept activates the unit more than an image outside it
(ties count half): the Mann-Whitney U statistic over the ranks of all activations, divided by the number of
(inside, outside) pairs. 1: the unit tells the concept apart perfectly; 0.5: no better than chance; below
0.5: it prefers the other images. Top-k purity looks at the k strongest images only; the AUC at all of them.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores: np.ndarray, inside: np.ndarray) -> float | None:
    """AUC of ``scores`` (n,) for the images where ``inside`` (n, bool) holds; None without both kinds."""
    scores, inside = np.asarray(scores, dtype=np.float64), np.asarray(inside, dtype=bool)
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    if n_in == 0 or n_out == 0:
        return None
    ranks = rankdata(scores, method="average")  # ties share their mean rank: they count half
    return float((ranks[inside].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def concept_aucs(scores: np.ndarray, labels: np.ndarray, concepts: list[list[int]]) -> dict:
    """AUC of one unit's activations ``scores`` (n,) on images with ``labels`` (n,) for each concept (its
    classes against every other image): ``{"concept1": auc, ..., "images": n, "inside": [n_1, ...]}``."""
    labels = np.asarray(labels)
    inside = [np.isin(labels, cs) for cs in concepts]
    out = {f"concept{j}": roc_auc(scores, m) for j, m in enumerate(inside, 1)}
    return {**out, "images": int(len(labels)), "inside": [int(m.sum()) for m in inside]}
