"""Stage 4: relative attribution and sub-channel activations on the validation images (``get_results.py``).

Shapes: ``B`` images in a batch, ``n`` images evaluated, ``C`` output channels of the layer ``L``, ``k``
concepts. On each validation image (label ``t``), in one pass:

    rel  = P[c] / sum_c' P[c'],   P[c'] = sum_hw max(a[c'] * d z_t / d a[c'], 0)     (original network)
    orig = sum_hw a[c],   d_j / res = sum_hw (conv(x, D_j / Res) + bias)             (before BatchNorm)

and, for the quantitative table, per concept the row ``d_1/orig, ..., d_k/orig, res/orig`` of every
image of its classes with ``rel >= tau``. Activations are signed, so a fraction may be negative or
above 1. Result files (CSVs, plots, the summary table) are written by ``utils.report.tables``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.classes import ClassNames, check_channel, check_concepts, data_class_map, normalise
from ..data.images import ImageList, Preprocess, class_batches, data_root, list_images
from ..defaults import DEFAULT_TAU
from ..passes.distributed import reduce_over_ranks
from ..errors import UserError
from ..passes.image_pass import RunOptions, Runner, finite_rows
from ..model.loading import LoadedModel, get_layer, load_model
from ..data.preprocess import InputSpec
from ..store.provenance import provenance
from ..store.records import Record, check_record, find_record, load_split, record_head
from ..model.hooks import layer_gradient, layer_input, unit_relevance
from ..report.tables import ResultFiles
from ..method.split import FilterBank, Split, filter_bank, oriented_bank, sub_names
from ..model.surgery import logit_diff_scale, nan_max
from ..method.selectivity import TopK
from ..passes.topk import TopKSearch
from ..method.selectivity import split_selectivity
from ..model.units import Unit, as_unit, unit_at


def relative_attribution(P: torch.Tensor, channel: int) -> torch.Tensor:
    """``rel`` (B,) = ``P[:, c] / P.sum(1)`` from clamped attributions ``P`` (B x C); 0 where the sum is 0."""
    P = P.double()
    total = P.sum(1)
    return torch.where(total > 0, P[:, channel] / total.clamp_min(torch.finfo(P.dtype).tiny), torch.zeros_like(total))


def sub_channel_maps(unit: Unit | nn.Module, x: torch.Tensor, split: Split) -> torch.Tensor:
    """The outputs of ``D_1 .. D_k, Res`` (B x (k+1) x H' x W') at the positions that count, on the layer input
    ``x`` (``Unit.counted``), with the layer's geometry and unit ``c``'s bias on every sub-unit."""
    unit = as_unit(unit)
    return filter_bank(unit, [split], sub_names(split.k)).maps(unit, x.to(unit.weight.dtype))


def sub_channel_sums(unit: Unit | nn.Module, x: torch.Tensor, split: Split) -> torch.Tensor:
    """``d_1 .. d_k, res`` per image (B x (k+1), float64): :func:`sub_channel_maps` summed over the positions."""
    return sub_channel_maps(unit, x, split).double().sum(dim=(2, 3))


def split_values(P: torch.Tensor, a: torch.Tensor, x: torch.Tensor, unit: Unit | nn.Module, split: Split,
                 g: torch.Tensor | None = None) -> dict:
    """Stage 4's values of one split from a batch's clamped attributions ``P`` (B x C), layer output ``a`` at the
    positions that count (B x C x H' x W') and input ``x`` as the layer sees it: ``rel``, ``orig`` (B each)
    and ``sub`` (B x (k+1)), float64 on the CPU; with the gradient ``g`` of the label logit at the layer's output
    (as ``a``), also ``subrel`` (B x (k+1)): each sub-unit's relevance for the image's own logit in the split
    network, ``sum_hw D_j(x) * g[c]`` and ``-(k - 1) sum_hw Res(x) * g[c]`` (the merge adds the D_j and takes
    k - 1 Res away, so d z / d D_j = g[c] and d z / d Res = -(k - 1) g[c]); they sum to the unit's relevance."""
    unit = as_unit(unit)
    c = split.channel
    maps = sub_channel_maps(unit, unit.counted(x), split)
    out = {"rel": relative_attribution(P, c), "orig": a[:, c].double().sum(dim=(1, 2)),
           "sub": maps.double().sum(dim=(2, 3))}
    if g is not None:
        merge = torch.tensor([1.0] * split.k + [1.0 - split.k], device=maps.device)
        out["subrel"] = (maps.float() * g[:, c:c + 1].float()).sum(dim=(2, 3)).double() * merge.double()
    return {k: v.detach().cpu() for k, v in out.items()}


def evaluate_batch(model: nn.Module, unit: Unit | nn.Module, split: Split, images: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch of stage 4 for one split: ``rel``, ``orig`` (B each), ``sub`` and ``subrel`` (B x (k+1))."""
    _, a, g, x = layer_gradient(model, unit, images, labels)
    return split_values(unit_relevance(a, g, positive=True), a, x, unit, split, g)


@dataclass
class Activations:
    """Per image of the pass (numpy): dataset ``index``, ``labels``, ``rel``, ``orig`` (n each), ``sub``
    (n x (k+1): d_1 .. d_k, res) and ``subrel`` (n x (k+1): each sub-unit's relevance for the image's own logit;
    None where not computed)."""

    index: np.ndarray
    labels: np.ndarray
    rel: np.ndarray
    orig: np.ndarray
    sub: np.ndarray
    subrel: np.ndarray | None = None

    def of_classes(self, classes: list[int]) -> "Activations":
        """The images whose label is one of ``classes``."""
        mask = np.isin(self.labels, classes)
        return Activations(self.index[mask], self.labels[mask], self.rel[mask], self.orig[mask], self.sub[mask],
                           None if self.subrel is None else self.subrel[mask])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TopKRequest:
    """Also search, in the same pass and over ALL its images, the top-``k`` of every sub-channel of ``bank``."""

    bank: FilterBank
    k: int
    keep_all: bool = False  # also every image's activation of every sub-channel (for the AUC)


@dataclass(frozen=True)
class ValPass:
    """What one validation pass returns: stage 4's ``acts`` per split channel; the ``top`` images of a
    :class:`TopKRequest` (else None); the largest |logit difference| of a check (else None); the ``images``
    read by all ranks and the ``seconds`` of the slowest; the largest |original logit| of the check (its
    tolerance's scale)."""

    acts: dict[int, Activations]
    top: TopK | None
    logit_diff: float | None
    images: int
    seconds: float
    logit_scale: float = 0.0


def evaluate_splits(runner: Runner, model: nn.Module, conv: Unit | nn.Module, splits: list[Split],
                    concepts: list[list[list[int]]], images: ImageList, preprocess: Preprocess | None = None,
                    search: TopKRequest | None = None, check: tuple[nn.Module, set[int]] | None = None) -> ValPass:
    """ONE pass over the validation ``images``: stage 4's values of every split on its concepts' images;
    with ``search`` the top-k of its sub-channels over every image (else only the concepts' images are
    read); with ``check = (net, indices)`` the largest |logit difference| of ``net`` and ``model`` on those.

    Batches never mix classes (``utils.data.images.class_batches``), so an image gives the same numbers whichever
    splits are evaluated with it. ``model`` and ``conv`` (its layer of interest) are on ``runner``'s device.
    Under torchrun each rank reads a block of whole batches; every rank gets all images' values back in
    dataset order.
    """
    conv = as_unit(conv)
    users: dict[int, list[int]] = {}  # class -> the splits with a concept of it
    for si, cs in enumerate(concepts):
        for t in {t for c in cs for t in c}:
            users.setdefault(t, []).append(si)
    indices = range(len(images)) if search else images.indices_of(users)
    ip = runner.image_pass(images, class_batches(images, indices, runner.batch_size), preprocess, "validation")
    top = TopKSearch(search.bank, search.k, conv, search.keep_all) if search else None

    def step(batches) -> tuple[list[torch.Tensor], float]:  # per split: index, label, rel, orig, d_1.., res, r_1.., r_res
        rows = [[torch.zeros(0, 4 + 2 * (s.k + 1), dtype=torch.float64)] for s in splits]
        diff = (0.0, 0.0)  # the largest |logit difference| and |original logit|
        finite, seen = [], []  # per image: whether it is finite (on the device: one look at the end)
        for b in batches:
            finite.append(finite_rows(b.x))
            seen.append(b.index)
            mine = users.get(int(b.targets[0]), [])
            if mine:
                _, a, g, x = layer_gradient(model, conv, b.x, b.labels)
                P = unit_relevance(a, g, positive=True)
                for si in mine:
                    v = split_values(P, a, x, conv, splits[si], g)
                    head = torch.stack([b.index.double(), b.targets.double(), v["rel"], v["orig"]], 1)
                    rows[si].append(torch.cat([head, v["sub"], v["subrel"]], 1))
            if top is not None:
                top.add(x if mine else layer_input(model, conv, b.x), b.index, b.targets)
            if check is not None:
                diff = tuple(map(nan_max, diff, _batch_logit_diff(model, check, b)))
        if finite:
            ok = torch.cat(finite).cpu()
            if not bool(ok.all()):
                raise UserError(f"validation image {images.paths[int(torch.cat(seen)[~ok][0])]} holds NaN or infinite "
                                "values: fix it or leave it out")
        return [torch.cat(r) for r in rows], diff

    ran = ip.run(step, "stage 4")
    rows, diff = ran.value
    acts = {}
    for s, r in zip(splits, rows):
        r = ip.gather_rows(r).numpy()  # rank order = dataset order
        acts[s.channel] = Activations(r[:, 0].astype(np.int64), r[:, 1].astype(np.int64), r[:, 2], r[:, 3],
                                      r[:, 4:5 + s.k], r[:, 5 + s.k:])
    scale = reduce_over_ranks(diff[1], runner.world, runner.device) if check is not None else 0.0
    diff = reduce_over_ranks(diff[0], runner.world, runner.device) if check is not None else None
    return ValPass(acts, top.result(runner) if top is not None else None, diff, ran.images, ran.seconds, scale)


def _batch_logit_diff(model: nn.Module, check: tuple[nn.Module, set[int]], b) -> tuple[float, float]:
    """The largest |logit difference| of ``check``'s network on the batch's images that ``check`` names, and the
    largest |original logit| there."""
    net, wanted = check
    sel = [j for j, i in enumerate(b.index.tolist()) if i in wanted]
    return logit_diff_scale(model, net, b.x[sel]) if sel else (0.0, 0.0)


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
    purity_k: int = 0  # > 0: also the purity of the top-k validation images (all classes; one more pass)


@dataclass
class Evaluation:
    """What a stage-4 run evaluates, resolved and checked: model, layer, images, record and split."""

    lm: LoadedModel
    layer: str
    conv: Unit  # the layer of interest (in the CPU model)
    images: ImageList
    names: ClassNames
    concepts: list[list[int]]
    record: Record
    split: Split
    rho: float


@dataclass(frozen=True)
class FoundSplit:
    """A split channel as stage 4 and the pictures start from it: the model, its layer, the channel's concepts,
    its record (checked to fit them) and the class map of the images to read."""

    lm: LoadedModel
    layer: str
    unit: Unit
    concepts: list[list[int]]
    record: Record
    classes: object  # utils.data.classes.ClassMap


def find_split(cfg, split: str, loaded: LoadedModel | None = None,
               check: Callable[[int], None] | None = None) -> FoundSplit:
    """``cfg.channel`` of ``cfg.layer`` split between ``cfg.concepts``: the model (``loaded``, or built from
    ``cfg``), the record in ``cfg.model_dir`` and the class map of the ``split`` images; every check a UserError
    before any pass (``check(out_channels)``: the scripts' --nr_channels_in_layer_of_interest)."""
    cfg.check()
    concepts = normalise(cfg.concepts)
    lm = loaded or load_model(cfg.model, cfg.weights, inputs=InputSpec.of(cfg))
    layer, unit = get_layer(lm.model, cfg.layer)
    if check is not None:
        check(unit.out_channels)
    check_channel(cfg.channel, unit.out_channels, layer)
    rec = find_record(cfg.model_dir, record_head(lm, layer), cfg.channel, concepts,
                      known=lambda: data_class_map(cfg.data_dir, split, lm.num_classes, cfg.class_index).index.values())
    check_record(rec, lm.name, lm.weights, layer, unit, lm.preprocess)
    return FoundSplit(lm, layer, unit, concepts, rec,
                      data_class_map(cfg.data_dir, split, lm.num_classes, cfg.class_index, rec.store))


def prepare_evaluation(cfg: Stage4Config, loaded: LoadedModel | None = None,
                       check: Callable[[int], None] | None = None) -> Evaluation:
    """Check the inputs and find the disentanglement; raises UserError before any pass. ``check(out_channels)``
    may reject the layer (the scripts' --nr_channels_in_layer_of_interest), as in the other stages."""
    f = find_split(cfg, "val", loaded, check)
    lm, layer, conv, concepts, rec, cmap = f.lm, f.layer, f.unit, f.concepts, f.record, f.classes
    check_concepts(concepts, cmap.index.values(), data_root(cfg.data_dir, "val"))
    wanted = None if cfg.purity_k > 0 else [t for cs in concepts for t in cs]  # purity: all val images
    images = list_images(cfg.data_dir, "val", classes=cmap, only=wanted)
    rho = round(float(rec.best_rho if cfg.rho is None else cfg.rho), 2)
    names = ClassNames(lm.categories, list(cmap.index), list(cmap.index.values()))
    return Evaluation(lm, layer, conv, images, names, concepts, rec, load_split(rec, cfg.rho), rho)


def run_stage4(cfg: Stage4Config, loaded: LoadedModel | None = None, log=print,
               check: Callable[[int], None] | None = None) -> dict:
    """Stage 4 end to end: check, one pass over the concepts' val images (all of them with ``purity_k``),
    write CSVs and plots; a summary dict.

    Under torchrun (``cfg.world_size`` > 1) every rank calls this and evaluates its share of the images;
    rank 0 alone logs, writes the files and returns the full summary; the other ranks return
    ``{"rank": r, "images": n}`` after the pass.
    """
    ev = prepare_evaluation(cfg, loaded, check)
    labels = [[ev.names.label(t) for t in cs] for cs in ev.concepts]
    runner = Runner.of(cfg)
    if runner.lead:
        log(f"channel {cfg.channel} of {ev.lm.name} {ev.layer}, rho {ev.rho}{' (best)' if cfg.rho is None else ''}; "
            + "; ".join(f"concept {j}: {', '.join(lab)}" for j, lab in enumerate(labels, 1)))
    model = runner.model(ev.lm.model)
    conv = unit_at(model, ev.layer, ev.record.positions)
    # a record made with --orientation gradient: its concept units are read in their concepts' directions
    bank = oriented_bank(conv, ev.split, ev.record.orientation) if ev.record.orientation else filter_bank(conv, [ev.split])
    search = TopKRequest(bank, cfg.purity_k, keep_all=True) if cfg.purity_k > 0 else None
    val = evaluate_splits(runner, model, conv, [ev.split], [ev.concepts], ev.images, ev.lm.preprocess, search)
    acts = val.acts[ev.split.channel]
    if not runner.lead:
        return {"rank": cfg.rank, "images": len(acts)}
    ips = val.images / max(val.seconds, 1e-9)
    log(f"{val.images} validation images in {val.seconds:.1f} s ({ips:.1f} img/s)")
    out: dict = {"record": ev.record.dir, "rho": ev.rho, "tau": cfg.tau, "images": len(acts), "seconds": val.seconds,
                 "images_per_second": ips, "plots": [], "csv": [], "provenance": provenance(transform=ev.lm.preprocess)}
    per_concept = [acts.of_classes(cs) for cs in ev.concepts]
    for j, (a, lab) in enumerate(zip(per_concept, labels), 1):
        out[f"concept{j}"] = {"images": len(a), "classes": lab}
    files = ResultFiles(cfg.out_dir, os.path.basename(os.path.normpath(ev.record.dir)), ev.lm.name, ev.layer,
                        ev.split.channel, ev.split.k, ev.rho, cfg.rho, cfg.tau)
    if cfg.quantitative:
        for j, q in enumerate(files.write_quantitative(per_concept, log), 1):
            out[f"concept{j}"].update(rows=q["rows"], mean=q["mean"], median=q["median"], shares=q["shares"])
            out["csv"].append(q["csv"])
    if val.top is not None:
        means = [out[f"concept{j}"].get("mean") for j in range(1, ev.split.k + 1)]
        out.update(split_selectivity(val.top, ev.split, ev.concepts, ev.record.sources.get(f"{ev.rho:.2f}", {}), means))
        for name, p in out["purity"].items():
            shares = ", ".join(f"concept {j} {p[f'concept{j}']:.2f}" for j in range(1, ev.split.k + 1))
            aucs = ", ".join(f"concept {j} {_num(out['auc'][name][f'concept{j}'])}" for j in range(1, ev.split.k + 1))
            log(f"purity of {name} (top {cfg.purity_k} of {val.images} val images): {shares}, other {p['other']:.2f}; "
                f"AUC over all {out['auc'][name]['images']} val images: {aucs}")
        for j, fl in enumerate(out["flags"], 1):
            if fl:
                log(f"flagged: D{j} ({', '.join(fl)})")
    if cfg.qualitative:
        out["plots"] = files.write_density_plots(per_concept, labels, log)
    for path in out["csv"] + out["plots"]:
        log(f"wrote {path}")
    return out


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
