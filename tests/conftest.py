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

import errno
import os
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from utils.model.loading import LoadedModel

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


# ---------------------------------------------------------------- independent computations and hand-made files


def arv_autograd(conv: nn.Conv2d, channel: int, inputs: torch.Tensor) -> torch.Tensor:
    """The ARV by its definition, slowly: mean over images of ``x * dS/dx`` summed over space, with
    ``S`` the spatial sum of ``conv(x)[channel]`` (C_in, float64)."""
    import torch.nn.functional as F

    x = inputs.double().detach().requires_grad_(True)
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else None
    with torch.enable_grad():
        if conv.padding_mode != "zeros":
            out = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), w, b,
                           conv.stride, 0, conv.dilation)
        else:
            out = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation)
        (g,) = torch.autograd.grad(out[:, channel].sum(), x)
    return (x * g).sum(dim=(2, 3)).mean(0).detach()


def conv_meta(conv: nn.Conv2d) -> dict:
    """The ``meta["conv"]`` entry stage 1 writes for ``conv``."""
    return {"kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation), "padding_mode": conv.padding_mode, "bias": conv.bias is not None}


def taps_by_formula(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Tap sums by their definition (B x C_in x kh x kw, float64), independently of utils.method.arv:
    ``T[b, k, i, j] = sum over output positions (h', w') of xp[b, k, h'*s_h + i*d_h, w'*s_w + j*d_w]``
    with ``xp`` the input after the layer's own padding (any padding mode)."""
    import torch.nn.functional as F

    x = x.double()
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    out_h, out_w = conv(torch.zeros(1, *x.shape[1:], dtype=conv.weight.dtype)).shape[-2:]
    (sh, sw), (dh, dw), (kh, kw) = conv.stride, conv.dilation, conv.kernel_size
    T = torch.zeros(x.shape[0], x.shape[1], kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            T[:, :, i, j] = xp[:, :, i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw].sum((2, 3))
    return T


def write_store(path: str, conv: nn.Conv2d, class_sums: np.ndarray, class_counts: list[int], version: int = 2) -> str:
    """A complete stage-1 store at ``path`` holding only what the ARVs need (no relevance rows): per-class
    tap sums (format 2, K x C_in x kh x kw) or, for format 1, per-class input-map sums (K x C_in x H x W)."""
    from utils.files import save_npy, write_json

    os.makedirs(path, exist_ok=True)
    save_npy(os.path.join(path, "tap_sums.npy" if version == 2 else "input_sums.npy"), np.asarray(class_sums, np.float64))
    targets = np.repeat(np.arange(len(class_counts)), class_counts).astype(np.int64)
    save_npy(os.path.join(path, "relevance.npy"), np.zeros((len(targets), conv.out_channels), np.float16))
    save_npy(os.path.join(path, "targets.npy"), targets)
    save_npy(os.path.join(path, "predictions.npy"), targets)
    save_npy(os.path.join(path, "layer_weight.npy"), conv.weight.detach().float().numpy())
    if conv.bias is not None:
        save_npy(os.path.join(path, "layer_bias.npy"), conv.bias.detach().float().numpy())
    write_json(os.path.join(path, "meta.json"), {
        "format_version": version, "complete": True, "model": "hand", "weights": "none", "layer": "conv",
        "in_channels": conv.in_channels, "out_channels": conv.out_channels, "conv": conv_meta(conv),
        "tap_shape": [conv.in_channels, *conv.kernel_size], "input_shape": [conv.in_channels, *np.shape(class_sums)[2:]],
        "classes": [f"class{t}" for t in range(len(class_counts))], "class_names": None,
        "class_counts": list(class_counts), "num_images": int(sum(class_counts))})
    return path


def make_record(model_dir: str, lm: LoadedModel, layer: str | None, channel: int, concepts: list[list[int]],
                A: torch.Tensor, best_rho: float = 0.5, class_names: dict | None = None):
    """A stage-3 record (record.json and filters.pt for every rho) of ``channel`` split by the concept ARVs
    ``A`` (k x C_in), written to ``model_dir/<its name>`` through the project's own record schema; no pass
    over images (its scores are zeros)."""
    from utils.model.loading import default_layer, get_layer
    from utils.store.records import Record, load_record, rho_key, save_record
    from utils.method.split import RHOS, sweep

    name, conv = get_layer(lm.model, layer)
    sw = sweep(conv.weight.detach().cpu()[channel], A)
    rec = Record(model=lm.name, weights=lm.weights, layer=name, default_layer=name == default_layer(lm.model),
                 in_channels=conv.in_channels, out_channels=conv.out_channels, channel=channel, concepts=concepts,
                 class_names=class_names or {}, store="", data_dir="", data_fingerprint="", rhos=list(RHOS),
                 scores={rho_key(r): 0.0 for r in RHOS}, best_rho=best_rho,
                 sources={rho_key(r): sw.sources(i) for i, r in enumerate(RHOS)}, max_abs_logit_diff=0.0,
                 equivalence_images=0, train_images={f"concept{j}": 0 for j in range(1, len(concepts) + 1)},
                 seconds=0.0, images_per_second=0.0)
    folder = os.path.join(model_dir, rec.name())
    save_record(folder, rec, sw)
    return load_record(folder)


def class_index_for(data_dir: str) -> str:
    """A ``--class_index`` file mapping ``data_dir/train``'s folders to logits 0, 1, 2, ... (their positions):
    what a 3-folder test dataset needs with a 1000-output model such as a random-weight resnet18."""
    import json

    path = os.path.join(data_dir, "class_index.json")
    with open(path, "w") as f:
        json.dump({c: t for t, c in enumerate(sorted(os.listdir(os.path.join(data_dir, "train"))))}, f)
    return path


def run_script(script: str, *args: str):
    """A script's command line run in this process (no interpreter start-up: fast), as a CompletedProcess with
    its exit code, stdout and stderr. For faults that need a process of their own, use subprocess."""
    import importlib
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from utils.errors import run_cli

    module = importlib.import_module(os.path.basename(script)[:-3])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_cli(lambda: module.main(module.get_args_parser().parse_args(list(args))))
        except SystemExit as e:
            code = e.code or 0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


PLANTED_RGB = '''import torch
from torch import nn

CONV = {conv!r}  # per conv channel: its stem inputs, and whether their weights are drawn from [0.5, 1] (else 1)
FC = {fc!r}  # logits x conv channels
NAMES = {names!r}


class PlantedRGB(nn.Module):
    """Stem channels 0-2 see red, 3-5 green, 6-8 blue, 9 is a constant 1; conv channel c reads CONV[c]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 1)
        self.conv = nn.Conv2d(10, len(CONV), 1, bias=False)
        self.fc = nn.Linear(len(CONV), len(FC), bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.bias.zero_()
            for c, rgb in ((0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)):
                self.stem.weight[c, rgb] = 1 + 0.2 * torch.rand(1, generator=g)
                self.stem.weight[c, [k for k in range(3) if k != rgb]] = -0.6
            self.stem.bias[9] = 1.0
            self.conv.weight.zero_()
            for c, (inputs, drawn) in enumerate(CONV):
                self.conv.weight[c, inputs, 0, 0] = 0.5 + 0.5 * torch.rand(len(inputs), generator=g) if drawn else 1.0
            self.fc.weight.copy_(torch.tensor(FC))

    def forward(self, x):
        a = self.conv(torch.relu(self.stem(x)))
        return self.fc(torch.relu(a).mean((2, 3)))


def build():
    return (PlantedRGB(), NAMES) if NAMES else PlantedRGB()
'''


def planted_rgb_source(conv: list, fc: list, names: list[str] | None) -> str:
    """The text of a model file (``build()``) of a planted RGB network: conv channel c reads the stem inputs
    ``conv[c][0]`` (weights drawn when ``conv[c][1]``), the logits are ``fc`` x the conv channels' means."""
    return PLANTED_RGB.format(conv=conv, fc=fc, names=names)


class FullDevice:
    """A file opened for writing on a device with ``free[0]`` bytes left (shared by every file of that device):
    a write past it writes what fits, then raises ENOSPC, as a full file system does."""

    def __init__(self, f, free: list[int]):
        self._f, self._free = f, free

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size <= self._free[0]:
            self._free[0] -= size
            return self._f.write(data)
        if not isinstance(data, str) and self._free[0]:
            self._f.write(memoryview(data).cast("B")[: self._free[0]])
        self._free[0] = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def full_device(folder: str, free: int = 0):
    """While the block runs, every file opened for writing under ``folder`` is on a device with ``free``
    bytes left (shared by all of them): an injected full disk, where a small tmpfs cannot be mounted.
    Yields the names of the files that were opened for writing there."""
    import builtins

    real_open, left, hits = builtins.open, [free], []
    root = os.path.abspath(folder) + os.sep

    def full_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if any(m in mode for m in "wax+") and isinstance(file, (str, os.PathLike)) and \
                os.path.abspath(file).startswith(root):
            hits.append(os.path.basename(file))
            return FullDevice(f, left)
        return f

    builtins.open = full_open
    try:
        yield hits
    finally:
        builtins.open = real_open


# Stem channels 0-2 see red, 3-5 green, 6-8 blue, 9 is a constant 1. Conv channel 0 reads red and blue, 1 reads
# red and green, 2 the constant, 3 green only. Orange excites the red stem channels (weaker), so red and orange
# have nearly parallel ARVs and form ONE concept. Logits: red = a0 + a1, orange = a0 + a1 + a2 / 2,
# green = a1 + a3, blue = a0 + a2. Channel 0: {red, orange} | {blue}; channel 1: {red, orange} | {green};
# channel 2: orange and blue through the constant alone, one concept (a candidate that is not split);
# channel 3: green alone (no candidate: the only channel the baseline may draw).
PLANTED4_CONV = [([0, 1, 2, 6, 7, 8], True), ([0, 1, 2, 3, 4, 5], True), ([9], False), ([3, 4, 5], False)]
PLANTED4_FC = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
PLANTED4 = planted_rgb_source(PLANTED4_CONV, PLANTED4_FC, ["red thing", "orange thing", "green thing", "blue thing"])
COLOURS = {"A_red": (220, 30, 30), "B_orange": (220, 120, 30), "C_green": (30, 220, 30), "D_blue": (30, 30, 220)}


def planted_cli_setup(root, name: str, source: str, colors: dict, n_val: int):
    """A planted network written as ``root/<name>.py``, its data, and its stage-1 store made by the CLI;
    returns ``(root, data_dir, the common flags of every command)``."""
    (root / f"{name}.py").write_text(source)
    data = write_image_folder(str(root / "data"), n_train=6, n_val=n_val, colors=colors, size=16)
    common = ["--data_dir", data, "--model", f"{root / (name + '.py')}:build", "--num_workers", "0", "--device", "cpu",
              "--batch_size", "4", "--no_progress"]
    r = run_script("get_importances_for_classes.py", *common, "--store_dir", str(root / "store"))
    assert r.returncode == 0, r.stderr
    return root, data, common


@pytest.fixture(scope="module")
def planted4(tmp_path_factory):
    """The planted network as a file, its data and its stage-1 store (made by the CLI)."""
    return planted_cli_setup(tmp_path_factory.mktemp("layer4"), "planted4", PLANTED4, COLOURS, 5)


def mount_tmpfs(path, size: str, options: str = "") -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; None when it worked, else why not (no root, no ``mount``, a
    container without CAP_SYS_ADMIN, ...)."""
    os.makedirs(path, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{',' + options if options else ''}", "tmpfs",
                            path], capture_output=True, text=True)
    except OSError as e:  # no mount program at all
        return f"cannot run mount: {e}"
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip() or f'exit code {r.returncode}'}"


@contextmanager
def small_fs(path, size: str, options: str = "", instead: str = ""):
    """A tmpfs of ``size`` at ``path``. Where this machine does not allow mounting, the test is skipped with a
    reason that says so and names what covers the behaviour ``instead`` (if anything)."""
    why = mount_tmpfs(path, size, options)
    if why is not None:
        pytest.skip(f"this test needs to mount a small tmpfs, which this machine does not allow ({why})"
                    + (f"; {instead} covers the same behaviour with an injected ENOSPC" if instead else ""))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
