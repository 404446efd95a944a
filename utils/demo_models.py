"""The demo's own models, given to the toolkit as own-file specs (``utils/demo_models.py:digits_vit``), as a
user's file would be: ``demo.py --model vit`` trains :func:`digits_vit` on the digits and splits its last MLP.

This file is also the worked example of ``--model path/to/file.py:function``: a function without arguments
that returns ``(model, class names)``. Such a model sees the default evaluation transform (Resize 256,
CenterCrop 224, ImageNet normalisation), so the ViT takes 224 px images.
"""
from __future__ import annotations

import os

import torch

try:  # loaded by path (importlib) as an own file, or as utils.demo_models
    from .demo_data import DIGIT_NAMES
except ImportError:
    from utils.demo_data import DIGIT_NAMES

# The geometry: a 7 x 7 grid of 32 px patches (each about one pixel of the 8 x 8 digit), a class token
# read by the head (global_pool="token"), 4 blocks of width 96 with 3 heads; measured on a 2-core CPU:
# see DIGITS_VIT_TRAINING for how long it trains and how well it does.
DIGITS_VIT = dict(img_size=224, patch_size=32, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                  class_token=True, global_pool="token")
# Its training settings (utils.demo_data.train_classifier): a ViT from scratch needs more epochs than the CNN.
DIGITS_VIT_TRAINING = {"epochs": 12, "lr": 1e-3}


def digits_vit() -> tuple[torch.nn.Module, list[str]]:
    """A small timm ``VisionTransformer`` for the ten digit classes, and their names.

    The initialisation draws from torch's global generator, so the caller's seed decides it (the demo seeds
    before it builds the model to train; a trained model's weights replace it anyway)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=len(DIGIT_NAMES), **DIGITS_VIT), list(DIGIT_NAMES)


def digits_vit_spec() -> str:
    """The model name of :func:`digits_vit` for ``utils.models.load_model``: this file's absolute path, so it
    works from any working directory."""
    return f"{os.path.abspath(__file__)}:digits_vit"
