"""Feature visualisation by optimisation of one sub-channel's spatially summed activation.

Two image parameterisations, both in a decorrelated colour space (Olah et al., Distill 2017):

- ``maco`` (Fel et al., NeurIPS 2023): the Fourier *phase* is learned, the magnitude spectrum is fixed
  to the average magnitude of natural images. We estimate it from the user's own training images
  (:func:`magnitude_spectrum`), so nothing is downloaded.
- ``fourier`` (Lucid): the whole spectrum is learned, scaled by 1/f.

Each step renders the image, draws a batch of augmented views (random crop and scale, jitter, noise)
and maximises the mean activation ``sum_hw conv(x, filter) + bias`` of the views (over the positions that
count, for a Linear unit: see ``utils.model.units``), where ``x`` is the
layer's input from a forward pass that stops at the layer. Everything random comes from one seeded
generator, so a run on the CPU is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from ..data.images import ImageList, Preprocess, load_image
from ..model.hooks import layer_input
from ..model.units import Unit, as_unit

# Square root of ImageNet's colour correlation (Lucid), columns scaled to unit max norm.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()
METHODS = ("maco", "fourier")


@dataclass
class FVConfig:
    """Settings of one feature visualisation (defaults: under 2 minutes for ResNet-50 on 2 CPU cores)."""

    method: str = "maco"
    steps: int = 128
    size: int = 224  # side of the optimised image
    input_size: int = 224  # side the augmented views are resized to before the network
    views: int = 2  # augmented views per step
    lr: float | None = None  # default: 1.0 for maco (NAdam on the phase), 0.05 for fourier (Adam)
    crop: tuple[float, float] = (0.6, 1.0)  # side of a random crop, as a fraction of the image
    jitter: float = 0.05  # random shift, fraction of the image side
    noise: float = 0.02  # Gaussian pixel noise on the views
    seed: int = 0


def recorrelate(img: torch.Tensor) -> torch.Tensor:
    """Decorrelated colour space -> RGB: ``... x 3 x H x W``."""
    return torch.einsum("ij,...jhw->...ihw", COLOR.to(img), img)


def decorrelate(img: torch.Tensor) -> torch.Tensor:
    """RGB -> decorrelated colour space (inverse of :func:`recorrelate`)."""
    return torch.einsum("ij,...jhw->...ihw", torch.linalg.inv(COLOR).to(img), img)


def frequencies(size: int) -> torch.Tensor:
    """Radial frequency of each rfft2 bin (size x size//2+1), in cycles per pixel."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


@torch.no_grad()
def magnitude_spectrum(images: ImageList, size: int = 224, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Mean |rfft2| (3 x size x size//2+1) of up to ``n`` of the user's images, in decorrelated colours.

    Images are drawn evenly over the list (all classes), resized and centre-cropped to ``size``, in [0, 1].
    """
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    step = max(1, len(images) // n)
    picks = list(range(0, len(images), step))[:n]
    total = torch.zeros(3, size, size // 2 + 1, dtype=torch.float64)
    for i in picks:
        x = decorrelate(load_image(images, i, tf) - 0.5)  # about zero, so the mean colour is a learnable sign at the DC bin
        total += torch.fft.rfft2(x.double()).abs()
    return (total / max(len(picks), 1)).float()


class Parameterisation(nn.Module):
    """An image (1 x 3 x size x size, values in [0, 1]) drawn from learnable Fourier parameters."""

    def __init__(self, method: str, size: int, generator: torch.Generator, magnitude: torch.Tensor | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown feature visualisation method {method!r}")
        self.method, self.size = method, size
        shape = (3, size, size // 2 + 1)
        if method == "maco":
            if magnitude is None or tuple(magnitude.shape) != shape:
                raise ValueError(f"maco needs a magnitude spectrum of shape {shape}")
            self.register_buffer("magnitude", magnitude.float())
            self.phase = nn.Parameter(torch.rand(shape, generator=generator) * 2 * math.pi - math.pi)
        else:
            scale = 1.0 / torch.clamp(frequencies(size), min=1.0 / size)
            self.register_buffer("scale", scale * size)  # 1/f, brought to pixel units
            self.spectrum = nn.Parameter(0.01 * torch.randn(2, *shape, generator=generator))

    def forward(self) -> torch.Tensor:
        if self.method == "maco":
            spec = torch.polar(self.magnitude, self.phase)
            img = torch.fft.irfft2(spec, s=(self.size, self.size))
            img = (img - img.mean()) / (img.std() + 1e-5)  # MACO: standardise, then squash
        else:
            spec = torch.complex(self.spectrum[0], self.spectrum[1]) * self.scale
            img = torch.fft.irfft2(spec, s=(self.size, self.size)) / 4.0  # Lucid's scaling
        return torch.sigmoid(recorrelate(img))[None]


def augment(img: torch.Tensor, n: int, cfg: FVConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` random views (n x 3 x input_size x input_size) of ``img`` (1 x 3 x S x S): crop+scale, jitter, noise.

    One differentiable ``grid_sample`` per step; the crop side is uniform in ``cfg.crop`` and its centre
    uniform over the positions that keep it inside the image, plus a jitter that may leave it (reflected).
    """
    lo, hi = cfg.crop
    s = lo + (hi - lo) * torch.rand(n, generator=generator)
    room = 1 - s
    t = (2 * torch.rand(n, 2, generator=generator) - 1) * room[:, None]
    t = t + cfg.jitter * 2 * (2 * torch.rand(n, 2, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(img), [n, 3, cfg.input_size, cfg.input_size], align_corners=False)
    views = F.grid_sample(img.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    return views + cfg.noise * torch.randn(views.shape, generator=generator).to(img)


def normalize(img: torch.Tensor, preprocess: Preprocess | None = None) -> torch.Tensor:
    """[0, 1] pixels -> the network's input (the mean and std of its evaluation transform)."""
    pre = preprocess or Preprocess()
    mean = torch.tensor(pre.mean, device=img.device, dtype=img.dtype)[:, None, None]
    std = torch.tensor(pre.std, device=img.device, dtype=img.dtype)[:, None, None]
    return (img - mean) / std


def activation(model: nn.Module, conv: Unit | nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
               images: torch.Tensor, preprocess: Preprocess | None = None) -> torch.Tensor:
    """Output summed over the positions that count (B,) of one filter (C_in x kh x kw) at the layer's place, for
    [0, 1] images."""
    unit = as_unit(conv)
    x = unit.counted(layer_input(model, unit, normalize(images, preprocess), grad=True))
    return unit.apply(x, weight[None], None if bias is None else bias.reshape(1)).sum((1, 2, 3))


def visualize(model: nn.Module, conv: Unit | nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
              cfg: FVConfig | None = None, magnitude: torch.Tensor | None = None,
              device: torch.device | str = "cpu", progress: bool = False,
              preprocess: Preprocess | None = None) -> tuple[torch.Tensor, list[float]]:
    """Optimise an image for one sub-channel; returns the image (3 x size x size, [0, 1]) and the
    per-step mean activation of the views."""
    cfg = cfg or FVConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    param = Parameterisation(cfg.method, cfg.size, g, magnitude).to(device)
    weight = weight.detach().to(device)
    bias = None if bias is None else bias.detach().to(device)
    lr = cfg.lr if cfg.lr is not None else (1.0 if cfg.method == "maco" else 0.05)
    opt = (torch.optim.NAdam if cfg.method == "maco" else torch.optim.Adam)(param.parameters(), lr=lr)
    history: list[float] = []
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"feature visualisation ({cfg.method})", unit="step", leave=False)
    with torch.enable_grad():
        for _ in steps:
            opt.zero_grad(set_to_none=True)
            act = activation(model, conv, weight, bias, augment(param(), cfg.views, cfg, g), preprocess).mean()
            (-act).backward()
            opt.step()
            history.append(act.item())
    with torch.no_grad():
        return param()[0].detach().cpu(), history
