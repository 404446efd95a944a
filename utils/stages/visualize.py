"""What a split channel responds to, before and after the split: top-k images, feature visualisations,
the teaser-style figure and the purity score (``visualize_channel.py``)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..passes import featvis
from ..report import teaser
from ..data.classes import ClassNames, check_concepts
from ..data.images import ImageList, Preprocess, list_images, load_image
from ..errors import UserError
from ..files import write_json
from ..passes.image_pass import RunOptions, Runner, plain_batches
from .evaluation import find_split
from ..model.loading import LoadedModel
from ..model.receptive import ReceptiveField, crop, receptive_field
from ..store.provenance import provenance
from ..store.records import Record, load_split
from ..model.hooks import layer_input
from ..method.split import FilterBank, Split, filter_bank, sub_names
from ..report.style import sub_label
from ..method.selectivity import TopK, purity
from ..passes.topk import stream_topk
from ..model.units import Unit, unit_at


@dataclass
class PicturesConfig(RunOptions):
    data_dir: str
    model_dir: str  # the models_disentangled folder
    channel: int
    concepts: list[list[int]] = field(default_factory=list)
    rho: float | None = None  # default: the record's best rho
    split: str = "train"
    top_k: int = 12
    out_dir: str = "./visualizations"
    residual: bool = False
    heatmap: bool = False
    crop_size: int | None = None  # default: the layer's effective receptive field
    fv: featvis.FVConfig | None = field(default_factory=featvis.FVConfig)  # None: no feature visualisation
    fv_spectrum_images: int = 256
    formats: tuple[str, ...] = ("png", "pdf")  # of the teaser figure
    crop_files: bool = True  # each top-k picture as its own PNG too (the layer command keeps the figure only)


def topk_for_splits(runner: Runner, model: nn.Module, layer: str, splits: list[Split], images: ImageList, k: int,
                    preprocess: Preprocess | None = None, residual: bool = False, positions: str | None = None) -> TopK:
    """Top-k images of the original channel and every sub-channel of ``splits`` (one layer) in ONE pass;
    ``model`` is on ``runner``'s device; ``positions``: the record's (a Linear's positions that count)."""
    conv = unit_at(model, layer, positions)
    bank = filter_bank(conv, splits, None) if not residual else FilterBank.join(
        [filter_bank(conv, [s], ("original",) + sub_names(s.k)) for s in splits])
    return stream_topk(runner, model, conv, bank, images, k, preprocess)


@dataclass
class Job:
    """One channel's pictures, resolved and checked; ``model`` is on the device the pictures are drawn on."""

    lm: LoadedModel
    model: nn.Module
    layer: str
    record: Record
    split: Split
    concepts: list[list[int]]
    images: ImageList
    names: ClassNames
    rho: float
    subs: list[str]  # original, D1 .. Dk (, Res)
    rf: ReceptiveField | None = None  # the layer's receptive field, when already measured (several channels)

    @property
    def unit(self) -> Unit:
        """The layer of interest in ``model``, with the positions that count of its record."""
        return unit_at(self.model, self.layer, self.record.positions)


def prepare(cfg: PicturesConfig, runner: Runner, loaded: LoadedModel | None = None,
            check: Callable[[int], None] | None = None) -> Job:
    """Check the inputs, find the record and list the images; raises UserError before any pass."""
    if cfg.top_k < 1:
        raise UserError("--top_k must be at least 1")
    if cfg.split not in ("train", "val"):
        raise UserError(f"--split must be train or val, not {cfg.split!r}")
    f = find_split(cfg, cfg.split, loaded, check)
    lm, layer, concepts, rec, cmap = f.lm, f.layer, f.concepts, f.record, f.classes
    images = list_images(cfg.data_dir, cfg.split, classes=cmap)
    check_concepts(concepts, cmap.index.values(), images.root)
    split = load_split(rec, cfg.rho)
    if rec.orientation:  # a record made with --orientation gradient: each concept unit is read in its direction
        split = split.oriented(rec.orientation)
    rho = float(rec.best_rho) if cfg.rho is None else round(float(cfg.rho), 2)
    subs = ["original", *sub_names(split.k)[:-1]] + (["Res"] if cfg.residual else [])
    names = ClassNames(lm.categories, list(cmap.index), list(cmap.index.values()))
    return Job(lm, runner.model(lm.model), layer, rec, split, concepts, images, names, rho, subs)


def channel_pictures(cfg: PicturesConfig, loaded: LoadedModel | None = None,
                     check: Callable[[int], None] | None = None, top: TopK | None = None) -> dict:
    """Top-k images, feature visualisations, figure and purity of one split channel; returns the summary.

    ``check(out_channels)`` may reject the layer (the scripts' --nr_channels_in_layer_of_interest).
    ``top``: the top-k of this channel already found by :func:`topk_for_splits` (one pass for many
    channels) with the same ``top_k``, ``rho``, ``residual`` and split; otherwise it is searched here.

    Under torchrun (``cfg.rank``, ``cfg.world_size``) every rank calls this: the top-k search is shared out
    (each rank a block of whole batches, merged in dataset order) and rank 0 alone draws, writes and returns
    the summary; the other ranks return None once it has. A failure on any rank stops all of them.
    """
    runner = Runner.of(cfg)
    job = runner.together(lambda: prepare(cfg, runner, loaded, check), "the pictures")
    t0 = time.time()
    if top is None:
        top = topk_for_splits(runner, job.model, job.layer, [job.split], job.images, cfg.top_k, job.lm.preprocess,
                              cfg.residual, job.record.positions)
    seconds = time.time() - t0
    return runner.together(lambda: draw(cfg, job, top, seconds) if runner.lead else None, "the pictures")


def draw(cfg: PicturesConfig, job: Job, top: TopK, seconds_topk: float = 0.0) -> dict:
    """The pictures of one split channel from its top-k (``top``): crops, feature visualisations, the teaser
    figure and purity.json in ``cfg.out_dir/<record>_rho<rho>/``; returns the summary."""
    model, conv = job.model, job.unit
    device = conv.weight.device
    out = os.path.join(cfg.out_dir, f"{os.path.basename(job.record.dir)}_rho{job.rho:.2f}")
    os.makedirs(out, exist_ok=True)
    side = job.lm.preprocess.crop
    rf = job.rf or receptive_field(model, conv, (side, side), min_size=max(1, side // 8))
    bank = filter_bank(conv, [job.split], tuple(job.subs))
    shown, maps = _top_images(cfg, model, conv, job, top, bank, device)
    magnitude = _magnitude(cfg)
    panels, subs, files = [], {}, []
    for s, name in enumerate(job.subs):
        pictures, entries, paths = _crops(cfg, job, top.get(cfg.channel, name), shown, maps, s, rf, out, name)
        fv_img, fv_info, fv_paths = _feature_visualisation(cfg, model, job, bank, s, magnitude, device, out, name)
        panels.append(_panel(cfg, job, top.get(cfg.channel, name), name, pictures, fv_img, shown, maps, s))
        subs[name] = {"label": sub_label(name), "purity": panels[-1].purity, "topk": entries,
                      "feature_visualisation": fv_info}
        files += paths + fv_paths
    files += _figure(cfg, job, panels, out)
    summary = {**_summary(cfg, job, rf, subs, seconds_topk, out),
               "provenance": provenance(cfg.fv.seed if cfg.fv else None, job.lm.preprocess)}
    files.append(os.path.join(out, "purity.json"))
    summary["files"] = files
    write_json(files[-1], summary)
    return summary


def _top_images(cfg, model, unit: Unit, job: Job, top: TopK, bank: FilterBank, device) -> tuple[dict, dict]:
    """The top-k images of all sub-channels, loaded once (the centre crop, unnormalised): ``shown[i]``
    (3 x side x side) by dataset index; and ``maps[i]`` (S x H' x W', over the layer's grid) of the images that need an activation
    map (all with ``--heatmap``; else each sub-channel's top-1 when there is no feature visualisation to
    show in the middle), run up to the layer once. Crops need no maps: the top-k pass kept the maxima."""
    display = job.lm.preprocess.display()
    tops = [[int(i) for i in top.get(job.split.channel, name)["indices"]] for name in job.subs]
    shown = {i: load_image(job.images, i, display) for i in sorted({i for t in tops for i in t})}
    need = sorted(shown if cfg.heatmap else {t[0] for t in tops if t} if cfg.fv is None else set())
    runner = Runner(device, cfg.batch_size, cfg.num_workers, progress=False)  # drawing is one process's work
    bank, maps = bank.to(device), {}

    def step(batches):
        for b in batches:
            m = bank.maps(unit, unit.grid(layer_input(model, unit, b.x))).float().cpu()
            maps.update(zip(b.index.tolist(), m))

    runner.image_pass(job.images, plain_batches(need, cfg.batch_size), job.lm.preprocess, "maps").run(step)
    return shown, maps


def _magnitude(cfg: PicturesConfig) -> torch.Tensor | None:
    """MACO's magnitude spectrum, from the user's own training images (None for other methods)."""
    if cfg.fv is None or cfg.fv.method != "maco":
        return None
    return featvis.magnitude_spectrum(list_images(cfg.data_dir, "train"), cfg.fv.size, cfg.fv_spectrum_images,
                                      cfg.fv.seed)


def _crops(cfg, job: Job, t: dict, shown: dict, maps: dict, s: int, rf: ReceptiveField, out: str, name: str):
    """One sub-channel's top-k pictures (receptive-field crops or heat maps), written as PNGs, and their entries."""
    side = cfg.crop_size or rf.size
    pictures, entries, paths = [], [], []
    for r, i in enumerate(int(v) for v in t["indices"]):
        pi, pj = (int(v) for v in t["positions"][r])
        box = rf.box(pi, pj, side)
        pic = teaser.overlay(shown[i], maps[i][s]) if cfg.heatmap else crop(shown[i], box)
        pictures.append(pic)
        if cfg.crop_files:
            paths.append(os.path.join(out, f"topk_{name}_{r + 1:02d}.png"))
            teaser.save_image(pic, paths[-1])
        lab = int(t["labels"][r])
        entries.append({"rank": r + 1, "index": i, "path": job.images.paths[i], "label": lab,
                        "class_name": job.names.name(lab), "activation": float(t["values"][r]),
                        "position": [pi, pj], "box": list(box)})
    return pictures, entries, paths


def _feature_visualisation(cfg, model, job: Job, bank: FilterBank, s: int, magnitude, device, out: str, name: str):
    """The feature visualisation of sub-channel ``s`` (image, facts, paths), or Nones without one."""
    if cfg.fv is None:
        return None, None, []
    t1 = time.time()
    w, b = bank.weight[s], None if bank.bias is None else bank.bias[s]
    unit = job.unit
    img, hist = featvis.visualize(model, unit, w, b, cfg.fv, magnitude, device, cfg.progress,
                                  job.lm.preprocess)
    size = cfg.fv.input_size
    with torch.no_grad():
        noise = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(cfg.fv.seed)).to(device)
        dev_w, dev_b = w.to(device), None if b is None else b.to(device)
        base = featvis.activation(model, unit, dev_w, dev_b, noise, job.lm.preprocess)
        final = featvis.activation(model, unit, dev_w, dev_b, nn.functional.interpolate(
            img[None].to(device), size, mode="bilinear", align_corners=False), job.lm.preprocess)
    info = {"seconds": time.time() - t1, "activation": float(final[0]), "activation_on_noise": float(base.mean()),
            "last_step_activation": hist[-1]}
    path = os.path.join(out, f"fv_{name}.png")
    teaser.save_image(img, path)
    return img, info, [path]


def _panel(cfg, job: Job, t: dict, name: str, pictures, fv_img, shown: dict, maps: dict, s: int) -> teaser.Panel:
    """The teaser panel of one sub-channel: its feature visualisation (or top-1 heat map) amid its top-k."""
    labels = [int(v) for v in t["labels"]]
    concept = {c: j for j, cs in enumerate(job.concepts, 1) for c in cs}
    center, caption = fv_img, f"feature visualisation ({cfg.fv.method})" if cfg.fv else ""
    if center is None:
        first = int(t["indices"][0])
        center, caption = teaser.overlay(shown[first], maps[first][s]), "top-1 image, activation map"
    return teaser.Panel(sub_label(name), center, pictures, [job.names.label(lab)[:22] for lab in labels],
                        [concept.get(lab, 0) for lab in labels], purity(labels, job.concepts), caption)


def _figure(cfg, job: Job, panels: list[teaser.Panel], out: str) -> list[str]:
    """The teaser figure in every format of ``cfg.formats`` (PNG, PDF); their paths."""
    legend = [job.names.labels(cs) for cs in job.concepts]
    title = f"{job.lm.name} {job.layer}, channel {cfg.channel} (rho = {job.rho:.2f}, top {cfg.top_k} of {cfg.split})"
    paths = [os.path.join(out, f"teaser.{fmt}") for fmt in cfg.formats]
    teaser.teaser_figure(panels, title, legend, paths)
    return paths


def _summary(cfg, job: Job, rf: ReceptiveField, subs: dict, seconds_topk: float, out: str) -> dict:
    """What ``purity.json`` (and ``--json``) says about this channel's pictures."""
    fv = cfg.fv
    return {
        "record": job.record.dir, "model": job.lm.name, "weights": job.lm.weights, "layer": job.layer,
        "channel": cfg.channel, **{f"classes_for_concept{j}": cs for j, cs in enumerate(job.concepts, 1)},
        "rho": job.rho, "split": cfg.split, "top_k": cfg.top_k, "images_searched": len(job.images),
        "seconds_topk": seconds_topk,
        "receptive_field": {"stride": list(rf.stride), "offset": list(rf.offset), "effective": rf.size,
                            "full": rf.full, "crop": cfg.crop_size or rf.size, "out_hw": list(rf.out_hw)},
        "feature_visualisation": None if fv is None else {
            "method": fv.method, "steps": fv.steps, "size": fv.size, "views": fv.views, "seed": fv.seed},
        "purity": {name: v["purity"] for name, v in subs.items()},
        "subchannels": subs, "out_dir": out,
    }
