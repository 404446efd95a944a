"""The stage-1 store: one plain array per quantity, written atomically, resumable.

Layout of ``<store_dir>/<model>[_<layer>]_channel_importances/``::

    meta.json         what made the store (model, weights, layer, data fingerprints, class map, ...) and "complete"
    relevance.npy     N x C float32, R_i[c] in dataset order (its dtype is meta.json's "relevance_dtype")
    targets.npy       N int64, labels (the model's logit indices)
    predictions.npy   N int64, argmax of the logits
    tap_sums.npy      K x C_in x kh x kw float64, per class what each kernel tap of the layer sees (summed)
    layer_weight.npy  C x C_in x kh x kw float32 (and layer_bias.npy when the layer has a bias)
    chunks/           while running: one .npz per finished chunk of images (deleted when complete)

Format 1 stores (``input_sums.npy``: K x C_in x H x W whole input maps) still open; their ARVs follow from
the input sums, which convert exactly into tap sums (``utils.store.arvs.class_tap_sums``). Format 1 and 2 stores hold
float16 relevance (values beyond 65504 became inf, those below 6e-8 zero); format 3 stores float32, which holds
whatever the pass computes. An unfinished store is finished in its own format.

Every file is written under a temporary name and renamed, so a crash leaves the old or the new
state. All arrays open with ``numpy.load(path, mmap_mode="r")``; nothing is pickled.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.classes import ClassNames, data_class_map
from ..data.images import ImageList, data_root, list_images
from ..errors import UserError
from ..files import read_json
from .lock import check_not_written
from ..model.loading import default_layer, get_layer, model_tag, weights_id
from ..model.sources import moved_spec

FORMAT_VERSION = 3  # 3: relevance float32 (1 and 2: float16)
READABLE_VERSIONS = (1, 2, 3)
# What must agree between a store and a run that uses it: key -> words for the message.
IDENTITY_KEYS = {"model": "model", "weights": "weights", "layer": "layer",
                 "data_fingerprint": "image list", "max_images_per_class": "--max_images_per_class",
                 "preprocess": "input transform (--input_size, --resize, --mean, --std)"}
OPTIONAL_IDENTITY = {"preprocess"}  # older stores may not have recorded it


def relevance_dtype(meta: dict) -> np.dtype:
    """The dtype of a store's relevance rows: its meta.json's ``relevance_dtype`` (stores before format 3: float16)."""
    return np.dtype(meta.get("relevance_dtype", "float16"))


STORE_SUFFIX = "_channel_importances"


def layer_head(tag: str, layer: str | None, is_default: bool) -> str:
    """A model's name in the names of its files: its tag, and the layer unless it is the model's default layer
    (``resnet50``, ``resnet50_layer3.1.conv2``): the start of a store's, a record's and stage 2's file names."""
    return tag if is_default else f"{tag}_{layer}"


def store_name(model: str, layer: str | None, default: str | None) -> str:
    """``resnet50_channel_importances`` for the default layer, ``resnet50_layer3.1.conv2_...`` otherwise."""
    return layer_head(model, layer, layer == default) + STORE_SUFFIX


def store_head(path: str) -> str:
    """The :func:`layer_head` a store's folder is named after."""
    return os.path.basename(os.path.normpath(path)).removesuffix(STORE_SUFFIX)


def identity_difference(meta: dict, wanted: dict) -> str | None:
    """Name the first identity field in which ``wanted`` differs from ``meta``, or None."""
    for key, words in IDENTITY_KEYS.items():
        if key in OPTIONAL_IDENTITY and key not in meta:
            continue
        if key in wanted and meta.get(key) != wanted[key]:
            return f"{words}: store has {meta.get(key)!r}, this run has {wanted[key]!r}"
    return None


def _same_layer_weights(path: str, unit) -> bool | None:
    """Whether the store's ``layer_weight.npy`` (and ``layer_bias.npy``) hold exactly ``unit``'s filters (a
    :class:`utils.model.units.Unit`); None when the store does not say."""
    try:
        w = np.load(os.path.join(path, "layer_weight.npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None
    same = np.array_equal(w, unit.weight.detach().float().cpu().numpy())
    if same and unit.bias is not None and os.path.isfile(os.path.join(path, "layer_bias.npy")):
        same = np.array_equal(np.load(os.path.join(path, "layer_bias.npy"), allow_pickle=False),
                              unit.bias.detach().float().cpu().numpy())
    return same


def weights_difference(path: str, meta: dict, lm, layer: str, unit) -> str | None:
    """How the weights of the store at ``path`` (its ``meta``) differ from the loaded model ``lm``'s (``unit``:
    its layer ``layer``), in words for "made with another ...", or None when they are the same.

    The store's weights id is compared with ``lm.weights``; the store's copy of the layer's filters says whether
    the difference reaches the layer. A store an earlier version made of an own model file recorded the hash of
    the .py file alone (``lm.legacy_weights``): it is taken when that file is unchanged AND the layer's filters are
    those of this model (the weights the function reads did not change); otherwise the line says how to proceed.
    """
    have, want = meta.get("weights"), lm.weights
    if have == want:
        return None
    same = _same_layer_weights(path, unit)
    if have is not None and have == lm.legacy_weights:
        if same:
            return None
        return (f"weights: store has {have!r}, which an earlier version made from {lm.name}'s .py file alone; that "
                f"file is unchanged, but layer {layer}'s filters are not those stage 1 used (the weights it loads "
                "changed)")
    where = {True: f"layer {layer}'s filters are the same, other parameters or buffers differ",
             False: f"layer {layer}'s filters differ"}.get(same, "parameters or buffers differ")
    line = f"weights: store has {have!r}, this run has {want!r} ({where})"
    if str(have).startswith("as-built:") and lm.legacy_weights is not None:
        line += (f"; the store's id is an earlier version's hash of the .py file alone, and that file changed: if "
                 f"the parameters are those stage 1 used, set \"weights\" to {want!r} in "
                 f"{os.path.join(path, 'meta.json')} to keep the store")
    return line


def model_difference(path: str, meta: dict, lm, layer: str, unit, **wanted: Any) -> str | None:
    """The first identity field in which the store at ``path`` differs from the loaded model ``lm``'s layer
    ``layer`` (``unit``) and ``wanted``: model, weights (:func:`weights_difference`), then the rest."""
    return (identity_difference({**meta, "model": moved_spec(meta.get("model"))}, {"model": lm.name})
            or weights_difference(path, meta, lm, layer, unit)
            or identity_difference(meta, {"layer": layer, "preprocess": lm.preprocess.to_json(), **wanted}))


REDO = "rerun stage 1 (get_importances_for_classes.py) into a fresh --store_dir"


def is_store(folder: str) -> bool:
    """Whether ``folder`` is a stage-1 store: its meta.json beside its arrays or its chunks."""
    return os.path.isfile(os.path.join(folder, "meta.json")) and any(
        os.path.exists(os.path.join(folder, n)) for n in ("relevance.npy", "chunks", "tap_sums.npy", "input_sums.npy"))


def _stores_here(folder: str) -> str:
    """What a user can do instead: the stores that ``folder`` does hold, with the ``--model`` (and
    ``--layer``) that reads each, or how to make one."""
    found = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        meta_path = os.path.join(folder, entry, "meta.json")
        if entry.endswith(STORE_SUFFIX) and os.path.isfile(meta_path):
            try:
                meta = read_json(meta_path)
            except UserError:
                continue
            found.append(f"--model {meta.get('model')} --layer {meta.get('layer')}")
    if not found:
        return "run get_importances_for_classes.py first"
    return f"{folder} holds {len(found)} store(s), read with: " + "; ".join(found)


def _array_problem(path: str, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
    """What is wrong with the .npy file ``path`` against ``dtype`` and ``shape``, or None."""
    if not os.path.isfile(path):
        return "is missing"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - whatever the content (text, a bad header), it is not the array
        return "is truncated or not a .npy file"
    if not isinstance(a, np.ndarray):  # a zip (an .npz, a torch file) loads as an archive
        if hasattr(a, "close"):
            a.close()
        return "is not a .npy array (it holds a zip archive)"
    if a.dtype != dtype or tuple(a.shape) != shape:
        return f"holds {a.dtype} {tuple(a.shape)}, meta.json implies {dtype} {shape}"
    return None


def read_meta(path: str) -> dict:
    """The ``meta.json`` of the store at ``path``; an unreadable one is a damaged store (one line)."""
    try:
        return read_json(os.path.join(path, "meta.json"))
    except UserError:
        raise UserError(f"store {path} is damaged: meta.json cannot be read; {REDO}") from None


def _array(name: str, mmap: bool = False) -> property:
    """A store array as a read-only property (memory-mapped where it can be large)."""
    return property(lambda self: self._load(f"{name}.npy", mmap))


@dataclass
class Store:
    """A finished (or partial) stage-1 store opened for reading; arrays are memory-mapped."""

    path: str
    meta: dict

    @classmethod
    def open(cls, path: str, require_complete: bool = True, writer: bool = False) -> "Store":
        """Open the store at ``path``: a complete one (``require_complete``), checked file by file against its
        meta.json, that no stage-1 run is writing (``writer``: the caller is that run)."""
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no stage-1 store at {path} ({_stores_here(os.path.dirname(path))})")
        if not writer:
            check_not_written(path)
        meta = read_meta(path)
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise UserError(f"store {path} has format version {meta.get('format_version')}, "
                            f"this toolkit reads {', '.join(map(str, READABLE_VERSIONS))}")
        if require_complete and not meta.get("complete"):
            raise UserError(f"store {path} is incomplete: rerun get_importances_for_classes.py to finish it")
        store = cls(path, meta)
        if require_complete:
            store.validate()
        return store

    def expected_arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Every array file of a complete store with the dtype and shape its meta.json implies."""
        m = self.meta
        n, C, c_in = int(m["num_images"]), int(m["out_channels"]), int(m["in_channels"])
        K = len(m["class_counts"])
        out = {"relevance.npy": (relevance_dtype(m), (n, C)), "targets.npy": (np.int64, (n,)),
               "predictions.npy": (np.int64, (n,)),
               "layer_weight.npy": (np.float32, (C, c_in, *m["conv"]["kernel_size"]))}
        if self.format_version >= 2:
            out["tap_sums.npy"] = (np.float64, (K, *m["tap_shape"]))
        else:
            out["input_sums.npy"] = (np.float64, (K, *m["input_shape"]))
        if m["conv"].get("bias"):
            out["layer_bias.npy"] = (np.float32, (C,))
        return out

    def validate(self) -> None:
        """Check every array's presence, dtype, shape and length against meta.json (headers only: cheap)."""
        try:
            expected = self.expected_arrays()
        except (KeyError, TypeError, ValueError):
            raise UserError(f"store {self.path} is damaged: meta.json lacks what it must say; {REDO}") from None
        for name, (dtype, shape) in expected.items():
            problem = _array_problem(os.path.join(self.path, name), np.dtype(dtype), tuple(int(v) for v in shape))
            if problem:
                raise UserError(f"store {self.path} is damaged: {name} {problem}; {REDO}")

    def _load(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(os.path.join(self.path, name), mmap_mode="r" if mmap else None, allow_pickle=False)

    relevance = _array("relevance", mmap=True)  # N x C float32 (older stores: float16), memory-mapped
    targets = _array("targets")  # N int64
    predictions = _array("predictions")  # N int64
    tap_sums = _array("tap_sums", mmap=True)  # K x C_in x kh x kw float64 (format 2)
    input_sums = _array("input_sums", mmap=True)  # K x C_in x H x W float64 (format 1), memory-mapped
    layer_weight = _array("layer_weight")  # C x C_in x kh x kw float32

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.meta["class_counts"], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """K: the length of every per-class array (the model's outputs; format 1: the class folders)."""
        return len(self.meta["class_counts"])

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def class_index(self) -> dict[str, int]:
        """Class folder -> logit index (format 1: the folder's position)."""
        return self.meta.get("class_index") or {f: t for t, f in enumerate(self.meta["classes"])}

    @property
    def positions(self) -> str:
        """Which positions of the layer count: ``all``, or ``cls`` (a Linear on tokens: the class token alone)."""
        return self.meta.get("positions", "all")

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy of the model on the training images as stage 1 fed them (None: no images)."""
        if "train_accuracy" in self.meta:
            return self.meta["train_accuracy"]
        t, p = self._load("targets.npy"), self._load("predictions.npy")
        return float((t == p).mean()) if len(t) else None

    @property
    def num_channels(self) -> int:
        return int(self.meta["out_channels"])

    @property
    def names(self) -> ClassNames:
        """Human class names (the weights' categories, else the class folders)."""
        index = self.class_index
        return ClassNames(self.meta.get("class_names"), list(index), list(index.values()))

    def check(self, **wanted: Any) -> None:
        diff = identity_difference(self.meta, wanted)
        if diff:
            raise UserError(f"store {self.path} was made with another {diff}")


def store_path(store_dir: str, lm, layer: str) -> str:
    """Where the store of a loaded model's ``layer`` lives in ``store_dir`` (see :func:`store_name`)."""
    return os.path.join(store_dir, store_name(lm.tag, layer, default_layer(lm.model)))


def model_store(store_dir: str, lm, layer: str) -> Store:
    """The complete store of a loaded model's ``layer``, checked against it (model, weights, layer): how
    every command that has the model opens its store."""
    store = Store.open(store_path(store_dir, lm, layer))
    diff = model_difference(store.path, store.meta, lm, layer, get_layer(lm.model, layer)[1])
    if diff:
        raise UserError(f"store {store.path} was made with another {diff}")
    return store


def open_store(store_dir: str, model: str, layer: str | None = None, weights: str | None = None) -> Store:
    """Open the complete stage-1 store of ``model`` (and ``layer``) in ``store_dir``, without loading the model.

    The default layer's store is ``<model>_channel_importances`` (its meta.json names the layer);
    another layer's is ``<model>_<layer>_channel_importances``. ``weights``, when given, is checked
    against the store as far as it can be known without the weights file.
    """
    default_path = os.path.join(store_dir, store_name(model_tag(model), None, None))
    path = default_path
    if layer not in (None, "", "last_conv"):
        own = os.path.join(store_dir, store_name(model_tag(model), layer, None))
        meta = os.path.join(default_path, "meta.json")
        if os.path.isfile(os.path.join(own, "meta.json")) or not os.path.isfile(meta) \
                or read_json(meta).get("layer") != layer:
            path = own
    store = Store.open(path)
    wanted = {"model": model}
    if layer not in (None, "", "last_conv"):
        wanted["layer"] = layer
    wid = weights_id(model, weights) if weights is not None else None
    if wid is not None:
        wanted["weights"] = wid
    store.check(**wanted)
    return store


def training_images(store: Store, data_dir: str, classes: list[int], class_index: str | None = None) -> ImageList:
    """The training images of ``classes`` (only those folders are listed), checked against the store: the
    same files (names, sizes, modification times) as when stage 1 ran."""
    cmap = data_class_map(data_dir, "train", store.num_classes, class_index, store.path)
    meta = store.meta
    if store.format_version == 1:  # fingerprints of the whole list, names only
        images = list_images(data_dir, "train", meta.get("max_images_per_class"), cmap)
        same = images.legacy_fingerprint() == meta["data_fingerprint"]
    else:
        images = list_images(data_dir, "train", meta.get("max_images_per_class"), cmap, only=classes)
        recorded = meta.get("class_fingerprints", {})
        changed = [c for c, f in images.class_fingerprints().items() if recorded.get(c) != f]
        same = not changed
        if changed and data_root(data_dir) == meta.get("data_root"):
            raise UserError(f"the images of class folder {os.path.join(data_root(data_dir, 'train'), changed[0])} changed "
                            f"since stage 1 made store {store.path} (an image added, removed or replaced): rerun "
                            "stage 1 into a new --store_dir")
    if not same:
        raise UserError(f"the training images in {data_root(data_dir)} are not those of store {store.path} "
                        f"(made from {meta.get('data_root')}); pass the same --data_dir as in stage 1")
    return images


def concept_training_images(store: Store, data_dir: str, concepts: list[int], others: int, seed: int,
                            class_index: str | None = None) -> ImageList:
    """:func:`training_images` of the ``concepts``' classes and of up to ``others`` classes outside them, drawn
    with ``seed`` among those with training images: what a concept is read against (the searched rule's other
    images, the ablations' references)."""
    mine = sorted(set(concepts))
    have = [t for t in store.class_index.values() if store.class_counts[t] > 0 and t not in set(mine)]
    extra = sorted(random.Random(seed).sample(have, min(len(have), others)))
    return training_images(store, data_dir, mine + extra, class_index)
