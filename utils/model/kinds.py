"""Kinds of ``Conv2d``: timm's subclasses that compute something else than their raw weight and geometry
(weight standardisation, TF-style dynamic 'same' padding) become plain ``nn.Conv2d`` where that is exact,
and the conv that computes the logits (a 1x1 conv head: squeezenet, BiT) is found by one probe forward.

The toolkit reads ``conv.weight`` and the plain geometry (``conv._conv_forward``, stride, padding) of the
layer of interest everywhere, so a layer whose class has its own ``forward`` cannot be the layer of interest.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["plain_convs", "plain_conv", "has_own_forward", "own_forward_problem", "classifier_conv",
           "positionwise_linears", "remember_side"]


def _timm_class(module: str, name: str) -> type | None:
    """timm's class ``name`` from ``timm.layers.<module>``, or None without timm."""
    try:
        mod = __import__(f"timm.layers.{module}", fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


def _kinds(*names: tuple[str, str]) -> tuple[type, ...]:
    """The timm classes ``(module, name)`` that this timm version has."""
    return tuple(c for c in (_timm_class(m, n) for m, n in names) if c is not None)


def _std_kinds() -> tuple[type, ...]:
    """timm's weight-standardised convs (no gain)."""
    return _kinds(("std_conv", "StdConv2d"), ("std_conv", "StdConv2dSame"))


def _scaled_kinds() -> tuple[type, ...]:
    """timm's scaled weight-standardised convs (NFNets: ``gain * gamma / sqrt(fan_in)``)."""
    return _kinds(("std_conv", "ScaledStdConv2d"), ("std_conv", "ScaledStdConv2dSame"))


def _same_kinds() -> tuple[type, ...]:
    """timm's convs with TF-style dynamic 'same' padding."""
    return _kinds(("conv2d_same", "Conv2dSame"), ("conv2d_same", "Conv2dSameExport"))


def has_own_forward(m: nn.Module) -> bool:
    """True for a Conv2d subclass whose output is not ``_conv_forward(x, weight, bias)`` of plain Conv2d, or a
    Linear subclass with its own forward."""
    t = type(m)
    if isinstance(m, nn.Linear):
        return t.forward is not nn.Linear.forward
    return isinstance(m, nn.Conv2d) and (t.forward is not nn.Conv2d.forward
                                         or t._conv_forward is not nn.Conv2d._conv_forward)


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The filters ``conv`` applies (C x C_in/groups x kh x kw): timm's (scaled) weight standardisation as in
    its ``forward`` (the very same ``F.batch_norm`` call), else the raw weight."""
    w = conv.weight.detach()
    if isinstance(conv, _std_kinds() + _scaled_kinds()):
        gain = (conv.gain * conv.scale).view(-1).detach() if isinstance(conv, _scaled_kinds()) else None
        w = F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, weight=gain, training=True,
                         momentum=0.0, eps=conv.eps).reshape_as(w)
    return w


def _dynamic_same(conv: nn.Conv2d) -> bool:
    """True when ``conv`` pads its input TF-style ('same', from the input size) in its ``forward``."""
    return isinstance(conv, _same_kinds()) or bool(getattr(conv, "same_pad", False))


def static_same_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric padding (ph, pw) equal to TF 'same' padding of ``conv`` at EVERY input size, else None.

    Along one axis the total is ``max((k-1)d + 1 - s, 0)`` for sizes divisible by the stride ``s`` and
    ``max((k-1)d + 1 - r, 0)`` for remainder ``r``: one value for all sizes iff ``s == 1`` or ``(k-1)d == 0``,
    and symmetric iff that value is even.
    """
    pads = []
    for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation):
        reach = (k - 1) * d
        if s != 1 and reach != 0:
            return None
        if reach % 2:
            return None
        pads.append(reach // 2)
    return pads[0], pads[1]


def plain_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """A plain ``nn.Conv2d`` computing what timm's ``conv`` computes (same parameters' device, dtype, mode,
    ``requires_grad``), ``conv`` itself when it is plain already, None when no plain Conv2d can."""
    if not has_own_forward(conv):
        return conv
    known = _std_kinds() + _scaled_kinds() + _same_kinds()
    if type(conv) not in known:
        return None
    padding = static_same_padding(conv) if _dynamic_same(conv) else conv.padding
    if padding is None:
        return None
    w = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                    conv.groups, conv.bias is not None, "zeros", device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(effective_weight(conv))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    new.weight.requires_grad_(w.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    return new.train(conv.training)


def plain_convs(model: nn.Module) -> nn.Module:
    """``model`` with every timm StdConv2d / ScaledStdConv2d (weights standardised once) and every Conv2dSame
    whose 'same' padding is symmetric at every input size replaced by a plain ``nn.Conv2d`` (in place;
    returns ``model``, or the replacement when ``model`` itself is such a conv). Outputs stay the same."""
    if isinstance(model, nn.Conv2d):
        return plain_conv(model) or model
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not has_own_forward(child):
                continue
            if id(child) not in done:
                done[id(child)] = plain_conv(child) or child
            if done[id(child)] is not child:
                setattr(parent, child_name, done[id(child)])
    return model


def own_forward_problem(name: str, conv: nn.Conv2d) -> str:
    """The one line that refuses ``conv`` (a Conv2d or Linear subclass with its own forward) as layer ``name``."""
    kind = type(conv).__name__
    if isinstance(conv, nn.Linear):
        return (f"layer {name} is a {kind}, a Linear subclass with its own forward, so its output is not the plain "
                "product with its weight that this toolkit computes; choose another layer")
    if isinstance(conv, _same_kinds()) or _dynamic_same(conv):
        return (f"layer {name} is a timm {kind} whose TF-style 'same' padding (kernel {tuple(conv.kernel_size)}, "
                f"stride {tuple(conv.stride)}) is asymmetric or changes with the input size, which a plain "
                "Conv2d cannot compute; choose another layer")
    return (f"layer {name} is a {kind}, a Conv2d subclass with its own forward, so its output is not the plain "
            "convolution of its weight that this toolkit computes; choose another layer, or make it a plain "
            "nn.Conv2d (utils.model.loading.plain_convs does so for timm's StdConv2d, ScaledStdConv2d and Conv2dSame)")


# ------------------------------------------------------------------ the conv that computes the logits

_SIDES: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_PROBES: "weakref.WeakKeyDictionary[nn.Module, tuple[str | None, frozenset]]" = weakref.WeakKeyDictionary()


def remember_side(model: nn.Module, side: int) -> None:
    """Probe ``model`` at ``side`` px (its evaluation crop) when :func:`classifier_conv` needs a forward."""
    _SIDES[model] = int(side)


def leaves_with_parameters(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` without children that hold parameters (convs, norms, linears)."""
    return [m for m in model.modules() if not next(m.children(), None) and next(m.parameters(), None) is not None]


def _probe_order(model: nn.Module, side: int) -> tuple[list[tuple[nn.Module, int]], int | None]:
    """The parameterised leaf modules in the order they run on one blank image (1 x C x side x side, C the
    first conv's input channels), each with the number of dimensions of its input, and the number of
    logits; ``([], None)`` if the model cannot run it."""
    order: list[tuple[nn.Module, int]] = []
    hooks = [m.register_forward_hook(lambda mod, i, _o: order.append((mod, i[0].dim() if i else 0)))
             for m in leaves_with_parameters(model)]
    modes = {m: m.training for m in model.modules()}
    p = next(model.parameters(), None)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.zeros(1, first.in_channels if first is not None else 3, side, side, dtype=dtype,
                    device=None if p is None else p.device)
    try:
        with torch.no_grad():
            y = model.eval()(x)
    except Exception:  # noqa: BLE001 - a model that needs other input: no probe, no head found
        return [], None
    finally:
        for h in hooks:
            h.remove()
        for m, was in modes.items():
            m.training = was
    return order, (int(y.reshape(y.shape[0], -1).shape[1]) if isinstance(y, torch.Tensor) and y.dim() else None)


def _probe(model: nn.Module, side: int | None) -> tuple[str | None, frozenset]:
    """What one probe forward tells (cached per model object): the conv head's name (see
    :func:`classifier_conv`) and the names of the ``Linear`` layers that ran on inputs with positions
    (``(B, tokens, C)`` or ``(B, H, W, C)``, not ``(B, C)``)."""
    if model not in _PROBES:
        order, logits = _probe_order(model, side or _SIDES.get(model, 224))
        names = {m: n for n, m in model.named_modules()}
        last = order[-1][0] if order else None
        head = names[last] if isinstance(last, nn.Conv2d) and last.out_channels == logits else None
        _PROBES[model] = head, frozenset(names[m] for m, dims in order if isinstance(m, nn.Linear) and dims >= 3)
    return _PROBES[model]


def classifier_conv(model: nn.Module, side: int | None = None) -> str | None:
    """Dotted name of the Conv2d that computes the logits (squeezenet's ``classifier.1``, BiT's ``head.fc``):
    the last parameterised module to run, with as many outputs as the model has logits; else None.
    One probe forward per model object (at ``side``, else the remembered crop, else 224 px), then cached."""
    return _probe(model, side)[0]


def positionwise_linears(model: nn.Module, side: int | None = None) -> frozenset:
    """Names of the model's ``Linear`` layers applied at every position (a ViT's MLPs, ConvNeXt's channels-last
    1x1 convolutions), from the same cached probe forward as :func:`classifier_conv`."""
    return _probe(model, side)[1]
