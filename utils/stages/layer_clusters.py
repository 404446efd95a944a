"""The layer command with concepts from clusters (``disentangle_layer.py --concepts clusters``): no label and no
class head needed, any backbone's units split by what their strongest images have in common.

    the training images (``DATA/train``, or the folder itself; class folders or none)
    -> every unit's label-free concepts (:func:`utils.stages.clusters.label_free_concepts`: its top images by
       activation, their contribution vectors clustered)
    -> the candidates (two or more concepts), least alike first, each split by the searched rule with cluster
       membership where the labelled path has classes (:func:`utils.stages.clusters.split_unit`)
    -> ONE network with every split; its outputs (logits or features) checked against the original's
    -> the held-out images (``DATA/val``, else a held-out share of the folder): one pass for every unit's and
       concept unit's activation (top-k and all), one contributions pass over the images that a split unit or one
       of its concept units fires on most (the top M of each, M the same share of the held-out images as the
       clustered top images are of the training images), each assigned to the concept whose mean contribution it is
       most alike (:func:`utils.method.clusters.nearest_concept`); every other held-out image is of no concept
    -> per concept: the AUC of the concept unit and of the original unit for its held-out images, the share of
       each one's top-k in the concept (purity), and, where the images have labels, each top-k's most frequent
       label (labels are read for this alone)
    -> layer.json, disentangled.pt, pictures/, report.html
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.classes import check_channel
from ..data.datasets import Datasets
from ..data.images import ImageList, list_any_images, list_images, load_image
from ..defaults import (ABLATION, CERTIFY_TOLERANCE, CLUSTER_GAMMA, CLUSTER_K0, CLUSTER_MIN_IMAGES, CLUSTER_TOP_N,
                        CLUSTER_VAL_SHARE, EFFECTS_PER_CLASS, REFERENCE_IMAGES, logit_tolerance)
from ..errors import UserError
from ..files import check_writable, write_json
from ..method.clusters import nearest_concept
from ..method.effects import unit_effects
from ..method.scoring import Scored
from ..method.selectivity import TopK, purity, roc_auc
from ..method.split import FilterBank, filter_bank
from ..model.loading import LoadedModel
from ..model.hooks import resolve_positions
from ..model.surgery import (appended_channels, check_logit_diff, export_network, logit_diff_scale, nan_max,
                             split_network)
from ..model.units import Unit
from ..passes.contributions import UnitRequest, contribution_pass
from ..passes.interventions import ABLATION_REFERENCES, intervention_pass, reference_outputs, unit_interventions
from ..passes.featvis import FVConfig, magnitude_spectrum, visualize
from ..passes.image_pass import RunOptions
from ..passes.topk import stream_topk
from ..report.html import write_clusters_report
from ..report.style import concept_colour
from ..report.teaser import save_strip, strips_figure
from ..store.provenance import provenance
from .clusters import LabelFree, UnitConcepts, label_free_concepts, split_unit
from .layer import start_run
from .layer_output import _remove, described_outputs


@dataclass
class ClustersConfig(RunOptions):
    data_dir: str | Datasets = ""
    store_dir: str = "."  # the default output folder goes under it (no store is read or written)
    top_n: int = CLUSTER_TOP_N  # each unit's strongest training images that are clustered
    clusters: int = CLUSTER_K0  # k-means' k before small clusters go and alike ones merge
    min_images: int = CLUSTER_MIN_IMAGES  # a concept holds at least this many of them
    gamma_high: float = CLUSTER_GAMMA  # clusters whose mean contributions are at least this alike are one concept
    channels: list[int] | None = None
    max_channels: int | None = None
    check_images: int = 32
    top_k: int = 12
    val_share: float = CLUSTER_VAL_SHARE  # without a val folder: this share of the images is held out
    positions: str = "auto"
    ablation: str = ABLATION  # the proof of each split on the model's output (mean, zero or none)
    certify_tolerance: float = CERTIFY_TOLERANCE
    fv: FVConfig | None = None
    seed: int = 0
    out_dir: str | None = None
    notes: dict = field(default_factory=dict)


def clusters_name(tag: str, layer: str, top_n: int, gamma: float) -> str:
    """``<model>_<layer>_clusters_top<N>_cossim<gamma>``: the folder of one layer's label-free disentanglement."""
    return f"{tag}_{layer}_clusters_top{int(top_n)}_cossim{float(gamma)}"


def check_clusters_config(cfg: ClustersConfig, out_channels: int, layer: str) -> None:
    """The label-free settings, in the flags' words; a UserError before any image is read."""
    cfg.check()
    for flag, v, least in (("--top_n", cfg.top_n, 2), ("--clusters", cfg.clusters, 2), ("--min_images", cfg.min_images, 1),
                           ("--check_images", cfg.check_images, 1), ("--top_k", cfg.top_k, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise UserError(f"{flag} must be a whole number >= {least}, not {v!r}")
    if cfg.top_n < 2 * cfg.min_images:
        raise UserError(f"--top_n ({cfg.top_n}) must be at least twice --min_images ({cfg.min_images}): a unit needs "
                        "two concepts of --min_images images among its top images")
    if not 0 < cfg.gamma_high <= 1:
        raise UserError(f"--cos_sim_high must be in (0, 1]: clusters at least this alike form one concept, "
                        f"not {cfg.gamma_high}")
    if cfg.ablation not in (*ABLATION_REFERENCES, "none"):
        raise UserError(f"--ablation must be one of {', '.join(ABLATION_REFERENCES)}, none, not {cfg.ablation!r}")
    if not 0 <= cfg.certify_tolerance < 1:
        raise UserError(f"--certify_tolerance must be in [0, 1), not {cfg.certify_tolerance}")
    if not 0 < cfg.val_share < 1:
        raise UserError(f"the held-out share must be between 0 and 1, not {cfg.val_share}")
    for c in cfg.channels or []:
        check_channel(c, out_channels, layer)


def cluster_images(data, val_share: float, seed: int) -> tuple[ImageList, ImageList, str]:
    """The training and held-out images, and where the held-out ones come from: ``data/train`` and ``data/val``;
    ``data/train`` alone (a ``val_share`` of it held out, drawn with ``seed``); or ``data`` itself, a folder of
    images with or without class folders (the same share held out). Labels, where present, are kept to evaluate."""
    if isinstance(data, Datasets):
        train = list_images(data, "train")
        if data.splits.get("val") is not None:
            return train, list_images(data, "val"), "the val data"
        return _hold_out(train, val_share, seed) + (f"{val_share:.0%} of the training data, held out",)
    root = os.fspath(data)
    if not os.path.isdir(root):
        raise UserError(f"no folder {root}")
    if os.path.isdir(os.path.join(root, "train")):
        train = list_any_images(root, "train")
        if os.path.isdir(os.path.join(root, "val")):
            return train, list_any_images(root, "val"), os.path.join(root, "val")
        return _hold_out(train, val_share, seed) + (f"{val_share:.0%} of {os.path.join(root, 'train')}, held out",)
    images = list_any_images(os.path.dirname(os.path.abspath(root)), os.path.basename(os.path.abspath(root)))
    return _hold_out(images, val_share, seed) + (f"{val_share:.0%} of {root}, held out",)


def _hold_out(images: ImageList, share: float, seed: int) -> tuple[ImageList, ImageList]:
    """``images`` cut in two: a ``share`` of them (drawn with ``seed``, at least one) held out, the rest to train."""
    if len(images) < 2:
        raise UserError(f"{images.root} holds {len(images)} image(s); two or more are needed (some to find concepts "
                        "in, some held out to evaluate on)")
    held = set(random.Random(seed).sample(range(len(images)), max(1, round(share * len(images)))))
    return (_subset(images, [i for i in range(len(images)) if i not in held]), _subset(images, sorted(held)))


def _subset(images: ImageList, rows: list[int]) -> ImageList:
    pick = lambda v: [v[i] for i in rows] if v else []  # noqa: E731
    return ImageList(images.root, images.classes, pick(images.paths), pick(images.targets), images.index,
                     images.listed, pick(images.stats), images.source, images.split, pick(images.items))


@dataclass(frozen=True)
class UnitResult:
    """One split unit, evaluated on the held-out images: ``concept`` (n_val, 0 for none) each image's concept,
    per concept j the ``auc`` and ``purity`` of the original unit and of concept unit D_j, ``labels``: where the
    images have labels, each top-k's most frequent label, its share and name (``{"original": ..., "D1": ...}``) and
    ``labels["auc"]``: per concept j, the AUC for the class D_j's top-k mostly holds (its images against every other
    held-out image) of the original unit and of D_j (``{"classes", "original", "concepts"}``)."""

    scored: Scored
    concepts: UnitConcepts
    concept: np.ndarray
    auc: dict
    purity: dict
    labels: dict | None


def disentangle_clusters(cfg: ClustersConfig, loaded: LoadedModel | None = None, log=print) -> dict:
    """The label-free layer command end to end (module docstring); returns the ``--json`` summary."""
    t0 = time.perf_counter()
    runner, log, lm, layer = start_run(cfg, loaded, log, check_clusters_config)
    train, val, held = cluster_images(cfg.data_dir, cfg.val_share, cfg.seed)
    out = cfg.out_dir or os.path.join(cfg.store_dir, "layer_disentangled",
                                      clusters_name(lm.tag, layer, cfg.top_n, cfg.gamma_high))
    if runner.lead:
        check_writable(out)
    model = runner.model(lm.model)
    module = model.get_submodule(layer)
    unit = Unit(module, resolve_positions(model, module, cfg.positions, lm.preprocess.crop, runner.device))
    log(f"label-free concepts of {unit.out_channels} units of {lm.name} {layer} from {len(train)} training images "
        f"(labels are not read); held out: {len(val)} images ({held})")
    found = label_free_concepts(runner, model, unit, train, lm.preprocess, cfg.top_n, cfg.clusters, cfg.min_images,
                                cfg.gamma_high, cfg.seed, cfg.channels)
    seconds = dict(found.seconds)
    chosen = _chosen(cfg, found, layer)
    log(f"{len(found.candidates)} candidates with 2+ concepts (" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        + f"); splitting {len(chosen)}: " + ", ".join(f"{c} (k={found.units[c].clusters.k})" for c in chosen[:20])
        + (" ..." if len(chosen) > 20 else ""))
    t1 = time.perf_counter()
    scored = [split_unit(found.units[c], unit.weight[c], cfg.seed) for c in chosen]
    seconds["search"] = time.perf_counter() - t1
    net = split_network(model, {layer: [s.split() for s in scored]})
    t1 = time.perf_counter()
    diff, scale, checked = _check_outputs(cfg, runner, model, net, val, lm)
    check_logit_diff(diff, f"on {checked} held-out images (the one network with every split)", scale)
    results, top = _evaluate(cfg, runner, model, unit, scored, found, train, val, lm)
    seconds["evaluation passes"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    fx = _cluster_effects(cfg, runner, net, layer, unit, results, train, val, lm, log)
    if fx is not None:
        seconds["ablation pass"] = time.perf_counter() - t1
    log(f"one network with {len(scored)} split units: max |output difference| {diff:.3g} on {checked} held-out images")
    summary = runner.together(lambda: _write(cfg, lm, model, unit, layer, results, top, train, val, held, out,
                                             seconds, diff, logit_tolerance(scale), checked, found, log, fx)
                              if runner.lead else None, "the layer command")  # rank 0 alone writes
    return {**(summary or {}), "seconds": runner.slowest(time.perf_counter() - t0)}


def _chosen(cfg: ClustersConfig, found: LabelFree, layer: str) -> list[int]:
    if cfg.channels is not None:
        missing = [c for c in cfg.channels if c not in set(found.candidates)]
        if missing:
            c = missing[0]
            raise UserError(f"unit {c} of {layer} has {found.units[c].clusters.k} concept(s) among its top "
                            f"{cfg.top_n} images at these settings; --channels needs 2 or more (lower --min_images or "
                            "raise --cos_sim_high)")
    chosen = [c for c in found.candidates if cfg.channels is None or c in cfg.channels]
    if not chosen:
        raise UserError(f"no unit of {layer} has 2 or more concepts among its top {cfg.top_n} images (clusters of "
                        f"at least {cfg.min_images} images, less alike than {cfg.gamma_high}): raise --cos_sim_high, "
                        "lower --min_images or raise --top_n")
    return sorted(chosen[:cfg.max_channels] if cfg.max_channels else chosen)


def _check_outputs(cfg, runner, model, net, val: ImageList, lm) -> tuple[float, float, int]:
    """The largest |output difference| of the split network on up to ``check_images`` held-out images (drawn
    with the seed) and the largest |original output| (the tolerance's scale)."""
    rows = sorted(random.Random(cfg.seed).sample(range(len(val)), min(cfg.check_images, len(val))))
    diff = scale = 0.0
    for b in range(0, len(rows), cfg.batch_size):
        x = torch.stack([load_image(val, i, lm.preprocess) for i in rows[b:b + cfg.batch_size]]).to(runner.device)
        d, s = logit_diff_scale(model, net, x)
        diff, scale = nan_max(diff, d), nan_max(scale, s)
    return diff, scale, len(rows)


def _evaluate(cfg, runner, model, unit: Unit, scored: list[Scored], found: LabelFree, train: ImageList,
              val: ImageList, lm) -> tuple[list[UnitResult], TopK]:
    """The two passes over the held-out images (module docstring) and each split unit's readings."""
    splits = [s.split() for s in scored]
    bank = FilterBank.join([filter_bank(unit, [s]) for s in splits])
    top = stream_topk(runner, model, unit, bank, val, cfg.top_k, lm.preprocess, desc="held-out images", keep_all=True)
    labelled = len(set(train.targets) | set(val.targets)) > 1  # one label (or none: a flat folder) tells nothing
    # the held-out images that a unit or one of its concept units fires on most: the top M of each, M the same share
    # of the held-out images as the clustered top images are of the training images
    m = max(cfg.top_k, round(cfg.top_n * len(val) / max(1, len(train))))
    requests = []
    for s in scored:
        rows = {int(i) for n in ["original"] + [f"D{j}" for j in range(1, len(s.concepts) + 1)]
                for i in top.every.index[np.argsort(-top.scores(s.channel, n), kind="stable")[:m]]}
        requests.append(UnitRequest(s.channel, [], {i: 0 for i in sorted(rows)}))
    got, _ = contribution_pass(runner, model, unit, val, requests, lm.preprocess, orient=False, desc="assignment")
    results = []
    for s, g in zip(scored, got):
        u, k = found.units[s.channel], len(s.concepts)
        concept = np.zeros(len(val), dtype=np.int64)
        concept[g.index.numpy()] = nearest_concept(g.V, u.clusters.arvs).numpy()
        at = concept[top.every.index]  # in the pass's order
        reading = {n: [(roc_auc(top.scores(s.channel, n), at == j),
                        purity(concept[top.get(s.channel, n)["indices"].numpy()], [[j]])["concept1"])
                       for j in range(1, k + 1)] for n in ["original"] + [f"D{j}" for j in range(1, k + 1)]}
        own = [reading[f"D{j}"][j - 1] for j in range(1, k + 1)]  # concept unit j for concept j
        auc = {"original": [a for a, _ in reading["original"]], "concepts": [a for a, _ in own],
               "images_in_concept": [int((concept == j).sum()) for j in range(1, k + 1)], "images": len(val)}
        pur = {"original": [p for _, p in reading["original"]], "concepts": [p for _, p in own]}
        labels = {n: _majority(top.get(s.channel, n)["labels"].tolist(), val) for n in reading} if labelled else None
        if labels:  # the AUC for the class concept unit j's top images mostly hold: of D_j and of the original
            cls = [labels[f"D{j}"]["label"] for j in range(1, k + 1)]
            labels["auc"] = {"classes": [labels[f"D{j}"]["name"] for j in range(1, k + 1)],
                             "original": [roc_auc(top.scores(s.channel, "original"), top.every.labels == t) for t in cls],
                             "concepts": [roc_auc(top.scores(s.channel, f"D{j}"), top.every.labels == t)
                                          for j, t in enumerate(cls, 1)]}
        results.append(UnitResult(s, u, concept, auc, pur, labels))
    return results, top


def _cluster_effects(cfg, runner, net, layer: str, unit: Unit, results: list[UnitResult], train: ImageList,
                     val: ImageList, lm, log) -> dict | None:
    """The proof of each split on the model's output (:mod:`utils.passes.interventions` with ``measure`` features):
    each split unit's original and concept units ablated on up to EFFECTS_PER_CLASS held-out images of each of its
    clusters and as many of no cluster; per unit, each cluster's entry (:func:`utils.method.effects.unit_effects`, clusters
    in the place of classes, the images of no concept as the class "elsewhere" reads)."""
    if cfg.ablation == "none":
        return None
    cols = appended_channels(unit.out_channels, [r.scored.split() for r in results])
    ivs = [iv for r, c in zip(results, cols) for iv in unit_interventions(r.scored.channel, c, len(r.scored.concepts))]
    # no concept has labels here: "absent" leaves nothing out (the mean over the reference images)
    ref = reference_outputs(runner, net, layer, train, lm.preprocess, cfg.ablation, REFERENCE_IMAGES, cfg.seed)
    rng = random.Random(cfg.seed)  # up to EFFECTS_PER_CLASS held-out images of each cluster, and as many of none
    mine = set()
    for r in results:
        for j in range(1, len(r.scored.concepts) + 1):
            of_j = np.flatnonzero(r.concept == j).tolist()
            mine |= set(rng.sample(of_j, min(len(of_j), EFFECTS_PER_CLASS)))
    rest = [i for i in range(len(val)) if not any(r.concept[i] for r in results)]
    rows = sorted(mine | set(rng.sample(rest, min(len(rest), EFFECTS_PER_CLASS))))
    effects, seconds = intervention_pass(runner, net, layer, val, ivs, ref, lm.preprocess, rows, measure="features")
    channels = {}
    for r in results:
        k = len(r.scored.concepts)
        relabelled = dataclasses.replace(effects, labels=r.concept[effects.index])
        channels[r.scored.channel] = unit_effects(relabelled, r.scored.channel, [[j] for j in range(1, k + 1)], k + 1,
                                                  cfg.certify_tolerance)
    n = sum(len(v) for v in channels.values())
    certified = sum(e["certified"] for v in channels.values() for e in v)
    log(f"ablation pass: {len(ivs)} interventions on {len(rows)} held-out images in {seconds:.1f} s; {certified} of "
        f"{n} concept units certified (on the output: its relative change)")
    return {"channels": channels, "summary": {"reference": cfg.ablation, "tolerance": cfg.certify_tolerance,
                                              "steer": None, "images": len(rows), "seconds": seconds,
                                              "certified": certified, "concept_units": n, "measure": "features"}}


def _majority(labels: list[int], images: ImageList) -> dict:
    """The most frequent of ``labels`` (a top-k's), its share and its class name."""
    if not labels:
        return {"label": None, "share": 0.0, "name": ""}
    best = max(sorted(set(labels)), key=labels.count)
    names = {t: c for c, t in images.index.items()}
    return {"label": int(best), "share": labels.count(best) / len(labels), "name": names.get(best, str(best))}


def _write(cfg, lm, model, unit: Unit, layer: str, results: list[UnitResult], top: TopK, train: ImageList,
           val: ImageList, held: str, out: str, seconds: dict, diff: float, tol: float, checked: int,
           found: LabelFree, log, fx: dict | None = None) -> dict:
    """layer.json, disentangled.pt, pictures/ and report.html into ``out``; the ``--json`` summary."""
    seconds = dict(seconds)
    os.makedirs(out, exist_ok=True)
    previous = described_outputs(os.path.join(out, "layer.json"))
    t0 = time.perf_counter()
    export = os.path.join(out, "disentangled.pt")
    export_network(lm.model, lm.name, {layer: [r.scored.split() for r in results]}, export, lm.preprocess)
    magnitude = (magnitude_spectrum(train, cfg.fv.size, seed=cfg.fv.seed)  # MACO's, from the user's images
                 if cfg.fv is not None and cfg.fv.method == "maco" else None)
    pictures = {r.scored.channel: _pictures(cfg, lm, model, unit, r, top, train, val, out, magnitude)
                for r in results}
    seconds["pictures"] = time.perf_counter() - t0
    channels = {}
    for r in results:
        s, u = r.scored, r.concepts
        k = len(s.concepts)
        labels = r.labels
        names = [[f"cluster {j}" + (f" (mostly {labels[f'D{j}']['name']})" if labels else "")] for j in range(1, k + 1)]
        channels[str(s.channel)] = {
            "concepts": s.concepts, "class_names": names, "concept_images": [[train.paths[i] for i in m]
                                                                             for m in s.concepts],
            "best_rho": round(float(s.sweep.rhos[s.best]), 2), "scores": {f"{float(rho):.2f}": float(v) for rho, v in
                                                                          zip(s.sweep.rhos, s.scores)},
            "sources": {f"{float(rho):.2f}": s.sweep.sources(i) for i, rho in enumerate(s.sweep.rhos)},
            "closest": u.clusters.closest, "purity": r.purity, "auc": r.auc, "labels": labels,
            "orientation": s.signs, "search": s.search,
            "flags": [(["top-k mostly outside its concept"] if p < 0.5 else [])
                      + ([] if certified else ["not certified by ablation"])
                      for p, certified in zip(r.purity["concepts"], _certified(fx, s.channel, k))],
            "effects": None if fx is None else fx["channels"][s.channel],
            "pictures": pictures[s.channel]}
    kind = {} if not unit.linear else {"unit": "Linear", "positions": unit.positions}
    summary = {"concepts_from": "clusters", "model": lm.name, "weights": lm.weights, "layer": layer, **kind,
               "top_n": cfg.top_n, "clusters": cfg.clusters, "min_images": cfg.min_images, "gamma_high": cfg.gamma_high,
               "split_rule": "search", "orientation": "none", "top_k": cfg.top_k,
               "labelled": results[0].labels is not None if results else False,
               "training_images": len(train), "held_out": held, "validation_images": len(val),
               "candidates": len(found.candidates), "units": len(found.units), "channels": channels,
               "certification": None if fx is None else fx["summary"],
               "max_abs_logit_diff": diff, "logit_tolerance": tol, "checked_images": checked, "export": export,
               "warnings": [], "provenance": provenance(cfg.seed, lm.preprocess)}
    write_json(os.path.join(out, "layer.json"), {**summary, "timings": seconds})
    report = os.path.join(out, "report.html")
    write_clusters_report(report, summary, seconds, cfg.notes)
    inside = os.path.abspath(out) + os.sep
    _remove({p for p in previous - described_outputs(os.path.join(out, "layer.json")) if p.startswith(inside)})
    log(f"wrote {out}/ (layer.json, disentangled.pt, pictures/, report.html)")
    return {**summary, "report": report, "out_dir": out}


def _certified(fx: dict | None, channel: int, k: int) -> list[bool]:
    """Per concept of ``channel``, whether the ablation pass certified it (all true without a pass: nothing to flag)."""
    return [True] * k if fx is None else [bool(e["certified"]) for e in fx["channels"][channel]]


def _pictures(cfg, lm, model, unit: Unit, r: UnitResult, top: TopK, train: ImageList, val: ImageList,
              out: str, magnitude: torch.Tensor | None) -> dict:
    """One unit's strips: the original's top-k held-out images; per concept its strongest training images (what
    the cluster is), its concept unit's top-k held-out images and, with ``cfg.fv``, the concept unit's feature
    visualisation."""
    c = r.scored.channel
    folder = os.path.join(out, "pictures", f"unit_{c}")
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's pictures of this unit (its own folder in out)
    os.makedirs(folder)
    display = lm.preprocess.display()

    rows = []  # the summary figure's rows: (label, colour, images)

    def strip(images: ImageList, indices, name: str, label: str, colour: str) -> str:
        path = os.path.join(folder, name)
        shown = [load_image(images, int(i), display) for i in list(indices)[:cfg.top_k]]
        save_strip(shown, path)
        rows.append((label, colour, shown))
        return path

    mostly = (lambda n: f" (mostly {r.labels[n]['name']}, {r.labels[n]['share']:.0%})") if r.labels else (lambda n: "")
    done = {"out_dir": folder, "original": strip(val, top.get(c, "original")["indices"].tolist(), "original.png",
                                                 "original unit: top held-out images" + mostly("original"),
                                                 concept_colour(0)),
            "clusters": [], "units": [], "fv": []}
    for j, members in enumerate(r.scored.concepts, 1):
        done["clusters"].append(strip(train, members, f"cluster_{j}.png",  # strongest first
                                      f"cluster {j}: its strongest training images", concept_colour(j)))
        done["units"].append(strip(val, top.get(c, f"D{j}")["indices"].tolist(), f"D{j}.png",
                                   f"concept unit {j}: top held-out images" + mostly(f"D{j}"), concept_colour(j)))
        if cfg.fv is not None:
            split = r.scored.split()
            img, _ = visualize(model, unit, split.D[j - 1], None if unit.bias is None else unit.bias[c], cfg.fv,
                               magnitude, device=unit.weight.device, preprocess=lm.preprocess)
            done["fv"].append(os.path.join(folder, f"fv_D{j}.png"))
            save_strip([img.cpu()], done["fv"][-1])
    done["figure"] = os.path.join(folder, "figure.png")
    strips_figure(rows, done["figure"], f"{lm.tag}, unit {c}: {len(r.scored.concepts)} concepts from clusters")
    return done
