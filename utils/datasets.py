"""Images given as torch Datasets (or DataLoaders) of ``(image, label)`` instead of an ImageFolder tree.

Everything that takes ``data_dir`` takes a :class:`Datasets` too: the images are listed as an
:class:`utils.data.ImageList` whose entries point into the dataset, a label is the model's logit index, and
a class's name is ``classes[label]`` (the dataset's ``classes`` attribute when it has one, else the label).

An item's image is either a PIL image (the tool's transform makes the network's input of it, as for image
files) or a tensor (``C x H x W``, already what the network takes: the tool feeds it as it is). For
pictures a tensor is mapped back to colours with ``mean`` and ``std`` (``x * std + mean``): give the
normalisation your tensors carry (``mean=(0, 0, 0), std=(1, 1, 1)`` for none).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLED = 16  # items whose content enters the fingerprint (with every label)


def _dataset(d, split: str):
    if isinstance(d, DataLoader):  # its batch size and workers are the tool's to choose; its dataset is the data
        d = d.dataset
    if d is not None and not (hasattr(d, "__getitem__") and hasattr(d, "__len__")):
        raise UserError(f"the {split} data is a {type(d).__name__}; give a torch Dataset (or a DataLoader over one) "
                        "of (image, label) items, or an ImageFolder path")
    return d


class Datasets:
    """Training (``train``) and validation (``val``) images as Datasets or DataLoaders of ``(image, label)``.

    ``classes``: the name of each label (default: the dataset's own ``classes``, else the label's number).
    ``mean``/``std``: the normalisation tensor items carry (pictures only). ``name``: how messages, records
    and reports call the data."""

    def __init__(self, train=None, val=None, classes: Sequence[str] | None = None, name: str = "datasets",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.splits = {"train": _dataset(train, "train"), "val": _dataset(val, "val")}
        self.name, self.mean, self.std = name, tuple(mean), tuple(std)
        self._classes = list(classes) if classes is not None else None
        self._labels: dict[str, list[int]] = {}  # read once per split, like the content hash
        self._hashes: dict[str, str] = {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.splits.items() if d is not None)
        return f"Datasets({self.name}: {sizes})"

    def dataset(self, split: str) -> Dataset:
        d = self.splits.get(split)
        if d is None:
            raise UserError(f"no {split} data was given ({self.name}); pass {split}=a Dataset of (image, label)")
        if len(d) == 0:
            raise UserError(f"the {split} data of {self.name} holds no images")
        return d

    def root(self, split: str) -> str:
        return f"{self.name}/{split}"

    def labels(self, split: str) -> list[int]:
        """Every item's label, read without decoding images where the dataset keeps them (``targets``,
        a TensorDataset's second tensor, a Subset of those); else from each item once."""
        if split not in self._labels:
            d = self.dataset(split)
            labels = _known_labels(d)
            if labels is None:
                labels = [self.item(split, i)[1] for i in range(len(d))]
            bad = [t for t in labels if t < 0]
            if bad:
                raise UserError(f"the {split} data of {self.name} has a negative label ({bad[0]})")
            self._labels[split] = labels
        return self._labels[split]

    def names(self) -> list[str] | None:
        """The name of each label, when the caller or a dataset gives them."""
        if self._classes is not None:
            return self._classes
        for d in self.splits.values():
            base = _base(d)
            if isinstance(getattr(base, "classes", None), (list, tuple)):
                return [str(c) for c in base.classes]
        return None

    def folders(self, split: str) -> dict[str, int]:
        """Each class of ``split`` as its 'folder' name (``classes[label]`` or the zero-padded label) -> label."""
        labels = sorted(set(self.labels(split)))
        names = self.names()
        if names is not None and labels[-1] >= len(names):
            raise UserError(f"the {split} data of {self.name} has label {labels[-1]} but only {len(names)} class "
                            "names")
        width = len(str(labels[-1]))
        out = {(names[t] if names is not None else f"{t:0{width}d}"): t for t in labels}
        if len(out) != len(labels):
            raise UserError(f"the class names of {self.name} are not unique")
        return out

    def item(self, split: str, i: int) -> tuple[object, int]:
        """Item ``i`` of ``split`` as (image, label); anything else is one line."""
        out = self.dataset(split)[i]
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise UserError(f"item {i} of the {split} data of {self.name} is a {type(out).__name__}; a dataset must "
                            "yield (image, label)")
        image, label = out[0], out[1]
        if not isinstance(image, (torch.Tensor, Image.Image)):
            raise UserError(f"item {i} of the {split} data of {self.name} has a {type(image).__name__} for its "
                            "image; give a PIL image or a C x H x W tensor")
        return image, int(label)

    def picture(self, split: str, i: int) -> Image.Image:
        """Item ``i``'s image as an RGB picture (a tensor mapped back with ``mean`` and ``std``)."""
        image = self.item(split, i)[0]
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        x = image.detach().float().cpu()
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise UserError(f"item {i} of the {split} data of {self.name} is a tensor of shape {tuple(x.shape)}; "
                            "an image is C x H x W with C = 1 or 3")
        x = (x * torch.tensor(self.std[:len(x)])[:, None, None] + torch.tensor(self.mean[:len(x)])[:, None, None])
        a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).convert("RGB")

    def content_hash(self, split: str) -> str:
        """sha256 of the labels and the content of up to :data:`SAMPLED` items spread over ``split`` (read once: a
        store's fingerprint and its per-class fingerprints both use it)."""
        if split not in self._hashes:
            labels = self.labels(split)
            h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
            for i in np.linspace(0, len(labels) - 1, min(SAMPLED, len(labels))).round().astype(int):
                image = self.item(split, int(i))[0]
                h.update(image.tobytes() if isinstance(image, Image.Image)
                         else image.detach().cpu().contiguous().numpy().tobytes())
            self._hashes[split] = h.hexdigest()
        return self._hashes[split]


def _base(d):
    while isinstance(d, Subset):
        d = d.dataset
    return d


def _known_labels(d) -> list[int] | None:
    if isinstance(d, Subset):
        inner = _known_labels(d.dataset)
        return None if inner is None else [inner[i] for i in d.indices]
    if isinstance(d, TensorDataset) and len(d.tensors) >= 2:
        return [int(t) for t in d.tensors[1].tolist()]
    targets = getattr(d, "targets", None)
    if targets is not None and len(targets) == len(d):
        return [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
    return None


def is_datasets(data) -> bool:
    return isinstance(data, Datasets)
