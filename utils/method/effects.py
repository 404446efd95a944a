"""Whether a concept unit carries its concept's function, and nothing else: the arithmetic of certification.

From one intervention pass (:mod:`utils.passes.interventions`), for split unit c and its concept j (classes C_j):

- ``own``: the mean drop of the own-class logit over concept j's images when concept unit D_j is ablated;
- ``own_original``: the same when the original unit is ablated (in the split network: all of its sub-units,
  which is exactly the original unit at its reference);
- ``collateral``: the largest mean drop of a class's own logit over its images, among every class outside C_j
  (the other concepts' classes included), when D_j is ablated, and that class;
- with steering, how the logits of C_j's classes move (mean over all images and those classes) when D_j is
  scaled, against those of the other concepts' classes (and the same for their summed probability).

Concept unit j is **certified** when, with every effect read against the original unit's on the same images (the
scale on which the unit matters at all):

- it carries concept j's function: ablating it takes at least ``1 - tol`` of what ablating the original unit takes
  from concept j's classes (``own_share = own / own_original >= 1 - tol``);
- it carries no other concept's: for every other concept l of the unit, ablating D_j takes at most ``tol`` of what
  ablating the original takes from concept l's classes (``cross_share <= tol``);
- it harms nothing else: on every class outside all of the unit's concepts, ablating D_j lowers the logit by at
  most what ablating the original does there, plus ``tol`` times ``own_original`` (``elsewhere <= tol``).

``own_original > 0`` is needed (the original unit matters for the concept). The entry also gives ``collateral``:
the largest drop of any class outside C_j under D_j, and that class.
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
    absent: tuple[int, ...] = ()  # an ablation's reference leaves out the images of these labels (its concepts)

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
    copies: str = "input"  # where the pass made its copies: "layer" (the network before it ran once) or "input"

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
    """Concept j's (1-based) entry for split unit ``channel`` (module docstring): ``own`` and ``own_original``, their
    ratio ``own_share``; ``cross_share``: the largest share of another concept's own effect that ablating D_j takes
    (that concept's drop under D_j / under the original); ``elsewhere``: the largest extra drop of a class outside
    every concept beyond what ablating the original causes there, as a share of ``own_original``; ``collateral``
    and ``collateral_class``: the largest drop of any class outside C_j under D_j; the accuracy on concept j's
    images intact, with D_j and with the original ablated; steering (with ``steer``); ``certified``."""
    ivs = {(iv.target, iv.factor): iv for iv in effects.interventions if iv.channel == channel}
    dj, orig = ivs[(f"D{j}", None)], ivs[("original", None)]
    mine = np.isin(effects.labels, concepts[j - 1])
    own = _mean(effects.drop(dj)[mine])
    own_original = _mean(effects.drop(orig)[mine])
    by_dj, by_orig = effects.class_drop(dj, num_classes), effects.class_drop(orig, num_classes)
    outside = [t for t in range(num_classes) if t not in set(concepts[j - 1]) and not np.isnan(by_dj[t])]
    worst = max(outside, key=lambda t: by_dj[t]) if outside else None
    cross = []
    for l, cs in enumerate(concepts, 1):
        theirs = np.isin(effects.labels, cs)
        if l != j and theirs.any():
            base = _mean(effects.drop(orig)[theirs])
            cross.append(_mean(effects.drop(dj)[theirs]) / base if base and base > 0 else np.inf)
    rest = [t for t in outside if not any(t in cs for cs in concepts)]
    scale = own_original if own_original and own_original > 0 else np.nan
    elsewhere = max(((by_dj[t] - max(by_orig[t], 0.0)) / scale for t in rest), default=0.0)
    out = {"own": own, "own_original": own_original,
           "own_share": None if own is None or not scale == scale else own / scale,
           "cross_share": float(max(cross)) if cross else 0.0, "elsewhere": _finite(elsewhere),
           "collateral": float(by_dj[worst]) if worst is not None else 0.0,
           "collateral_class": None if worst is None else int(worst),
           "accuracy": [_mean(effects.correct[mine, 0]), _mean(effects.correct[mine, effects.column(dj)])],
           "accuracy_original": _mean(effects.correct[mine, effects.column(orig)])}
    out["certified"] = certified(out, tol)
    if steer is not None and (f"D{j}", float(steer)) in ivs:
        a = effects.interventions.index(ivs[(f"D{j}", float(steer))])
        others = sorted({t for i, cs in enumerate(concepts, 1) if i != j for t in cs})
        out["steer"] = {"factor": float(steer), "concept": float(effects.dlogit[a, concepts[j - 1]].mean()),
                        "other_concepts": float(effects.dlogit[a, others].mean()) if others else 0.0,
                        "concept_prob": float(effects.dprob[a, concepts[j - 1]].sum()),
                        "other_concepts_prob": float(effects.dprob[a, others].sum()) if others else 0.0}
    return out


def certified(e: dict, tol: float) -> bool:
    """The rule of the module docstring on an entry of :func:`concept_effect`."""
    if e["own_share"] is None or e["elsewhere"] is None:
        return False
    return e["own_share"] >= 1 - tol and e["cross_share"] <= tol and e["elsewhere"] <= tol


def _finite(v) -> float | None:
    return float(v) if np.isfinite(v) else None


def unit_effects(effects: Effects, channel: int, concepts: list[list[int]], num_classes: int, tol: float,
                 steer: float | None = None) -> list[dict]:
    """:func:`concept_effect` of every concept of one split unit."""
    return [concept_effect(effects, channel, concepts, j, num_classes, tol, steer)
            for j in range(1, len(concepts) + 1)]


def _mean(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()) if v.size else None

