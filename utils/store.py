"""The stage-1 store: one plain array per quantity, written atomically, resumable.

Layout of ``<store_dir>/<model>[_<layer>]_channel_importances/``::

    meta.json         what made the store (model, weights, layer, data fingerprint, ...) and "complete"
    relevance.npy     N x C float16, R_i[c] in dataset order
    targets.npy       N int64, labels
    predictions.npy   N int64, argmax of the logits
    input_sums.npy    K x C_in x H x W float64, per-class sums of the layer's input map
    layer_weight.npy  C x C_in x kh x kw float32 (and layer_bias.npy when the layer has a bias)
    chunks/           while running: one .npz per finished chunk of images (deleted when complete)

Every file is written under a temporary name and renamed, so a crash leaves the old or the new
state. All arrays open with ``numpy.load(path, mmap_mode="r")``; nothing is pickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .concepts import ClassNames
from .errors import UserError
from .files import read_json

FORMAT_VERSION = 1
# What must agree between a store and a run that uses it: key -> words for the message.
IDENTITY_KEYS = {"model": "model", "weights": "weights", "layer": "layer",
                 "data_fingerprint": "image list", "max_images_per_class": "--max_images_per_class"}


def store_name(model: str, layer: str, default: str) -> str:
    """``resnet50_channel_importances`` for the default layer, ``resnet50_layer3.1.conv2_...`` otherwise."""
    return f"{model}_channel_importances" if layer == default else f"{model}_{layer}_channel_importances"


def identity_difference(meta: dict, wanted: dict) -> str | None:
    """Name the first identity field in which ``wanted`` differs from ``meta``, or None."""
    for key, words in IDENTITY_KEYS.items():
        if key in wanted and meta.get(key) != wanted[key]:
            return f"{words}: store has {meta.get(key)!r}, this run has {wanted[key]!r}"
    return None


def _array(name: str, mmap: bool = False) -> property:
    """A store array as a read-only property (memory-mapped where it can be large)."""
    return property(lambda self: self._load(f"{name}.npy", mmap))


@dataclass
class Store:
    """A finished (or partial) stage-1 store opened for reading; arrays are memory-mapped."""

    path: str
    meta: dict

    @classmethod
    def open(cls, path: str, require_complete: bool = True) -> "Store":
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no stage-1 store at {path} (run get_importances_for_classes.py first)")
        meta = read_json(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"store {path} has format version {meta.get('format_version')}, "
                            f"this toolkit reads {FORMAT_VERSION}")
        if require_complete and not meta.get("complete"):
            raise UserError(f"store {path} is incomplete: rerun get_importances_for_classes.py to finish it")
        return cls(path, meta)

    def _load(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(os.path.join(self.path, name), mmap_mode="r" if mmap else None, allow_pickle=False)

    relevance = _array("relevance", mmap=True)  # N x C float16, memory-mapped
    targets = _array("targets")  # N int64
    predictions = _array("predictions")  # N int64
    input_sums = _array("input_sums", mmap=True)  # K x C_in x H x W float64, memory-mapped
    layer_weight = _array("layer_weight")  # C x C_in x kh x kw float32

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.meta["class_counts"], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def num_channels(self) -> int:
        return int(self.meta["out_channels"])

    @property
    def names(self) -> ClassNames:
        """Human class names (the weights' categories, else the class folders)."""
        return ClassNames(self.meta.get("class_names"), self.meta["classes"])

    def check(self, **wanted: Any) -> None:
        diff = identity_difference(self.meta, wanted)
        if diff:
            raise UserError(f"store {self.path} was made with another {diff}")


def open_store(store_dir: str, model: str, layer: str | None = None, weights: str | None = None) -> Store:
    """Open the complete stage-1 store of ``model`` (and ``layer``) in ``store_dir``, without loading the model.

    The default layer's store is ``<model>_channel_importances`` (its meta.json names the layer);
    another layer's is ``<model>_<layer>_channel_importances``. ``weights``, when given, is checked
    against the store as far as it can be known without the weights file.
    """
    from .models import weights_id

    default_path = os.path.join(store_dir, f"{model}_channel_importances")
    path = default_path
    if layer not in (None, "", "last_conv"):
        own = os.path.join(store_dir, f"{model}_{layer}_channel_importances")
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
