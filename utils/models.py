"""Model construction, weight loading and layer lookup for torchvision classifiers.

All architecture knowledge lives here: which models exist, where their weights are, which
``Conv2d`` is the default layer of interest, and what the classes are called.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from .errors import UserError

DEFAULT_WEIGHTS = "IMAGENET1K_V1"


@dataclass
class LoadedModel:
    """A classifier in eval mode plus what produced it (recorded in every store and record)."""

    model: nn.Module
    name: str
    weights: str  # torchvision weights name, "file:<sha256 prefix>" or "none"
    num_classes: int
    categories: list[str] | None  # human class names from the weights' metadata, if any


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _last_linear_name(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_checkpoint(weights: str) -> bool:
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pt", ".pth"))


def weights_id(name: str, weights: str) -> str | None:
    """The id a store or record keeps for ``weights`` of model ``name``: ``none``, ``file:<sha256 prefix>``
    or ``<WeightsEnum>.<NAME>``; None when it cannot be known here (a checkpoint file that is not here)."""
    if weights.lower() == "none":
        return "none"
    if _is_checkpoint(weights):
        return "file:" + file_sha256(weights)[:16] if os.path.isfile(weights) else None
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    return f"{enum.__name__}.{weights}"


def _from_checkpoint(name: str, path: str, num_classes: int | None) -> nn.Module:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} does not exist")
    state = _read_checkpoint(path)
    if num_classes is None:  # infer the classifier size from the checkpoint
        head = _last_linear_name(torchvision.models.get_model(name, weights=None))
        if head and f"{head}.weight" in state:
            num_classes = int(state[f"{head}.weight"].shape[0])
    model = torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"checkpoint {path} does not fit {name}: {detail[:300]}") from None
    return model


def _from_torchvision_weights(name: str, weights: str) -> tuple[nn.Module, list[str] | None]:
    enum = torchvision.models.get_model_weights(name)
    if weights not in enum.__members__:
        raise UserError(f"model {name} has no weights {weights!r}; choose one of "
                        f"{', '.join(enum.__members__)}, a checkpoint file, or none")
    w = enum[weights]
    fname = os.path.basename(w.url)
    if not os.path.isfile(os.path.join(_hub_checkpoint_dir(), fname)):
        raise UserError(f"weights {name}/{weights} are not on this machine: put {fname} into "
                        f"{_hub_checkpoint_dir()} (set TORCH_HOME to move it), or pass a checkpoint "
                        "file or --weights none")
    return torchvision.models.get_model(name, weights=w), list(w.meta.get("categories") or []) or None


def load_model(name: str, weights: str = DEFAULT_WEIGHTS, num_classes: int | None = None) -> LoadedModel:
    """Build torchvision model ``name`` in eval mode with ``weights``.

    ``weights`` is a torchvision weights name (e.g. ``IMAGENET1K_V1``), a path to a checkpoint
    file (a state_dict, loaded with ``weights_only=True``) or ``none`` (random init, seeded).
    Nothing is downloaded: torchvision weights must already be in ``$TORCH_HOME/hub/checkpoints``.
    """
    if name not in classification_models():
        raise UserError(f"unknown model {name!r}; torchvision classification models are e.g. "
                        "resnet18, resnet50, vgg16, densenet121, convnext_tiny")
    categories = None
    if weights.lower() == "none":
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    elif _is_checkpoint(weights):
        model = _from_checkpoint(name, weights, num_classes)
    else:
        model, categories = _from_torchvision_weights(name, weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = _last_linear_name(model)
    out = dict(model.named_modules())[head].out_features if head else None
    if categories is not None and out is not None and len(categories) != out:
        categories = None
    return LoadedModel(model, name, weights_id(name, weights), int(out or 0), categories)


def default_layer(model: nn.Module) -> str:
    """Dotted name of the model's last ``Conv2d`` with ``groups == 1`` (ResNet-50: ``layer4.2.conv3``)."""
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            last = n
    if last is None:
        raise UserError("the model has no Conv2d layer with groups=1")
    return last


def get_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Conv2d]:
    """Resolve ``layer`` (dotted module path, ``None``/``last_conv`` for the default) to a Conv2d."""
    if layer in (None, "", "last_conv"):
        layer = default_layer(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        hint = f" (e.g. {', '.join(convs[-3:])})" if convs else ""
        raise UserError(f"the model has no layer {layer!r}{hint}")
    m = modules[layer]
    if not isinstance(m, nn.Conv2d):
        raise UserError(f"layer {layer} is a {type(m).__name__}, not a Conv2d")
    if m.groups != 1:
        raise UserError(f"layer {layer} is a grouped convolution (groups={m.groups}); "
                        "only groups=1 is supported")
    return layer, m


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted`` (e.g. ``layer4.2.conv3``) by ``new``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
