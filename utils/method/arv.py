"""Average relevance vectors (ARVs) in closed form (the paper's stage 2): the arithmetic (a store's ARVs:
``utils.store.arvs``).

For a candidate channel ``c`` and the images of a class (or a concept's classes),

    ARV[k] = mean over the images of  sum_hw x[k, h, w] * dS/dx[k, h, w],   S = sum over (h', w') of L(x)[c]

``S`` is linear in ``x``, so ``dS/dx[k, h, w] = sum_ij W[c, k, i, j] * M[ij, h, w]`` with ``M`` the tap maps
of the layer's geometry (:func:`tap_maps`: how often input position (h, w) meets kernel tap (i, j)). So
every ARV follows exactly from the *tap sums* ``T[t, k, ij] = sum_hw x[k, h, w] * M[ij, h, w]`` (what tap
(i, j) of input channel k sees, summed over output positions and over the images of class t), which
stage 1 accumulates: ``ARV(c, t)[k] = sum_ij W[c, k, ij] * T[t, k, ij] / n_t``. Shapes: ``C_in`` inputs,
``T = kh*kw`` taps, ``H x W`` input map; ``K x C_in x kh x kw`` per store, independent of the image size.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


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


def batch_tap_sums(x: torch.Tensor, maps: torch.Tensor, block: int = 16) -> torch.Tensor:
    """What each kernel tap sees, summed over the output positions: ``T[b, k, ij]`` (B x C_in x T, float64)
    for layer inputs ``x`` (B x C_in x H x W) and the layer's ``tap_maps`` (T x H x W, on ``x``'s device).

    ``T[b, k, ij] = sum over (h', w') of xp[b, k, h'*s + i*d, w'*s + j*d]`` (``xp`` padded as the layer pads),
    computed as ``sum_hw x * M[ij]`` in float64, ``block`` images at a time (a bounded temporary).
    """
    out = torch.empty(x.shape[0], x.shape[1], maps.shape[0], dtype=torch.float64, device=x.device)
    m = maps.flatten(1).T.to(device=x.device, dtype=torch.float64)  # HW x T
    for s in range(0, len(x), block):
        out[s:s + block] = x[s:s + block].double().flatten(2) @ m
    return out


def tap_view(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The layer input as each kernel tap sees it at each output position: ``U[b, k, ij, q] = xp[b, k, q_h * s +
    i * d, q_w * s + j * d]`` (B x C_in x kh*kw x Q, Q = H' * W', ``xp`` padded as the layer pads) for inputs ``x``
    (B x C_in x H x W), so that ``conv(x)[b, c, q] = sum_k,ij W[c, k, ij] * U[b, k, ij, q]`` (without the bias).
    A one-channel probe with the layer's geometry computes it, so PyTorch's own padding rules hold."""
    kh, kw = conv.kernel_size
    B, C = x.shape[:2]
    if (kh, kw) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.padding in ((0, 0), "valid"):
        return x.flatten(2)[:, :, None]
    probe = nn.Conv2d(1, kh * kw, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      bias=False, padding_mode=conv.padding_mode).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        probe.weight.zero_()
        probe.weight.view(kh * kw, kh * kw)[torch.arange(kh * kw), torch.arange(kh * kw)] = 1.0
        out = probe(x.reshape(B * C, 1, *x.shape[2:]))
    return out.reshape(B, C, kh * kw, -1)


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


def conv_from_meta(meta: dict, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor | None = None) -> nn.Conv2d:
    """Rebuild the layer ``L`` (float64) from a store's ``meta["conv"]`` geometry and its weight (C x C_in x kh x kw)."""
    g = meta["conv"]
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float64)
    pad = g["padding"] if isinstance(g["padding"], str) else tuple(g["padding"])
    conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(g["kernel_size"]), stride=tuple(g["stride"]), padding=pad,
                     dilation=tuple(g["dilation"]), bias=bool(g.get("bias")), padding_mode=g["padding_mode"],
                     device="meta")
    conv.weight = nn.Parameter(w, requires_grad=False)
    if conv.bias is not None:
        b = torch.zeros(w.shape[0]) if bias is None else torch.as_tensor(np.asarray(bias))
        conv.bias = nn.Parameter(b.double(), requires_grad=False)
    return conv
