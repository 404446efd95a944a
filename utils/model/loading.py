"""The model of interest and its layer: loading (``utils.model.sources``), what it is called in file names,
its outputs, and the lookup of the ``Conv2d`` of interest. Architecture knowledge stays in these two files and
``utils.model.kinds`` (timm's conv subclasses made plain, the conv head found)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .kinds import (classifier_conv, has_own_forward, own_forward_problem, plain_convs, positionwise_linears,
                         remember_side)
from ..data.images import Preprocess
from ..data.preprocess import INPUT_FLAGS, InputSpec
from ..errors import UserError
from .units import Unit
from .sources import (DEFAULT_WEIGHTS, build_own, build_timm, build_torchvision, file_sha256, is_checkpoint,
                            module_weights_id, split_file_spec, torchvision_weights_id)

__all__ = ["DEFAULT_WEIGHTS", "LoadedModel", "load_model", "weights_id", "module_weights_id", "build_model", "model_tag",
           "default_layer", "get_layer", "set_module", "file_sha256", "plain_convs"]


@dataclass
class LoadedModel:
    """A classifier in eval mode plus what produced it (recorded in every store and record)."""

    model: nn.Module
    name: str  # torchvision name, timm/<name>, or path/to/file.py:function
    weights: str  # weights id: "<WeightsEnum>.<NAME>", "timm:<name>", "file:<sha256 prefix>", "module:<sha256
    # prefix of the parameters and buffers>" (an own file's model as built, a notebook's module), "none"
    num_classes: int  # outputs (logits)
    categories: list[str] | None  # human class names by logit index, from the weights' metadata, if any
    preprocess: Preprocess = field(default_factory=Preprocess)  # the evaluation transform its weights declare
    legacy_weights: str | None = None  # the id an earlier version recorded instead (own file: "as-built:<.py hash>")

    @property
    def tag(self) -> str:
        return model_tag(self.name)


def model_tag(name: str) -> str:
    """``name`` as it appears in file and folder names: ``timm/convnext_tiny`` -> ``timm-convnext_tiny``,
    ``models/net.py:build`` -> ``net.py-build``; torchvision names stay as they are."""
    own = split_file_spec(name)
    if own:
        return f"{own[0].replace(chr(92), '/').rsplit('/', 1)[-1]}-{own[1]}"
    return name.replace("/", "-")


def _source(name: str):
    if name.startswith("timm/"):
        return lambda w, n, seed=0: build_timm(name[5:], w, n, seed)
    if split_file_spec(name):
        return lambda w, n, seed=0: build_own(name, w, n, seed)
    return lambda w, n, seed=0: build_torchvision(name, w, n, seed)


def load_model(name: str, weights: str = DEFAULT_WEIGHTS, num_classes: int | None = None,
               inputs: InputSpec | None = None) -> LoadedModel:
    """Build model ``name`` in eval mode with ``weights`` (see ``utils.model.sources``), parameters frozen, timm's
    weight-standardised and symmetric 'same'-padded convs made plain ``nn.Conv2d`` (:func:`plain_convs`).
    ``inputs`` replaces parts of the transform its weights declare (``--input_size``, ...). One blank image
    of that size goes through the model first: a model that fails on it is one line naming the flags.

    Nothing is downloaded: torchvision weights must be in ``$TORCH_HOME/hub/checkpoints``, timm's in the
    local Hugging Face (or torch hub) cache.
    """
    weights = weights or DEFAULT_WEIGHTS
    if weights.lower() == "none":
        weights = "none"
    built = _source(name)(weights, num_classes)
    preprocess = (inputs or InputSpec()).applied(built.preprocess)
    return loaded_model(built.model, name, built.weights_id, built.categories, preprocess, built.legacy_id)


def check_float32(model: nn.Module, name: str = "the model") -> None:
    """Refuse a model whose parameters are not float32 or whose buffers are half precision (``model.half()``,
    a bfloat16 or float64 model): every pass feeds float32 images and keeps float32 filters; half precision is
    a setting of stage 1's pass (``--precision``), not of the model."""
    def odd(t: torch.Tensor, parameter: bool) -> bool:
        return t.is_floating_point() and t.dtype != torch.float32 and (
            parameter or t.dtype in (torch.float16, torch.bfloat16))

    kinds = sorted({str(t.dtype).replace("torch.", "") for t in model.parameters() if odd(t, True)}
                   | {str(t.dtype).replace("torch.", "") for t in model.buffers() if odd(t, False)})
    if kinds:
        raise UserError(f"{name} has {' and '.join(kinds)} weights; this toolkit takes float32 models: pass "
                        "model.float() (--precision bf16 or fp16 runs stage 1's pass in half precision)")


def loaded_model(model: nn.Module, name: str, weights_id: str, categories, preprocess: Preprocess,
                 legacy_weights: str | None = None) -> LoadedModel:
    """A model in memory made ready as :func:`load_model` makes one (eval mode, frozen, convs plain, probed
    with one image of ``preprocess.crop`` px): for the Python API's ``nn.Module``. The caller's module is used
    in place. A model that is not float32 (``model.half()``) is one UserError line."""
    check_float32(model, name)
    model = plain_convs(model).eval()
    remember_side(model, preprocess.crop)
    for p in model.parameters():
        p.requires_grad_(False)
    out = outputs(model, preprocess.crop, name)
    categories = list(categories) if categories and len(categories) == out else None
    return LoadedModel(model, name, weights_id, out, categories, preprocess, legacy_weights)


def outputs(model: nn.Module, side: int = 224, name: str = "the model") -> int:
    """The number of logits, measured on one blank image of ``side`` x ``side`` pixels (the size the model's
    transform makes): a model that fails on it, or returns anything but a batch x classes tensor, is one
    UserError line that says what was expected."""
    p = next(iter(model.parameters()), None)
    try:
        with torch.no_grad():
            y = model(torch.zeros(1, 3, side, side, device=None if p is None else p.device))
    except Exception as e:  # noqa: BLE001 - the user's model: say what failed, and what it was given
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{name} fails on one 3 x {side} x {side} image, the input size its transform makes "
                        f"({type(e).__name__}: {first}); give the size it takes with {INPUT_FLAGS}") from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != 1:
        what = type(y).__name__ if not isinstance(y, torch.Tensor) else f"a tensor of shape {tuple(y.shape)}"
        raise UserError(f"{name} returns {what} for one image; it must return its logits, a tensor of shape "
                        "(images, classes)")
    return int(y.shape[1])


def weights_id(name: str, weights: str) -> str | None:
    """The id a store or record keeps for ``weights`` of model ``name``, when it can be known without
    building the model (None: a checkpoint file that is not here, or a source that cannot tell)."""
    if weights.lower() == "none" and not split_file_spec(name):
        return "none"
    if is_checkpoint(weights):
        return "file:" + file_sha256(weights)[:16] if os.path.isfile(weights) else None
    if name.startswith("timm/"):
        return f"timm:{name[5:]}" if weights in (DEFAULT_WEIGHTS, "pretrained") else None
    if split_file_spec(name):
        return None
    return torchvision_weights_id(name, weights)


def build_model(name: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """The architecture ``name`` without pretrained weights (random from ``seed``), convs made plain as by
    :func:`load_model` (to load a state_dict saved from a loaded model into, or to train)."""
    built = _source(name)("none", num_classes, seed)
    model = plain_convs(built.model)
    remember_side(model, built.preprocess.crop)
    return model


def default_layer(model: nn.Module, side: int | None = None) -> str:
    """Dotted name of the model's last unit layer before its head: the last ``Conv2d`` with ``groups == 1`` or
    ``Linear`` applied at every position, that is not the classifier (a conv head) and that the toolkit can
    compute. ResNet-50: ``layer4.2.conv3``; squeezenet1_1: ``features.12.expand3x3``; ViT, DeiT, Swin,
    ConvNeXt: the last block's MLP output (torchvision ``vit_b_16``: ``encoder.layers.encoder_layer_11.mlp.3``).
    The head and the position-wise Linears come from one cached probe forward at ``side`` px
    (``utils.model.kinds``); a ``Linear`` on ``(B, C)`` (a classifier, VGG's fc layers) is never the default."""
    linears = positionwise_linears(model, side)
    head = classifier_conv(model, side)
    units = [n for n, m in model.named_modules() if n != head and (
        (isinstance(m, nn.Conv2d) and m.groups == 1 and not has_own_forward(m)) or n in linears)]
    if not units:
        raise UserError("the model has no plain Conv2d layer with groups=1 and no position-wise Linear before its "
                        f"head{f' {head}' if head else ''}; pass --layer")
    return units[-1]


def get_layer(model: nn.Module, layer: str | None, positions: str = "all") -> tuple[str, Unit]:
    """Resolve ``layer`` (dotted module path, ``None``/``last_conv`` for the default) to a :class:`Unit`: a plain
    Conv2d (groups=1), or a Linear (its neurons; ``positions``: which of its positions count)."""
    if layer in (None, "", "last_conv"):
        layer = default_layer(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        units = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hint = f" (e.g. {', '.join(units[-3:])})" if units else ""
        raise UserError(f"the model has no layer {layer!r}{hint}")
    m = modules[layer]
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        raise UserError(f"layer {layer} is a {type(m).__name__}, not a Conv2d or a Linear")
    if has_own_forward(m):
        raise UserError(own_forward_problem(layer, m))
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise UserError(f"layer {layer} is a grouped convolution (groups={m.groups}); only groups=1 is supported")
    return layer, Unit(m, positions)


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted`` (e.g. ``layer4.2.conv3``) by ``new``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
