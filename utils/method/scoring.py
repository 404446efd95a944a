"""Stage 3's score of a rho, from the concepts' training images (pure functions on tensors).

With ``pos(y) = sum_hw max(y, 0)`` of one sub-channel's output map and ``k`` concepts:

    score(rho) = sum over j of  mean over concept-j images of  pos(D_j) / (sum over l != j of pos(D_l) + 1e-5)

(for k = 2: mean_1 pos(D1)/(pos(D2)+eps) + mean_2 pos(D2)/(pos(D1)+eps)). Rhos with the same index sets
have the same filters, so only the ``U`` distinct splits of a sweep are computed; every image's layer
input ``x`` serves all of them (and, for a whole layer, every channel) in one convolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .split import Sweep, oriented

EPS = 1e-5  # the score's denominator offset


def score_filters(sw: Sweep, signs=None) -> torch.Tensor:
    """The distinct splits' concept filters as one bank ((k*U) x C_in x kh x kw): all D_1, then all D_2, ...;
    ``signs`` (k, default all +1): concept j's filters times s_j, so that its positive mass is that of the unit
    read in its concept's direction."""
    first, _ = sw.distinct()
    D = sw.D[first].transpose(0, 1)  # k x U x ...
    return (D if signs is None else oriented(D, signs)).reshape(-1, *sw.D.shape[2:])


def score_bias(bias: torch.Tensor | None, sw: Sweep, signs=None) -> torch.Tensor | None:
    """Unit ``c``'s bias (a scalar tensor, or None) for every row of :func:`score_filters`, times the row's sign."""
    if bias is None:
        return None
    return oriented(bias.expand(sw.k), signs or [1] * sw.k).repeat_interleave(len(sw.distinct()[0]))


def positive_mass(y: torch.Tensor) -> torch.Tensor:
    """``pos(y) = sum_hw max(y, 0)`` per image and channel: (B x n x H' x W') -> (B x n), float64."""
    return y.clamp_min(0).double().sum(dim=(2, 3))


def ratio_sums(pos: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """Sums over a batch of the score's ratios (k x U, float64).

    ``pos``: B x k x U positive masses (concept filter j of distinct split u); ``concept``: (B,) in 1..k
    (0: the image counts for no concept). Row j-1: sum over concept-j images of pos(D_j) / (others + eps).
    """
    k = pos.shape[1]
    rows = []
    for j in range(k):
        others = pos[:, [l for l in range(k) if l != j]].sum(1)
        inside = (concept == j + 1).to(pos)[:, None]
        rows.append((inside * pos[:, j] / (others + EPS)).sum(0))
    return torch.stack(rows)


def batch_ratio_sums(unit, x: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor | None, k: int,
                     concept: torch.Tensor) -> torch.Tensor:
    """:func:`ratio_sums` of one batch from its layer input ``x`` and a :func:`score_filters` bank, applied by the
    layer's geometry (``unit.apply``: a :class:`utils.model.units.Unit`)."""
    pos = positive_mass(unit.apply(x, bank, bias))
    return ratio_sums(pos.view(len(x), k, -1), concept)


def scores_from_sums(sw: Sweep, parts: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """score per rho (R,, CPU float64) from per-batch ratio sums (k x U each, added in list order from
    zero) and the images per concept."""
    _, inverse = sw.distinct()
    if not parts or min(counts) == 0:
        raise UserError("a concept has no images to score on")
    sums = torch.zeros_like(parts[0])
    for p in parts:
        sums += p.to(sums.device)
    score = sums[0] / counts[0]
    for j in range(1, len(counts)):
        score = score + sums[j] / counts[j]
    return score.cpu()[inverse]


def best_index(scores: torch.Tensor) -> int:
    """Index of the first maximal score (sweep order decides ties); scores that are not numbers (NaN: an image
    or activation that is not finite) are a UserError, never an arbitrary choice."""
    if not len(scores) or bool(torch.isnan(scores).any()):
        raise UserError("a split's scores are not numbers (NaN): an image of its concepts holds NaN or infinite "
                        "values, or the model overflows on one")
    return int((scores == scores.max()).nonzero()[0, 0])


@dataclass(frozen=True)
class Scored:
    """One channel's scored sweep: its ``concepts``, ``sweep``, ``scores`` (R,), images scored per concept
    (``counts``) and the index of its best rho (``best``, the first maximal score); with orientation, each
    concept's ``signs``; for a searched split, ``search`` (the sweep's best row holds the searched sets)."""

    channel: int
    concepts: list[list[int]]
    sweep: Sweep
    scores: torch.Tensor
    counts: list[int]
    best: int
    signs: list[int] | None = None  # the concepts' orientations (None: not measured, read as +1)
    search: dict | None = None  # a searched split: how the search went (utils.stages.layer)

    @property
    def best_rho(self) -> float:
        return round(float(self.sweep.rhos[self.best]), 2)

    @property
    def orientation(self) -> list[int]:
        """Each concept's orientation (+1 where none was measured)."""
        return list(self.signs) if self.signs else [1] * len(self.concepts)

    def split(self):
        """The :class:`utils.method.split.Split` of the best rho."""
        return self.sweep.split(self.channel, self.best)
