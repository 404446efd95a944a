"""A whole layer in one command (``disentangle_layer.py``): every polysemantic channel's concepts found
from the data, each channel split into as many channels as it has concepts, all splits in ONE network.

    the store -> stage 2's candidates and ARVs -> concepts by complete linkage (``utils.linkage``)
    -> per channel the rho sweep of its k concepts -> ONE truncated pass over the union of the concepts'
       training images scores every channel and rho (``utils.disentangle.score_channels``)
    -> ONE network with every split, its logits checked against the original's on validation images
    -> ONE pass over the concepts' validation images evaluates every split (stage 4's rows and plots)
    -> ONE top-k pass over all validation images: purity of every sub-channel and of random other channels
    -> records, layer.json, disentangled.pt, results_quantitative/, plots/, pictures/, report.html
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import torch

from . import store as st
from .arv import concept_arvs
from .cli import RunOptions
from .data import list_images
from .device import model_on, resolve_device
from .disentangle import check_indices, max_logit_diff, score_channels
from .errors import UserError
from .featvis import FVConfig
from .files import check_writable
from .linkage import channel_concepts
from .models import LoadedModel, default_layer, get_layer, load_model
from .records import Record, rho_key, save_record
from .scoring import best_index
from .split import Sweep, sweep
from .store import data_class_map, training_images
from .surgery import split_network


@dataclass
class LayerConfig(RunOptions):
    data_dir: str
    store_dir: str
    tau: float = 0.03
    p: float = 0.75
    gamma_high: float = 0.5
    channels: list[int] | None = None  # only these channels (each needs two or more concepts)
    min_concepts: int = 2
    max_channels: int | None = None  # at most this many: the most polysemantic first
    check_images: int = 32
    top_k: int = 12
    baseline: int | None = None  # random non-candidate channels for the purity baseline (default: as many as split)
    fv: FVConfig | None = None  # feature visualisations in the pictures (off by default: ~40 s per sub-channel)
    seed: int = 0
    out_dir: str | None = None  # default: STORE_DIR/layer_disentangled/<name>
    notes: dict = field(default_factory=dict)  # more rows for the report's settings (the demo's model)


@dataclass
class LayerSplit:
    """One split channel of the layer: its concepts, sweep, scores, best rho and (after the pass) record."""

    channel: int
    concepts: list[list[int]]
    sweep: Sweep
    scores: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)
    best: int = 0
    record: Record | None = None


def layer_name(tag: str, layer: str, tau: float, p: float, gamma: float) -> str:
    """``<model>_<layer>_required<tau>_p<p>_cossim<gamma>``: the folder of one layer's disentanglement."""
    return f"{tag}_{layer}_required{float(tau)}_p{float(p)}_cossim{float(gamma)}"


def select_channels(concepts: dict[int, list[list[int]]], arvs_cos: dict[int, float], cfg: LayerConfig) -> list[int]:
    """The channels to split: two or more concepts (``min_concepts``), those of ``--channels`` if given, at
    most ``max_channels`` of them (lowest similarity between their concepts first)."""
    if cfg.channels is not None:
        missing = [c for c in cfg.channels if len(concepts.get(c, [])) < cfg.min_concepts]
        if missing:
            have = len(concepts.get(missing[0], []))
            raise UserError(f"channel {missing[0]} has {have} concept(s) at these settings (tau, p, gamma); "
                            f"--channels needs {cfg.min_concepts} or more")
    chosen = [c for c, g in concepts.items() if len(g) >= cfg.min_concepts
              and (cfg.channels is None or c in cfg.channels)]
    chosen.sort(key=lambda c: (arvs_cos.get(c, 1.0), c))
    return sorted(chosen[:cfg.max_channels] if cfg.max_channels else chosen)


def disentangle_layer(cfg: LayerConfig, loaded: LoadedModel | None = None, log=print) -> dict:
    """Run the layer command end to end; returns the ``--json`` summary (see ``disentangle_layer.py``)."""
    from .layer_output import evaluate_layer, write_layer

    t0 = time.perf_counter()
    lm = loaded or load_model(cfg.model, cfg.weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    store = st.Store.open(os.path.join(cfg.store_dir, st.store_name(lm.tag, layer, default_layer(lm.model))))
    store.check(model=lm.name, weights=lm.weights, layer=layer)
    concepts, least = channel_concepts(store, cfg.tau, cfg.p, cfg.gamma_high, progress=cfg.progress)
    chosen = select_channels(concepts, least, cfg)
    if not chosen:
        raise UserError(f"no channel of {layer} has {cfg.min_concepts} or more concepts at tau {cfg.tau}, p {cfg.p}, "
                        f"gamma {cfg.gamma_high}: lower --p or raise --cos_sim_high")
    out = cfg.out_dir or os.path.join(cfg.store_dir, "layer_disentangled",
                                      layer_name(lm.tag, layer, cfg.tau, cfg.p, cfg.gamma_high))
    check_writable(out)
    check_writable(os.path.join(cfg.store_dir, "models_disentangled"))
    log(f"{len(concepts)} candidate channels in {lm.name} {layer}; splitting {len(chosen)} with "
        f"{cfg.min_concepts}+ concepts: " + ", ".join(f"{c} (k={len(concepts[c])})" for c in chosen[:20])
        + (" ..." if len(chosen) > 20 else ""))
    device = resolve_device(cfg.device, cfg.gpu)
    model = model_on(lm.model, device)
    splits = _score(cfg, lm, store, model, layer, {c: concepts[c] for c in chosen}, device, log)
    seconds = {"score": time.perf_counter() - t0}
    val = _val_images(cfg, lm, store)
    net = split_network(model, {layer: [s.sweep.split(s.channel, s.best) for s in splits]})
    keep = _check_images(val, splits, cfg.check_images)
    diff = max_logit_diff(model, net, _stack(val, keep, lm), cfg.batch_size)
    log(f"one network with {len(splits)} split channels: max |logit difference| {diff:.3g} on {len(keep)} "
        "validation images")
    if not diff <= 1e-3:
        raise UserError(f"the disentangled network's logits differ from the original's by {diff:.3g} (> 0.001); "
                        "nothing written")
    _make_records(cfg, lm, layer, conv, store, splits, diff, len(keep))
    t1 = time.perf_counter()
    evaluation = evaluate_layer(cfg, lm, layer, model, splits, val, list(concepts), device, log)
    seconds["evaluate"] = time.perf_counter() - t1
    summary = write_layer(cfg, lm, layer, store, splits, evaluation, diff, out, seconds, log)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _score(cfg: LayerConfig, lm: LoadedModel, store: st.Store, model, layer: str,
           concepts: dict[int, list[list[int]]], device, log) -> list[LayerSplit]:
    """Every channel's sweep, scored in one pass over the union of the concepts' training images."""
    conv = model.get_submodule(layer)
    weight = conv.weight.detach().cpu()
    splits = [LayerSplit(c, cs, sweep(weight[c], concept_arvs(store, c, cs))) for c, cs in concepts.items()]
    classes = sorted({t for s in splits for cs in s.concepts for t in cs})
    images = training_images(store, cfg.data_dir, classes, cfg.class_index)
    scored, seconds, _ = score_channels(model, conv, images, [(s.channel, s.concepts, s.sweep) for s in splits],
                                        cfg.batch_size, cfg.num_workers, lm.preprocess, device, cfg.progress,
                                        desc="scoring")
    for s, (scores, counts) in zip(splits, scored):
        s.scores, s.counts, s.best = scores, counts, best_index(scores)
    log(f"scored {len(splits)} channels x 20 rhos on {len(images)} training images in {seconds:.1f} s "
        f"({len(images) / max(seconds, 1e-9):.1f} img/s)")
    return splits


def _val_images(cfg: LayerConfig, lm: LoadedModel, store: st.Store):
    """All validation images (the top-k search looks at every class), mapped by the store's class map."""
    return list_images(cfg.data_dir, "val", classes=data_class_map(cfg.data_dir, "val", lm.num_classes,
                                                                    cfg.class_index, store.path))


def _check_images(val, splits: list[LayerSplit], n: int) -> list[int]:
    """Up to ``n`` validation images for the logit check, spread over every split channel's concepts."""
    groups = [val.indices_of(cs) for s in splits for cs in s.concepts]
    rng = random.Random(0)
    rng.shuffle(groups)
    return check_indices([g for g in groups if g], n)


def _stack(val, indices: list[int], lm: LoadedModel) -> torch.Tensor:
    from .data import load_image

    return torch.stack([load_image(val, i, lm.preprocess) for i in indices])


def _make_records(cfg: LayerConfig, lm: LoadedModel, layer: str, conv, store: st.Store, splits: list[LayerSplit],
                  diff: float, checked: int) -> None:
    """One stage-3 record per split channel (``models_disentangled/``), so that get_results.py and
    visualize_channel.py work on each of them too."""
    names = store.names
    for s in splits:
        sw = s.sweep
        s.record = Record(
            model=lm.name, weights=lm.weights, layer=layer, default_layer=layer == default_layer(lm.model),
            in_channels=conv.in_channels, out_channels=conv.out_channels, channel=s.channel, concepts=s.concepts,
            class_names=names.as_dict(t for cs in s.concepts for t in cs), store=os.path.abspath(store.path),
            data_dir=os.path.abspath(cfg.data_dir), data_fingerprint=store.meta["data_fingerprint"],
            rhos=[round(float(r), 2) for r in sw.rhos], scores={rho_key(r): float(v) for r, v in zip(sw.rhos, s.scores)},
            best_rho=round(float(sw.rhos[s.best]), 2), sources={rho_key(r): sw.sources(i) for i, r in enumerate(sw.rhos)},
            max_abs_logit_diff=diff, equivalence_images=checked,
            train_images={f"concept{j}": n for j, n in enumerate(s.counts, 1)}, seconds=0.0, images_per_second=0.0)
        s.record.dir = os.path.join(cfg.store_dir, "models_disentangled", s.record.name())
        save_record(s.record.dir, s.record, sw)
