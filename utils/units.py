"""The units the toolkit splits: output channels of a ``Conv2d``, or output neurons of a ``Linear`` applied at
every position (ConvNeXt's 1x1 convolutions on channels-last maps, the MLPs of ViT, DeiT and Swin).

A position-wise ``Linear`` is a 1x1 convolution whose positions are tokens or H x W cells, so every stage
works on one picture of a layer, :class:`Unit`:

- ``weight``: ``C_out x C_in x kh x kw`` (a ``Linear``: one tap, a view of its weight) and ``bias``;
- ``counted(t)``: the layer's input or output in conv layout (``B x C x H x W``), restricted to the
  positions that count (those that reach the logits, see :func:`resolve_positions`): all of them for a
  ``Conv2d``; for a ``Linear`` on tokens ``(B, N, C)`` the N tokens as an N x 1 map, or the class token
  alone (1 x 1) with ``positions="cls"``; a channels-last grid ``(B, H, W, C)`` as H x W; ``(B, C)`` as 1 x 1;
- ``grid(t)``: where the unit looks, for pictures: the spatial map, or the patch tokens as their g x g grid;
- ``apply(x, weight, bias)``: other filters at the layer's place, on ``counted`` inputs;
- ``widened(n)`` and ``merge(n)``: the two layers of a split layer (``utils.surgery``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

POSITIONS = ("auto", "all", "cls")
KINDS = (nn.Conv2d, nn.Linear)


def filters(module: nn.Module) -> torch.Tensor:
    """The weight of a ``Conv2d`` or ``Linear`` as filters, ``C_out x C_in x kh x kw`` (a view: writes go through)."""
    return module.weight if isinstance(module, nn.Conv2d) else module.weight[:, :, None, None]


def prefix_tokens(n: int) -> int:
    """Tokens before the patch tokens of a sequence of ``n`` (class, distillation, register tokens): the rest
    of ``n`` after the largest square, the patch grid of a square image."""
    return n - math.isqrt(n) ** 2


class Unit:
    """One layer of interest (a ``Conv2d``, or a position-wise ``Linear``) as every stage sees it.

    ``positions``: ``all`` (every position counts) or ``cls`` (a Linear on tokens: the class token alone).
    """

    def __init__(self, module: nn.Module, positions: str = "all"):
        if not isinstance(module, KINDS):
            raise UserError(f"a {type(module).__name__} has no units to split; the layer must be a Conv2d or a Linear")
        if positions not in ("all", "cls"):
            raise UserError(f"positions must be all or cls, not {positions!r}")
        if positions == "cls" and not isinstance(module, nn.Linear):
            raise UserError("--positions cls is for a Linear on tokens; a Conv2d's positions all count")
        self.module = module
        self.positions = positions
        self.linear = isinstance(module, nn.Linear)

    # -------------------------------------------------------------- the layer as a bank of filters

    @property
    def kind(self) -> str:
        return type(self.module).__name__ if not self.linear else "Linear"

    @property
    def weight(self) -> torch.Tensor:
        return filters(self.module)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    @property
    def in_channels(self) -> int:
        return self.module.in_features if self.linear else self.module.in_channels

    @property
    def out_channels(self) -> int:
        return self.module.out_features if self.linear else self.module.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (1, 1) if self.linear else tuple(self.module.kernel_size)

    def geometry(self) -> nn.Conv2d:
        """The convolution whose geometry the unit has (a Linear: 1x1, stride 1, no padding), on the meta device."""
        if not self.linear:
            return self.module
        return nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None, device="meta")

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Filters ``weight`` (S x C_in x kh x kw) and ``bias`` (S, or None) at the layer's place on a ``counted``
        input ``x`` (B x C_in x H x W): B x S x H' x W'. How every sub-unit is computed."""
        w = weight.to(device=x.device, dtype=x.dtype)
        b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
        return F.conv2d(x, w, b) if self.linear else self.module._conv_forward(x, w, b)

    # -------------------------------------------------------------- positions

    def counted(self, t: torch.Tensor) -> torch.Tensor:
        """The layer's input or output ``t`` at the positions that count, in conv layout (B x C x H x W)."""
        if not self.linear:
            return t
        if t.dim() == 3 and self.positions == "cls":
            t = t[:, :1]
        return _conv_layout(t)

    def tokens(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (the layer's input or output) is a token sequence, whose grid is not its counted positions."""
        return self.linear and t.dim() == 3

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        """Where the unit looks, in conv layout over the image's grid: a Conv2d's map, a channels-last grid,
        or a token sequence's patch tokens as their g x g grid (prefix tokens left out)."""
        if not self.linear or t.dim() != 3:
            return _conv_layout(t) if self.linear else t
        n = t.shape[1]
        g = math.isqrt(n)
        return t[:, n - g * g:].transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)

    # -------------------------------------------------------------- the split layer's two layers

    def widened(self, outputs: int) -> nn.Module:
        """A layer like this one (same geometry, dtype and device) with ``outputs`` outputs."""
        m, kw = self.module, dict(device=self.module.weight.device, dtype=self.module.weight.dtype)
        if self.linear:
            return nn.Linear(m.in_features, outputs, m.bias is not None, **kw)
        return nn.Conv2d(m.in_channels, outputs, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                         m.bias is not None, m.padding_mode, **kw)

    def merge(self, inputs: int) -> nn.Module:
        """The merge after :meth:`widened`: ``inputs -> C_out``, no bias (a 1x1 conv, or a Linear)."""
        kw = dict(device=self.module.weight.device, dtype=self.module.weight.dtype)
        if self.linear:
            return nn.Linear(inputs, self.out_channels, bias=False, **kw)
        return nn.Conv2d(inputs, self.out_channels, 1, bias=False, **kw)


def _conv_layout(t: torch.Tensor) -> torch.Tensor:
    """A Linear's ``(B, C)``, ``(B, N, C)`` or channels-last ``(B, H, W, C)`` tensor as ``B x C x H x W``
    (contiguous, so that a Linear gives the numbers of the 1x1 conv it is)."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t.transpose(1, 2)[..., None].contiguous()
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    raise UserError(f"a Linear layer of interest must see (B, C), (B, tokens, C) or (B, H, W, C), not {tuple(t.shape)}")


def unit_at(model: nn.Module, layer: str, positions: str | None = None) -> Unit:
    """The :class:`Unit` of ``model``'s layer ``layer`` (a store's or a record's ``positions``; None: all)."""
    return Unit(model.get_submodule(layer), positions or "all")


def as_unit(layer: "Unit | nn.Module") -> Unit:
    """``layer`` as a :class:`Unit` (a plain module: every position counts)."""
    return layer if isinstance(layer, Unit) else Unit(layer)


def resolve_positions(model: nn.Module, module: nn.Module, requested: str, side: int, device=None) -> str:
    """The positions that count for ``module`` in ``model`` (``requested``: auto, all or cls).

    ``auto`` measures which positions reach the logits: the gradient, at the layer's output on two noise images
    of ``side`` px, of a random projection of what the head reads (the input of the last layer with weights to
    run, so that a head initialised to zero, as torchvision's ViT's is, still tells). A Linear on tokens whose
    class token alone reaches it (a ViT's last block, read through its class token) gets ``cls``; everything
    else ``all``.
    """
    if requested not in POSITIONS:
        raise UserError(f"--positions must be one of {', '.join(POSITIONS)}, not {requested!r}")
    if not isinstance(module, nn.Linear):
        return Unit(module, "all" if requested == "auto" else requested).positions
    if requested == "all":
        return "all"
    g = _output_gradient(model, module, side, device or module.weight.device)
    if g.dim() != 3:
        if requested == "cls":
            raise UserError(f"--positions cls needs a Linear on tokens (B, tokens, C); this one sees {tuple(g.shape)}")
        return "all"
    reach = g.abs().sum((0, 2)) > 0
    return "cls" if requested == "cls" or (bool(reach[0]) and not bool(reach[1:].any())) else "all"


def _output_gradient(model: nn.Module, module: nn.Module, side: int, device) -> torch.Tensor:
    """The gradient at ``module``'s output of a random projection of the head's input (else of the logits)."""
    from .conv_kinds import leaves_with_parameters
    from .relevance import capture_layer

    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, i, _o: seen.__setitem__("head_input", i[0]))
             for m in leaves_with_parameters(model)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, side, side, generator=gen).to(device)
    try:
        with torch.enable_grad(), capture_layer(module, grad=True) as cap:
            logits = model(x)
            for target in (seen.get("head_input"), logits):
                if isinstance(target, torch.Tensor) and target.requires_grad:
                    r = torch.randn(target.shape, generator=gen).to(target.device)
                    (g,) = torch.autograd.grad((target.float() * r).sum(), cap.a, retain_graph=True, allow_unused=True)
                    if g is not None and bool(g.abs().sum() > 0):
                        return g
    finally:
        for h in hooks:
            h.remove()
    return torch.zeros_like(cap.a)
