"""Channel relevance (stage 1) and average relevance vectors in closed form (stage 2, step 5).

Shapes: ``B`` images, ``C_in`` input channels of the layer ``L``, ``C`` output channels,
``H x W`` the input map, ``H' x W'`` the output map, ``K`` classes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _Capture:
    """What a hooked forward pass saw at the layer: its input ``x`` and output ``a``."""

    x: torch.Tensor | None = None
    a: torch.Tensor | None = None


class StopForward(Exception):
    """Raised by a truncating hook once the layer's input is captured."""


@contextmanager
def capture_layer(layer: nn.Module, grad: bool = False) -> Iterator[_Capture]:
    """Hook ``layer`` for the duration of the block: record its input ``x`` and output ``a``.

    ``grad=True``: the output becomes a fresh leaf that requires grad, so autograd builds a graph
    only from the layer onward (nothing before it requires grad) and ``a`` receives gradients.
    """
    cap = _Capture()

    def hook(_module, inputs, output):
        cap.x = inputs[0].detach()
        if grad:
            cap.a = output.detach().requires_grad_(True)
            return cap.a.clone()  # later in-place ops (ReLU(inplace)) must not touch the leaf
        cap.a = output.detach()
        return None

    handle = layer.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def layer_input(model: nn.Module, layer: nn.Module, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Run ``model`` only up to ``layer`` and return the layer's input ``x`` (B x C_in x H x W).

    The forward pass stops before the layer computes anything. ``grad=True`` keeps the autograd graph
    back to ``images`` (feature visualisation); otherwise no graph is built.
    """
    seen: list[torch.Tensor] = []

    def hook(_module, inputs):
        seen.append(inputs[0])
        raise StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            model(images)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the forward pass never reached the layer of interest")
    return seen[0]


def relevance_batch(model: nn.Module, layer: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Stage 1 for one batch.

    Returns ``R`` (B x C, float32): ``sum_hw a * d z_label / d a`` at the layer's output, signed;
    the predictions (B, argmax of the logits); and the layer input ``x`` (B x C_in x H x W).
    Back-propagates only from the label logits to the layer output.
    """
    with torch.enable_grad(), capture_layer(layer, grad=True) as cap:
        logits = model(images)
        picked = logits.gather(1, labels[:, None]).sum()
        (g,) = torch.autograd.grad(picked, cap.a)
    a = cap.a.detach()
    R = (a.float() * g.float()).sum(dim=(2, 3))
    return R, logits.detach().argmax(1), cap.x


def relevance_batch_positive(model: nn.Module, layer: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Stage 4's attribution: ``P[c] = sum_hw max(a * d z_label / d a, 0)`` (B x C), plus ``a`` and ``x``."""
    with torch.enable_grad(), capture_layer(layer, grad=True) as cap:
        logits = model(images)
        (g,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), cap.a)
    a = cap.a.detach()
    P = (a.float() * g.float()).clamp_min(0).sum(dim=(2, 3))
    return P, a, cap.x


# ---------------------------------------------------------------- closed-form ARV


def tap_maps(conv: nn.Conv2d, in_hw: tuple[int, int]) -> torch.Tensor:
    """``M`` (kh*kw x H x W, float64): how often input position (h, w) meets kernel tap (i, j).

    For ``S = sum over output positions of conv(x)[c]`` the gradient is
    ``dS/dx[k, h, w] = sum_ij W[c, k, i, j] * M[ij, h, w]`` for any stride, padding (mode
    included) and dilation; the bias does not enter. Computed by autograd on a one-channel
    copy of the convolution's geometry, so it follows PyTorch's own padding rules.
    """
    kh, kw = conv.kernel_size
    probe = nn.Conv2d(1, kh * kw, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        probe.weight.zero_()
        probe.weight.view(kh * kw, kh * kw)[torch.arange(kh * kw), torch.arange(kh * kw)] = 1.0
    x = torch.zeros(kh * kw, 1, *in_hw, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = probe(x)  # (kh*kw, kh*kw, H', W'): batch element b keeps only tap b
        (g,) = torch.autograd.grad(out[torch.arange(kh * kw), torch.arange(kh * kw)].sum(), x)
    return g[:, 0]


def tap_profile(mean_input: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``Q[..., k, ij] = sum_hw mean_input[..., k, h, w] * M[ij, h, w]`` (... x C_in x kh*kw, float64)."""
    return torch.einsum("...khw,thw->...kt", mean_input.double(), maps.double())


def arv_from_profile(weight: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """ARVs from a tap profile: ``ARV[..., k] = sum_ij W[k, i, j] * Q[..., k, ij]``.

    ``weight``: the filter(s) of channel c (C_in x kh x kw, or n x C_in x kh x kw);
    ``profile``: ``tap_profile`` of a class's mean input (C_in x kh*kw). Float64.
    """
    w = weight.double().flatten(-2)
    return (w * profile).sum(-1)


def arv(conv: nn.Conv2d | torch.Tensor, channel: int, mean_input: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """ARV(c, t) (C_in, float64) from the mean input map of class t (C_in x H x W) and ``tap_maps``."""
    weight = conv.weight if isinstance(conv, nn.Conv2d) else conv
    return arv_from_profile(weight[channel], tap_profile(mean_input, maps))


def arv_autograd(conv: nn.Conv2d, channel: int, inputs: torch.Tensor) -> torch.Tensor:
    """The definition, slowly: mean over images of ``x * dS/dx`` summed over space (C_in, float64)."""
    x = inputs.double().detach().requires_grad_(True)
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else None
    with torch.enable_grad():
        if conv.padding_mode != "zeros":
            out = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), w, b,
                           conv.stride, 0, conv.dilation)
        else:
            out = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation)
        S = out[:, channel].sum()
        (g,) = torch.autograd.grad(S, x)
    return (x * g).sum(dim=(2, 3)).mean(0).detach()
