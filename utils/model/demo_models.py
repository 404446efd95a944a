"""The digits demo's models: the default CNN (a torchvision name) and a small vision transformer given to the
toolkit as an own file (``utils/model/demo_models.py:digits_vit``, what ``demo.py --model vit`` means), each with
the settings ``utils.stages.demo.train_classifier`` trains it with on the digits.

:func:`digits_vit` is also a worked example of ``--model path/to/file.py:function``: a function without
arguments that returns ``(model, class names)``. Such a model sees the default evaluation transform (Resize
256, CenterCrop 224, ImageNet normalisation), so the ViT takes 224 px images. Nothing heavy is imported at the
top, so that ``demo.py --help`` stays quick.
"""
from __future__ import annotations

import os

# The ten classes' names, as utils/data/digits.py names the demo's folders (a test checks they agree). Kept here
# too, not imported from there: this file is also loaded by path as an own model file (importlib), where it has
# no package for a relative import, and the package's name differs between a clone (utils) and an installed copy
# (disentangle_channels).
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_CNN = "mobilenet_v3_small"  # the demo's default model
DIGITS_CNN_TRAINING = {"epochs": 2, "lr": 2e-3, "batch_size": 32}

# A 4 x 4 grid of 56 px patches (each about 2 x 2 pixels of the 8 x 8 digit), a class token read by the head
# (global_pool="token"), 4 blocks of width 96 with 3 heads. Finer grids (32 px: 7 x 7, 16 px: 14 x 14) cost
# about as much on the CPU but learn the digits' shapes from 1,347 images more slowly (val accuracy ~0.82
# after 20 epochs at 32 px).
DIGITS_VIT = dict(img_size=224, patch_size=56, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                  class_token=True, global_pool="token", weight_init="jax")
# A ViT from scratch needs more epochs and smaller steps than the CNN.
DIGITS_VIT_TRAINING = {"epochs": 15, "lr": 1e-3, "batch_size": 16}


def digits_vit():
    """A small timm ``VisionTransformer`` for the ten digit classes, and their names.

    The initialisation draws from torch's global generator, so the caller's seed decides it (the demo seeds
    before it builds the model to train; a trained model's weights replace it anyway)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(num_classes=len(DIGIT_NAMES), **DIGITS_VIT)
    sincos_positions(model)
    return model, list(DIGIT_NAMES)


def sincos_positions(model) -> None:
    """Start ``model``'s learned position embedding at the 2-D sine-cosine one (as MAE does; the class token's
    at zero). timm's default start (noise of std 0.02) hides where a patch is, so that the class token can at
    first only average the patches, which says little about a digit, and training idles for epochs."""
    import torch
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, model.num_prefix_tokens:] = build_sincos2d_pos_embed(
            list(model.patch_embed.grid_size), model.embed_dim)


def is_digits_vit(name: str) -> bool:
    """Whether model ``name`` is :func:`digits_vit` of this file (by any path to it)."""
    path, _, function = name.rpartition(":")
    return function == "digits_vit" and os.path.isfile(path) and os.path.samefile(path, __file__)


def digits_vit_spec() -> str:
    """The model name of :func:`digits_vit` for ``utils.model.loading.load_model``: this file's absolute path, so it
    works from any working directory."""
    return f"{os.path.abspath(__file__)}:digits_vit"


def digits_training(name: str) -> dict:
    """``train_classifier``'s settings (epochs, lr, batch_size) for model ``name`` on the digits: the digits
    ViT's own, else the CNN's."""
    return dict(DIGITS_VIT_TRAINING if is_digits_vit(name) else DIGITS_CNN_TRAINING)
