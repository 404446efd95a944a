"""Whether a concept unit carries its concept's function, and nothing else: the arithmetic of certification.

From one intervention pass (:mod:`utils.passes.interventions`), for split unit c and its concept j (classes C_j):

- ``own``: the mean drop of the own-class logit over concept j's images when concept unit D_j is ablated;
- ``own_original``: the same when the original unit is ablated (in the split network: all of its sub-units,
  which is exactly the original unit at its reference);
- ``collateral``: the largest mean drop of a class's own logit over its images, among every class outside C_j
  (the other concepts' classes included), when D_j is ablated, and that class;
- with steering, how the summed probability of C_j's classes moves (mean over all images) when D_j is scaled,
  against that of the other concepts' classes.

Concept unit j is **certified** when ablating it hurts concept j's classes at least nearly as much as ablating the
original unit does, ``own >= (1 - tol) * own_original``, and hurts every other class by at most a small share of
that, ``collateral <= tol * own_original`` (``own_original > 0``: the original unit matters for the concept). Both
bounds are relative to the original unit's own effect, so they read the same for any logit scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Intervention:
    """One copy of every batch: the split layer's ``expanded`` output ``columns`` set to their reference
    (``factor`` None: an ablation) or multiplied by ``factor`` (steering). ``channel`` and ``target`` (``original``,
    ``D1`` ..) say what it is."""

    channel: int
    target: str
    columns: tuple[int, ...]
    factor: float | None = None

    @property
    def name(self) -> str:
        return f"{self.channel}:{self.target}" + ("" if self.factor is None else f"x{self.factor:g}")


@dataclass(frozen=True)
class Effects:
    """What one intervention pass found, over ``n`` images (dataset ``index``, ``labels``) and A interventions
    (numpy): ``logit`` and ``prob`` (n x (A + 1)): each image's own-class logit and probability, intact (column
    0) and under each intervention; ``correct`` (n x (A + 1), bool) whether the image is classified right;
    ``dlogit`` and ``dprob`` (A x K): per intervention, the mean over all images of each class's logit and
    probability change (intervened - intact)."""

    interventions: list[Intervention]
    index: np.ndarray
    labels: np.ndarray
    logit: np.ndarray
    prob: np.ndarray
    correct: np.ndarray
    dlogit: np.ndarray
    dprob: np.ndarray

    def column(self, iv: Intervention) -> int:
        """The column of ``iv`` in ``logit``, ``prob`` and ``correct`` (0 is intact)."""
        return self.interventions.index(iv) + 1

    def drop(self, iv: Intervention) -> np.ndarray:
        """Per image, how much its own-class logit falls under ``iv`` (intact - intervened)."""
        return self.logit[:, 0] - self.logit[:, self.column(iv)]

    def class_drop(self, iv: Intervention, num_classes: int) -> np.ndarray:
        """Per class (K), the mean drop of the class's own logit over its images (NaN for a class without)."""
        d = self.drop(iv)
        sums = np.bincount(self.labels, weights=d, minlength=num_classes)
        counts = np.bincount(self.labels, minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)




def concept_effect(effects: Effects, channel: int, concepts: list[list[int]], j: int, num_classes: int,
                   tol: float, steer: float | None = None) -> dict:
    """Concept j's (1-based) entry for split unit ``channel``: own, own_original, collateral (and its class),
    the accuracy on concept j's images intact and with D_j ablated, steering (with ``steer``) and certified."""
    ivs = {(iv.target, iv.factor): iv for iv in effects.interventions if iv.channel == channel}
    dj, orig = ivs[(f"D{j}", None)], ivs[("original", None)]
    mine = np.isin(effects.labels, concepts[j - 1])
    own = _mean(effects.drop(dj)[mine])
    own_original = _mean(effects.drop(orig)[mine])
    per_class = effects.class_drop(dj, num_classes)
    outside = [t for t in range(num_classes) if t not in set(concepts[j - 1]) and not np.isnan(per_class[t])]
    worst = max(outside, key=lambda t: per_class[t]) if outside else None
    collateral = float(per_class[worst]) if worst is not None else 0.0
    out = {"own": own, "own_original": own_original, "collateral": collateral,
           "collateral_class": None if worst is None else int(worst),
           "accuracy": [_mean(effects.correct[mine, 0]), _mean(effects.correct[mine, effects.column(dj)])],
           "accuracy_original": _mean(effects.correct[mine, effects.column(orig)]),
           "certified": certified(own, own_original, collateral, tol)}
    if steer is not None and (f"D{j}", float(steer)) in ivs:
        a = effects.interventions.index(ivs[(f"D{j}", float(steer))])
        others = sorted({t for i, cs in enumerate(concepts, 1) if i != j for t in cs})
        out["steer"] = {"factor": float(steer), "concept": float(effects.dprob[a, concepts[j - 1]].sum()),
                        "other_concepts": float(effects.dprob[a, others].sum()) if others else 0.0}
    return out


def certified(own: float | None, own_original: float | None, collateral: float, tol: float) -> bool:
    """The rule of the module docstring."""
    if own is None or own_original is None or not own_original > 0:
        return False
    return own >= (1 - tol) * own_original and collateral <= tol * own_original


def unit_effects(effects: Effects, channel: int, concepts: list[list[int]], num_classes: int, tol: float,
                 steer: float | None = None) -> list[dict]:
    """:func:`concept_effect` of every concept of one split unit."""
    return [concept_effect(effects, channel, concepts, j, num_classes, tol, steer)
            for j in range(1, len(concepts) + 1)]


def _mean(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()) if v.size else None

