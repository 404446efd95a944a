"""Images given as torch Datasets (or DataLoaders) of ``(image, label)`` instead of an ImageFolder tree.

Everything that takes ``data_dir`` takes a :class:`Datasets` too: the images are listed as an
:class:`utils.data.images.ImageList` whose entries point into the dataset, a label is the model's logit index, and
a class's name is ``classes[label]`` (the dataset's ``classes`` attribute when it has one, else the label).
A label is what ``dataset[i][1]`` gives: a dataset's ``targets`` are read through its ``target_transform``
(an ImageFolder that remaps its folders to the model's logits, also inside a Subset), and checked against
the items' own labels.

An item's image is either a PIL image (the tool's transform makes the network's input of it, as for image
files) or a float tensor (``3 x H x W`` on the CPU, already what the network takes: the tool feeds it as it
is, so all are one size). Items must read the same each time (no random augmentation). For
pictures a tensor is mapped back to colours with ``mean`` and ``std`` (``x * std + mean``): give the
normalisation your tensors carry (``mean=(0, 0, 0), std=(1, 1, 1)`` for none).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torchvision.datasets.vision import StandardTransform

from ..errors import UserError, say

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLED = 16  # items whose content enters the fingerprint (with every label), and that are checked when given
WIDE = 20.0  # a tensor with larger values is not normalised (0..255): said in a note


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _dataset(d, split: str):
    if isinstance(d, DataLoader):  # its batch size and workers are the tool's to choose; its dataset is the data
        d = d.dataset
    if isinstance(d, (str, bytes, os.PathLike)):
        raise UserError(f"the {split} data is {_a(type(d).__name__)} ({os.fsdecode(d)!r:.80}); an ImageFolder root is "
                        "given as train alone (train/ and val/ inside), else give a torch Dataset of (image, label)")
    if isinstance(d, IterableDataset):
        raise UserError(f"the {split} data is a {type(d).__name__}, an IterableDataset; the tool reads items by index "
                        "(several times): give a map-style torch Dataset of (image, label)")
    if d is not None and (isinstance(d, Mapping) or not (hasattr(d, "__getitem__") and hasattr(d, "__len__"))):
        raise UserError(f"the {split} data is {_a(type(d).__name__)}; give a torch Dataset (or a DataLoader over one) "
                        "of (image, label) items, or an ImageFolder path")
    return d


class Datasets:
    """Training (``train``) and validation (``val``) images as Datasets or DataLoaders of ``(image, label)``.

    ``classes``: the name of each label (default: the dataset's own ``classes``, else the label's number).
    ``mean``/``std``: the normalisation tensor items carry (pictures only). ``name``: how messages, records
    and reports call the data.

    Each split is checked when it is given, on up to :data:`SAMPLED` items spread over it, each read twice:
    items must be ``(image, label)`` with a PIL image or a float ``3 x H x W`` CPU tensor (one size for all
    tensors, train and val alike) and a label that is one whole number, and must read the same each time (a
    random transform, augmentation, is refused: stage 1, the later stages and a rerun that resumes a store must
    see the same images). Tensors with values far outside a normalised image's (0..255) are noted once. With
    ``labels_optional`` (what reads no label: concepts from clusters) an item may also be an image alone, read as
    label 0."""

    def __init__(self, train=None, val=None, classes: Sequence[str] | None = None, name: str = "datasets",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, labels_optional: bool = False):
        self.labels_optional = labels_optional  # an item may be an image alone (label 0): concepts from clusters
        self.splits = {"train": _dataset(train, "train"), "val": _dataset(val, "val")}
        self.name, self.mean, self.std = name, tuple(mean), tuple(std)
        self._classes = list(classes) if classes is not None else None
        self._labels: dict[str, list[int]] = {}  # read once per split, like the content hash
        self._hashes: dict[str, str] = {}
        self._sampled: dict[str, dict[int, int]] = {}  # split -> {sampled item: its label}
        self._shapes: dict[str, tuple[int, tuple[int, ...]]] = {}  # split -> (item, shape) of its first tensor
        for split, d in self.splits.items():
            if d is not None:
                self._check(split)
        if len(self._shapes) == 2 and self._shapes["train"][1] != self._shapes["val"][1]:
            (k, shape), (_, want) = self._shapes["val"], self._shapes["train"]
            raise UserError(f"item {k} of the val data of {self.name} is a tensor of shape {shape}, the training "
                            f"images are {' x '.join(map(str, want))}: tensors are fed as they are, so every image "
                            "tensor must be that size (or give PIL images, which the transform resizes)")

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

    def tensor_shape(self, split: str) -> tuple[int, ...] | None:
        """The shape every tensor image must have: the first training tensor's (else ``split``'s first); None
        when the images are PIL images."""
        first = self._shapes.get("train") or self._shapes.get(split)
        return None if first is None else first[1]

    def _where(self, split: str, i: int) -> str:
        return f"item {i} of the {split} data of {self.name}"

    def _check(self, split: str) -> None:
        """Read the sampled items of ``split`` twice each: one line for any item the tool cannot take, for a
        random transform, or for tensors of two sizes; a note for tensors in 0..255. Their labels are kept to
        check the labels :meth:`labels` reads without the items against."""
        d = self.dataset(split)
        labels, first, widest = {}, None, (0.0, 0)
        for i in _sampled(len(d)):
            image, label = self.item(split, i)
            again, label2 = self.item(split, i)
            if _content(image) != _content(again) or label != label2:
                what = "training" if split == "train" else "validation"
                raise UserError(f"{self._where(split, i)} differs each time it is read: the dataset's transform is "
                                f"random (augmentation); give a deterministic transform for the {what} images (as "
                                "for evaluation: Resize, CenterCrop, ToTensor, Normalize)")
            labels[i] = label
            if isinstance(image, torch.Tensor):
                if first is None:
                    first = (i, tuple(image.shape))
                elif tuple(image.shape) != first[1]:
                    raise UserError(f"{self._where(split, i)} is a tensor of shape {tuple(image.shape)}, item "
                                    f"{first[0]} is {' x '.join(map(str, first[1]))}: tensors are fed as they are, so "
                                    "every image tensor must be the same size (or give PIL images, which the "
                                    "transform resizes)")
                top = float(image.detach().abs().max()) if image.numel() else 0.0
                widest = max(widest, (top, i))
        if widest[0] > WIDE:
            say(f"note: the {split} data of {self.name} holds tensors with values up to {widest[0]:.0f} (item "
                f"{widest[1]}); tensors are fed to the model as they are, so they must carry the normalisation it "
                "expects (e.g. ToTensor then Normalize), not 0..255")
        self._sampled[split] = labels
        if first is not None:
            self._shapes[split] = first

    def labels(self, split: str) -> list[int]:
        """Every item's label as ``dataset[i][1]`` gives it, read without decoding images where the dataset keeps
        them (``targets`` through its ``target_transform``, a TensorDataset's second tensor, a Subset of those)
        and those agree with the sampled items' labels; else from each item once."""
        if split not in self._labels and self.labels_optional and _bare(self.dataset(split)[0]):
            self._labels[split] = [0] * len(self.dataset(split))  # images alone: one label, none read
        if split not in self._labels:
            d = self.dataset(split)
            raw = _known_labels(d)
            labels = None if raw is None else _label_list(raw, lambda k: self._where(split, k))
            wrong = [k for k, t in self._sampled.get(split, {}).items() if labels is not None and labels[k] != t]
            if wrong:
                k = wrong[0]
                say(f"note: the labels the {split} data of {self.name} keeps are not those its items give (item {k}: "
                    f"{labels[k]}, the item says {self._sampled[split][k]}); reading every item's label instead")
                labels = None
            if labels is None:
                labels = [self.item(split, i)[1] for i in range(len(d))]
            bad = [t for t in labels if t < 0]
            if bad:
                raise UserError(f"the {split} data of {self.name} has a negative label ({bad[0]})")
            self._labels[split] = labels
        return self._labels[split]

    def names(self) -> list[str] | None:
        """The name of each label, when the caller or a dataset gives them (a dataset's ``classes`` through its
        ``target_transform``: ``classes[j]`` names label ``target_transform(j)``)."""
        if self._classes is not None:
            return self._classes
        for d in self.splits.values():
            names = _class_names(d)
            if names is not None:
                return names
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
        """Item ``i`` of ``split`` as (image, label): a PIL image or a float 3 x H x W CPU tensor, and a whole
        number; anything else (or an item the dataset fails to give) is one line."""
        try:
            out = self.dataset(split)[i]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's dataset: say which item, and why
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"{self._where(split, i)} cannot be read ({type(e).__name__}: {first})") from e
        if self.labels_optional and _bare(out):
            out = (out[0] if isinstance(out, (tuple, list)) else out, 0)
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise UserError(f"{self._where(split, i)} is {_a(type(out).__name__)}; a dataset must yield (image, label)")
        image = out[0]
        if not isinstance(image, (torch.Tensor, Image.Image)):
            raise UserError(f"{self._where(split, i)} has {_a(type(image).__name__)} for its image; give a PIL image "
                            "or a 3 x H x W tensor")
        if isinstance(image, torch.Tensor):
            if image.device.type != "cpu":
                raise UserError(f"{self._where(split, i)} is a tensor on {image.device}; give CPU tensors (the tool "
                                "moves each batch to its device itself)")
            if not image.is_floating_point():
                dtype = str(image.dtype).replace("torch.", "")
                raise UserError(f"{self._where(split, i)} is a {dtype} tensor"
                                f"{' (0..255)' if image.dtype == torch.uint8 else ''}; tensors are fed to the model "
                                "as they are: give float tensors normalised as it expects (e.g. ToTensor then "
                                "Normalize), or PIL images")
            if image.dim() != 3 or image.shape[0] != 3:
                raise UserError(f"{self._where(split, i)} is a tensor of shape {tuple(image.shape)}; an image tensor "
                                "is 3 x H x W (RGB), as the model takes it")
        return image, _label(out[1], self._where(split, i))

    def picture(self, split: str, i: int) -> Image.Image:
        """Item ``i``'s image as an RGB picture (a tensor mapped back with ``mean`` and ``std``)."""
        image = self.item(split, i)[0]
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        x = image.detach().float().cpu()
        x = (x * torch.tensor(self.std[:len(x)])[:, None, None] + torch.tensor(self.mean[:len(x)])[:, None, None])
        a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).convert("RGB")

    def content_hash(self, split: str) -> str:
        """sha256 of the labels and the content of up to :data:`SAMPLED` items spread over ``split`` (read once: a
        store's fingerprint and its per-class fingerprints both use it)."""
        if split not in self._hashes:
            labels = self.labels(split)
            h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
            for i in _sampled(len(labels)):
                h.update(_content(self.item(split, int(i))[0]))
            self._hashes[split] = h.hexdigest()
        return self._hashes[split]


def _bare(item) -> bool:
    """Whether a dataset's item is an image without a label (the image itself, or a 1-tuple of it)."""
    if isinstance(item, (tuple, list)) and len(item) == 1:
        item = item[0]
    return isinstance(item, (torch.Tensor, Image.Image))


def _sampled(n: int) -> list[int]:
    """The up to :data:`SAMPLED` items spread over ``n`` whose content enters the fingerprint."""
    return [int(i) for i in np.linspace(0, n - 1, min(SAMPLED, n)).round().astype(int)]


def _content(image) -> bytes:
    """An item image's bytes, as the content hash reads them."""
    return image.tobytes() if isinstance(image, Image.Image) else image.detach().cpu().contiguous().numpy().tobytes()


def _label(value, where: str) -> int:
    """An item's label as an int: one whole number (an int, a whole float, a one-element tensor or array)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size != 1:
            raise UserError(f"{where} has a label of shape {tuple(value.shape)}; a label is one number, the index "
                            "of its class's logit (not one-hot or soft labels)")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise UserError(f"{where} has label {value}, not a whole number; a label is the index of its class's logit")
    raise UserError(f"{where} has {_a(type(value).__name__)} label ({value!r:.40}); a label is the index of its "
                    "class's logit (an int)")


def _label_list(raw, where) -> list[int]:
    """Labels kept by a dataset (a list, an array or a tensor) as ints, checked as :func:`_label` checks one
    (``where(k)`` names item ``k``)."""
    a = _array(raw)
    if a.ndim == 1 and a.dtype.kind in "iub":
        return a.astype(np.int64).tolist()
    if a.ndim == 1 and a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
        return a.astype(np.int64).tolist()
    return [_label(a[k], where(k)) for k in range(len(a))]


def _array(values) -> np.ndarray:
    """Labels as a numpy array (of objects where they are not numbers of one shape)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    try:
        return np.asarray(values)
    except (ValueError, TypeError):  # ragged or mixed: one object per label
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out


def _base(d):
    while isinstance(d, Subset):
        d = d.dataset
    return d


def _target_transform(d):
    """``(True, the dataset's target_transform or None)`` when its ``targets`` give its items' labels through
    that alone; ``(False, None)`` when a joint transform of image and label may change them."""
    joint = getattr(d, "transforms", None)
    if joint is not None and not isinstance(joint, StandardTransform):
        return False, None
    return True, getattr(d, "target_transform", None)


def _known_labels(d):
    """The labels a dataset keeps (before checking), or None where only its items say."""
    if isinstance(d, Subset):
        inner = _known_labels(d.dataset)
        if inner is None:
            return None
        try:
            return _array(inner)[np.asarray(d.indices, dtype=np.int64)]
        except (IndexError, TypeError, ValueError):  # indices the items will refuse, one by one
            return None
    if isinstance(d, TensorDataset) and len(d.tensors) >= 2:
        return d.tensors[1]
    targets = getattr(d, "targets", None)
    trusted, tt = _target_transform(d)
    if targets is None or not trusted or not hasattr(targets, "__len__") or len(targets) != len(d):
        return None
    if tt is None:
        return targets
    try:
        return _array([tt(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)])
    except Exception:  # noqa: BLE001 - the items will say (or fail to give) their labels
        return None


def _class_names(d) -> list[str] | None:
    """A dataset's ``classes`` by label (through a Subset and a ``target_transform`` that maps the classes to
    distinct labels), or None."""
    base = _base(d)
    classes = getattr(base, "classes", None)
    trusted, tt = _target_transform(base)
    if not isinstance(classes, (list, tuple)) or not classes or not trusted:
        return None
    if tt is None:
        return [str(c) for c in classes]
    try:
        labels = [_label(tt(j), "") for j in range(len(classes))]
    except Exception:  # noqa: BLE001 - no names then: labels are shown as numbers
        return None
    if len(set(labels)) != len(labels) or min(labels) < 0:
        return None
    out = [str(t) for t in range(max(labels) + 1)]
    for j, t in enumerate(labels):
        out[t] = str(classes[j])
    return out


def is_datasets(data) -> bool:
    return isinstance(data, Datasets)
