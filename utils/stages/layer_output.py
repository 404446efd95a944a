"""The layer command's evaluation and outputs: ONE pass over the validation images for every split (stage 4's
values, the top-k of every sub-channel and of random other channels, the logit check), the purity of each
concept channel against a baseline measured the same way, and the files: layer.json, disentangled.pt,
results_quantitative/, plots/, pictures/, report.html."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.classes import ClassNames
from ..data.images import ImageList, load_image
from .evaluation import Activations, TopKRequest, evaluate_splits
from ..report.html import write_layer_report
from ..report.style import concept_colour
from ..report.teaser import heat_overlay, save_strip, strips_figure
from ..passes.heatmaps import conditional_heatmaps
from .visualize import Job, PicturesConfig, draw
from ..model.receptive import receptive_field
from ..method.selectivity import oriented_selectivity, split_flags
from ..defaults import MAX_LOGIT_DIFF, NEAR_CHANCE, logit_tolerance
from ..errors import UserError
from ..files import read_json, save_arrays, write_json
from ..store.provenance import provenance
from ..store.records import Record
from ..report.tables import ResultFiles
from ..method.scoring import Scored
from ..method.split import FilterBank, channel_bank, oriented_bank, sub_names
from ..model.units import Unit, unit_at
from ..model.surgery import check_logit_diff, export_network
from ..method.selectivity import TopK


@dataclass(frozen=True)
class Baseline:
    """Random channels that are no candidate: ``labels[b]`` = the classes of channel ``channels[b]``'s top-k
    validation images, ``ranked[b]`` = the classes channel b is most relevant to on the *training* images (the
    share of each class's images on which it is important, stage 2's counts), most first. A concept of n classes
    is compared with :meth:`share` (n): the mean share of these channels' top-k images in their n most relevant
    classes, the same quantity as a concept channel's purity, in classes chosen before any validation image is
    seen (as a concept's are)."""

    channels: list[int]
    labels: list[list[int]]
    ranked: list[list[int]]

    def share(self, n: int) -> float | None:
        shares = [float(np.isin(lab, r[:n]).mean()) for lab, r in zip(self.labels, self.ranked) if lab]
        return float(np.mean(shares)) if shares else None


@dataclass(frozen=True)
class ChannelResult:
    """One split channel, evaluated: stage 4's ``acts`` on its concepts' validation images; per concept j the
    purity ``before`` (share of the original channel's top-k in concept j's classes), ``after`` (the same for
    concept channel j) and ``baseline`` (:meth:`Baseline.share` of concept j's number of classes); and the
    selectivity on every validation image: ``auc_before`` (the original channel's ROC AUC for concept j against
    every other image), ``auc_after`` (concept channel j's), ``auc_images`` (images inside each concept, all);
    ``pair_before`` / ``pair_after``: the same for concept j's images against the other concepts' images only
    (the mean over the other concepts). Every reading of concept j is in its direction (``scored.orientation``).
    ``by_relevance``: per concept j its reference images by relevance (:func:`relevance_top`)."""

    scored: Scored
    acts: Activations
    before: list[float]
    after: list[float]
    baseline: list[float | None]
    auc_before: list[float | None]
    auc_after: list[float | None]
    auc_images: tuple[list[int], int]
    pair_before: list[float | None]
    pair_after: list[float | None]
    by_relevance: list[dict]

    @property
    def channel(self) -> int:
        return self.scored.channel

    @property
    def concepts(self) -> list[list[int]]:
        return self.scored.concepts

    @property
    def gain(self) -> float:
        """The mean over concepts of after - before."""
        return float(np.mean(np.subtract(self.after, self.before)))


@dataclass(frozen=True)
class LayerEvaluation:
    """The validation pass of the layer command: every channel's result, the top-k, the baseline, the one
    network's largest |logit difference| on ``checked`` images, the images read and the pass's seconds, the
    tolerance of the logit check (:func:`utils.defaults.logit_tolerance`)."""

    channels: list[ChannelResult]
    top: TopK
    baseline: Baseline
    logit_diff: float
    checked: int
    val: ImageList
    images: int
    seconds: float
    logit_tolerance: float = MAX_LOGIT_DIFF


def evaluate_layer(runner, model: nn.Module, unit: Unit, scored: list[Scored], val: ImageList, check: list[int],
                   net: nn.Module, baseline: list[int], k: int, shares, preprocess=None) -> LayerEvaluation:
    """ONE pass over every validation image: stage 4's values of every split, the top-``k`` images of the
    original channel, every concept channel (each read in its concept's direction) and the ``baseline``
    channels, and the logits of the one network ``net`` against ``model``'s on the ``check`` images (above
    MAX_LOGIT_DIFF a UserError). ``unit``: the layer of interest in ``model``; ``shares``: K x C, how relevant
    each channel is to each class on the training images (the baseline's classes,
    :func:`utils.stages.candidates.channel_concepts`)."""
    splits = [s.split() for s in scored]
    bank = FilterBank.join([oriented_bank(unit, s.split(), s.orientation) for s in scored]
                           + ([channel_bank(unit, baseline)] if baseline else []))
    vp = evaluate_splits(runner, model, unit, splits, [s.concepts for s in scored], val,
                         preprocess, TopKRequest(bank, k, keep_all=True), (net, set(check)))
    check_logit_diff(vp.logit_diff, f"on {len(check)} validation images (the one network with every split)",
                     vp.logit_scale)
    ranked = [[int(t) for t in torch.as_tensor(shares)[:, c].argsort(descending=True, stable=True)] for c in baseline]
    base = Baseline(baseline, [[int(t) for t in vp.top.get(c, "original")["labels"]] for c in baseline], ranked)
    results = []
    for s in scored:
        o = oriented_selectivity(vp.top, s.split(), s.concepts, s.orientation)
        results.append(ChannelResult(s, vp.acts[s.channel], o["before"], o["after"],
                                     [base.share(len(cs)) for cs in s.concepts], o["auc_before"], o["auc_after"],
                                     (o["inside"], o["images"]), o["pair_before"], o["pair_after"],
                                     [relevance_top(vp.acts[s.channel], cs, j, k) for j, cs in enumerate(s.concepts, 1)]))
    return LayerEvaluation(results, vp.top, base, vp.logit_diff, len(check), val, vp.images, vp.seconds,
                           logit_tolerance(vp.logit_scale))


def relevance_top(acts: Activations, concept: list[int], j: int, k: int) -> dict:
    """Concept j's reference images by relevance: among the validation images of its classes, the ``k`` where
    concept unit D_j contributes most to the image's own class logit (``Activations.subrel``, most first; ties
    in dataset order): ``{"indices", "labels", "relevance"}``."""
    a = acts.of_classes(concept)
    order = np.argsort(-a.subrel[:, j - 1], kind="stable")[:k] if a.subrel is not None else np.zeros(0, int)
    return {"indices": [int(i) for i in a.index[order]], "labels": [int(t) for t in a.labels[order]],
            "relevance": [float(v) for v in a.subrel[order, j - 1]] if len(order) else []}


@dataclass(frozen=True)
class ChannelFiles:
    """What the layer command wrote for one channel: per concept ``quantitative`` (``images``, ``classes``,
    ``rows``, ``mean``, ``csv``), the density ``plots`` and the ``pictures`` (``out_dir``, ``teaser``)."""

    record: Record
    quantitative: list[dict]
    plots: list[str]
    pictures: dict


def write_layer(cfg, lm, model, layer: str, store, ev: LayerEvaluation, records: dict[int, Record], out: str,
                seconds: dict, log, evidence: dict | None = None, fx=None) -> dict:
    """Every output of the layer command into ``out`` (rank 0); returns the ``--json`` summary. ``model``: the
    one the passes ran on, on the device (the pictures use it rather than copy ``lm.model`` again);
    ``evidence``: why each channel is a candidate (``utils.stages.candidates.channel_concepts``); ``fx``: the
    ablation pass (:class:`utils.stages.effects.LayerEffects`, None without one)."""
    seconds = dict(seconds)  # the caller's timings, and this step's added to a copy
    os.makedirs(out, exist_ok=True)
    previous = described_outputs(os.path.join(out, "layer.json"))  # an earlier run's files in this folder
    names = ClassNames(lm.categories, list(store.class_index), list(store.class_index.values()))
    t0 = time.perf_counter()
    export = os.path.join(out, "disentangled.pt")
    export_network(lm.model, lm.name, {layer: [r.scored.split() for r in ev.channels]}, export, lm.preprocess)
    files = {r.channel: _stage4_files(out, lm, layer, r, records[r.channel], names, cfg.tau) for r in ev.channels}
    seconds["results and plots"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    heat: dict[str, np.ndarray] = {}  # the heatmaps as arrays (arrays.npz)
    shown_heat: dict[tuple[int, int], list] = {}  # (channel, j) -> the first reference images under their heatmaps
    pictures = _pictures(cfg, lm, model, layer, ev, records, names, out, heat, shown_heat)
    files = {c: ChannelFiles(f.record, f.quantitative, f.plots, pictures[c]) for c, f in files.items()}
    seconds["pictures"] = time.perf_counter() - t0
    summary = {**_summary(cfg, lm, layer, ev, files, export, names, evidence or {}, fx),
               "warnings": warnings(store), "provenance": provenance(cfg.seed, lm.preprocess)}
    summary["arrays"] = write_arrays(os.path.join(out, "arrays.npz"), ev, fx, heat)
    if fx is not None and shown_heat:
        summary["effects_figure"] = effects_figure(os.path.join(out, "pictures", "effects.png"), summary, shown_heat)
    write_json(os.path.join(out, "layer.json"), {**summary, "timings": seconds})
    report = os.path.join(out, "report.html")
    write_layer_report(report, summary, ev, files, names, seconds, cfg.notes)
    inside = os.path.abspath(out) + os.sep  # never anything outside this folder
    _remove({p for p in previous - described_outputs(os.path.join(out, "layer.json")) if p.startswith(inside)})
    log(f"wrote {out}/ (layer.json, disentangled.pt, arrays.npz, results_quantitative/, plots/, pictures/, report.html)")
    return {**summary, "report": report, "out_dir": out}


def warnings(store) -> list[str]:
    """What a reader must know before reading any split: a model near chance on its own training images has
    concepts that mean little (a model with random weights is a fair subject, so this warns, never refuses)."""
    classes = int((store.class_counts > 0).sum())
    acc = store.accuracy
    if acc is None or classes < 2 or acc >= NEAR_CHANCE / classes:
        return []
    return [f"the model is near chance on its training images ({acc:.1%}; chance 1/{classes} = {1 / classes:.1%}): "
            "its concepts and splits say little about what it has learned (random weights? the wrong input "
            "transform?)"]


def described_outputs(layer_json: str) -> set[str]:
    """The per-channel files (CSVs, plots) and picture folders that a ``layer.json`` lists (none without one)."""
    if not os.path.isfile(layer_json):
        return set()
    try:
        channels = read_json(layer_json).get("channels", {})
    except UserError:  # a damaged layer.json lists nothing to clean up
        return set()
    out = set()
    for ch in channels.values():
        out |= {os.path.abspath(p) for p in ch.get("csv", []) + ch.get("plots", [])}
        out |= {os.path.abspath((ch.get("pictures") or {}).get("out_dir") or "")} - {os.path.abspath("")}
    return out


def _remove(paths: set[str]) -> None:
    """Remove an earlier run's outputs that this run does not describe, so that the folder holds what its
    layer.json says (summarize_results.py counts every CSV it finds)."""
    for p in sorted(paths):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.isfile(p):
            os.remove(p)


def _stage4_files(out: str, lm, layer: str, r: ChannelResult, rec: Record, names, tau: float) -> ChannelFiles:
    """Stage 4's CSVs and density plots of one channel, as ``get_results.py`` names them."""
    files = ResultFiles(out, os.path.basename(rec.dir), lm.name, layer, r.channel, len(r.concepts), rec.best_rho,
                        None, tau)
    per_concept = [r.acts.of_classes(cs) for cs in r.concepts]
    labels = [[names.label(t) for t in cs] for cs in r.concepts]
    quantitative = [{"images": len(a), "classes": lab, **q}
                    for a, lab, q in zip(per_concept, labels, files.write_quantitative(per_concept, lambda *a: None))]
    return ChannelFiles(rec, quantitative, files.write_density_plots(per_concept, labels, lambda *a: None), {})


def write_arrays(path: str, ev: LayerEvaluation, fx, heat: dict[str, np.ndarray]) -> str:
    """The arrays behind the report, in one ``.npz`` (no pickle; ``Result.arrays()`` reads it): every validation
    image's activation of each original and concept unit (``act_index``, ``act_labels``, ``act_<c>_<unit>``),
    the ablation pass (``effects_*``: per image the own-class logit, probability and whether it is right, intact
    and under each intervention named in ``effects_names``; per intervention the mean change of every class's
    logit and probability), and the heatmaps (``heatmap_<c>_D<j>``, with the images' ``..._index``)."""
    every = ev.top.every
    arrays = {"act_index": every.index, "act_labels": every.labels}
    for s, (c, name) in enumerate(ev.top.keys):
        arrays[f"act_{c}_{name}"] = every.values[:, s].astype(np.float32)
    if fx is not None:
        e = fx.effects
        arrays.update(effects_names=np.array([iv.name for iv in e.interventions]), effects_index=e.index,
                      effects_labels=e.labels, effects_logit=e.logit.astype(np.float32),
                      effects_prob=e.prob.astype(np.float32), effects_correct=e.correct,
                      effects_dlogit=e.dlogit.astype(np.float32), effects_dprob=e.dprob.astype(np.float32))
    arrays.update(heat)
    save_arrays(path, arrays)
    return path


def effects_figure(path: str, summary: dict, shown: dict[tuple[int, int], list]) -> str:
    """One figure of every concept unit of the layer: its reference images under its conditional heatmap, labelled
    with whether it is certified and the three shares that decide it."""
    rows = []
    for c, ch in summary["channels"].items():
        for j, e in enumerate(ch["effects"] or [], 1):
            if (int(c), j) not in shown:
                continue
            shares = ", ".join(f"{name} {'-' if v is None else format(v, '.0%')}" for name, v in
                               (("own share", e["own_share"]), ("cross share", e["cross_share"]),
                                ("elsewhere", e["elsewhere"])))
            rows.append((f"channel {c}, concept unit {j} ({', '.join(ch['class_names'][j - 1])}): "
                         f"{'certified' if e['certified'] else 'NOT certified'} ({shares})", concept_colour(j),
                         shown[(int(c), j)]))
    strips_figure(rows, path, f"{summary['model']} {summary['layer']}: concept units, where they look, ablation",
                  cell_inches=1.15)
    return path


def _pictures(cfg, lm, model, layer: str, ev: LayerEvaluation, records: dict[int, Record], names, out: str,
              heat: dict[str, np.ndarray], shown_heat: dict) -> dict:
    """The teaser figure (original and every concept channel) of each split, from the one top-k, and each
    concept's reference images by relevance with their conditional heatmaps (``heat`` gets the arrays); ``model``
    is the one the passes ran on (already on the device)."""
    side = lm.preprocess.crop
    rf = receptive_field(model, unit_at(model, layer, next(iter(records.values())).positions), (side, side),
                         min_size=max(1, side // 8))
    done = {}
    for r in ev.channels:
        rec = records[r.channel]
        pc = PicturesConfig(data_dir=cfg.data_dir, model_dir="", channel=r.channel, concepts=r.concepts, split="val",
                            top_k=cfg.top_k, out_dir=os.path.join(out, "pictures"), fv=cfg.fv,
                            batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            device=str(model.get_submodule(layer).weight.device),
                            progress=cfg.progress, formats=("png",), crop_files=False)
        split = r.scored.split().oriented(r.scored.orientation)  # its pictures look in each concept's direction
        job = Job(lm, model, layer, rec, split, r.concepts, ev.val, names, rec.best_rho,
                  ["original", *sub_names(split.k)[:-1]], rf)
        p = draw(pc, job, ev.top)
        display = lm.preprocess.display()
        strips, heatmaps = [], []
        unit = job.unit
        for j, ref in enumerate(r.by_relevance, 1):  # the reference images by relevance, one strip per concept
            strips.append(os.path.join(p["out_dir"], f"relevance_D{j}.png"))
            shown = [load_image(ev.val, i, display) for i in ref["indices"]]
            save_strip(shown, strips[-1])
            if not shown:
                continue
            x = torch.stack([load_image(ev.val, i, lm.preprocess) for i in ref["indices"]]).to(unit.weight.device)
            h = conditional_heatmaps(model, unit, split.D[j - 1], None if unit.bias is None else unit.bias[r.channel], x)
            heat[f"heatmap_{r.channel}_D{j}"] = h.cpu().numpy().astype(np.float16)
            heat[f"heatmap_{r.channel}_D{j}_index"] = np.asarray(ref["indices"], dtype=np.int64)
            heatmaps.append(os.path.join(p["out_dir"], f"heatmap_D{j}.png"))
            overlays = [heat_overlay(img, m) for img, m in zip(shown, h.cpu())]
            save_strip(overlays, heatmaps[-1])
            shown_heat[(r.channel, j)] = overlays[:8]
        done[r.channel] = {"out_dir": p["out_dir"], "teaser": os.path.join(p["out_dir"], "teaser.png"),
                           "relevance": strips, "heatmaps": heatmaps}
    return done


def _summary(cfg, lm, layer: str, ev: LayerEvaluation, files: dict[int, ChannelFiles], export: str, names,
             evidence: dict, fx=None) -> dict:
    """The ``--json`` object: per channel its concepts, every rho's score and index sets, best rho, purity."""
    channels = {}
    for r in ev.channels:
        f, rec = files[r.channel], files[r.channel].record
        channels[str(r.channel)] = {
            "concepts": r.concepts, "class_names": [[names.name(t) for t in cs] for cs in r.concepts],
            "best_rho": rec.best_rho, "scores": rec.scores, "sources": rec.sources,
            "purity": {"original": r.before, "concepts": r.after, "baseline": r.baseline}, "purity_gain": r.gain,
            "auc": {"original": r.auc_before, "concepts": r.auc_after, "images_in_concept": r.auc_images[0],
                    "images": r.auc_images[1]},
            "pair_auc": {"original": r.pair_before, "concepts": r.pair_after},
            "by_relevance": [{**ref, "paths": [ev.val.paths[i] for i in ref["indices"]]} for ref in r.by_relevance],
            "orientation": r.scored.signs, "search": rec.search,
            "purity_gain_per_concept": [a - b for a, b in zip(r.after, r.before)], "flags": _flags(ev.top, r, f, fx),
            "effects": None if fx is None else [{**e, "collateral_class_name": None if e["collateral_class"] is None
                                                 else names.name(e["collateral_class"])} for e in fx.channels[r.channel]],
            "why": {"candidate": evidence.get(r.channel), "outside": _outside(ev.top, r)},
            "record": rec.dir, "quantitative": {f"concept{j}": {k: v for k, v in q.items() if k != "csv"}
                                                for j, q in enumerate(f.quantitative, 1)},
            "plots": f.plots, "csv": [q["csv"] for q in f.quantitative], "pictures": f.pictures}
    sizes = sorted({len(cs) for r in ev.channels for cs in r.concepts})
    base = ev.baseline
    positions = next(iter(files.values())).record.positions  # None: a Conv2d layer (its summary is as before)
    kind = {} if positions is None else {"unit": "Linear", "positions": positions}
    return {"model": lm.name, "weights": lm.weights, "layer": layer, **kind, "tau": cfg.tau, "p": cfg.p,
            "gamma_high": cfg.gamma_high, "split_rule": cfg.split_rule, "orientation": cfg.orientation,
            "top_k": cfg.top_k, "channels": channels,
            "baseline_purity": {"channels": base.channels, "by_classes": {str(n): base.share(n) for n in sizes},
                                "mean": _mean([v for r in ev.channels for v in r.baseline]),
                                "concept_channels_mean": _mean([v for r in ev.channels for v in r.after])},
            "certification": None if fx is None else fx.summary(),
            "max_abs_logit_diff": ev.logit_diff, "logit_tolerance": ev.logit_tolerance, "checked_images": ev.checked,
            "validation_images": ev.images, "export": export}


def _outside(top: TopK, r: ChannelResult, n: int = 3) -> list[list[list[float]]]:
    """Per concept unit D_j, the ``n`` classes outside its concept on which it fires most: ``[class, mean
    activation over the class's validation images]``, strongest first (where an impure unit's top images come from)."""
    labels = top.every.labels
    out = []
    for j, cs in enumerate(r.concepts, 1):
        scores = top.scores(r.channel, f"D{j}")
        means = [[int(t), float(scores[labels == t].mean())] for t in np.unique(labels) if t not in set(cs)]
        out.append(sorted(means, key=lambda tm: -tm[1])[:n])
    return out


def _flags(top: TopK, r: ChannelResult, f: ChannelFiles, fx=None) -> list[list[str]]:
    """:func:`utils.method.failures.concept_flags` of every concept unit of one split channel, and "not certified"
    where the ablation pass ran and the concept unit does not carry its concept alone."""
    flags = split_flags(top, r.scored.split(), f.record.sources[f"{f.record.best_rho:.2f}"],
                        [q.get("mean") for q in f.quantitative], r.before, r.after)
    if fx is not None:
        flags = [fl + ([] if e["certified"] else ["not certified by ablation"])
                 for fl, e in zip(flags, fx.channels[r.channel])]
    return flags


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
