"""The functional split rule: index sets chosen so that each concept unit carries its own concepts' effect on the
network's decisions and no other's.

Any assignment of a unit's inputs to "shared" (0) or "exclusive to concept j" (j) keeps the split exact
(:mod:`utils.method.search`), so the sets may be chosen for what a split is used for: ablating concept unit
D_j (setting its output to its reference, :mod:`utils.passes.interventions`) should take concept j's evidence
and leave every other class's. To first order that effect is a sum over the unit's inputs. For image ``i`` of
class ``t_i``, with ``g_i`` the gradient of its class logit at the unit's output (per position ``q``) and ``U_i``
the layer input as each kernel tap sees it (``U_i[k, tap, q]``; a Linear: its input at the positions that count),
input ``k`` adds

    G_i[k] = sum_tap W[c, k, tap] * sum_q g_i[q] * (U_i[k, tap, q] - U_ref[k, tap, q])

to the drop of the class logit when the unit's output moves to the output of the reference input ``U_ref``. So
ablating D_j (the inputs it keeps, ``a[k] in {0, j}``, against its own reference) drops the class logit of
image i by about ``sum over kept k of G_i[k]`` with ``U_ref`` D_j's reference, and ablating the original unit
(every input) by ``sum_k G_i[k]`` with the original's reference. Averaged over a class's images, each is a sum
of per-input terms, so the three numbers of certification (:mod:`utils.method.effects`) are linear in the
assignment:

- ``own_j`` = concept j's drop under D_j / under the original (should be near 1);
- ``cross_jl`` = concept l's drop under D_j / under the original, l != j (should be near 0);
- ``elsewhere_jt`` = the drop of class t outside every concept under D_j, beyond the original's, over concept
  j's drop under the original (should be near 0).

The rule finds the assignment whose worst ``max(1 - own_j, cross_jl, elsewhere_jt)`` is least: a small mixed
integer program (one binary per input and set, solved by scipy's HiGHS). Of the assignments within ``slack`` of
that worst value, or within a ``target`` that is good enough, it then takes the one that moves the fewest inputs
from the searched rule's sets (which tell the concepts apart by activation): inputs that carry no function stay
where the activation search put them.

The gradient at the image misses a unit that an ablation switches on (a class that holds it off with two groups
of inputs that cancel, split apart). :func:`effect_model` therefore also takes ``F`` and ``g`` read *along* each
ablation's path (``along``: from :func:`utils.passes.contributions.path_pass`, the mean over a quadrature's
points), and ``G`` is then that path integral; :mod:`utils.stages.functional` runs the programs on both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SLACK = 0.01  # the second program may give up this much of the least worst value to keep the searched sets
TIME_LIMIT = 1.0  # seconds per program; HiGHS returns the best assignment it found by then
MIN_IMAGES = 3  # a class outside the concepts counts for "elsewhere" with at least this many images


@dataclass(frozen=True)
class ClassInputs:
    """Per class of a pass's images, the sum of the layer input as each kernel tap sees it (``sums[t]``:
    C_in x taps x Q, float64, Q the output positions that count) and how many images (``counts[t]``)."""

    sums: dict[int, torch.Tensor]
    counts: dict[int, int]

    def mean(self, classes) -> torch.Tensor:
        """The mean input over the images of ``classes`` (C_in x taps x Q); zeros where none."""
        classes = [t for t in classes if self.counts.get(t)]
        any_ = next(iter(self.sums.values()))
        if not classes:
            return torch.zeros_like(any_)
        return sum(self.sums[t] for t in classes) / sum(self.counts[t] for t in classes)


def references(inputs: ClassInputs, concepts: list[list[int]], mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference inputs of the original unit and of each concept unit, as the intervention pass sets them:
    ``absent`` (the mean over the images where the concepts are absent: every concept's for the original,
    concept j's for D_j; every image where none is), ``mean`` (every image) or ``zero``."""
    every = sorted(inputs.counts)
    if mode == "zero":
        z = torch.zeros_like(inputs.mean(every))
        return z, [z] * len(concepts)
    if mode == "mean":
        m = inputs.mean(every)
        return m, [m] * len(concepts)
    mine = {t for cs in concepts for t in cs}  # as the ablation pass: where no image lacks them, every image
    return (inputs.mean([t for t in every if t not in mine] or every),
            [inputs.mean([t for t in every if t not in set(cs)] or every) for cs in concepts])


def input_effects(F: torch.Tensor, g: torch.Tensor, weight_c: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``G`` (n x C_in, float64) of the module docstring: ``F`` (n x C_in) the same without the reference
    (``sum_tap W * sum_q g * U``), ``g`` (n x Q) the gradients, ``weight_c`` (C_in x taps), ``ref`` (C_in x taps x Q)."""
    at_ref = torch.einsum("nq,ktq->nkt", g.double(), ref.double().to(g.device))
    return F.double() - (at_ref * weight_c.double().to(g.device)).sum(-1)


@dataclass(frozen=True)
class EffectModel:
    """One unit's first-order effects, per input: ``own[j, l]`` (C_in): concept l's mean drop under D_j's reference
    input; ``base[l]``: concept l's mean drop when the original unit is ablated; ``other[j, r]`` (C_in) and
    ``other_base[r]`` the same for class ``classes[r]`` outside every concept."""

    own: np.ndarray  # k x k x C_in
    base: np.ndarray  # k
    other: np.ndarray  # k x R x C_in
    other_base: np.ndarray  # R
    classes: list[int]

    @property
    def k(self) -> int:
        return len(self.base)

    def usable(self) -> bool:
        """Whether the original unit's ablation lowers every concept's logits (what every share is read against)."""
        return bool(np.all(np.isfinite(self.base)) and np.all(self.base > 0))

    def shares(self, assign) -> dict:
        """The predicted ``own`` (k), ``cross`` (k x k, NaN on the diagonal) and ``elsewhere`` (k) of ``assign``,
        and ``worst``: the largest of every ``1 - own``, ``cross`` and ``elsewhere``."""
        a = np.asarray(assign)
        keep = np.stack([(a == 0) | (a == j) for j in range(1, self.k + 1)]).astype(np.float64)  # k x C_in
        by = np.einsum("jlc,jc->jl", self.own, keep) / self.base[None, :]
        own = np.diag(by).copy()
        cross = by.copy()
        np.fill_diagonal(cross, np.nan)
        extra = np.einsum("jrc,jc->jr", self.other, keep) - np.maximum(self.other_base, 0)[None, :]
        elsewhere = (extra / self.base[:, None]).max(1) if len(self.classes) else np.zeros(self.k)
        worst = max(float((1 - own).max()), float(np.nanmax(cross)) if self.k > 1 else 0.0, float(elsewhere.max()))
        return {"own": own, "cross": cross, "elsewhere": elsewhere, "worst": worst}


def effect_model(F: torch.Tensor, g: torch.Tensor, classes: torch.Tensor, weight_c: torch.Tensor,
                 inputs: ClassInputs, concepts: list[list[int]], mode: str,
                 min_images: int = MIN_IMAGES, along: tuple[torch.Tensor, torch.Tensor] | None = None) -> EffectModel:
    """The :class:`EffectModel` of one unit from its pass rows: ``F`` and ``g`` (:func:`input_effects`) and each
    row's class (``classes``), its filter ``weight_c`` (C_in x taps), the pass's :class:`ClassInputs` and the
    ablation reference ``mode``. ``along``: ``F`` and ``g`` again (E x n x ...), per ablation (the original's
    first, then D_1 .. D_k's) read along the path from the image to where that ablation takes the unit (a
    quadrature's mean; :func:`utils.passes.contributions.path_pass`): each ablation's effects are then its
    path integral, which sees a unit that the ablation switches on or off."""
    if along is not None:
        Fs, gs = list(along[0]), list(along[1])
    else:
        Fs, gs = [F] * (len(concepts) + 1), [g] * (len(concepts) + 1)
    ref0, refs = references(inputs, concepts, mode)
    cls = classes.cpu().numpy()
    member = [np.isin(cls, cs) for cs in concepts]
    anyc = np.any(member, 0)
    G0 = input_effects(Fs[0], gs[0], weight_c, ref0).sum(1).cpu().numpy()
    rest = [t for t in sorted(set(cls[~anyc].tolist())) if (cls == t).sum() >= min_images]
    k, C = len(concepts), F.shape[1]
    own, other = np.zeros((k, k, C)), np.zeros((k, len(rest), C))
    for j in range(k):
        G = input_effects(Fs[j + 1], gs[j + 1], weight_c, refs[j]).cpu().numpy()
        for l in range(k):
            own[j, l] = G[member[l]].mean(0) if member[l].any() else np.nan
        for r, t in enumerate(rest):
            other[j, r] = G[cls == t].mean(0)
    base = np.array([G0[m].mean() if m.any() else np.nan for m in member])
    return EffectModel(own, base, other, np.array([G0[cls == t].mean() for t in rest]), rest)


def functional_assignment(model: EffectModel, start: torch.Tensor, target: float = 0.0, slack: float = SLACK,
                          time_limit: float = TIME_LIMIT) -> tuple[torch.Tensor, dict]:
    """The functional rule's assignment (module docstring) and how it went: ``{"worst": [at start, chosen],
    "moved": inputs moved from ``start``, "status"}``. ``target``: a worst share that is good enough; the second
    program moves the fewest inputs to reach ``max(least + slack, target)``, and a start already there is kept.
    ``start`` (C_in, 0..k) is returned unchanged where the original unit does not lower every concept's logits or
    no program finds an assignment."""
    start = start.cpu()
    before = model.shares(start.numpy())["worst"] if model.usable() else None
    if not model.usable():
        return start.clone(), {"worst": [before, before], "moved": 0, "status": "the original unit does not lower "
                               "every concept's logits: the searched sets are kept"}
    if before <= target:
        return start.clone(), {"worst": [before, before], "moved": 0, "status": "the searched sets meet the target"}
    A, lo, hi = _constraints(model)
    first = _solve(model, A, lo, hi, None, None, time_limit)
    if first is None:
        return start.clone(), {"worst": [before, before], "moved": 0, "status": "no assignment found"}
    second = _solve(model, A, lo, hi, start.numpy(), max(first[1] + slack, target), time_limit)
    assign, exact = (first[0], first[2]) if second is None else (second[0], first[2] and second[2])
    chosen = model.shares(assign)["worst"]
    if chosen >= before:  # never worse than where it started
        return start.clone(), {"worst": [before, before], "moved": 0, "status": "the searched sets are best"}
    out = torch.as_tensor(assign, dtype=start.dtype)
    return out, {"worst": [before, chosen], "moved": int((out != start).sum()),
                 "status": "optimal" if exact else f"best found in {time_limit:g} s"}


def _constraints(model: EffectModel):
    """The linear rows of the program over ``x[k', s]`` (input k' in set s, s = 0 shared, j concept j; C_in x
    (k + 1), row-major) and ``u`` (last): ``own_j + u >= 1``, ``cross_jl - u <= 0``, ``elsewhere_jt - u <= 0``,
    and one set per input (a sparse matrix: the share rows are dense, the C_in rows of one set per input are not)."""
    from scipy.sparse import csr_matrix, vstack

    k, C = model.k, model.own.shape[-1]
    n = C * (k + 1) + 1

    def kept(terms: np.ndarray, j: int) -> np.ndarray:  # the row of sum over the inputs D_j keeps of ``terms``
        row = np.zeros(n)
        idx = np.arange(C) * (k + 1)
        row[idx] = terms
        row[idx + j] = terms
        return row

    rows, lo, hi = [], [], []
    for j in range(1, k + 1):
        for l in range(k):
            row = kept(model.own[j - 1, l] / model.base[l], j)
            row[-1] = 1.0 if l == j - 1 else -1.0
            rows.append(row)
            lo.append(1.0 if l == j - 1 else -np.inf)
            hi.append(np.inf if l == j - 1 else 0.0)
        for r in range(len(model.classes)):
            row = kept(model.other[j - 1, r] / model.base[j - 1], j)
            row[-1] = -1.0
            rows.append(row)
            lo.append(-np.inf)
            hi.append(max(float(model.other_base[r]), 0.0) / model.base[j - 1])
    one = csr_matrix((np.ones(C * (k + 1)), np.arange(C * (k + 1)), np.arange(0, C * (k + 1) + 1, k + 1)),
                     shape=(C, n))
    return vstack([csr_matrix(np.array(rows)), one]).tocsr(), np.r_[lo, np.ones(C)], np.r_[hi, np.ones(C)]


def _solve(model: EffectModel, A, lo, hi, start: np.ndarray | None, bound: float | None,
           time_limit: float) -> tuple[np.ndarray, float, bool] | None:
    """Least worst value (``start`` None), or fewest moves from ``start`` with ``u <= bound``: the assignment
    (C_in), its ``u`` and whether it is proven optimal. Where HiGHS finds no integer point in time (thousands of
    inputs), the linear relaxation's solution rounded (each input to its largest set); None where neither is
    found."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    k, C = model.k, model.own.shape[-1]
    n = C * (k + 1) + 1
    cost = np.zeros(n)
    if start is None:
        cost[-1] = 1.0
    else:
        cost[np.arange(C) * (k + 1) + start] = -1.0
    upper = np.r_[np.ones(n - 1), np.inf if bound is None else bound]
    integrality = np.r_[np.ones(n - 1), 0]
    # u >= 0: no worst value below zero is asked for (an own share above 1 or a negative cross share is no aim)
    rows, bounds = LinearConstraint(A, lo, hi), Bounds(np.zeros(n), upper)
    res = milp(cost, constraints=rows, integrality=integrality, bounds=bounds, options={"time_limit": time_limit})
    if res.x is not None:
        return res.x[:-1].reshape(C, k + 1).argmax(1), float(res.x[-1]), res.status == 0
    res = milp(cost, constraints=rows, integrality=np.zeros(n), bounds=bounds, options={"time_limit": time_limit})
    if res.x is None:
        return None
    assign = res.x[:-1].reshape(C, k + 1).argmax(1)
    return assign, max(model.shares(assign)["worst"], 0.0), False
