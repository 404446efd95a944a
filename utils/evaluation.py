"""Stage 4: relative attribution and sub-channel activations on the validation images (``get_results.py``).

Shapes: ``B`` images in a batch, ``n`` images evaluated, ``C`` output channels of the layer ``L``, ``k``
concepts. On each validation image (label ``t``), in one pass:

    rel  = P[c] / sum_c' P[c'],   P[c'] = sum_hw max(a[c'] * d z_t / d a[c'], 0)     (original network)
    orig = sum_hw a[c],   d_j / res = sum_hw (conv(x, D_j / Res) + bias)             (before BatchNorm)

and, for the quantitative table, per concept the row ``d_1/orig, ..., d_k/orig, res/orig`` of every
image of its classes with ``rel >= tau``. Activations are signed, so a fraction may be negative or
above 1. Result files (CSVs, plots, the summary table) are written by ``utils.results``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .cli import RunOptions
from .concepts import ClassNames, check_channel, check_concepts, normalise
from .data import ImageList, Preprocess, check_batch, class_batches, list_images, make_loader
from .device import model_on, pin, resolve_device, to_device
from .distributed import all_gather_rows, batch_shard, reduce_over_ranks, run_together
from .errors import UserError
from .models import LoadedModel, get_layer, load_model
from .records import Record, check_record, find_record, load_split, record_head
from .store import data_class_map
from .relevance import relevance_batch
from .split import Split, filter_bank, sub_names

DEFAULT_TAU = 0.03


def relative_attribution(P: torch.Tensor, channel: int) -> torch.Tensor:
    """``rel`` (B,) = ``P[:, c] / P.sum(1)`` from clamped attributions ``P`` (B x C); 0 where the sum is 0."""
    P = P.double()
    total = P.sum(1)
    return torch.where(total > 0, P[:, channel] / total.clamp_min(torch.finfo(P.dtype).tiny), torch.zeros_like(total))


def sub_channel_sums(conv: nn.Conv2d, x: torch.Tensor, split: Split) -> torch.Tensor:
    """``d_1 .. d_k, res`` per image (B x (k+1), float64): spatial sums of the sub-channels' output maps on
    the layer input ``x``, with the layer's geometry and channel ``c``'s bias on every sub-channel."""
    bank = filter_bank(conv, [split], sub_names(split.k))
    return bank.maps(conv, x.to(conv.weight.dtype)).double().sum(dim=(2, 3))


def split_values(P: torch.Tensor, a: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, split: Split) -> dict:
    """Stage 4's values of one split from a batch's clamped attributions ``P`` (B x C), layer output ``a`` and
    input ``x``: ``rel``, ``orig`` (B each) and ``sub`` (B x (k+1)), float64 on the CPU."""
    c = split.channel
    out = {"rel": relative_attribution(P, c), "orig": a[:, c].double().sum(dim=(1, 2)),
           "sub": sub_channel_sums(conv, x, split)}
    return {k: v.detach().cpu() for k, v in out.items()}


def evaluate_batch(model: nn.Module, conv: nn.Conv2d, split: Split, images: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch of stage 4 for one split: ``rel``, ``orig`` (B each) and ``sub`` (B x (k+1))."""
    P, _, a, x = relevance_batch(model, conv, images, labels, positive=True)
    return split_values(P, a, x, conv, split)


@dataclass
class Activations:
    """Per image of the pass (numpy): dataset ``index``, ``labels``, ``rel``, ``orig`` (n each) and ``sub``
    (n x (k+1): d_1 .. d_k, res)."""

    index: np.ndarray
    labels: np.ndarray
    rel: np.ndarray
    orig: np.ndarray
    sub: np.ndarray

    def of_classes(self, classes: list[int]) -> "Activations":
        """The images whose label is one of ``classes``."""
        mask = np.isin(self.labels, classes)
        return Activations(self.index[mask], self.labels[mask], self.rel[mask], self.orig[mask], self.sub[mask])

    def __len__(self) -> int:
        return len(self.labels)


def fraction_rows(acts: Activations, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Rows (m x (k+1)) ``d_1/orig, ..., d_k/orig, res/orig`` of the images with ``rel >= tau`` and ``orig != 0``."""
    keep = (acts.rel >= tau) & (acts.orig != 0)
    return (acts.sub[keep] / acts.orig[keep][:, None]).reshape(-1, acts.sub.shape[1])


def evaluate_splits(model: nn.Module, conv: nn.Conv2d, splits: list[Split], concepts: list[list[list[int]]],
                    images: ImageList, indices: list[int], batch_size: int = 64, num_workers: int = 4,
                    device: torch.device | str = "cpu", progress: bool = True, rank: int = 0, world_size: int = 1,
                    preprocess: Preprocess | None = None) -> tuple[dict[int, Activations], float]:
    """Stage 4's single pass over ``images[indices]`` for every split (its concepts' images only); returns
    ``{channel: Activations}`` and the seconds taken.

    Batches never mix classes (``utils.data.class_batches``), so an image gives the same numbers whichever
    splits are evaluated with it. ``model`` and ``conv`` (its layer of interest) must be on ``device``.
    Under torchrun (``world_size`` > 1, every rank calls this) each rank evaluates a block of whole batches;
    every rank gets all images' values back in ``indices`` order and the seconds of the slowest rank.
    """
    device = torch.device(device)
    batches = class_batches(images, indices, batch_size)
    lo, hi = batch_shard(len(batches), 1, rank, world_size)
    loader = make_loader(images, batch_sampler=batches[lo:hi], num_workers=num_workers, pin_memory=pin(device),
                         transform=preprocess)
    users: dict[int, list[int]] = {}  # class -> the splits with a concept of it
    for si, cs in enumerate(concepts):
        for t in {t for c in cs for t in c}:
            users.setdefault(t, []).append(si)
    desc = "stage 4" if world_size == 1 else f"stage 4 (rank 0 of {world_size})"
    bar = tqdm(total=sum(len(b) for b in batches[lo:hi]), unit="img", desc=desc, disable=not progress or rank != 0,
               dynamic_ncols=True)
    start = time.perf_counter()

    def run() -> list[torch.Tensor]:  # per split, one row per image: index, label, rel, orig, d_1 .. d_k, res
        rows = [[torch.zeros(0, 4 + s.k + 1, dtype=torch.float64)] for s in splits]
        for x_img, labels, index in loader:
            check_batch(images, labels, index)
            P, _, a, x = relevance_batch(model, conv, to_device(x_img, device, images=True), to_device(labels, device),
                                         positive=True)
            for si in users[int(labels[0])]:
                v = split_values(P, a, x, conv, splits[si])
                rows[si].append(torch.cat([torch.stack([index.double(), labels.double(), v["rel"], v["orig"]], 1),
                                           v["sub"]], 1))
            bar.update(len(labels))
        return [torch.cat(r) for r in rows]

    rows = run_together(run, world_size, device, "stage 4")
    bar.close()
    seconds = reduce_over_ranks(time.perf_counter() - start, world_size, device)
    out = {}
    for s, r in zip(splits, rows):
        r = all_gather_rows(r, world_size, device).numpy()  # rank order = the order of ``indices``
        out[s.channel] = Activations(r[:, 0].astype(np.int64), r[:, 1].astype(np.int64), r[:, 2], r[:, 3], r[:, 4:])
    return out, seconds


# ------------------------------------------------------------------ the whole stage


@dataclass
class Stage4Config(RunOptions):
    """What one stage-4 run evaluates and where its outputs go (the flags of get_results.py)."""

    data_dir: str
    model_dir: str
    channel: int
    concepts: list[list[int]] = field(default_factory=list)
    rho: float | None = None
    tau: float = DEFAULT_TAU
    out_dir: str = "."
    qualitative: bool = True
    quantitative: bool = True
    nr_channels: int | None = None
    purity_k: int = 0  # > 0: also the purity of the top-k validation images (all classes; one more pass)
    rank: int = 0  # under torchrun: this process's rank and the number of processes (see utils.distributed)
    world_size: int = 1


@dataclass
class Evaluation:
    """What a stage-4 run evaluates, resolved and checked: model, layer, images, record and split."""

    lm: LoadedModel
    layer: str
    conv: nn.Conv2d
    images: ImageList
    names: ClassNames
    concepts: list[list[int]]
    record: Record
    split: Split
    rho: float


def prepare_evaluation(cfg: Stage4Config, loaded: LoadedModel | None = None) -> Evaluation:
    """Check the inputs and find the disentanglement; raises UserError before any pass."""
    from .cli import check_channels

    if cfg.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    concepts = normalise(cfg.concepts)
    lm = loaded or load_model(cfg.model, cfg.weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    check_channels(cfg.nr_channels, conv.out_channels, f"layer {layer} of {lm.name}")
    check_channel(cfg.channel, conv.out_channels, layer)
    rec = find_record(cfg.model_dir, record_head(lm, layer), cfg.channel, concepts,
                      known=lambda: data_class_map(cfg.data_dir, "val", lm.num_classes, cfg.class_index).index.values())
    check_record(rec, lm.name, lm.weights, layer, conv)
    cmap = data_class_map(cfg.data_dir, "val", lm.num_classes, cfg.class_index, rec.store)
    check_concepts(concepts, cmap.index.values(), os.path.join(cfg.data_dir, "val"))
    wanted = None if cfg.purity_k > 0 else [t for cs in concepts for t in cs]  # purity: all val images
    images = list_images(cfg.data_dir, "val", classes=cmap, only=wanted)
    rho = round(float(rec.best_rho if cfg.rho is None else cfg.rho), 2)
    names = ClassNames(lm.categories, list(cmap.index), list(cmap.index.values()))
    return Evaluation(lm, layer, conv, images, names, concepts, rec, load_split(rec, cfg.rho), rho)


def run_stage4(cfg: Stage4Config, loaded: LoadedModel | None = None, log=print) -> dict:
    """Stage 4 end to end: check, one pass over the concepts' val images, write CSVs and plots; a summary dict.

    Under torchrun (``cfg.world_size`` > 1) every rank calls this and evaluates its share of the images;
    rank 0 alone logs, writes the files (and runs the purity pass) and returns the full summary; the
    other ranks return ``{"rank": r, "images": n}`` after the pass.
    """
    from . import results

    ev = prepare_evaluation(cfg, loaded)
    labels = [[ev.names.label(t) for t in cs] for cs in ev.concepts]
    if cfg.rank == 0:
        log(f"channel {cfg.channel} of {ev.lm.name} {ev.layer}, rho {ev.rho}{' (best)' if cfg.rho is None else ''}; "
            + "; ".join(f"concept {j}: {', '.join(lab)}" for j, lab in enumerate(labels, 1)))
    device = resolve_device(cfg.device, cfg.gpu)
    indices = ev.images.indices_of([t for cs in ev.concepts for t in cs])
    model = model_on(ev.lm.model, device)
    acts, seconds = evaluate_splits(model, model.get_submodule(ev.layer), [ev.split], [ev.concepts], ev.images,
                                    indices, cfg.batch_size, cfg.num_workers, device, cfg.progress, cfg.rank,
                                    cfg.world_size, ev.lm.preprocess)
    acts = acts[ev.split.channel]
    if cfg.rank != 0:
        return {"rank": cfg.rank, "images": len(acts)}
    ips = len(acts) / max(seconds, 1e-9)
    log(f"{len(acts)} validation images in {seconds:.1f} s ({ips:.1f} img/s)")
    out: dict = {"record": ev.record.dir, "rho": ev.rho, "tau": cfg.tau, "images": len(acts), "seconds": seconds,
                 "images_per_second": ips, "plots": [], "csv": []}
    per_concept = [acts.of_classes(cs) for cs in ev.concepts]
    for j, (a, lab) in enumerate(zip(per_concept, labels), 1):
        out[f"concept{j}"] = {"images": len(a), "classes": lab}
    if cfg.quantitative:
        results.write_quantitative(cfg, ev, per_concept, out, log)
    if cfg.purity_k > 0:
        out["purity"] = results.purity_of_split(cfg, ev, device, log)
    if cfg.qualitative:
        out["plots"] = results.write_density_plots(cfg, ev, per_concept, labels, log)
    for path in out["csv"] + out["plots"]:
        log(f"wrote {path}")
    return out
