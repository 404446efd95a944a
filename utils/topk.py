"""Top activating images of sub-channels, their receptive-field crops, and the purity score.

A *sub-channel* is one filter applied to the input ``x`` of the layer of interest ``L``: the original
channel ``W[c]`` (its output is ``a[c]``), or ``D1``, ``D2``, ``Res`` of a split. Its activation on an
image is the spatial sum of its output map, before BatchNorm and ReLU (stage 4's activation):
``sum_hw conv(x, filter) + bias``. All sub-channels of any number of splits of one layer go into one
filter bank, so the top-k search is a single streaming pass over the images, run only up to ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .data import ImageList, check_batch
from .relevance import layer_input
from .surgery import Split, conv_with_filters

SUBCHANNELS = ("original", "D1", "D2", "Res")
LABELS = {"original": "Original", "D1": "Disentangled 1", "D2": "Disentangled 2", "Res": "Residual"}


# ------------------------------------------------------------------ filter bank and truncated forward


@dataclass
class FilterBank:
    """Filters of the sub-channels to search: ``keys[s] = (channel, name)``; ``weight`` S x C_in x kh x kw."""

    keys: list[tuple[int, str]]
    weight: torch.Tensor
    bias: torch.Tensor | None  # (S,) or None

    def index(self, channel: int, name: str) -> int:
        return self.keys.index((int(channel), name))


def filter_bank(conv: nn.Conv2d, splits: list[Split], names: tuple[str, ...] = ("original", "D1", "D2")) -> FilterBank:
    """Stack the ``names`` sub-channels of every split of ``conv`` into one filter bank."""
    keys, ws, bs = [], [], []
    for s in splits:
        for n in names:
            w = conv.weight[s.channel] if n == "original" else getattr(s, n)
            keys.append((int(s.channel), n))
            ws.append(w.detach().to(conv.weight))
            if conv.bias is not None:
                bs.append(conv.bias[s.channel].detach())
    return FilterBank(keys, torch.stack(ws), torch.stack(bs) if bs else None)


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
    w = bank.weight.to(device)
    b = bank.bias.to(device) if bank.bias is not None else None
    state, out_hw = None, (0, 0)
    for x, y, idx in tqdm(loader, desc="top-k", unit="batch", disable=not progress, leave=False):
        if images is not None:
            check_batch(images, y, idx)
        inp = layer_input(model, conv, x.to(device, non_blocking=True))
        maps = conv_with_filters(conv, inp, w, b).float()  # B x S x H' x W'
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


@torch.no_grad()
def subchannel_maps(model: nn.Module, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                    images: torch.Tensor) -> torch.Tensor:
    """Output maps (B x S x H' x W') of the filters ``weight`` (S x C_in x kh x kw) on normalised images."""
    return conv_with_filters(conv, layer_input(model, conv, images, grad=True), weight, bias).float()


# ------------------------------------------------------------------ receptive field and crops


@dataclass
class ReceptiveField:
    """Where an output position of the layer looks in the input image (pixels of the H x W input).

    Output position (i, j) is centred at ``(offset[0] + i*stride[0], offset[1] + j*stride[1])``;
    ``size`` is the side of the square holding ``mass`` of the input gradient (the effective field),
    ``full`` the side of the box where that gradient is nonzero at all (the theoretical field).
    """

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    stride: tuple[float, float]
    offset: tuple[float, float]
    size: int
    full: int

    def center(self, i: int, j: int) -> tuple[float, float]:
        return self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1]

    def box(self, i: int, j: int, size: int | None = None) -> tuple[int, int, int, int]:
        """Square crop (top, left, bottom, right) of side ``size`` (default: the effective field) around
        output position (i, j), shifted to lie inside the image."""
        side = min(int(size or self.size), *self.in_hw)
        ci, cj = self.center(i, j)
        top = int(round(ci - side / 2))
        left = int(round(cj - side / 2))
        top = min(max(top, 0), self.in_hw[0] - side)
        left = min(max(left, 0), self.in_hw[1] - side)
        return top, left, top + side, left + side


def receptive_field(model: nn.Module, conv: nn.Conv2d, in_hw: tuple[int, int] = (224, 224), mass: float = 0.9,
                    n: int = 2, seed: int = 0, min_size: int = 1) -> ReceptiveField:
    """Measure the receptive field of ``conv``'s output positions by autograd, for any architecture.

    The gradient of the output at the central position (all channels, ``n`` noise images) with respect
    to the input image gives where that position looks and how far; the stride is the size ratio.
    """
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    x = torch.randn(n, 3, *in_hw, generator=g).to(dev).requires_grad_(True)
    with torch.enable_grad():
        out = conv_with_filters(conv, layer_input(model, conv, x, grad=True), conv.weight, conv.bias)
        H, W = out.shape[-2:]
        ci, cj = H // 2, W // 2
        (gx,) = torch.autograd.grad(out[:, :, ci, cj].sum(), x)
    gc = gx.abs().sum((0, 1)).double().cpu()  # H x W: where the central position looks
    if gc.sum() == 0:  # dead at noise: centre the field on the evenly spaced position
        gc = torch.zeros(*in_hw, dtype=torch.float64)
        gc[min(int((ci + 0.5) * in_hw[0] / H), in_hw[0] - 1), min(int((cj + 0.5) * in_hw[1] / W), in_hw[1] - 1)] = 1.0
    rows = torch.arange(in_hw[0], dtype=torch.float64)
    cols = torch.arange(in_hw[1], dtype=torch.float64)
    c0 = (float((gc.sum(1) * rows).sum() / gc.sum()), float((gc.sum(0) * cols).sum() / gc.sum()))
    # The image is covered by H x W positions: the stride is the size ratio (exact for the usual
    # "same"-padded strided convolutions; a centre of mass of a neighbour would be biased by clipping).
    stride = (in_hw[0] / H, in_hw[1] / W)
    offset = (c0[0] - ci * stride[0], c0[1] - cj * stride[1])
    nz = (gc > 0).nonzero()
    full = int(max(nz[:, 0].max() - nz[:, 0].min(), nz[:, 1].max() - nz[:, 1].min()) + 1)
    # smallest centred square holding ``mass`` of the gradient
    total, size = float(gc.sum()), full
    for side in range(1, max(in_hw) + 1):
        t = int(round(c0[0] - side / 2))
        l_ = int(round(c0[1] - side / 2))
        if float(gc[max(t, 0):t + side, max(l_, 0):l_ + side].sum()) >= mass * total:
            size = side
            break
    return ReceptiveField(tuple(in_hw), (int(H), int(W)), stride, offset, max(size, min_size), full)


def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``image`` (3 x H x W) cut to ``box`` = (top, left, bottom, right)."""
    t, l_, b, r = box
    return image[:, t:b, l_:r]


# ------------------------------------------------------------------ purity


def purity(topk_labels, c1: list[int], c2: list[int]) -> dict:
    """Fractions of the top-k images (labels, length k) in concept 1's classes, concept 2's, and others."""
    labels = [int(t) for t in (topk_labels.tolist() if hasattr(topk_labels, "tolist") else topk_labels)]
    n = len(labels)
    n1 = sum(t in set(c1) for t in labels)
    n2 = sum(t in set(c2) for t in labels)
    if n == 0:
        return {"concept1": 0.0, "concept2": 0.0, "other": 0.0, "k": 0}
    return {"concept1": n1 / n, "concept2": n2 / n, "other": (n - n1 - n2) / n, "k": n}
