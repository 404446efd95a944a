"""Top activating images of sub-channels (one streaming pass) and the purity score.

A sub-channel's activation on an image is the spatial sum of its output map, before BatchNorm and ReLU
(stage 4's activation): ``sum_hw conv(x, filter) + bias``. All sub-channels of any number of splits
of one layer are one :class:`utils.split.FilterBank`, so the top-k search is a single streaming pass
over the images, run only up to ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .data import ImageList, check_batch
from .device import to_device
from .relevance import layer_input
from .split import FilterBank


# ------------------------------------------------------------------ streaming top-k


@dataclass
class TopK:
    """Per sub-channel ``s``: the ``k`` largest activations, best first, over the images searched.

    ``values`` S x k (float32), ``indices`` S x k (dataset index = row of the stage-1 store for train/),
    ``positions`` S x k x 2 (row, column of the maximum of the output map, in H' x W'),
    ``labels`` S x k; ``out_hw`` = (H', W').
    """

    keys: list[tuple[int, str]]
    values: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    out_hw: tuple[int, int]

    def get(self, channel: int, name: str) -> dict:
        """``values``, ``indices``, ``positions``, ``labels`` of one sub-channel (k each)."""
        s = self.keys.index((int(channel), name))
        return {"values": self.values[s], "indices": self.indices[s], "positions": self.positions[s],
                "labels": self.labels[s]}


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


@torch.no_grad()
def stream_topk(model: nn.Module, conv: nn.Conv2d, bank: FilterBank, loader, k: int,
                images: ImageList | None = None, device: torch.device | str = "cpu", progress: bool = True) -> TopK:
    """One pass over ``loader`` (yielding image, label, index): the top-``k`` images of every sub-channel."""
    bank = bank.to(device)
    state, out_hw = None, (0, 0)
    for x, y, idx in tqdm(loader, desc="top-k", unit="batch", disable=not progress, leave=False):
        if images is not None:
            check_batch(images, y, idx)
        inp = layer_input(model, conv, to_device(x, torch.device(device), images=True))
        maps = bank.maps(conv, inp).float()  # B x S x H' x W'
        out_hw = tuple(maps.shape[-2:])
        act = maps.sum((2, 3)).T.cpu()  # S x B
        pos = maps.flatten(2).argmax(-1).T.cpu()  # S x B, flat position of the maximum
        n = act.shape[1]
        state = merge_topk(state, act, idx[None].expand(len(bank.keys), n).long(), pos,
                           y[None].expand(len(bank.keys), n).long(), k=k)
    if state is None:
        raise ValueError("no images to search")
    values, indices, flat, labels = state
    positions = torch.stack([flat // out_hw[1], flat % out_hw[1]], -1)
    return TopK(bank.keys, values, indices, positions, labels, out_hw)


# ------------------------------------------------------------------ purity


def purity(topk_labels, concepts: list[list[int]]) -> dict:
    """Fractions of the top-k images (their labels) in each concept's classes and in other classes:
    ``{"concept1": f1, ..., "conceptk": fk, "other": f, "k": number of images}``."""
    labels = [int(t) for t in (topk_labels.tolist() if hasattr(topk_labels, "tolist") else topk_labels)]
    n = len(labels)
    counts = [sum(t in set(cs) for t in labels) for cs in concepts]
    out = {f"concept{j}": (c / n if n else 0.0) for j, c in enumerate(counts, 1)}
    return {**out, "other": (n - sum(counts)) / n if n else 0.0, "k": n}
