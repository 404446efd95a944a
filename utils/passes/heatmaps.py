"""Where in the image a unit's activation comes from: gradient x input through that unit alone.

For a filter ``w`` at the layer (a concept unit D_j, the original unit, any sub-unit) and an image ``x`` as the
network takes it, the unit's activation is ``act(x) = sum over the positions that count of (w * layer_input(x)) +
bias``. Its **conditional heatmap** is ``sum over colour channels of x * d act / d x``: the attribution of that one
unit's activation to the pixels, through the network up to the layer and through the unit's own filter only (no
other unit of the layer, nothing after it). For a concept unit that is the path of its concept: where the
concept's evidence in this image comes from.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.hooks import layer_input
from ..model.units import Unit, as_unit


def conditional_heatmaps(model: nn.Module, unit: Unit | nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                         images: torch.Tensor) -> torch.Tensor:
    """The heatmaps (B x H x W, float32, on ``images``' device) of the filter ``weight`` (C_in x kh x kw; its
    ``bias`` or None) at ``unit``'s place in ``model``, for ``images`` (B x 3 x H x W, as the network takes them)."""
    unit = as_unit(unit)
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        xl = unit.counted(layer_input(model, unit, x, grad=True))
        act = unit.apply(xl, weight[None].to(xl), None if bias is None else bias.reshape(1).to(xl)).sum()
        (g,) = torch.autograd.grad(act, x)
    return (g * x).detach().float().sum(1)
