"""The layer command's evaluation and outputs: one pass over the validation images for every split, one
top-k pass for the purity of every sub-channel (and of random other channels, the baseline), and the
files: layer.json, disentangled.pt, results_quantitative/, plots/, pictures/, report.html."""
from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch

from .concepts import ClassNames
from .data import make_loader
from .device import pin
from .evaluation import Evaluation, evaluate_splits
from .files import write_json
from .split import FilterBank, filter_bank, sub_names
from .surgery import export_network
from .topk import purity, stream_topk


def evaluate_layer(cfg, lm, layer: str, model, splits: list, val, candidates: list[int], device, log) -> dict:
    """Stage 4's values of every split on its concepts' validation images, and the purity of every
    sub-channel's top-k validation images: per concept j, the share of the original channel's top-k in concept
    j's classes (before) and of concept channel j's (after); the gain is the mean of after - before. The
    baseline: the share of the most frequent class in the top-k of random non-candidate channels."""
    conv = model.get_submodule(layer)
    union = sorted({t for s in splits for cs in s.concepts for t in cs})
    acts, seconds = evaluate_splits(model, conv, [s.sweep.split(s.channel, s.best) for s in splits],
                                    [s.concepts for s in splits], val, val.indices_of(union), cfg.batch_size,
                                    cfg.num_workers, device, cfg.progress, preprocess=lm.preprocess)
    log(f"evaluated {len(splits)} splits on {len(val.indices_of(union))} validation images in {seconds:.1f} s")
    others = [c for c in range(conv.out_channels) if c not in set(candidates)]
    baseline = sorted(random.Random(cfg.seed).sample(others, min(len(others), cfg.baseline or len(splits))))
    banks = [filter_bank(conv, [s.sweep.split(s.channel, s.best)]) for s in splits]
    if baseline:
        banks.append(FilterBank([(c, "original") for c in baseline], conv.weight.detach()[baseline],
                                None if conv.bias is None else conv.bias.detach()[baseline]))
    bank = FilterBank(sum((b.keys for b in banks), []), torch.cat([b.weight for b in banks]),
                      None if conv.bias is None else torch.cat([b.bias for b in banks]))
    loader = make_loader(val, batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin(device),
                         transform=lm.preprocess)
    top = stream_topk(model, conv, bank, loader, cfg.top_k, val, device, cfg.progress)
    for s in splits:
        subs = ("original",) + sub_names(len(s.concepts))[:-1]
        p = {name: purity(top.get(s.channel, name)["labels"], s.concepts) for name in subs}
        s.purity = {"original": [p["original"][f"concept{j}"] for j in range(1, len(s.concepts) + 1)],
                    "concepts": [p[f"D{j}"][f"concept{j}"] for j in range(1, len(s.concepts) + 1)]}
        s.gain = float(np.mean(np.subtract(s.purity["concepts"], s.purity["original"])))
    shares = [_top_class_share(top.get(c, "original")["labels"]) for c in baseline]
    return {"acts": acts, "top": top, "val": val,
            "baseline": {"channels": baseline, "top_class_share": shares, "mean": float(np.mean(shares)) if shares else None}}


def _top_class_share(labels) -> float:
    """The share of top-k images in their most frequent class."""
    labels = [int(t) for t in labels]
    return max(labels.count(t) for t in set(labels)) / len(labels) if labels else 0.0


def write_layer(cfg, lm, layer: str, store, splits: list, evaluation: dict, diff: float, out: str,
                seconds: dict, log) -> dict:
    """Every output of the layer command into ``out``; returns the ``--json`` summary."""
    from . import results
    from .layer_report import write_layer_report

    os.makedirs(out, exist_ok=True)
    names = ClassNames(lm.categories, list(store.class_index), list(store.class_index.values()))
    t0 = time.perf_counter()
    export = os.path.join(out, "disentangled.pt")
    export_network(lm.model, lm.name, {layer: [s.sweep.split(s.channel, s.best) for s in splits]}, export)
    for s in splits:
        ev = Evaluation(lm, layer, None, None, names, s.concepts, s.record, s.sweep.split(s.channel, s.best),
                        s.record.best_rho)
        stage4 = SimpleNamespace(out_dir=out, rho=None, tau=cfg.tau, channel=s.channel)
        per_concept = [evaluation["acts"][s.channel].of_classes(cs) for cs in s.concepts]
        labels = [[names.label(t) for t in cs] for cs in s.concepts]
        s.stage4 = {"csv": [], "plots": [], **{f"concept{j}": {"images": len(a), "classes": lab}
                                               for j, (a, lab) in enumerate(zip(per_concept, labels), 1)}}
        results.write_quantitative(stage4, ev, per_concept, s.stage4, lambda *a: None)
        s.stage4["plots"] = results.write_density_plots(stage4, ev, per_concept, labels, lambda *a: None)
    seconds["results and plots"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pictures = _pictures(cfg, lm, layer, splits, evaluation, names, out)
    seconds["pictures"] = time.perf_counter() - t0
    summary = _summary(cfg, lm, layer, splits, evaluation, diff, export, names)
    write_json(os.path.join(out, "layer.json"), {**summary, "pictures": pictures, "timings": seconds})
    report = os.path.join(out, "report.html")
    write_layer_report(report, summary, splits, pictures, names, seconds, cfg.notes)
    log(f"wrote {out}/ (layer.json, disentangled.pt, results_quantitative/, plots/, pictures/, report.html)")
    return {**summary, "report": report, "out_dir": out}


def _pictures(cfg, lm, layer: str, splits: list, evaluation: dict, names, out: str) -> dict:
    """The teaser figure (original and every concept channel) of each split, from the one top-k pass."""
    from .pictures import Job, PicturesConfig, draw
    from .receptive import receptive_field

    side = lm.preprocess.crop
    rf = receptive_field(lm.model, lm.model.get_submodule(layer), (side, side), min_size=max(1, side // 8))
    done = {}
    for s in splits:
        pc = PicturesConfig(data_dir=cfg.data_dir, model_dir="", channel=s.channel, concepts=s.concepts, split="val",
                            top_k=cfg.top_k, out_dir=os.path.join(out, "pictures"), fv=cfg.fv,
                            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
                            progress=cfg.progress, formats=("png",), crop_files=False)
        split = s.sweep.split(s.channel, s.best)
        job = Job(lm, layer, lm.model.get_submodule(layer), s.record, split, s.concepts, evaluation["val"], names,
                  s.record.best_rho, ["original", *sub_names(split.k)[:-1]], rf)
        done[s.channel] = draw(pc, job, evaluation["top"])
    return {str(c): {"out_dir": p["out_dir"], "teaser": os.path.join(p["out_dir"], "teaser.png")}
            for c, p in done.items()}


def _summary(cfg, lm, layer: str, splits: list, evaluation: dict, diff: float, export: str, names) -> dict:
    """The ``--json`` object: per channel its concepts, every rho's score and index sets, best rho, purity."""
    channels = {}
    for s in splits:
        rec = s.record
        channels[str(s.channel)] = {
            "concepts": s.concepts, "class_names": [[names.name(t) for t in cs] for cs in s.concepts],
            "best_rho": rec.best_rho, "scores": rec.scores, "sources": rec.sources, "purity": s.purity,
            "purity_gain": s.gain, "record": rec.dir,
            "quantitative": {f"concept{j}": s.stage4.get(f"concept{j}") for j in range(1, len(s.concepts) + 1)},
            "plots": s.stage4["plots"], "csv": s.stage4["csv"]}
    return {"model": lm.name, "weights": lm.weights, "layer": layer, "tau": cfg.tau, "p": cfg.p,
            "gamma_high": cfg.gamma_high, "top_k": cfg.top_k, "channels": channels,
            "baseline_purity": evaluation["baseline"], "max_abs_logit_diff": diff, "export": export}
