"""ImageFolder listing and loading with the evaluation transform (no augmentation anywhere)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform() -> transforms.Compose:
    """Resize(256), CenterCrop(224), ToTensor, ImageNet Normalize: every image, train and val."""
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass
class ImageList:
    """The images of one split: ``paths[i]`` has label ``targets[i]`` (index of its sorted class folder)."""

    root: str
    classes: list[str]
    paths: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 over class folders and relative image paths: tells two image lists apart."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        for p, t in zip(self.paths, self.targets):
            h.update(f"\n{t}\t{os.path.relpath(p, self.root)}".encode())
        return h.hexdigest()

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for t in self.targets:
            counts[t] += 1
        return counts

    def indices_of(self, classes: list[int]) -> list[int]:
        wanted = set(classes)
        return [i for i, t in enumerate(self.targets) if t in wanted]


def list_images(data_dir: str, split: str, max_images_per_class: int | None = None) -> ImageList:
    """List ``data_dir/split`` as ImageFolder does (sorted classes, sorted files).

    With ``max_images_per_class`` only the first N files of each class are kept.
    Raises :class:`UserError` for a missing folder, no class folders, or an empty class folder.
    """
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"no folder {root} (expected an ImageFolder tree with {split}/<class>/<image>)")
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        raise UserError(f"{root} holds no class folders") from None
    paths, targets = [], []
    for t, c in enumerate(classes):
        files = []
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            files += [os.path.join(dirpath, n) for n in sorted(names) if has_file_allowed_extension(n, IMG_EXTENSIONS)]
        if not files:
            raise UserError(f"class folder {os.path.join(root, c)} holds no images")
        if max_images_per_class:
            files = files[:max_images_per_class]
        paths += files
        targets += [t] * len(files)
    return ImageList(os.path.abspath(root), classes, paths, targets)


def read_rgb(path: str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (fully read, file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def load_image(images: ImageList, i: int, transform=None) -> torch.Tensor:
    """Image ``i`` of ``images`` through ``transform`` (default: the evaluation transform); an unreadable
    file is a UserError that names it."""
    try:
        return (transform or eval_transform())(read_rgb(images.paths[i]))
    except Exception:  # noqa: BLE001 - any failure to decode is a bad file
        raise UserError(f"cannot read image {images.paths[i]}") from None


class ImageDataset(Dataset):
    """Yields ``(image, label, index)``; an unreadable image yields label -1 so the caller can name it."""

    def __init__(self, images: ImageList, transform=None):
        self.images = images
        self.transform = transform or eval_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(read_rgb(self.images.paths[i])), self.images.targets[i], i
        except Exception:  # noqa: BLE001 - reported by check_batch with the file name
            return torch.zeros(3, 224, 224), -1, i


def check_batch(images: ImageList, labels: torch.Tensor, index: torch.Tensor) -> None:
    """Raise a UserError naming the first unreadable image of a batch."""
    bad = (labels < 0).nonzero()
    if len(bad):
        raise UserError(f"cannot read image {images.paths[int(index[bad[0, 0]])]}")


def make_loader(images: ImageList, indices=None, batch_size: int = 64, num_workers: int = 4,
                pin_memory: bool = False, batch_sampler=None) -> DataLoader:
    """A DataLoader over ``images`` (optionally a subset ``indices``) in list order."""
    ds = ImageDataset(images)
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=False)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, list(indices))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """``auto``: cuda if available, else cpu. ``--gpu N`` (the reference's flag) means ``cuda:N``."""
    if gpu is not None and device == "auto":
        device = f"cuda:{gpu}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    return dev
