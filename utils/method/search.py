"""A split rule that searches: the index sets chosen for concept units that tell their concepts apart.

Any assignment of a unit's inputs to "shared" (0) or "exclusive to concept j" (j) keeps the split exact,
sum_j D_j - (k - 1) Res = W[c] (:func:`utils.method.split.split_filters`), so the sets may be chosen for what
they are for. What the search needs per image ``i`` is its *input contributions* ``V[i, k']``: the sum over the
positions that count of what input ``k'`` adds to the unit (``W[c, k']`` applied to the input's channel
``k'``). Concept unit D_j's activation under an assignment ``a`` is then

    act_j(i) = sum over the inputs k' with a[k'] in {0, j} of V[i, k']      (+ the bias: the same for every
                                                                             image, so no AUC depends on it)

``labels[i]`` is j for an image of concept j and 0 for any other image. The objective is the mean over the
concepts of the ROC AUC of ``s_j * act_j`` for concept j's images against every other image, ``s_j`` the
concept's orientation (+1, or -1 for a concept that lowers the unit); the AUC is
:func:`utils.method.selectivity.auc_rows`.

The search starts from an assignment (the paper's sets), and each step makes the one move (one input into
another set) that raises the objective on the *fitting* images most. It stops when no move raises it, after
``budget`` moves, or when the *held-out* images' objective has not risen for ``patience`` moves, and returns the
assignment with the best held-out objective it met, the start included: on the held-out images it never ends
below where it began. Every candidate move of a step is scored at once: per concept, the AUCs of
``act_j + V[:, k']`` and ``act_j - V[:, k']`` for the inputs ``k'`` that can be added to or removed from D_j (2k
batched sorts of at most C_in x N). With ``screen = M``, a step first scores only the M inputs per concept and
direction whose contributions separate the concept best on average (``s_j`` times the difference of their mean
over the concept's images and over the others, in units of their spread): a sort of M rows instead of C_in. Only
when no screened move raises the objective are all moves scored, so the search stops exactly where the
unscreened one would have nothing left to gain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .scoring import best_index
from .selectivity import auc_rows
from .split import Sweep

EPS = 1e-12  # a move must raise the objective by more than this


def concept_masks(assign: torch.Tensor, k: int) -> torch.Tensor:
    """Which inputs each concept unit keeps (C_in x k, float64): ``a[k'] in {0, j}``."""
    j = torch.arange(1, k + 1, device=assign.device)
    return ((assign[:, None] == 0) | (assign[:, None] == j)).double()


def unit_aucs(V: torch.Tensor, labels: torch.Tensor, assign: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Per concept j (k, float64), the ROC AUC of concept unit j's activation read in its direction (``signs``;
    without the bias: the inputs it keeps, ``assign`` in {0, j}, summed from ``V``) for concept j's images
    (``labels == j``) against every other image; NaN where either side is empty."""
    k = len(signs)
    act = V.double() @ concept_masks(assign.to(V.device), k) * signs.to(V.device, torch.float64)  # N x k
    return torch.stack([auc_rows(act[:, j][None], labels == j + 1)[0] for j in range(k)])


def objective(V: torch.Tensor, labels: torch.Tensor, assign: torch.Tensor, signs: torch.Tensor) -> float:
    """The mean over the concepts of the oriented concept unit's AUC (concept j's images against all others)."""
    return float(unit_aucs(V, labels, assign, signs).mean())


def holdout_mask(labels: torch.Tensor, share: float = 0.25, seed: int = 0) -> torch.Tensor:
    """Which images (N, bool) the stopping rule holds out: ``share`` of each label value's images, drawn with
    ``seed`` (at least one of a value with two or more images, none of a value with one)."""
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for v in labels.unique().tolist():
        idx = (labels == v).nonzero().flatten()
        n = min(max(1, round(share * len(idx))), len(idx) - 1)
        held[idx[torch.randperm(len(idx), generator=g)[:n]]] = True
    return held


@dataclass
class SearchResult:
    """The searched ``assign`` (C_in, int64 in 0..k) and how it got there: the ``moves`` made ((input, from, to)
    each), the fitting images' objective after each (``fit``: the start first) and the held-out images'
    (``held``), and ``best``: how many of the moves the returned assignment keeps."""

    assign: torch.Tensor
    moves: list[tuple[int, int, int]] = field(default_factory=list)
    fit: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    best: int = 0

    def summary(self, start: dict, held: torch.Tensor) -> dict:
        """How the search went, as records and layer.json keep it: the ``start`` sets (a sweep row's sources), the
        moves kept and tried, the objective at the start and at the kept moves on the fitting and the ``held``-out
        images, and how many of each there were."""
        return {"start": start, "moves": self.best, "moves_tried": len(self.moves),
                "fit_objective": [self.fit[0], self.fit[self.best]], "held_objective": [self.held[0], self.held[self.best]],
                "images": {"fit": int((~held).sum()), "held": int(held.sum())}}


def search_assignment(V: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, signs: torch.Tensor | None = None,
                      held: torch.Tensor | None = None, budget: int = 200, patience: int = 10,
                      screen: int | None = None) -> SearchResult:
    """Search the index sets of one unit from ``start`` (module docstring).

    ``V``: N x C_in input contributions; ``labels``: N (0 other, j concept j); ``start``: C_in (0..k); ``signs``:
    k orientations (default +1); ``held``: N bool, the images of the stopping rule (default
    :func:`holdout_mask`); ``screen``: score at most this many inputs per concept and direction first (None: all).
    Runs on ``V``'s device.
    """
    k = int(labels.max()) if len(labels) else 0
    k = max(k, int(start.max()) if len(start) else 0, len(signs) if signs is not None else 0)
    if k < 2:
        raise ValueError("a split needs at least two concepts")
    dev = V.device
    signs = torch.ones(k, dtype=torch.float64, device=dev) if signs is None else signs.to(dev, torch.float64)
    labels = labels.to(dev)
    held = (holdout_mask(labels.cpu()) if held is None else held).to(dev)
    Vf, Vh, lf, lh = V[~held].double(), V[held].double(), labels[~held], labels[held]
    assign = start.to(dev).clone()
    out = SearchResult(assign.cpu().clone(), fit=[objective(Vf, lf, assign, signs)],
                       held=[objective(Vh, lh, assign, signs)])
    if any(not bool((lab == j).any()) for lab in (lf, lh) for j in range(1, k + 1)):
        return out  # a concept without images on either side: nothing to measure a move by
    inside = [lf == j for j in range(1, k + 1)]
    # how well each input separates each concept on average (the screen's order): k x C_in
    spread = Vf.std(0) + torch.finfo(torch.float64).tiny
    separation = torch.stack([signs[j] * (Vf[inside[j]].mean(0) - Vf[~inside[j]].mean(0)) / spread for j in range(k)])
    # d[u, t, j]: how concept unit j's activation changes (-1, 0, +1 times V[:, k']) when an input moves u -> t
    keeps = concept_masks(torch.arange(k + 1, device=dev), k)  # (k+1) x k: whether set u's inputs are in D_j
    d = keeps[None, :, :] - keeps[:, None, :]
    since = 0
    for _ in range(budget):
        kept = concept_masks(assign, k)  # C_in x k
        act = Vf @ kept  # N_fit x k
        now = torch.stack([auc_rows((signs[j] * act[:, j])[None], inside[j])[0] for j in range(k)])  # k
        score = _move_scores(Vf, act, kept, now, inside, signs, separation, d[assign], screen)
        if screen is not None and not float(score.max()) > out.fit[-1] + EPS:
            score = _move_scores(Vf, act, kept, now, inside, signs, separation, d[assign], None)
        flat = int(score.argmax())
        i, t = divmod(flat, k + 1)
        if not float(score[i, t]) > out.fit[-1] + EPS:
            break
        out.moves.append((i, int(assign[i]), t))
        assign[i] = t
        out.fit.append(float(score[i, t]))
        out.held.append(objective(Vh, lh, assign, signs))
        if out.held[-1] > out.held[out.best] + EPS:
            since, out.best, out.assign = 0, len(out.moves), assign.cpu().clone()
        else:
            since += 1
            if since >= patience:
                break
    return out


def _move_scores(Vf: torch.Tensor, act: torch.Tensor, kept: torch.Tensor, now: torch.Tensor, inside: list,
                 signs: torch.Tensor, separation: torch.Tensor, du: torch.Tensor, screen: int | None) -> torch.Tensor:
    """The objective after every move (C_in x (k+1); -inf for staying and for the moves not scored). ``du``
    (C_in x (k+1) x k): how each concept unit changes for each (input, target). Per concept j and direction
    (add an input D_j lacks, remove one it keeps), the AUC of ``act_j +- V[:, k']`` for those inputs, or, with
    ``screen``, for the ``screen`` of them that ``separation`` ranks first in that direction."""
    C_in, k = kept.shape
    table = torch.full((k, 2, C_in), float("-inf"), dtype=torch.float64, device=Vf.device)
    for j in range(k):
        for col, s in ((0, 1.0), (1, -1.0)):
            able = (kept[:, j] == 0) if s > 0 else (kept[:, j] == 1)
            rows = able.nonzero().flatten()
            if screen is not None and len(rows) > screen:
                rows = rows[(s * separation[j, rows]).topk(screen).indices]
            if len(rows):
                table[j, col, rows] = auc_rows(signs[j] * (act[:, j][None] + s * Vf[:, rows].T), inside[j])
    after = torch.where(du > 0, table[:, 0].T[:, None, :], torch.where(du < 0, table[:, 1].T[:, None, :],
                                                                        now[None, None, :]))
    score = after.mean(-1)  # C_in x (k+1); a move with an unscored change is -inf
    stay = du.abs().sum(-1) == 0
    return score.masked_fill(stay, float("-inf"))


def search_from_sweep(sw: Sweep, V: torch.Tensor, labels: torch.Tensor, signs: torch.Tensor, held: torch.Tensor,
                      budget: int = 200, patience: int = 10, screen: int | None = None
                      ) -> tuple[torch.Tensor, int, SearchResult]:
    """The searched rule from a sweep (on ``V``'s device): each rho's objective on the fitting images (``objs``,
    R; a concept without fitting images makes every rho alike: 0), the first best rho's index, and the search
    from its sets (:func:`search_assignment`)."""
    first, inverse = sw.distinct()
    fit = ~held.to(V.device)
    objs = torch.tensor([objective(V[fit], labels[fit], sw.assign[int(i)], signs) for i in first],
                        dtype=torch.float64)[inverse]
    objs = torch.nan_to_num(objs, nan=0.0)
    best = best_index(objs)
    return objs, best, search_assignment(V, labels, sw.assign[best], signs, held, budget, patience, screen)
