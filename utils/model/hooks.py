"""Hooks at the layer of interest: its input, unit relevance (stages 1 and 4), other filters at its place.

Shapes: ``B`` images, ``C_in`` inputs of the layer ``L``, ``C`` outputs (channels, or a Linear's neurons),
``H x W`` the input map, ``H' x W'`` the output map (for a Linear: the positions that count, see
``utils.model.units``), ``K`` classes. The layer is a :class:`utils.model.units.Unit` or a plain Conv2d/Linear module.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UserError
from .units import POSITIONS, Unit, as_unit, known_positions, token_slice, tokens_positions


class _Capture:
    """What a hooked forward pass saw at the layer: its input ``x`` and output ``a``."""

    x: torch.Tensor | None = None
    a: torch.Tensor | None = None


class StopForward(Exception):
    """Raised by a truncating hook once the layer's input is captured."""


@contextmanager
def capture_layer(layer: Unit | nn.Module, grad: bool = False) -> Iterator[_Capture]:
    """Hook ``layer`` for the duration of the block: record its input ``x`` and output ``a`` (as the layer
    sees them: a Linear's ``(B, ..., C)``).

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

    handle = as_unit(layer).module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def layer_input(model: nn.Module, layer: Unit | nn.Module, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Run ``model`` only up to ``layer`` and return the layer's input ``x`` as the layer sees it (a Conv2d:
    B x C_in x H x W; a Linear: ``(B, ..., C_in)``, see ``Unit.counted`` and ``Unit.grid``).

    The forward pass stops before the layer computes anything. ``grad=True`` keeps the autograd graph
    back to ``images`` (feature visualisation); otherwise no graph is built.
    """
    seen: list[torch.Tensor] = []

    def hook(_module, inputs):
        seen.append(inputs[0])
        raise StopForward

    handle = as_unit(layer).module.register_forward_pre_hook(hook)
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            model(images)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise UserError("the model's forward pass never runs the layer of interest (a module whose weights are used "
                        "directly, like nn.MultiheadAttention's out_proj); choose another --layer")
    return seen[0]


def relevance_batch(model: nn.Module, layer: Unit | nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    positive: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relevance of every unit of ``layer`` for one batch, back-propagated only from the label logits.

    Returns ``R`` (B x C, float32): ``sum_hw a * d z_label / d a`` over the positions that count at the
    layer's output, signed (stage 1), or with ``positive`` clamped per position before the sum,
    ``sum_hw max(a * d z / d a, 0)`` (stage 4); the predictions (B, argmax of the logits); the layer output
    ``a`` at the positions that count (B x C x H' x W') and the layer input ``x`` as the layer sees it.
    """
    R, logits, a, x = relevance_logits(model, layer, images, labels, positive)
    return R, logits.argmax(1), a, x


class LossScale:
    """Dynamic loss scaling of the backward pass in float16 (``--precision fp16``): gradients below float16's
    smallest value (6e-8) would become zero, so the label logits' gradient starts at ``value`` (a power of two,
    2^15 at first: the largest that float16 holds); a backward pass that overflows (a gradient not finite) is
    redone at half the scale, which then stays (one host synchronisation per batch). Dividing by a power of two
    is exact: where nothing under- or overflows the relevance is bit for bit that of an unscaled pass."""

    START = 2.0 ** 15

    def __init__(self) -> None:
        self.value = self.START

    def grad(self, objective: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``d objective / d a`` (float32) by a scaled backward pass, retried at half the scale while it overflows
        (down to 1: then what overflows is the forward pass, and the gradient is returned as it is)."""
        while True:
            (g,) = torch.autograd.grad(objective, a, grad_outputs=torch.full_like(objective, self.value),
                                       retain_graph=True)
            if self.value <= 1 or bool(torch.isfinite(g).all()):
                return g.float() / self.value
            self.value /= 2


def relevance_logits(model: nn.Module, layer: Unit | nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     positive: bool = False, scale: LossScale | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`relevance_batch` that returns the logits (B x K, detached) instead of the predictions; ``scale``:
    the backward pass's loss scaling (:class:`LossScale`, for float16 autocast), else none."""
    logits, a, g, x = layer_gradient(model, layer, images, labels, scale)
    return unit_relevance(a, g, positive), logits, a, x


def unit_relevance(a: torch.Tensor, g: torch.Tensor, positive: bool = False) -> torch.Tensor:
    """``sum_hw a * g`` per image and unit (B x C, float32) from outputs and gradients at the positions that count
    (B x C x H' x W'), or with ``positive`` ``sum_hw max(a * g, 0)``."""
    ag = a.float() * g.float()
    return (ag.clamp_min(0) if positive else ag).sum(dim=(2, 3))


def layer_gradient(model: nn.Module, layer: Unit | nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   scale: LossScale | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass and a backward pass from the label logits to the layer (nothing before it is
    differentiated): the logits (B x K, detached), the layer's output ``a`` and the gradient ``g = d z_label / d a``
    at the positions that count (B x C x H' x W' each), and the layer input ``x`` as the layer sees it."""
    unit = as_unit(layer)
    with torch.enable_grad(), capture_layer(unit, grad=True) as cap:
        logits = model(images)
        objective = logits.gather(1, labels[:, None]).sum()
        if scale is not None and bool(torch.isfinite(logits).all()):
            g = scale.grad(objective, cap.a)
        else:
            (g,) = torch.autograd.grad(objective, cap.a)
    return logits.detach(), unit.counted(cap.a.detach()), unit.counted(g), cap.x


def conv_with_filters(layer: Unit | nn.Module, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's geometry (stride, padding and its mode, dilation; a Linear: 1x1) applied with other filters.

    ``x``: B x C_in x H x W (``Unit.counted``); ``weight``: S x C_in x kh x kw; ``bias``: S or None
    -> B x S x H' x W'. How every sub-unit (D_j, Res, many rhos or channels at once) is computed.
    """
    return as_unit(layer).apply(x, weight, bias)


# ------------------------------------------------------------------ the positions rule: which positions count


def resolve_positions(model: nn.Module, module: nn.Module, requested: str, side: int, device=None) -> str:
    """The positions that count for ``module`` in ``model`` (``requested``: auto, all, cls or ``tokens[a:b]``).

    ``auto`` measures which positions reach the logits (:func:`reaching_positions`). A Linear on tokens gets the
    run of tokens that reaches them: ``cls`` (a ViT's last block read through its class token, register tokens
    or not), ``tokens[:2]`` (a distilled DeiT's last block: class and distillation token), ``tokens[P:]`` (the
    last block of a ViT that averages its patch tokens, P its class and register tokens), ``all`` (every token:
    an earlier block); every other layer ``all``. Tokens that reach the logits in more than one run are a
    UserError (pass the positions to count).
    """
    if not known_positions(requested):
        raise UserError(f"--positions must be auto, all, cls or tokens[a:b] (e.g. tokens[:2]), not {requested!r}")
    if requested not in POSITIONS:
        token_slice(requested)  # counts at least one token
    if not isinstance(module, nn.Linear):
        return Unit(module, "all" if requested == "auto" else requested).positions
    if requested == "all":
        return "all"
    g = reaching_positions(model, module, side, device or module.weight.device)
    if g.dim() != 1:
        if requested != "auto":
            raise UserError(f"--positions {requested} needs a Linear on tokens (B, tokens, C); this one sees "
                            f"(B, {', '.join(map(str, g.shape))}, C)")
        return "all"
    if requested != "auto":
        return requested
    idx = [int(i) for i in g.nonzero().flatten()]
    if not idx:  # nothing reaches the logits from noise images (a dead layer): every token, as the layer sees them
        return "all"
    a, b = idx[0], idx[-1] + 1
    if b - a != len(idx):
        raise UserError(f"the tokens of this layer that reach the logits ({_runs(idx)} of {len(g)}) are not one run; "
                        "pass the positions that count (all, cls or tokens[a:b])")
    return tokens_positions(a, None if b == len(g) else b)


def _runs(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def reaching_positions(model: nn.Module, module: nn.Module, side: int, device=None) -> torch.Tensor:
    """Which positions of ``module``'s output reach ``model``'s logits: a bool tensor of the output's shape without
    its batch and channel axes (tokens ``(B, N, C)``: N; a channels-last grid: H x W; ``(B, C)``: none).

    Measured, for any architecture: the gradient at the layer's output, on two noise images of ``side`` px, of a
    random projection of the logits, with every parameter that is all zeros (a head initialised to zero, as
    torchvision's ViT's is; a zero layer scale) replaced by noise for this one forward (``torch.func.functional_call``:
    the model is not changed), so that a zero weight does not hide a path that exists. A distilled DeiT's logits
    average two heads, on its class and its distillation token: both reach them."""
    gen = torch.Generator().manual_seed(0)
    device = device or module.weight.device
    noise = {n: (0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float32)).to(p)
             for n, p in model.named_parameters() if p.is_floating_point() and p.numel() and not bool(p.any())}
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
    x = torch.randn(2, first.in_channels if first is not None else 3, side, side, generator=gen).to(device, dtype)
    with torch.enable_grad(), capture_layer(module, grad=True) as cap:
        out = functional_call(model, noise, (x,)) if noise else model(x)
        logits = out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
        if cap.a is None:
            raise UserError("the model's forward pass never runs the layer of interest; choose another --layer")
        g = None
        if logits.requires_grad:
            r = torch.randn(logits.shape, generator=gen).to(logits.device)
            (g,) = torch.autograd.grad((logits.float() * r).sum(), cap.a, allow_unused=True)
    a = cap.a
    reach = (torch.zeros_like(a) if g is None else g).abs()
    if a.dim() == 3:
        return reach.sum((0, 2)) > 0
    if a.dim() == 4:
        return reach.sum((0, 3)) > 0
    return reach.sum((0, 1)) > 0
