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

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError

FORMAT_VERSION = 1
# What must agree between a store and a run that uses it: key -> words for the message.
IDENTITY_KEYS = {"model": "model", "weights": "weights", "layer": "layer",
                 "data_fingerprint": "image list", "max_images_per_class": "--max_images_per_class"}


def store_name(model: str, layer: str, default: str) -> str:
    """``resnet50_channel_importances`` for the default layer, ``resnet50_layer3.1.conv2_...`` otherwise."""
    return f"{model}_channel_importances" if layer == default else f"{model}_{layer}_channel_importances"


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def write_json(path: str, obj: Any) -> None:
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path: str, arr: np.ndarray) -> None:
    tmp = _tmp(path) + ".npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    tmp = _tmp(path) + ".npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def identity_difference(meta: dict, wanted: dict) -> str | None:
    """Name the first identity field in which ``wanted`` differs from ``meta``, or None."""
    for key, words in IDENTITY_KEYS.items():
        if key in wanted and meta.get(key) != wanted[key]:
            return f"{words}: store has {meta.get(key)!r}, this run has {wanted[key]!r}"
    return None


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

    @property
    def relevance(self) -> np.ndarray:
        return self._load("relevance.npy")

    @property
    def targets(self) -> np.ndarray:
        return self._load("targets.npy", mmap=False)

    @property
    def predictions(self) -> np.ndarray:
        return self._load("predictions.npy", mmap=False)

    @property
    def input_sums(self) -> np.ndarray:
        return self._load("input_sums.npy")

    @property
    def layer_weight(self) -> np.ndarray:
        return self._load("layer_weight.npy", mmap=False)

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.meta["class_counts"], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def num_channels(self) -> int:
        return int(self.meta["out_channels"])

    def class_label(self, t: int) -> str:
        names = self.meta.get("class_names") or self.meta["classes"]
        return f"{t} {names[t]}"

    def check(self, **wanted: Any) -> None:
        diff = identity_difference(self.meta, wanted)
        if diff:
            raise UserError(f"store {self.path} was made with another {diff}")

    def conv_geometry(self) -> dict:
        return self.meta["conv"]


def remove_partial(path: str) -> None:
    """Delete a store folder that holds no finished work (used when the first chunk fails)."""
    chunks = os.path.join(path, "chunks")
    if os.path.isdir(path) and not (os.path.isdir(chunks) and os.listdir(chunks)):
        meta = os.path.join(path, "meta.json")
        if not os.path.isfile(meta) or not read_json(meta).get("complete"):
            shutil.rmtree(path, ignore_errors=True)
