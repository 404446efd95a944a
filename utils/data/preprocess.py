"""The evaluation transform of every image (no augmentation anywhere): what the weights declare, or what
``--input_size``, ``--resize``, ``--mean`` and ``--std`` (or an own model's build function) ask for."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms

from .datasets import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError

_INTERPOLATION = {"nearest": transforms.InterpolationMode.NEAREST, "bilinear": transforms.InterpolationMode.BILINEAR,
                  "bicubic": transforms.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform of every image, train and val (no augmentation anywhere): Resize(``resize``,
    ``interpolation``), CenterCrop(``crop``), ToTensor, Normalize(``mean``, ``std``). The default is the
    paper's (ResNet-50 ``IMAGENET1K_V1``: 256, 224, bilinear, ImageNet statistics)."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def display(self) -> transforms.Compose:
        """The transform without Normalize: what the network sees, as a picture in [0, 1]."""
        return transforms.Compose([transforms.Resize(self.resize, _INTERPOLATION.get(self.interpolation)),
                                   transforms.CenterCrop(self.crop), transforms.ToTensor()])

    def normalize(self) -> transforms.Normalize:
        return transforms.Normalize(self.mean, self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize()(self.display()(image))

    def to_json(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict | None) -> "Preprocess":
        if not d:
            return cls()
        return cls(int(d["resize"]), int(d["crop"]), d["interpolation"], tuple(d["mean"]), tuple(d["std"]))


def eval_transform() -> Preprocess:
    """The paper's evaluation transform: Resize(256), CenterCrop(224), ToTensor, ImageNet Normalize."""
    return Preprocess()


INPUT_FLAGS = "--input_size (and --resize, --mean, --std)"


@dataclass(frozen=True)
class InputSpec:
    """What ``--input_size``, ``--resize``, ``--mean`` and ``--std`` ask for (None: what the model declares).

    ``input_size`` N is the side of the network's input (CenterCrop N); the shorter side is resized to N
    as well unless ``resize`` says otherwise (a 32 px model sees the whole 32 px image)."""

    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, options) -> "InputSpec":
        """The spec of a config or argparse namespace with these four attributes (missing ones: None)."""
        get = lambda k: getattr(options, k, None)  # noqa: E731
        return cls(get("input_size"), get("resize"), _triple(get("mean"), "mean"), _triple(get("std"), "std"))

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.input_size, self.resize, self.mean, self.std))

    def applied(self, base: Preprocess) -> Preprocess:
        """``base`` (the model's declared transform) with what was asked for replaced."""
        crop = self.input_size or base.crop
        resize = self.resize or (self.input_size if self.input_size else base.resize)
        if crop < 1 or resize < crop:
            raise UserError(f"--resize {resize} must be at least --input_size {crop} (the crop is taken from the "
                            "resized image)")
        return Preprocess(resize, crop, base.interpolation, self.mean or base.mean, self.std or base.std)


def _triple(v, name: str) -> tuple[float, float, float] | None:
    if v is None:
        return None
    v = tuple(float(x) for x in v)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise UserError(f"--{name} takes 1 or 3 numbers (one per colour channel), not {len(v)}")
    if name == "std" and any(x <= 0 for x in v):
        raise UserError("--std must be positive")
    return v


def as_preprocess(value) -> Preprocess:
    """A transform an own model's build function returns: a :class:`Preprocess`, or a dict of its fields
    (``input_size`` is the crop's other name); anything else is one line."""
    if isinstance(value, Preprocess):
        return value
    if isinstance(value, dict):
        known = {"input_size", "crop", "resize", "mean", "std", "interpolation"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"the transform's keys are {', '.join(sorted(known))}, not {', '.join(unknown)}")
        spec = InputSpec(value.get("input_size", value.get("crop")), value.get("resize"),
                         _triple(value.get("mean"), "mean"), _triple(value.get("std"), "std"))
        base = Preprocess(interpolation=value.get("interpolation", "bilinear"))
        return spec.applied(base)
    raise UserError(f"a model's transform must be a Preprocess or a dict of its fields, not a {type(value).__name__}")
