"""Where a model comes from: torchvision by name, timm (``timm/<name>``), or a user's own Python file
(``path/to/file.py:function``). Each source builds the network, loads its weights without downloading
anything, and says what its weights declare: class names and the evaluation transform.

Weights: ``default`` (torchvision: ``IMAGENET1K_V1``; timm: its pretrained weights; own file: the model
as the function returns it), a weights name (torchvision) or ``pretrained`` (timm), a local checkpoint
file (a state_dict, read with ``weights_only=True``), or ``none`` (random initialisation, seeded).

The weights' id that stores and records keep: ``<WeightsEnum>.<NAME>`` (torchvision's published files),
``timm:<name>``, ``file:<sha256 of the checkpoint file>``, ``none``, and for an own file's model as its function
returns it (``default`` or ``none``) ``module:<sha256 of its parameters and buffers>``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from ..data.images import Preprocess
from ..data.preprocess import as_preprocess
from ..errors import UserError

DEFAULT_WEIGHTS = "default"
TORCHVISION_DEFAULT = "IMAGENET1K_V1"


@dataclass
class Built:
    """A freshly built network and what its weights declare."""

    model: nn.Module
    weights_id: str
    categories: list[str] | None = None
    preprocess: Preprocess = Preprocess()
    legacy_id: str | None = None  # the id an earlier version recorded for these weights (own files: the .py's hash)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def module_weights_id(model: nn.Module) -> str:
    """``module:<sha256 prefix>`` over the names and bytes of the parameters and buffers (its ``state_dict``):
    what identifies a model that is not a named or checkpoint file's weights (a notebook's ``nn.Module``, an own
    model file's function, whatever file that function reads its weights from)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return "module:" + h.hexdigest()[:16]


def is_checkpoint(weights: str) -> bool:
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``torch.load(..., weights_only=True)``; a ``state_dict``/``model`` entry of a
    training checkpoint works too). Anything else is one line saying how to make a plain state dict."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} does not exist")
    how = ("save one with torch.save(model.state_dict(), PATH); this toolkit never unpickles arbitrary objects")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module, a damaged or foreign file: all "not a state dict"
        raise UserError(f"checkpoint {path} is not a plain state dict of tensors: {how}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} is not a plain state dict of tensors: {how}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state(model: nn.Module, path: str, name: str) -> None:
    """Load the checkpoint ``path`` into ``model`` strictly; a mismatch is one line."""
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {name}: {' '.join(str(e).split())[:300]}") from None


def last_linear(model: nn.Module) -> tuple[str | None, nn.Linear | None]:
    found = (None, None)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (n, m)
    return found


def head_size(state: dict[str, torch.Tensor], probe: nn.Module) -> int | None:
    """The classifier size a checkpoint was trained with (its last Linear's rows), if it says."""
    head, _ = last_linear(probe)
    w = state.get(f"{head}.weight") if head else None
    return int(w.shape[0]) if w is not None else None


# ------------------------------------------------------------------ torchvision


def torchvision_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_weights_id(name: str, weights: str) -> str | None:
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    return f"{enum.__name__}.{TORCHVISION_DEFAULT if weights == DEFAULT_WEIGHTS else weights}"


def build_torchvision(name: str, weights: str, num_classes: int | None, seed: int = 0) -> Built:
    if name not in torchvision_models():
        raise UserError(f"unknown model {name!r}; torchvision classification models are e.g. resnet18, resnet50, "
                        "vgg16, densenet121, convnext_tiny (timm models: timm/<name>; your own: file.py:function)")
    kw = {"num_classes": num_classes} if num_classes else {}
    if weights == "none":  # random, from ``seed``
        torch.manual_seed(seed)
        return Built(torchvision.models.get_model(name, weights=None, **kw), "none")
    if is_checkpoint(weights):
        if not kw:
            n = head_size(read_state_dict(weights), torchvision.models.get_model(name, weights=None))
            kw = {"num_classes": n} if n else {}
        model = torchvision.models.get_model(name, weights=None, **kw)
        load_state(model, weights, name)
        return Built(model, "file:" + file_sha256(weights)[:16])
    enum = torchvision.models.get_model_weights(name)
    wname = TORCHVISION_DEFAULT if weights == DEFAULT_WEIGHTS else weights
    if wname not in enum.__members__:
        raise UserError(f"model {name} has no weights {wname!r}; choose one of {', '.join(enum.__members__)}, "
                        "a checkpoint file, or none")
    w = enum[wname]
    fname = os.path.basename(w.url)
    if not os.path.isfile(os.path.join(hub_checkpoint_dir(), fname)):
        raise UserError(f"weights {name}/{wname} are not on this machine: put {fname} into {hub_checkpoint_dir()} "
                        "(set TORCH_HOME to move it), or pass a checkpoint file or --weights none")
    tf = w.transforms()
    pre = Preprocess(int(tf.resize_size[0]), int(tf.crop_size[0]), tf.interpolation.value, tuple(tf.mean), tuple(tf.std))
    return Built(torchvision.models.get_model(name, weights=w), torchvision_weights_id(name, wname),
                 list(w.meta.get("categories") or []) or None, pre)


# ------------------------------------------------------------------ timm


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install timm") from None
    return timm


def timm_local_weights(arch: str) -> str:
    """The local file of timm's pretrained weights of ``arch`` (Hugging Face cache or torch hub cache)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise UserError(f"timm model {arch} has no pretrained weights; pass a checkpoint file or --weights none")
    repo = cfg.hf_hub_id
    if repo:
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
        for fname in names + ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        local = os.path.join(hub_checkpoint_dir(), os.path.basename(cfg.url))
        if os.path.isfile(local):
            return local
    where = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--")) if repo else hub_checkpoint_dir()
    raise UserError(f"timm weights of {arch} are not on this machine (looked in {where}); fetch them once on a "
                    "machine with internet (timm.create_model(..., pretrained=True)) and copy the cache, or pass a "
                    "checkpoint file or --weights none")


def timm_preprocess(model: nn.Module) -> Preprocess:
    """The evaluation transform timm's data config declares for ``model`` (centre crop)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bilinear")
    return Preprocess(int(math.floor(crop / cfg.get("crop_pct", 0.875))), crop,
                      interp if interp in ("nearest", "bilinear", "bicubic") else "bilinear",
                      tuple(cfg["mean"]), tuple(cfg["std"]))


def timm_categories(model: nn.Module) -> list[str] | None:
    """Class names from timm's ImageNet info, for models trained on an ImageNet subset it knows."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    except Exception:  # noqa: BLE001 - names are a nicety; folder names stand in
        return None


def build_timm(arch: str, weights: str, num_classes: int | None, seed: int = 0) -> Built:
    timm = _timm()
    if not timm.is_model(arch):
        raise UserError(f"timm has no model {arch!r} (timm.list_models() lists them)")
    kw = {"num_classes": num_classes} if num_classes else {}
    if weights == "none":  # random, from ``seed``
        torch.manual_seed(seed)
        model, wid = timm.create_model(arch, pretrained=False, **kw), "none"
    elif is_checkpoint(weights):
        if not kw:
            n = head_size(read_state_dict(weights), timm.create_model(arch, pretrained=False))
            kw = {"num_classes": n} if n else {}
        model = timm.create_model(arch, pretrained=False, **kw)
        load_state(model, weights, f"timm/{arch}")
        wid = "file:" + file_sha256(weights)[:16]
    elif weights in (DEFAULT_WEIGHTS, "pretrained"):
        local = timm_local_weights(arch)
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": local}, **kw)
        wid = f"timm:{arch}"
    else:
        raise UserError(f"--weights for a timm model is pretrained (default), a checkpoint file or none, not {weights!r}")
    return Built(model, wid, timm_categories(model), timm_preprocess(model))


# ------------------------------------------------------------------ a user's own file


# This package's own model files that moved when the package was rehoused into sub-packages: stores, records and
# exported networks made before name the old path (``.../utils/demo_models.py:digits_vit``), which still loads.
MOVED_FILES = {"demo_models.py": ("model", "demo_models.py")}


def moved_file(path: str) -> str:
    """``path``, or where this package's file of that old path is now."""
    head, base = os.path.split(path)
    if base in MOVED_FILES and not os.path.exists(path) and os.path.basename(head) in ("utils", "disentangle_channels"):
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *MOVED_FILES[base])
    return path


def moved_spec(name):
    """A model name as this version names it: ``path/to/file.py:function`` with an old path of this package's own
    file (:data:`MOVED_FILES`) made the new one; any other name as it is."""
    spec = split_file_spec(name) if isinstance(name, str) else None
    return f"{spec[0]}:{spec[1]}" if spec else name


def split_file_spec(name: str) -> tuple[str, str] | None:
    """``("path/to/file.py", "function")`` for ``path/to/file.py:function``, else None."""
    m = re.fullmatch(r"(.+\.py):([A-Za-z_][A-Za-z0-9_]*)", name)
    return (moved_file(m[1]), m[2]) if m else None


OWN_RETURNS = "an nn.Module, (nn.Module, class names) or (nn.Module, class names or None, transform)"


def _call_own(name: str, path: str, function: str):
    """Import the user's file and call ``function()``; whatever fails in it is one UserError line."""
    spec = importlib.util.spec_from_file_location(f"_user_model_{hashlib.sha1(path.encode()).hexdigest()[:8]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        raise UserError(f"{path} called sys.exit({e.code!r}) while it was imported; a model file must not exit") from None
    except BaseException as e:  # noqa: BLE001 - the user's code: say what failed in one line
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserError(f"importing {path} failed: {type(e).__name__}: {_first_line(e)}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"{path} has no function {function}")
    try:
        return fn()
    except SystemExit as e:
        raise UserError(f"{name} called sys.exit({e.code!r}); it must return {OWN_RETURNS}") from None
    except Exception as e:  # noqa: BLE001 - the user's code: say what failed in one line
        raise UserError(f"{name} failed: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _own_result(name: str, path: str, function: str, out) -> tuple[nn.Module, list | None, Preprocess | None]:
    """The model, class names and transform (a :class:`Preprocess` or a dict of its fields, see
    :func:`utils.data.preprocess.as_preprocess`) that the user's function returned, checked: one line for anything
    else."""
    if isinstance(out, tuple):
        names = out[1] if len(out) > 1 else None
        if len(out) not in (2, 3) or not isinstance(out[0], nn.Module) or (
                names is not None and (isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"))) or (
                len(out) == 3 and not isinstance(out[2], (Preprocess, dict))):
            kinds = ", ".join(type(v).__name__ for v in out)
            raise UserError(f"{name} returned a tuple of {len(out)} ({kinds}); it must return {OWN_RETURNS}")
        transform = as_preprocess(out[2]) if len(out) == 3 else None
        return out[0], list(names) if names is not None else None, transform
    if not isinstance(out, nn.Module):
        raise UserError(f"{name} returned a {type(out).__name__}; it must return {OWN_RETURNS}")
    return out, None, None


def build_own(name: str, weights: str, num_classes: int | None, seed: int = 0) -> Built:
    path, function = split_file_spec(name)
    if not os.path.isfile(path):
        raise UserError(f"no file {path} (--model path/to/file.py:function)")
    if weights == "none":  # random, from ``seed`` (the function's initialisation draws from torch's generator)
        torch.manual_seed(seed)
    model, names, transform = _own_result(name, path, function, _call_own(name, path, function))
    if weights not in (DEFAULT_WEIGHTS, "none"):
        load_state(model, weights, name)
        return Built(model, "file:" + file_sha256(weights)[:16], names or None, transform or Preprocess())
    # the model as the function returns it: its parameters and buffers identify it, wherever they come from (the
    # function may read another file); earlier versions recorded the hash of the .py file alone (``legacy_id``)
    return Built(model, module_weights_id(model), names or None, transform or Preprocess(),
                 "as-built:" + file_sha256(path)[:16])
