"""ImageFolder listing and loading with the evaluation transform (no augmentation anywhere)."""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from .datasets import Datasets
from .preprocess import Preprocess, eval_transform
from ..errors import UserError

@dataclass
class ImageList:
    """The images of one split: ``paths[i]`` has label ``targets[i]``, the logit index of its class folder.

    ``classes`` are all class folders (sorted); ``index`` maps each to its logit index; ``listed`` are the
    folders whose images were listed (all, or those a caller asked for), with ``stats`` (size, mtime).
    Images of a :class:`utils.data.datasets.Datasets` have ``source`` and ``split`` set, ``items[i]`` is entry
    ``i``'s index in that dataset and ``paths[i]`` names it (``name/split[index]``).
    """

    root: str
    classes: list[str]
    paths: list[str]
    targets: list[int]
    index: dict[str, int] = field(default_factory=dict)
    listed: list[str] = field(default_factory=list)
    stats: list[tuple[int, int]] = field(default_factory=list)
    source: Datasets | None = None
    split: str = ""
    items: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def class_fingerprints(self) -> dict[str, str]:
        """sha256 per listed class folder over its images' relative paths, sizes and modification times (of a
        dataset: over its items' indices and the dataset's sampled content, :meth:`Datasets.content_hash`)."""
        if self.source is not None:
            return self._dataset_fingerprints()
        out: dict[str, hashlib._Hash] = {c: hashlib.sha256() for c in self.listed}
        for p, (size, mtime) in zip(self.paths, self.stats):
            rel = os.path.relpath(p, self.root)
            out[rel.split(os.sep, 1)[0]].update(f"{rel}\t{size}\t{mtime}\n".encode())
        return {c: h.hexdigest() for c, h in out.items()}

    def _dataset_fingerprints(self) -> dict[str, str]:
        content = self.source.content_hash(self.split)
        out = {c: hashlib.sha256(content.encode()) for c in self.listed}
        names = {t: c for c, t in self.index.items()}
        for i, t in zip(self.items, self.targets):
            out[names[t]].update(f"{i}\n".encode())
        return {c: h.hexdigest() for c, h in out.items()}

    def fingerprint(self) -> str:
        """sha256 over every class folder's logit index and fingerprint: tells two image lists apart."""
        h = hashlib.sha256()
        for c, f in self.class_fingerprints().items():
            h.update(f"{c}\t{self.index.get(c)}\t{f}\n".encode())
        return h.hexdigest()

    def legacy_fingerprint(self) -> str:
        """The fingerprint of stores of format version 1: class folders and relative paths only."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        for p, t in zip(self.paths, self.targets):
            h.update(f"\n{t}\t{os.path.relpath(p, self.root)}".encode())
        return h.hexdigest()

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class index (length ``num_classes``)."""
        counts = [0] * num_classes
        for t in self.targets:
            counts[t] += 1
        return counts

    def indices_of(self, classes) -> list[int]:
        wanted = set(classes)
        return [i for i, t in enumerate(self.targets) if t in wanted]


def data_root(data, split: str | None = None) -> str:
    """How messages and records name the data (a folder's absolute path, a :class:`Datasets`' name), or one
    split of it."""
    if isinstance(data, Datasets):
        return data.name if split is None else data.root(split)
    return os.path.abspath(data if split is None else os.path.join(data, split))


def class_folders(data_dir, split: str) -> list[str]:
    """The class folders of ``data_dir/split``, sorted (ImageFolder's classes); of a :class:`Datasets`, its
    classes' names in label order."""
    if isinstance(data_dir, Datasets):
        return list(data_dir.folders(split))
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"no folder {root} (expected an ImageFolder tree with {split}/<class>/<image>)")
    try:
        return find_classes(root)[0]
    except FileNotFoundError:
        raise UserError(f"{root} holds no class folders") from None


def list_images(data_dir: str, split: str, max_images_per_class: int | None = None, classes=None,
                only: Iterable[int] | None = None) -> ImageList:
    """List ``data_dir/split`` as ImageFolder does (sorted classes, sorted files).

    ``classes``: a :class:`utils.data.classes.ClassMap` giving each folder's logit index (default: its position).
    ``only``: list only the folders of these class indices (the others are not even walked). With
    ``max_images_per_class`` only the first N files of each class are kept. Raises :class:`UserError` for
    a missing folder, no class folders, an empty class folder, or a folder the class map does not know.
    ``data_dir`` may be a :class:`utils.data.datasets.Datasets` (its labels are the classes' logit indices).
    """
    if isinstance(data_dir, Datasets):
        return _list_dataset(data_dir, split, max_images_per_class, only)
    root = os.path.join(data_dir, split)
    folders = class_folders(data_dir, split)
    wanted = None if only is None else set(only)
    if classes is None:
        index = {f: t for t, f in enumerate(folders)}
    else:  # a folder the map does not know is an error, unless only some classes are listed
        index = {f: classes.of(f, root) for f in folders
                 if (only is None or f in classes.index) and f not in classes.skipped}
    out = ImageList(os.path.abspath(root), folders, [], [], index)
    for c in folders:
        if c not in index or (wanted is not None and index[c] not in wanted):
            continue
        files = _class_files(os.path.join(root, c), max_images_per_class)
        out.listed.append(c)
        out.paths += [p for p, _ in files]
        out.stats += [st for _, st in files]
        out.targets += [index[c]] * len(files)
    return out


def list_any_images(data_dir: str, split: str, max_images: int | None = None) -> ImageList:
    """``data_dir/split`` with or without class folders, for what reads no label (concepts from clusters): with
    class folders as :func:`list_images` (the labels kept, to evaluate with); without, every image in it
    (recursively, sorted) under one label, 0, of a class named ``.``. A missing or imageless folder is a
    UserError."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"no folder {root} (expected a folder of images, with or without class folders)")
    try:
        find_classes(root)
    except FileNotFoundError:  # no class folders: a flat folder of images
        files = _class_files(root, max_images)
        return ImageList(os.path.abspath(root), ["."], [p for p, _ in files], [0] * len(files), {".": 0}, ["."],
                         [st for _, st in files])
    return list_images(data_dir, split, max_images)


def _list_dataset(data: Datasets, split: str, max_images: int | None, only) -> ImageList:
    """The items of ``data``'s ``split`` grouped by label (in dataset order within a label)."""
    labels, folders = data.labels(split), data.folders(split)
    wanted = None if only is None else set(only)
    out = ImageList(data.root(split), list(folders), [], [], dict(folders), source=data, split=split)
    by_label: dict[int, list[int]] = {}
    for i, t in enumerate(labels):
        by_label.setdefault(t, []).append(i)
    for c, t in folders.items():
        if wanted is not None and t not in wanted:
            continue
        items = by_label[t][:max_images] if max_images else by_label[t]
        out.listed.append(c)
        out.items += items
        out.paths += [f"{out.root}[{i}]" for i in items]
        out.targets += [t] * len(items)
    return out


def _class_files(folder: str, max_images: int | None) -> list[tuple[str, tuple[int, int]]]:
    """The image files of one class folder (recursively, sorted) with their (size, mtime_ns)."""
    files = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        files += [os.path.join(dirpath, n) for n in sorted(names) if has_file_allowed_extension(n, IMG_EXTENSIONS)]
    if not files:
        raise UserError(f"class folder {folder} holds no images")
    files = files[:max_images] if max_images else files
    out = []
    for p in files:
        st = os.stat(p)
        out.append((p, (st.st_size, st.st_mtime_ns)))
    return out


def class_batches(images: ImageList, indices, batch_size: int) -> list[list[int]]:
    """``indices`` (in list order) cut into batches that never mix classes: each class's images in batches of
    ``batch_size`` (the last one shorter). An image then meets the same batch neighbours whichever other
    classes a pass includes, so stage 3, stage 4 and the layer command compute it bit for bit alike."""
    out: list[list[int]] = []
    run: list[int] = []
    for i in indices:
        if run and (images.targets[i] != images.targets[run[0]] or len(run) == batch_size):
            out.append(run)
            run = []
        run.append(i)
    return out + ([run] if run else [])


def read_rgb(path: str) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image (fully read, file closed). 16-bit grey images are
    scaled to 8 bit as an image viewer shows them (PIL's own conversion would clip them to 0/255). An image
    over Pillow's size limit (its guard against decompression bombs) is an error, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _read_rgb(path)


def _read_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
            a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
            return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")


def read_image(images: ImageList, i: int, transform=None) -> torch.Tensor:
    """Image ``i`` through ``transform`` (default: the evaluation transform). A dataset's tensor image is the
    network's input as it is for a :class:`Preprocess` (or none), and must be 3 x crop x crop (with none: the
    size of the data's first tensor, :meth:`Datasets.tensor_shape`); any other transform (a picture's) gets it
    mapped back to colours (:meth:`Datasets.picture`)."""
    given, transform = transform, transform or eval_transform()
    if images.source is None:
        return transform(read_rgb(images.paths[i]))
    image = images.source.item(images.split, images.items[i])[0]
    if not isinstance(transform, Preprocess):
        return transform(images.source.picture(images.split, images.items[i]))
    if not isinstance(image, torch.Tensor):
        return transform(image.convert("RGB"))
    # a tensor of another size: one line, not torch.stack's traceback; without a transform, the data's own size
    want = (3, given.crop, given.crop) if given is not None else images.source.tensor_shape(images.split)
    if want is not None and tuple(image.shape) != tuple(want):
        raise UserError(f"item {images.items[i]} of the {images.split} data of {images.source.name} is a tensor of "
                        f"shape {tuple(image.shape)}; tensors are fed as they are, so every image tensor must be "
                        f"{' x '.join(map(str, want))}, the input size (or give PIL images, which the transform "
                        "resizes)")
    return image.float()


def load_image(images: ImageList, i: int, transform=None) -> torch.Tensor:
    """Image ``i`` of ``images`` through ``transform`` (default: the paper's evaluation transform); an
    unreadable file is a UserError that names it and says why."""
    try:
        return read_image(images, i, transform)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to decode is a bad file
        raise UserError(f"cannot read image {images.paths[i]}: {image_problem(e)}") from None


def image_problem(e: BaseException) -> str:
    """Why an image could not be read, in words."""
    if isinstance(e, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return (f"it is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a guard against "
                "decompression bombs); make it smaller")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not an image'}"


class ImageDataset(Dataset):
    """Yields ``(image, label, index)``; an unreadable image yields label -1 so the caller can name it."""

    def __init__(self, images: ImageList, transform: Preprocess | None = None):
        self.images = images
        self.transform = transform or eval_transform()
        self.side = getattr(self.transform, "crop", 224)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return read_image(self.images, i, self.transform), self.images.targets[i], i
        except Exception:  # noqa: BLE001 - reported by check_batch with the file name
            return torch.zeros(3, self.side, self.side), -1, i


def check_batch(images: ImageList, labels: torch.Tensor, index: torch.Tensor) -> None:
    """Raise a UserError naming the first unreadable image of a batch, and why (read again here: the loader's
    worker processes only flag it)."""
    bad = (labels < 0).nonzero()
    if len(bad):
        load_image(images, int(index[bad[0, 0]]))
        raise UserError(f"cannot read image {images.paths[int(index[bad[0, 0]])]}")


def make_loader(images: ImageList, indices=None, batch_size: int = 64, num_workers: int = 4,
                pin_memory: bool = False, batch_sampler=None, transform: Preprocess | None = None) -> DataLoader:
    """A DataLoader over ``images`` (optionally a subset ``indices``) in list order, through ``transform``
    (default: the paper's evaluation transform)."""
    ds = ImageDataset(images, transform)
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=False)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, list(indices))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
