"""Shared fixtures: image folders made on the fly and the planted network.

The planted network has a known answer for every stage. Its layer of interest ``conv`` (10 -> 4
channels, 1x1) reads a stem whose input channels 0..3 fire on red images (class A), 4..7 on blue
images (class B), and 8..9 are constant (bias only, on for every image). Channels of ``conv``:

    0: weights on 0..7   -> polysemantic: driven by {0..3} for A and by {4..7} for B
    1: weights on 8..9   -> relevant to A and B through the SAME inputs (monosemantic)
    2: weights on 0..3   -> A only
    3: weights on 4..7   -> B only

Logits: A = a0 + a1 + a2, B = a0 + a1 + a3, C (gray images) = 0.5 a1 (spatial means after ReLU).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from utils.models import LoadedModel

COLORS = {"A_red": (220, 30, 30), "B_blue": (30, 30, 220), "C_gray": (128, 128, 128)}


class PlantedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 1)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(10, 4, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.bias.zero_()
            self.stem.weight[0:4, 0, 0, 0] = 1 + 0.2 * torch.rand(4, generator=g)  # red
            self.stem.weight[4:8, 2, 0, 0] = 1 + 0.2 * torch.rand(4, generator=g)  # blue
            self.stem.bias[8:10] = 1.0  # constant, present in every image
            self.conv.weight.zero_()
            self.conv.weight[0, 0:8, 0, 0] = 0.5 + 0.5 * torch.rand(8, generator=g)
            self.conv.weight[1, 8:10, 0, 0] = 1.0
            self.conv.weight[2, 0:4, 0, 0] = 1.0
            self.conv.weight[3, 4:8, 0, 0] = 1.0
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0]]))

    def forward(self, x):
        a = self.conv(self.relu(self.stem(x)))
        return self.fc(self.pool(torch.relu(a)).flatten(1))


def planted_loaded() -> LoadedModel:
    m = PlantedNet().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return LoadedModel(m, "planted", "planted-v1", 3, ["red thing", "blue thing", "gray thing"])


def write_image_folder(root: str, n_train: int | dict = 6, n_val: int = 3, colors: dict = COLORS,
                       size: int = 32, seed: int = 0) -> str:
    """ImageFolder tree ``root/{train,val}/<class>/<i>.png`` of noisy solid-colour images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, rgb in colors.items():
            count = n[name] if isinstance(n, dict) else n
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"img_{i:03d}.png"))
    return root


@pytest.fixture
def planted_model() -> LoadedModel:
    return planted_loaded()


@pytest.fixture
def planted_data(tmp_path) -> str:
    return write_image_folder(str(tmp_path / "data"), n_train=8, n_val=4)


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``image_folder(n_train=..., n_val=..., colors=...)`` -> data_dir."""
    count = iter(range(1000))

    def make(**kw) -> str:
        return write_image_folder(str(tmp_path / f"data{next(count)}"), **kw)

    return make
