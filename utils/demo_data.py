"""The bundled demo: scikit-learn's handwritten digits as an ImageFolder, and a small classifier trained on it.

Nothing is downloaded: the 1,797 8x8 digit images ship inside scikit-learn.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import list_images, load_image
from .demo_models import DIGIT_NAMES
from .errors import UserError
from .files import save_torch
from .models import build_model, model_tag


def make_digits_folder(root: str, val_fraction: float = 0.25, size: int = 64, seed: int = 0) -> str:
    """Write ``root/{train,val}/<d>_<name>/*.png`` from sklearn's digits (upscaled to ``size``), once."""
    done = os.path.join(root, ".complete")
    if os.path.isfile(done):
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = int(round(val_fraction * len(order)))
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in sorted(idx):
            t = int(digits.target[i])
            d = os.path.join(root, split, f"{t}_{DIGIT_NAMES[t]}")
            os.makedirs(d, exist_ok=True)
            img = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
            Image.fromarray(img).resize((size, size), Image.BICUBIC).convert("RGB").save(
                os.path.join(d, f"{i:04d}.png"))
    open(done, "w").close()
    return root


def _tensors(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = list_images(data_dir, split)
    return torch.stack([load_image(images, i) for i in range(len(images))]), torch.tensor(images.targets)


def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Set every BatchNorm's running statistics to the exact average over ``x`` (N x 3 x H x W).

    A short training run leaves them far from the data when the momentum is small (MobileNetV3 uses
    0.01), which makes the eval-mode network near chance. Leaves the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:  # a ViT: LayerNorm only, nothing to recalibrate (and no pass over x to spend)
        model.eval()
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over all batches
    model.train()
    with torch.no_grad():
        for b in range(0, len(x), batch_size):
            model(x[b:b + batch_size])
    model.eval()


def train_classifier(data_dir: str, model_name: str, out_path: str, epochs: int = 3, batch_size: int = 32,
                     lr: float = 2e-3, seed: int = 0, max_train: int | None = None, progress: bool = True) -> dict:
    """Train model ``model_name`` (any name ``utils.models.build_model`` knows: torchvision, ``timm/<name>``,
    ``file.py:function``) from scratch on ``data_dir/train`` (eval transform, no augmentation, seeded: the
    same seed gives the same weights).

    Saves the state_dict to ``out_path`` (atomically) and returns train/val accuracy and seconds.
    ``progress``: a progress bar of the steps.
    """
    torch.manual_seed(seed)
    x, y = _tensors(data_dir, "train")
    if max_train:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_train]
        x, y = x[keep], y[keep]
    xv, yv = _tensors(data_dir, "val")
    model = _untrained(model_name, int(y.max()) + 1, x[:1], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"train {model_tag(model_name)}", unit="step", dynamic_ncols=True,
               disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), batch_size):
            i = perm[b:b + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    recalibrate_batchnorm(model, x, batch_size=64)
    with torch.no_grad():
        acc = {name: float((torch.cat([model(xx[b:b + 256]).argmax(1) for b in range(0, len(yy), 256)]) == yy)
                           .float().mean()) for name, xx, yy in (("train", x, y), ("val", xv, yv))}
    save_torch(out_path, model.state_dict())
    return {"train_accuracy": acc["train"], "val_accuracy": acc["val"], "seconds": time.perf_counter() - start}


def _untrained(model_name: str, classes: int, probe: torch.Tensor, seed: int) -> torch.nn.Module:
    """``model_name`` freshly initialised from ``seed`` with ``classes`` outputs, trainable; a model with another
    number of outputs (an own file's fixed head) is one line."""
    model = build_model(model_name, classes, seed)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        out = model.eval()(probe).shape[-1]
    if out != classes:
        raise UserError(f"{model_name} has {out} outputs; the digits have {classes} classes")
    return model
