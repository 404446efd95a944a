"""The disentangled network: split layers built from :class:`utils.method.split.Split`, and plain checkpoints.

A layer ``L`` (``C`` outputs) with splits ``s_1 .. s_m`` becomes ``nn.Sequential(expanded, merge)``:
``expanded`` has the original filters with filter ``c`` of each split replaced by its ``D_1`` and, per
split in order, ``k`` more filters appended (``D_2 .. D_k``, then ``Res``); ``merge`` is a 1x1 conv
(no bias) that copies the first ``C`` channels and adds ``+D_2 .. +D_k`` and ``-(k - 1) Res`` into
channel ``c``. For a Conv2d both are plain ``nn.Conv2d``; for a position-wise Linear both are plain
``nn.Linear`` (``merge``: ``C + sum k -> C``, no bias), so the result is an ordinary module tree; everything
after ``L`` is untouched and the logits are unchanged up to float rounding.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict

import torch
from torch import nn

from ..defaults import logit_tolerance
from ..errors import UserError
from ..files import save_torch
from .kinds import plain_convs
from ..data.images import Preprocess
from .sources import head_size, split_file_spec
from .loading import build_model, get_layer, set_module
from ..method.split import Split
from .units import Unit, as_unit, filters


def appended_channels(conv_channels: int, splits: list[Split]) -> list[list[int]]:
    """For each split, the output channels of ``expanded`` that hold its sub-channels D_1 .. D_k, Res."""
    out, nxt = [], conv_channels
    for s in splits:
        out.append([s.channel] + list(range(nxt, nxt + s.k)))
        nxt += s.k
    return out


def make_split_layer(layer: Unit | nn.Module, splits: list[Split]) -> nn.Sequential:
    """Replace ``layer`` (a Conv2d or a Linear) by ``Sequential(expanded, merge)`` computing the same output, split
    units apart."""
    unit = as_unit(layer)
    C = unit.out_channels
    if len({s.channel for s in splits}) != len(splits):
        raise UserError("the same channel is split twice in one layer")
    for s in splits:
        if not 0 <= s.channel < C:
            raise UserError(f"channel {s.channel} is outside the layer's {C} channels")
    where = appended_channels(C, splits)
    total = C + sum(s.k for s in splits)
    expanded, merge = unit.widened(total), unit.merge(total)
    with torch.no_grad():
        w, bias = unit.weight.detach(), unit.bias
        wide, mw = filters(expanded), filters(merge)  # views: C_out x C_in x kh x kw for both kinds
        wide[:C] = w
        if bias is not None:
            expanded.bias[:C] = bias.detach()
        mw.zero_()
        mw[torch.arange(C), torch.arange(C), 0, 0] = 1.0
        for s, chans in zip(splits, where):
            wide[chans] = s.weight().to(w)
            mw[s.channel, chans[1:-1], 0, 0] = 1.0
            mw[s.channel, chans[-1], 0, 0] = -float(s.k - 1)
            if bias is not None:  # every sub-unit gets the bias: k b - (k - 1) b = b
                expanded.bias[chans] = bias.detach()[s.channel]
    layer = nn.Sequential(OrderedDict(expanded=expanded, merge=merge)).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def split_network(model: nn.Module, splits: dict[str, list[Split]], inplace: bool = False) -> nn.Module:
    """``model`` with every layer named in ``splits`` replaced by its split layer (a copy unless ``inplace``), and
    timm's weight-standardised convs plain ``nn.Conv2d`` holding the weight they apply (:func:`plain_convs`, as
    every model the toolkit loads has them: the splits are of that weight, and :func:`load_checkpoint` rebuilds
    the same module tree)."""
    model = plain_convs(model if inplace else copy.deepcopy(model))
    for name, layer_splits in splits.items():
        _, unit = get_layer(model, name)
        set_module(model, name, make_split_layer(unit, layer_splits))
    return model.eval()


def export_network(model: nn.Module, model_name: str, splits: dict[str, list[Split]], path: str,
                   preprocess=None) -> None:
    """Save ``model`` with ``splits`` applied as a plain checkpoint (``torch.load(..., weights_only=True)``).

    Holds ``state_dict`` (an ordinary module tree), ``model`` (its name; an own file's by its absolute path, so
    that the checkpoint loads from any folder), ``splits`` ({layer: [channels]}), ``k`` ({layer: [concepts per
    split]}) and ``preprocess`` (the input transform, :func:`checkpoint_transform`), so that
    :func:`load_checkpoint` can rebuild it.
    """
    own = split_file_spec(model_name)
    name = f"{os.path.abspath(own[0])}:{own[1]}" if own else model_name
    net = split_network(model, splits)
    save_torch(path, {"model": name, "splits": {n: [s.channel for s in ss] for n, ss in splits.items()},
                      "k": {n: [s.k for s in ss] for n, ss in splits.items()}, "state_dict": net.state_dict(),
                      **({"preprocess": preprocess.to_json()} if preprocess is not None else {})})


def _read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint {path}") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_checkpoint(path: str, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a network saved by :func:`export_network` (no custom classes needed; a timm model needs timm,
    your own model its file). ``model``: the original architecture to split instead of building it by name
    (a network made in a notebook; its weights are replaced by the checkpoint's, it is not changed; its timm
    weight-standardised convs become the plain convs the checkpoint holds, so the result computes what the
    original does, standardised once)."""
    ck = _read_checkpoint(path)
    sd = ck["state_dict"]
    if model is None:
        model = build_model(ck["model"], head_size(sd, build_model(ck["model"])))
    else:  # as the checkpoint's network was saved: timm's StdConv2d / ScaledStdConv2d plain, with the weight they apply
        model = plain_convs(copy.deepcopy(model))
    for layer, channels in ck["splits"].items():
        _, unit = get_layer(model, layer)
        ks = ck.get("k", {}).get(layer, [2] * len(channels))
        zero = torch.zeros_like(unit.weight[0])
        blanks = [Split(c, zero.expand(k, *zero.shape).clone(), zero) for c, k in zip(channels, ks)]
        set_module(model, layer, make_split_layer(unit, blanks))
    model.load_state_dict(sd)
    return model.eval()


def checkpoint_splits(path: str) -> dict[str, list[int]]:
    """``{layer: [channels]}`` of a checkpoint, in the order their concept units follow in each split layer."""
    return {k: [int(c) for c in v] for k, v in _read_checkpoint(path)["splits"].items()}


def checkpoint_transform(path: str):
    """The input transform (a :class:`utils.data.images.Preprocess`) a checkpoint was made with (None: not recorded)."""
    p = _read_checkpoint(path).get("preprocess")
    return Preprocess.from_json(p) if p else None


def max_logit_diff(original: nn.Module, disentangled: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Largest |original(images) - disentangled(images)| over all logits (full forwards)."""
    return logit_diff_scale(original, disentangled, images, batch_size)[0]


def logit_diff_scale(original: nn.Module, disentangled: nn.Module, images: torch.Tensor,
                     batch_size: int = 64) -> tuple[float, float]:
    """The largest |logit difference| (:func:`max_logit_diff`) and the largest |original logit| (the scale its
    tolerance is relative to, see :func:`utils.defaults.logit_tolerance`)."""
    diff = scale = 0.0
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size]
            o = original(x).float()
            diff = nan_max(diff, float((o - disentangled(x).float()).abs().max()))
            scale = nan_max(scale, float(o.abs().max()))
    return diff, scale


def nan_max(a: float, b: float) -> float:
    """``max(a, b)``, NaN when either is (Python's max keeps whichever comes first)."""
    return a if a != a else b if b != b else max(a, b)


def check_logit_diff(diff: float, where: str, scale: float = 0.0) -> float:
    """``diff``, the largest |logit difference| of a disentangled network (``where``: on which images); above
    :func:`utils.defaults.logit_tolerance` of ``scale``, the largest |original logit| (MAX_LOGIT_DIFF, or a share
    of large logits), or NaN, a UserError: the split is broken and nothing may be written."""
    tol = logit_tolerance(scale)
    if not diff <= tol:
        raise UserError(f"the disentangled network's logits differ from the original's by {diff:.3g} "
                        f"(> {tol:g}, for logits up to {scale:.3g}) {where}; nothing written")
    return diff
