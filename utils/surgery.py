"""Stage 3's channel surgery: index sets, the three filters, and the disentangled layer.

A split of channel ``c`` of a Conv2d ``L`` (``C`` outputs) by the ARVs ``A1``, ``A2`` of two concepts:

    S1 = {k : rho*A1[k] > A2[k]},  S2 = {k not in S1 : rho*A2[k] > A1[k]},  S0 = the rest
    D1 = W[c] without S2,  D2 = W[c] without S1,  Res = W[c] without S1 and S2   (D1 + D2 - Res = W[c])

The disentangled layer is ``nn.Sequential(expanded, merge)``: ``expanded`` has the original filters
with filter ``c`` replaced by D1 and, per split channel, two more filters (D2, Res) appended;
``merge`` is a 1x1 conv (C + 2m -> C, no bias) that copies the first C channels and adds
``+D2 - Res`` into channel ``c``. Both are plain ``nn.Conv2d``, so the result is an ordinary module
tree that any other tool can load.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .models import get_layer, set_module
from .store import read_json

RHOS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.00
RECORD_VERSION = 1


def index_sets(A1: torch.Tensor, A2: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (C_in,) of S1, S2, S0 for ARVs ``A1``, ``A2`` (C_in,) at ``rho`` (signed rule)."""
    S1 = rho * A1 > A2
    S2 = ~S1 & (rho * A2 > A1)
    return S1, S2, ~(S1 | S2)


def split_filters(weight_c: torch.Tensor, S1: torch.Tensor, S2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``D1, D2, Res`` (each C_in x kh x kw) from filter ``W[c]`` and the masks S1, S2 (C_in,)."""
    keep1 = (~S2).to(weight_c.dtype)[:, None, None]
    keep2 = (~S1).to(weight_c.dtype)[:, None, None]
    return weight_c * keep1, weight_c * keep2, weight_c * keep1 * keep2


def conv_with_filters(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv``'s geometry (stride, padding and its mode, dilation) applied with other filters.

    ``x``: B x C_in x H x W; ``weight``: S x C_in x kh x kw; ``bias``: S or None -> B x S x H' x W'.
    How every sub-channel (D1, D2, Res, many rhos or channels at once) is computed from the layer input.
    """
    return conv._conv_forward(x, weight.to(device=x.device, dtype=x.dtype),
                              None if bias is None else bias.to(device=x.device, dtype=x.dtype))


@dataclass
class Split:
    """One split channel: ``channel`` of its layer and its three filters (C_in x kh x kw each)."""

    channel: int
    D1: torch.Tensor
    D2: torch.Tensor
    Res: torch.Tensor


def make_split_layer(conv: nn.Conv2d, splits: list[Split]) -> nn.Sequential:
    """Replace ``conv`` by ``Sequential(expanded, merge)`` computing the same output, split channels apart.

    Sub-channel outputs (before the merge): ``expanded(x)[:, c]`` is D1 of the split of ``c``;
    ``expanded(x)[:, C + 2j]`` and ``[:, C + 2j + 1]`` are D2 and Res of the j-th split.
    """
    C, m = conv.out_channels, len(splits)
    if len({s.channel for s in splits}) != m:
        raise UserError("the same channel is split twice in one layer")
    expanded = nn.Conv2d(conv.in_channels, C + 2 * m, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
    merge = nn.Conv2d(C + 2 * m, C, 1, bias=False, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        w = conv.weight.detach()
        expanded.weight[:C] = w
        merge.weight.zero_()
        merge.weight[torch.arange(C), torch.arange(C), 0, 0] = 1.0
        for j, s in enumerate(splits):
            if not 0 <= s.channel < C:
                raise UserError(f"channel {s.channel} is outside the layer's {C} channels")
            expanded.weight[s.channel] = s.D1.to(w)
            expanded.weight[C + 2 * j] = s.D2.to(w)
            expanded.weight[C + 2 * j + 1] = s.Res.to(w)
            merge.weight[s.channel, C + 2 * j, 0, 0] = 1.0
            merge.weight[s.channel, C + 2 * j + 1, 0, 0] = -1.0
        if conv.bias is not None:
            b = conv.bias.detach()
            expanded.bias[:C] = b
            for j, s in enumerate(splits):
                expanded.bias[C + 2 * j] = b[s.channel]
                expanded.bias[C + 2 * j + 1] = b[s.channel]
    layer = nn.Sequential(OrderedDict(expanded=expanded, merge=merge)).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


# ------------------------------------------------------------------ records on disk


def record_name(model: str, layer: str, default: str, channel: int, c1: list[int], c2: list[int]) -> str:
    """Folder name of one disentanglement under ``models_disentangled/``."""
    head = model if layer == default else f"{model}_{layer}"
    return f"{head}_channel{channel}_c1-{'-'.join(map(str, c1))}_c2-{'-'.join(map(str, c2))}"


def load_record(folder: str) -> dict:
    """The record JSON of one disentanglement; ``record["dir"]`` is set to its folder."""
    path = os.path.join(folder, "record.json")
    if not os.path.isfile(path):
        raise UserError(f"no disentanglement record at {folder} (run disentangle_channel.py first)")
    rec = read_json(path)
    rec["dir"] = folder
    return rec


def find_record(model_dir: str, model: str, layer: str, default: str, channel: int,
                classes1: list[int], classes2: list[int]) -> dict:
    """Load the record of one disentanglement from ``model_dir``; a missing one is a UserError naming the folder."""
    if not os.path.isdir(model_dir):
        raise UserError(f"no folder {model_dir} (--model_dir: STORE_DIR/models_disentangled/ of disentangle_channel.py)")
    candidates = [record_name(model, layer, default, channel, classes1, classes2),
                  record_name(model, layer, default, channel, sorted(classes1), sorted(classes2))]
    for name in candidates:
        if os.path.isfile(os.path.join(model_dir, name, "record.json")):
            return load_record(os.path.join(model_dir, name))
    raise UserError(f"no disentanglement of channel {channel} for classes {classes1} / {classes2} at "
                    f"{os.path.join(model_dir, candidates[0])}: disentangle_channel.py makes it (same --model, --layer)")


def check_record_identity(rec: dict, model: str, weights: str, layer: str) -> None:
    """Refuse a record made with another model, weights or layer than this run's."""
    for key, have in (("model", model), ("weights", weights), ("layer", layer)):
        if rec.get(key) != have:
            raise UserError(f"disentanglement {rec['dir']} was made with {key} {rec.get(key)!r}, "
                            f"this run uses {have!r}")


def load_filters(record: dict, rho: float | None = None) -> Split:
    """The D1, D2, Res filters of a record at ``rho`` (default: the best rho)."""
    path = os.path.join(record["dir"], record.get("filters", "filters.pt"))
    try:
        f = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    rhos = [round(float(r), 2) for r in f["rhos"]]
    rho = record["best_rho"] if rho is None else round(float(rho), 2)
    if rho not in rhos:
        raise UserError(f"rho {rho} is not one of the swept values {rhos[0]}..{rhos[-1]} (step 0.05)")
    i = rhos.index(rho)
    return Split(int(record["channel"]), f["D1"][i], f["D2"][i], f["Res"][i])


def disentangle_model(model: nn.Module, records: list[dict], rho: float | None = None, inplace: bool = False) -> nn.Module:
    """The disentangled network: every record's layer replaced by its split layer (one per layer).

    ``records`` may split several channels of one layer and channels of different layers.
    The returned model computes the same logits as ``model`` up to float rounding.
    """
    model = model if inplace else copy.deepcopy(model)
    by_layer: dict[str, list[Split]] = OrderedDict()
    for rec in records:
        by_layer.setdefault(rec["layer"], []).append(load_filters(rec, rho))
    for name, splits in by_layer.items():
        _, conv = get_layer(model, name)
        set_module(model, name, make_split_layer(conv, splits))
    return model.eval()


def export_checkpoint(model: nn.Module, model_name: str, records: list[dict], path: str, rho: float | None = None) -> None:
    """Save the disentangled network as a plain checkpoint (``torch.load(..., weights_only=True)``).

    Holds ``state_dict`` (an ordinary nn.Module tree: each split layer is ``Sequential(expanded, merge)``),
    ``model`` (torchvision name) and ``splits`` ({layer: [channels]}) so ``load_checkpoint`` can rebuild it.
    """
    net = disentangle_model(model, records, rho)
    splits: dict[str, list[int]] = OrderedDict()
    for rec in records:
        splits.setdefault(rec["layer"], []).append(int(rec["channel"]))
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"model": model_name, "splits": dict(splits), "state_dict": net.state_dict()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> nn.Module:
    """Rebuild a network saved by :func:`export_checkpoint` (no custom classes needed)."""
    import torchvision

    ck = torch.load(path, map_location="cpu", weights_only=True)
    sd = ck["state_dict"]
    probe = torchvision.models.get_model(ck["model"], weights=None)
    heads = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    kwargs = {"num_classes": int(sd[f"{heads[-1]}.weight"].shape[0])} if heads and f"{heads[-1]}.weight" in sd else {}
    model = torchvision.models.get_model(ck["model"], weights=None, **kwargs)
    for layer, channels in ck["splits"].items():
        _, conv = get_layer(model, layer)
        zero = torch.zeros_like(conv.weight[0])
        set_module(model, layer, make_split_layer(conv, [Split(c, zero, zero, zero) for c in channels]))
    model.load_state_dict(sd)
    return model.eval()
