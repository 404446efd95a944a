"""The units the toolkit splits: output channels of a ``Conv2d``, or output neurons of a ``Linear`` applied at
every position (ConvNeXt's 1x1 convolutions on channels-last maps, the MLPs of ViT, DeiT and Swin).

A position-wise ``Linear`` is a 1x1 convolution whose positions are tokens or H x W cells, so every stage
works on one picture of a layer, :class:`Unit`:

- ``weight``: ``C_out x C_in x kh x kw`` (a ``Linear``: one tap, a view of its weight) and ``bias``;
- ``counted(t)``: the layer's input or output in conv layout (``B x C x H x W``), restricted to the
  positions that count (those that reach the logits, see :func:`resolve_positions`): all of them for a
  ``Conv2d``; for a ``Linear`` on tokens ``(B, N, C)`` the tokens of ``positions`` as an n x 1 map (``all``:
  every token; ``cls``: the class token alone, 1 x 1; ``tokens[a:b]``: the tokens a .. b-1, either end open:
  ``tokens[:2]`` a distilled DeiT's class and distillation tokens, ``tokens[5:]`` the patch tokens after a
  class and 4 register tokens); a channels-last grid ``(B, H, W, C)`` as H x W; ``(B, C)`` as 1 x 1;
- ``grid(t)``: where the unit looks, for pictures: the spatial map, or the patch tokens as their g x g grid
  (the tokens before them, class, distillation and register tokens, counted by :func:`prefix_tokens` of the model);
- ``apply(x, weight, bias)``: other filters at the layer's place, on ``counted`` inputs;
- ``widened(n)`` and ``merge(n)``: the two layers of a split layer (``utils.model.surgery``).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

POSITIONS = ("auto", "all", "cls")
KINDS = (nn.Conv2d, nn.Linear)


def filters(module: nn.Module) -> torch.Tensor:
    """The weight of a ``Conv2d`` or ``Linear`` as filters, ``C_out x C_in x kh x kw`` (a view: writes go through)."""
    return module.weight if isinstance(module, nn.Conv2d) else module.weight[:, :, None, None]


_TOKENS = re.compile(r"tokens\[(\d*):(\d*)\]")


def token_slice(positions: str) -> slice | None:
    """The tokens that ``positions`` counts, as a slice of the token axis (None: every token); a UserError for a
    value that is none of ``all``, ``cls``, ``tokens[a:b]`` (a and b token indices, either left out)."""
    if positions == "all":
        return None
    if positions == "cls":
        return slice(0, 1)
    m = _TOKENS.fullmatch(positions) if isinstance(positions, str) else None
    if m is None:
        raise UserError(f"positions must be all, cls or tokens[a:b] (e.g. tokens[:2], tokens[1:]), not {positions!r}")
    a, b = (int(v) if v else None for v in m.groups())
    if b is not None and (b <= (a or 0)):
        raise UserError(f"positions {positions} counts no token")
    return slice(a, b)


def known_positions(positions) -> bool:
    """Whether ``positions`` is a value the positions rule takes: auto, all, cls or ``tokens[a:b]``."""
    return positions in POSITIONS or (isinstance(positions, str) and _TOKENS.fullmatch(positions) is not None)


def tokens_positions(a: int, b: int | None) -> str:
    """The ``positions`` value that counts tokens ``a`` .. ``b - 1`` (``b`` None: to the last): ``cls`` for token 0
    alone, ``all`` for every token, else ``tokens[a:b]``."""
    if a == 0 and b is None:
        return "all"
    if a == 0 and b == 1:
        return "cls"
    return f"tokens[{a or ''}:{'' if b is None else b}]"


def describe_positions(positions: str) -> str:
    """``positions`` in words, for reports."""
    s = token_slice(positions)
    if s is None:
        return "every token or cell"
    if s == slice(0, 1):
        return "the class token alone"
    if s.stop is None:
        return f"every token from token {s.start} on (the patch tokens, after the class and register tokens)"
    if not s.start:
        return f"the first {s.stop} tokens" + (" (a distilled DeiT's class and distillation tokens)" if s.stop == 2 else "")
    return f"tokens {s.start} to {s.stop - 1}"


def prefix_tokens(model: nn.Module) -> int | None:
    """How many tokens come before the patch tokens in ``model``'s token sequences (class, distillation and
    register tokens), as the model declares it: timm's ``num_prefix_tokens`` (the model's, or a submodule's when
    it is wrapped), torchvision's ``VisionTransformer`` (a class token: 1); None when it declares nothing (an own
    model may set ``num_prefix_tokens`` itself). The one place the toolkit learns it."""
    for m in model.modules():
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
        if isinstance(getattr(m, "class_token", None), nn.Parameter) and hasattr(m, "encoder"):  # torchvision ViT
            return 1
    return None


class Unit:
    """One layer of interest (a ``Conv2d``, or a position-wise ``Linear``) as every stage sees it.

    ``positions``: ``all`` (every position counts), ``cls`` (a Linear on tokens: the class token alone) or
    ``tokens[a:b]`` (a Linear on tokens: those tokens). ``prefix``: the model's tokens before its patch tokens
    (:func:`prefix_tokens`; :func:`unit_at` gives it), for :meth:`grid`.
    """

    def __init__(self, module: nn.Module, positions: str = "all", prefix: int | None = None):
        if not isinstance(module, KINDS):
            raise UserError(f"a {type(module).__name__} has no units to split; the layer must be a Conv2d or a Linear")
        self.tokens_counted = token_slice(positions)
        if positions != "all" and not isinstance(module, nn.Linear):
            raise UserError(f"--positions {positions} is for a Linear on tokens; a Conv2d's positions all count")
        self.module = module
        self.positions = positions
        self.prefix = prefix
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
        if t.dim() == 3 and self.tokens_counted is not None:
            t = t[:, self.tokens_counted]
        return _conv_layout(t)

    def add_counted(self, t: torch.Tensor, channel: int, shift: torch.Tensor) -> torch.Tensor:
        """``t`` (the layer's output, as the layer gives it) with ``shift`` (B x Q, the positions that count in
        :meth:`counted`'s order) added to unit ``channel`` there, in place; returns ``t``."""
        s = shift.to(t.dtype)
        if not self.linear:
            t[:, channel] += s.view(t.shape[0], *t.shape[2:])
        elif t.dim() == 2:
            t[:, channel] += s[:, 0]
        elif t.dim() == 3:
            t[:, self.tokens_counted or slice(None), channel] += s
        else:
            t[..., channel] += s.view(*t.shape[:3])
        return t

    def tokens(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (the layer's input or output) is a token sequence, whose grid is not its counted positions."""
        return self.linear and t.dim() == 3

    @property
    def prefix_only(self) -> bool:
        """Whether only tokens at the start of the sequence count (``cls``, a distilled DeiT's ``tokens[:2]``):
        tokens that look at the whole image, not at one patch."""
        s = self.tokens_counted
        return self.linear and s is not None and not s.start and s.stop is not None and (
            self.prefix is None or s.stop <= max(self.prefix, 1))

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        """Where the unit looks, in conv layout over the image's grid: a Conv2d's map, a channels-last grid,
        or a token sequence's patch tokens as their g x g grid (the model's prefix tokens left out: ``prefix``;
        else the start of ``tokens[a:]``; else, for a model that declares nothing, what is left after the
        largest square). A sequence whose patch tokens are no square grid is a UserError."""
        if not self.linear or t.dim() != 3:
            return _conv_layout(t) if self.linear else t
        n = t.shape[1]
        p = self.prefix
        if p is None:
            s = self.tokens_counted
            p = s.start if s is not None and s.start and s.stop is None else n - math.isqrt(n) ** 2
        g = math.isqrt(max(n - p, 0))
        if p > n or g * g != n - p:
            raise UserError(f"the layer sees {n} tokens, {p} of them before the patch tokens (the model's "
                            f"num_prefix_tokens): the other {n - p} form no square grid of patches")
        return t[:, p:].transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)

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
    """The :class:`Unit` of ``model``'s layer ``layer`` (a store's or a record's ``positions``; None: all), with the
    model's prefix tokens (:func:`prefix_tokens`)."""
    return Unit(model.get_submodule(layer), positions or "all", prefix_tokens(model))


def as_unit(layer: "Unit | nn.Module") -> Unit:
    """``layer`` as a :class:`Unit` (a plain module: every position counts)."""
    return layer if isinstance(layer, Unit) else Unit(layer)
