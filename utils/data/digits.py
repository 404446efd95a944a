"""The bundled demo's data: scikit-learn's handwritten digits as an ImageFolder (its classifier: ``utils.stages.demo``).

Nothing is downloaded: the 1,797 8x8 digit images ship inside scikit-learn.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import UserError

# the classes' names (utils/model/demo_models.py, loaded as a file of its own, keeps the same list: a test checks)
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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
