"""What a split channel responds to, before and after the split: top-k images, feature
visualisations, the teaser-style figure and the purity score (``visualize_channel.py``)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torchvision import transforms

from . import featvis, surgery, teaser
from .data import ImageList, eval_transform, list_images, make_loader, resolve_device
from .cli import RunOptions
from .errors import UserError
from .models import LoadedModel, default_layer, get_layer, load_model
from .store import write_json
from .surgery import load_filters
from .topk import LABELS, TopK, crop, filter_bank, purity, receptive_field, stream_topk, subchannel_maps


@dataclass
class PicturesConfig(RunOptions):
    data_dir: str
    model_dir: str  # the models_disentangled folder
    channel: int
    classes_for_concept1: list[int]
    classes_for_concept2: list[int]
    rho: float | None = None  # default: the record's best rho
    split: str = "train"
    top_k: int = 12
    out_dir: str = "./visualizations"
    residual: bool = False
    heatmap: bool = False
    crop_size: int | None = None  # default: the layer's effective receptive field
    fv: featvis.FVConfig | None = field(default_factory=featvis.FVConfig)  # None: no feature visualisation
    fv_spectrum_images: int = 256


def find_record(model_dir: str, lm: LoadedModel, layer: str, channel: int, c1: list[int], c2: list[int]) -> dict:
    """Load the record of one disentanglement from ``model_dir`` and check it fits the model."""
    rec = surgery.find_record(model_dir, lm.name, layer, default_layer(lm.model), channel, c1, c2)
    surgery.check_record_identity(rec, lm.name, lm.weights, layer)
    return rec


def topk_for_records(loaded: LoadedModel, records: list[dict], images: ImageList, k: int, rho: float | None = None,
                     residual: bool = False, batch_size: int = 64, num_workers: int = 4,
                     device: torch.device | str = "cpu", progress: bool = True) -> TopK:
    """Top-k images of Original/D1/D2 (and Res) of every record (one layer), in ONE pass over ``images``."""
    layers = {r["layer"] for r in records}
    if len(layers) != 1:
        raise UserError(f"records of one layer at a time, got {sorted(layers)}")
    _, conv = get_layer(loaded.model, layers.pop())
    splits = [load_filters(r, rho) for r in records]
    names = ("original", "D1", "D2", "Res") if residual else ("original", "D1", "D2")
    bank = filter_bank(conv, splits, names)
    loader = make_loader(images, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=torch.device(device).type == "cuda")
    return stream_topk(loaded.model.to(device), conv, bank, loader, k, images, device, progress)


def class_names(lm: LoadedModel, images: ImageList) -> list[str]:
    """Human class names: the weights' categories when they cover the data's classes, else folder names."""
    if lm.categories and len(lm.categories) >= len(images.classes):
        return list(lm.categories)
    return list(images.classes)


def channel_pictures(cfg: PicturesConfig, loaded: LoadedModel | None = None,
                     check: Callable[[int], None] | None = None, top: TopK | None = None) -> dict:
    """Top-k images, feature visualisations, figure and purity of one split channel; returns the summary.

    ``check(out_channels)`` may reject the layer (the scripts' --nr_channels_in_layer_of_interest).
    ``top``: the top-k of this channel already found by :func:`topk_for_records` (one pass for many
    channels) with the same ``top_k``, ``rho``, ``residual`` and split; otherwise it is searched here.
    """
    if cfg.top_k < 1:
        raise UserError("--top_k must be at least 1")
    if cfg.split not in ("train", "val"):
        raise UserError(f"--split must be train or val, not {cfg.split!r}")
    c1, c2 = list(cfg.classes_for_concept1), list(cfg.classes_for_concept2)
    if set(c1) & set(c2):
        raise UserError(f"class(es) {sorted(set(c1) & set(c2))} are in both concepts")
    device = resolve_device(cfg.device, cfg.gpu)
    lm = loaded or load_model(cfg.model, cfg.weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    if check is not None:
        check(conv.out_channels)
    if not 0 <= cfg.channel < conv.out_channels:
        raise UserError(f"channel {cfg.channel} is outside layer {layer}'s {conv.out_channels} channels")
    rec = find_record(cfg.model_dir, lm, layer, cfg.channel, c1, c2)
    images = list_images(cfg.data_dir, cfg.split)
    for t in c1 + c2:
        if not 0 <= t < len(images.classes):
            raise UserError(f"class {t} is outside the {len(images.classes)} classes of {images.root}")
    if cfg.split == "train" and rec.get("data_fingerprint") not in (None, images.fingerprint()):
        print(f"warning: {images.root} differs from the images the record was made with", file=sys.stderr)
    split = load_filters(rec, cfg.rho)
    rho = float(rec["best_rho"]) if cfg.rho is None else round(float(cfg.rho), 2)
    names = class_names(lm, images)
    model = lm.model.to(device)
    t0 = time.time()
    if top is None:
        top = topk_for_records(lm, [rec], images, cfg.top_k, cfg.rho, cfg.residual, cfg.batch_size,
                               cfg.num_workers, device, cfg.progress)
    seconds_topk = time.time() - t0

    out = os.path.join(cfg.out_dir, f"{os.path.basename(rec['dir'])}_rho{rho:.2f}")
    os.makedirs(out, exist_ok=True)
    rf = receptive_field(model, conv, (224, 224), min_size=28)
    side = cfg.crop_size or rf.size
    subs = ["original", "D1", "D2"] + (["Res"] if cfg.residual else [])
    disp = transforms.Compose(eval_transform().transforms[:3])  # the 224 centre crop, unnormalised
    norm = eval_transform().transforms[3]
    bank = filter_bank(conv, [split], tuple(subs))
    magnitude = None
    if cfg.fv is not None and cfg.fv.method == "maco":
        spectrum_images = list_images(cfg.data_dir, "train")
        magnitude = featvis.magnitude_spectrum(spectrum_images, cfg.fv.size, cfg.fv_spectrum_images, cfg.fv.seed)

    # the top-k images of all sub-channels, loaded and run up to the layer once
    wanted = sorted({int(i) for name in subs for i in top.get(cfg.channel, name)["indices"]})
    shown_all = {i: _load(images, i, disp) for i in wanted}
    maps_all = subchannel_maps(model, conv, bank.weight.to(device), None if bank.bias is None else bank.bias.to(device),
                               torch.stack([norm(shown_all[i]) for i in wanted]).to(device)).cpu()  # n x S x H' x W'
    panels, summary_subs, files = [], {}, []
    for s, name in enumerate(subs):
        t = top.get(cfg.channel, name)
        shown = [shown_all[int(i)] for i in t["indices"]]
        maps = [maps_all[wanted.index(int(i)), s] for i in t["indices"]]
        pictures, entries = [], []
        for r, (img, m) in enumerate(zip(shown, maps)):
            i, j = (int(v) for v in t["positions"][r])
            box = rf.box(i, j, side)
            pic = teaser.overlay(img, m) if cfg.heatmap else crop(img, box)
            pictures.append(pic)
            path = os.path.join(out, f"topk_{name}_{r + 1:02d}.png")
            teaser.save_image(pic, path)
            files.append(path)
            lab = int(t["labels"][r])
            entries.append({"rank": r + 1, "index": int(t["indices"][r]), "path": images.paths[int(t["indices"][r])],
                            "label": lab, "class_name": names[lab], "activation": float(t["values"][r]),
                            "position": [i, j], "box": list(box)})
        fv_img, fv_info = None, None
        if cfg.fv is not None:
            t1 = time.time()
            w = bank.weight[s]
            b = None if bank.bias is None else bank.bias[s]
            fv_img, hist = featvis.visualize(model, conv, w, b, cfg.fv, magnitude, device, cfg.progress)
            with torch.no_grad():
                g = torch.Generator().manual_seed(cfg.fv.seed)
                noise = torch.rand(2, 3, cfg.fv.input_size, cfg.fv.input_size, generator=g).to(device)
                base = featvis.activation(model, conv, w.to(device), None if b is None else b.to(device), noise)
                fin = featvis.activation(model, conv, w.to(device), None if b is None else b.to(device),
                                         torch.nn.functional.interpolate(fv_img[None].to(device), cfg.fv.input_size,
                                                                         mode="bilinear", align_corners=False))
            fv_info = {"seconds": time.time() - t1, "activation": float(fin[0]),
                       "activation_on_noise": float(base.mean()), "last_step_activation": hist[-1]}
            path = os.path.join(out, f"fv_{name}.png")
            teaser.save_image(fv_img, path)
            files.append(path)
        pur = purity(t["labels"], c1, c2)
        concepts = [1 if int(lab) in c1 else 2 if int(lab) in c2 else 0 for lab in t["labels"]]
        center, caption = fv_img, f"feature visualisation ({cfg.fv.method})" if cfg.fv else ""
        if center is None:
            center, caption = teaser.overlay(shown[0], maps[0]), "top-1 image, activation map"
        panels.append(teaser.Panel(LABELS[name], center, pictures,
                                   [f"{lab} {names[int(lab)]}"[:22] for lab in t["labels"]], concepts, pur, caption))
        summary_subs[name] = {"label": LABELS[name], "purity": pur, "topk": entries, "feature_visualisation": fv_info}

    legend = (", ".join(f"{t} {names[t]}" for t in c1), ", ".join(f"{t} {names[t]}" for t in c2))
    title = f"{lm.name} {layer}, channel {cfg.channel} (rho = {rho:.2f}, top {cfg.top_k} of {cfg.split})"
    fig_paths = (os.path.join(out, "teaser.png"), os.path.join(out, "teaser.pdf"))
    fig = teaser.teaser_figure(panels, title, legend, fig_paths)
    import matplotlib.pyplot as plt
    plt.close(fig)
    files += list(fig_paths)
    summary = {
        "record": rec["dir"], "model": lm.name, "weights": lm.weights, "layer": layer, "channel": cfg.channel,
        "classes_for_concept1": c1, "classes_for_concept2": c2, "rho": rho, "split": cfg.split, "top_k": cfg.top_k,
        "images_searched": len(images), "seconds_topk": seconds_topk,
        "receptive_field": {"stride": list(rf.stride), "offset": list(rf.offset), "effective": rf.size,
                            "full": rf.full, "crop": side, "out_hw": list(rf.out_hw)},
        "feature_visualisation": None if cfg.fv is None else {
            "method": cfg.fv.method, "steps": cfg.fv.steps, "size": cfg.fv.size, "views": cfg.fv.views,
            "seed": cfg.fv.seed},
        "purity": {name: v["purity"] for name, v in summary_subs.items()},
        "subchannels": summary_subs, "out_dir": out,
    }
    path = os.path.join(out, "purity.json")
    files.append(path)
    summary["files"] = files
    write_json(path, summary)
    return summary


def _load(images: ImageList, i: int, tf) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(images.paths[i]) as im:
            return tf(im.convert("RGB"))
    except Exception:  # noqa: BLE001
        raise UserError(f"cannot read image {images.paths[i]}") from None
