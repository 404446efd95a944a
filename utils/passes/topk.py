"""Top activating images of sub-channels (one streaming pass); what it finds is a :class:`utils.method.selectivity.TopK`.

A sub-unit's activation on an image is the sum of its outputs over the positions that count, before
BatchNorm and ReLU (stage 4's activation): ``sum_hw conv(x, filter) + bias``; where it looks is the
maximum of its map over the image's grid (``utils.model.units.Unit.grid``: for a ViT the patch tokens). All sub-channels of any number of splits
of one layer are one :class:`utils.method.split.FilterBank`, so the top-k search is a single streaming pass
over the images, run only up to ``L``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..data.images import ImageList, Preprocess
from .image_pass import plain_batches
from ..model.hooks import layer_input
from ..method.selectivity import EveryImage, TopK
from ..method.split import FilterBank
from ..model.units import Unit, as_unit


# ------------------------------------------------------------------ streaming top-k


def merge_topk(state: tuple[torch.Tensor, ...] | None, values: torch.Tensor, *extra: torch.Tensor,
               k: int) -> tuple[torch.Tensor, ...]:
    """Running top-k: keep the ``k`` best of (kept, new) candidates along dim 1 (S x n each).

    Ties go to the candidate seen first (kept ones, then the new ones in order), so the result equals
    a stable sort of all activations in dataset order.
    """
    if state is not None:
        values = torch.cat([state[0], values], 1)
        extra = tuple(torch.cat([a, b], 1) for a, b in zip(state[1:], extra))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return (values.gather(1, order),) + tuple(e.gather(1, order) for e in extra)


class TopKSearch:
    """The running top-``k`` of every sub-channel of ``bank`` (on the layer's device), fed batch by batch
    with the layer input; :meth:`result` gathers every rank's candidates and merges them in rank order, so
    that the result equals a single-process search (ties go to the image seen first in dataset order)."""

    def __init__(self, bank: FilterBank, k: int, unit: Unit | nn.Module, keep_all: bool = False):
        self.unit = as_unit(unit)
        self.bank, self.k = bank.to(self.unit.weight.device), k
        self.state: tuple[torch.Tensor, ...] | None = None
        self.out_hw = (0, 0)
        self.rows: list[torch.Tensor] | None = [] if keep_all else None  # per batch: index, label, activations

    def add(self, x: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: its layer input ``x`` as the layer sees it, dataset ``index`` and ``labels`` (B, host)."""
        unit = self.unit
        grid = self.bank.maps(unit, unit.grid(x)).float()  # B x S x H' x W'
        maps = self.bank.maps(unit, unit.counted(x)).float() if unit.tokens(x) else grid  # the positions that count
        self.out_hw = tuple(grid.shape[-2:])
        act = maps.sum((2, 3)).T.cpu()  # S x B
        pos = grid.flatten(2).argmax(-1).T.cpu()  # S x B, flat position of the maximum
        if self.rows is not None:
            self.rows.append(torch.cat([index[:, None].double(), labels[:, None].double(), act.T.double()], 1))
        S, n = act.shape
        self.state = merge_topk(self.state, act, index[None].expand(S, n).long(), pos, labels[None].expand(S, n).long(),
                                k=self.k)

    def result(self, runner) -> TopK:
        """The top-k over every rank's images (an empty rank sends padding that sorts last)."""
        S, k = len(self.bank.keys), self.k
        pad = (torch.full((S, k), -math.inf), torch.full((S, k), -1, dtype=torch.long),
               torch.zeros(S, k, dtype=torch.long), torch.full((S, k), -1, dtype=torch.long))
        mine = pad if self.state is None else merge_topk(self.state, *pad, k=k)  # padded to k columns
        rows = runner.gather_rows(torch.cat([t.double() for t in mine], 1).reshape(1, -1))  # world x 4Sk
        state = None
        for row in rows:  # rank order = dataset order of the batches
            values, *extra = row.view(S, 4 * k).split(k, 1)
            state = merge_topk(state, values.float(), *(e.long() for e in extra), k=k)
        hw = [int(runner.slowest(float(v))) for v in self.out_hw]  # a rank without images knows no H' x W'
        seen = state[1][0] >= 0  # fewer than k images in all: the padding columns go
        values, indices, flat, labels = (t[:, seen] for t in state)
        return TopK(self.bank.keys, values, indices, torch.stack([flat // hw[1], flat % hw[1]], -1), labels,
                    tuple(hw), self._every(runner))

    def _every(self, runner) -> EveryImage | None:
        """Every rank's kept rows, in rank order (= dataset order of the batches)."""
        if self.rows is None:
            return None
        mine = torch.cat(self.rows) if self.rows else torch.zeros(0, 2 + len(self.bank.keys), dtype=torch.float64)
        rows = runner.gather_rows(mine).numpy()
        return EveryImage(rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2:])


def stream_topk(runner, model: nn.Module, conv: Unit | nn.Module, bank: FilterBank, images: ImageList, k: int,
                preprocess: Preprocess | None = None, indices: list[int] | None = None, desc: str = "top-k",
                keep_all: bool = False) -> TopK:
    """One pass over ``images`` (or ``indices`` of them) run up to ``conv``: the top-``k`` images of every
    sub-channel of ``bank`` (``keep_all``: and every image's activation of each). ``model`` and ``conv`` are on
    ``runner``'s device."""
    search = TopKSearch(bank, k, conv, keep_all)
    batches = plain_batches(range(len(images)) if indices is None else indices, runner.batch_size)

    def step(batches):
        for b in batches:
            search.add(layer_input(model, conv, b.x), b.index, b.targets)

    runner.image_pass(images, batches, preprocess, desc).run(step)
    return search.result(runner)
