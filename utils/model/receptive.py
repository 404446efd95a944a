"""Where an output position of the layer of interest looks in the input image, measured by autograd for
any architecture (a token of a transformer: its patch), and the crops of the top-k images around their maxima."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hooks import layer_input
from .units import Unit, as_unit


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


def patch_field(in_hw: tuple[int, int], grid: int, whole: bool, min_size: int = 1) -> ReceptiveField:
    """A transformer's tokens: token (i, j) of the ``grid`` x ``grid`` patches is its patch; ``whole``: the units
    count at the class token alone, which looks at the whole image, so the crop is the whole image."""
    stride = (in_hw[0] / grid, in_hw[1] / grid)
    size = max(in_hw) if whole else max(int(round(max(stride))), min_size)
    return ReceptiveField(tuple(in_hw), (grid, grid), stride, (stride[0] / 2 - 0.5, stride[1] / 2 - 0.5), size,
                          max(in_hw) if whole else int(round(max(stride))))


def receptive_field(model: nn.Module, conv: Unit | nn.Module, in_hw: tuple[int, int] = (224, 224), mass: float = 0.9,
                    n: int = 2, seed: int = 0, min_size: int = 1) -> ReceptiveField:
    """Measure the receptive field of the layer's output positions (its grid, ``Unit.grid``) by autograd, for
    any architecture; a token sequence's grid is its patches (:func:`patch_field`).

    The gradient of the output at the central position (all channels, ``n`` noise images) with respect
    to the input image gives where that position looks and how far; the stride is the size ratio.
    """
    unit = as_unit(conv)
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    x = torch.randn(n, 3, *in_hw, generator=g).to(dev).requires_grad_(True)
    with torch.enable_grad():
        xin = layer_input(model, unit, x, grad=True)
        if unit.tokens(xin):
            return patch_field(in_hw, unit.grid(xin).shape[-1], unit.prefix_only, min_size)
        out = unit.apply(unit.grid(xin), unit.weight, unit.bias)
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


