"""A whole layer in one command (``disentangle_layer.py``): every polysemantic channel's concepts found
from the data, each channel split into as many channels as it has concepts, all splits in ONE network.

    the store -> stage 2's candidates and ARVs -> concepts by complete linkage (``utils.method.linkage``)
    -> per channel the rho sweep of its k concepts -> ONE truncated pass over the union of the concepts'
       training images scores every channel and rho (``utils.stages.splitting.score_channels``)
    -> ONE network with every split
    -> ONE pass over the validation images (``utils.stages.layer_output.evaluate_layer``): stage 4's values of every
       split on its concepts' images, the top-k images of every sub-channel and of random other channels
       (purity and its baseline), and the one network's logits checked against the original's
    -> the ablation pass (utils.stages.effects): what each concept unit does to the decisions, certified or not
    -> records, layer.json, disentangled.pt, arrays.npz, results_quantitative/, plots/, pictures/, report.html (rank 0)

Under torchrun every pass is shared out (each rank a block of whole batches) and rank 0 alone writes; the
outputs equal a single-process run's.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import torch

from ..store import layout as st
from ..store.arvs import concept_arvs
from ..data.classes import check_channel, data_class_map
from ..data.images import ImageList, list_images
from ..defaults import (ABLATION, CERTIFY_TOLERANCE, DEFAULT_GAMMA, DEFAULT_P, DEFAULT_TAU, EFFECTS_PER_CLASS, STEER, SEARCH_BUDGET, SEARCH_IMAGES, SEARCH_OTHER_CLASSES,
                        SEARCH_OTHERS, SEARCH_PATIENCE, SEARCH_SCREEN)
from .effects import layer_effects
from .functional import functional_splits
from ..passes.interventions import ABLATION_REFERENCES
from .layer_output import evaluate_layer, write_layer
from .splitting import check_indices, score_channels
from ..errors import UserError
from ..passes.featvis import FVConfig
from ..files import check_writable
from ..passes.image_pass import RunOptions, Runner
from .candidates import channel_concepts
from ..model.loading import LoadedModel, get_layer, load_model
from ..data.preprocess import InputSpec
from ..store.records import LAYER_COMMAND, make_record, records_dir, store_record, variant_suffix
from ..method.scoring import Scored, best_index
from ..method.search import holdout_mask, search_from_sweep
from ..method.split import SPLIT_RULES, Sweep, sweep
from ..passes.contributions import Contributions, UnitRequest, contribution_pass, pick_rows
from ..model.units import Unit, unit_at
from ..store.layout import training_images
from ..model.surgery import split_network


@dataclass
class LayerConfig(RunOptions):
    data_dir: str
    store_dir: str
    tau: float = DEFAULT_TAU
    p: float = DEFAULT_P
    gamma_high: float = DEFAULT_GAMMA
    channels: list[int] | None = None  # only these channels (each needs two or more concepts)
    min_concepts: int = 2
    max_channels: int | None = None  # at most this many: the most polysemantic first
    check_images: int = 32
    top_k: int = 12
    baseline: int | None = None  # random non-candidate channels for the purity baseline (None: as many as split)
    fv: FVConfig | None = None  # feature visualisations in the pictures (off by default: ~40 s per sub-channel)
    seed: int = 0
    out_dir: str | None = None  # default: STORE_DIR/layer_disentangled/<name>
    notes: dict = field(default_factory=dict)  # more rows for the report's settings (the demo's model)
    # the rule whose concept units carry their concepts' function (utils.method.function), on the searched sets that
    # separate concepts best (utils.method.search, benchmarks/split_rules.py); "paper" and "none": the paper's
    split_rule: str = "function"  # or "search", "paper", "positive" (utils.method.split)
    orientation: str = "gradient"  # read each concept's unit in the direction that raises its logit; or "none"
    search_images: int = SEARCH_IMAGES  # the searched rule's training images per concept
    ablation: str = ABLATION  # the proof of each split (utils.stages.effects): mean, zero or none
    steer: float | None = STEER  # steering factor of the concept units (None: no steering)
    effects_per_class: int = EFFECTS_PER_CLASS
    certify_tolerance: float = CERTIFY_TOLERANCE


LAYER_RULES = (*SPLIT_RULES, "search", "function")  # the layer command's split rules
ORIENTATIONS = ("none", "gradient")
ABLATIONS = (*ABLATION_REFERENCES, "none")  # the reference an ablated unit takes (utils.passes.interventions), or none


def layer_name(tag: str, layer: str, tau: float, p: float, gamma: float, rule: str = "paper",
               oriented: bool = False) -> str:
    """``<model>_<layer>_required<tau>_p<p>_cossim<gamma>[_<rule>][_oriented]``: the folder of one layer's
    disentanglement (the rule unless the paper's)."""
    return f"{tag}_{layer}_required{float(tau)}_p{float(p)}_cossim{float(gamma)}" + variant_suffix(rule, oriented)


def check_layer_config(cfg: LayerConfig, out_channels: int, layer: str) -> None:
    """The layer command's numbers, in its own words; a UserError before anything is read."""
    if cfg.split_rule not in LAYER_RULES:
        raise UserError(f"--split_rule must be one of {', '.join(LAYER_RULES)}, not {cfg.split_rule!r}")
    if cfg.orientation not in ORIENTATIONS:
        raise UserError(f"--orientation must be one of {', '.join(ORIENTATIONS)}, not {cfg.orientation!r}")
    if cfg.ablation not in ABLATIONS:
        raise UserError(f"--ablation must be one of {', '.join(ABLATIONS)}, not {cfg.ablation!r}")
    if cfg.effects_per_class < 1:
        raise UserError(f"--effects_per_class must be at least 1, not {cfg.effects_per_class}")
    if not 0 <= cfg.certify_tolerance < 1:
        raise UserError(f"--certify_tolerance must be in [0, 1), not {cfg.certify_tolerance}")
    if cfg.search_images < 2:
        raise UserError(f"--search_images must be at least 2 (some fit the split, some stop the search), "
                        f"not {cfg.search_images}")
    if cfg.min_concepts < 2:
        raise UserError(f"--min_concepts must be at least 2 (a channel with one concept has nothing to split), "
                        f"not {cfg.min_concepts}")
    if not 0 <= cfg.p <= 1:
        raise UserError(f"--p must be between 0 and 1, not {cfg.p}")
    if not 0 < cfg.gamma_high <= 1:
        raise UserError(f"--cos_sim_high must be in (0, 1]: classes at least this alike form one concept, "
                        f"not {cfg.gamma_high}")
    cfg.check()
    for name, v in (("--check_images", cfg.check_images), ("--top_k", cfg.top_k)):
        if v < 1:
            raise UserError(f"{name} must be at least 1, not {v}")
    if cfg.baseline is not None and cfg.baseline < 0:
        raise UserError(f"--baseline_channels must be 0 (none) or more, not {cfg.baseline}")
    for c in cfg.channels or []:
        check_channel(c, out_channels, layer)


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


def baseline_channels(candidates: list[int], out_channels: int, n: int, seed: int) -> list[int]:
    """``n`` channels of the layer drawn at random (``seed``) among those that are no candidate, sorted."""
    others = [c for c in range(out_channels) if c not in set(candidates)]
    return sorted(random.Random(seed).sample(others, min(len(others), n)))


def start_run(cfg, loaded: LoadedModel | None, log, check) -> tuple[Runner, object, LoadedModel, str]:
    """What a layer command does first, on every rank: its runner, its log (rank 0 alone logs), the model
    (``loaded``, or built from ``cfg``) and the layer's name, the settings checked by ``check(cfg, out_channels,
    layer)`` before any image is read."""
    runner = Runner.of(cfg)
    lm = loaded or load_model(cfg.model, cfg.weights, inputs=InputSpec.of(cfg))
    layer, shape = get_layer(lm.model, cfg.layer)
    check(cfg, shape.out_channels, layer)
    return runner, log if runner.lead else (lambda *a: None), lm, layer


def disentangle_layer(cfg: LayerConfig, loaded: LoadedModel | None = None, log=print) -> dict:
    """Run the layer command end to end; returns the ``--json`` summary (see ``disentangle_layer.py``).

    Under torchrun (``cfg.rank``, ``cfg.world_size``) every rank calls this; rank 0 alone logs, writes and
    returns the summary, the other ranks return ``{"seconds": ...}`` once rank 0 has written.
    """
    t0 = time.perf_counter()
    runner, log, lm, layer = start_run(cfg, loaded, log, check_layer_config)
    store, concepts, chosen, out, val, evidence, shares = runner.together(
        lambda: _prepare(cfg, runner, lm, layer, log), "the layer command")
    model = runner.model(lm.model)
    unit = unit_at(model, layer, store.positions)
    parts: dict[str, float] = {}
    scored, score_seconds = _score(cfg, runner, store, model, unit, {c: concepts[c] for c in chosen},
                                   lm.preprocess, log, parts)
    seconds = {"score": time.perf_counter() - t0, **parts}
    t1 = time.perf_counter()
    net = split_network(model, {layer: [s.split() for s in scored]})
    n_base = len(scored) if cfg.baseline is None else cfg.baseline
    ev = evaluate_layer(runner, model, unit, scored, val, _check_images(val, scored, cfg.check_images), net,
                        baseline_channels(list(concepts), unit.out_channels, n_base, cfg.seed), cfg.top_k,
                        shares, lm.preprocess)
    seconds["validation pass"] = time.perf_counter() - t1
    log(f"validation pass: {ev.images} images in {ev.seconds:.1f} s ({ev.images / max(ev.seconds, 1e-9):.1f} img/s); "
        f"one network with {len(scored)} split channels: max |logit difference| {ev.logit_diff:.3g} on "
        f"{ev.checked} validation images")
    fx = layer_effects(cfg, runner, store, net, layer, unit.out_channels, scored, val, lm.num_classes, lm.preprocess,
                       log)
    if fx is not None:
        seconds["ablation pass"] = fx.seconds

    def write() -> dict:
        records = {s.channel: store_record(cfg.store_dir, make_record(
            lm, layer, store, cfg.data_dir, s, ev.logit_diff, ev.checked, LAYER_COMMAND, score_seconds,
            cfg.split_rule, cfg.seed), s.sweep)[0] for s in scored}
        return write_layer(cfg, lm, model, layer, store, ev, records, out, seconds, log, evidence, fx)

    summary = runner.together(lambda: write() if runner.lead else None, "the layer command")
    return {**(summary or {}), "seconds": runner.slowest(time.perf_counter() - t0)}


def _prepare(cfg: LayerConfig, runner: Runner, lm: LoadedModel, layer: str, log):
    """Every rank, before any pass (a failure anywhere stops all): the store, every candidate's concepts, the
    channels to split, the output folder (rank 0 checks it takes files) and the validation images."""
    store = st.model_store(cfg.store_dir, lm, layer)
    concepts, least, evidence, shares = channel_concepts(store, cfg.tau, cfg.p, cfg.gamma_high,
                                                 progress=cfg.progress and runner.lead)
    chosen = select_channels(concepts, least, cfg)
    if not chosen:
        most = max((len(v) for v in concepts.values()), default=0)
        raise UserError(f"no channel of {layer} has {cfg.min_concepts} or more concepts at tau {cfg.tau}, p {cfg.p}, "
                        f"gamma {cfg.gamma_high} ({len(concepts)} candidate channels, the most concepts any has: "
                        f"{most}): lower --p or raise --cos_sim_high")
    out = cfg.out_dir or os.path.join(cfg.store_dir, "layer_disentangled",
                                      layer_name(lm.tag, layer, cfg.tau, cfg.p, cfg.gamma_high, cfg.split_rule,
                                                 cfg.orientation != "none"))
    if runner.lead:
        check_writable(out)
        check_writable(records_dir(cfg.store_dir))
    log(f"{len(concepts)} candidate channels in {lm.name} {layer}; splitting {len(chosen)} with "
        f"{cfg.min_concepts}+ concepts: " + ", ".join(f"{c} (k={len(concepts[c])})" for c in chosen[:20])
        + (" ..." if len(chosen) > 20 else ""))
    return (store, concepts, chosen, out, _val_images(cfg, lm, store, [concepts[c] for c in chosen], chosen), evidence,
            shares)


def _score(cfg: LayerConfig, runner: Runner, store: st.Store, model, unit: Unit,
           concepts: dict[int, list[list[int]]], preprocess, log, parts: dict) -> tuple[list[Scored], float]:
    """Every channel's split: by the paper's or the positive rule, its sweep scored in one pass over the union of
    the concepts' training images; by the searched rule, from the contributions pass (:func:`_contributions`).
    With ``--orientation gradient`` the concepts' orientations come first, from that pass. ``parts``: the seconds
    of each pass and of the search are added to it."""
    weight = unit.weight.detach().cpu()
    searched = cfg.split_rule in ("search", "function")
    found, seconds = {}, 0.0
    if searched or cfg.orientation == "gradient":
        found, seconds, images = _contributions(cfg, runner, store, model, unit, concepts, preprocess, searched, log)
        parts["contributions pass"] = seconds
    signs = {c: found[c].signs() if cfg.orientation == "gradient" else None for c in concepts}
    sweeps = {c: sweep(weight[c], concept_arvs(store, c, cs), rule="paper" if searched else cfg.split_rule,
                       signs=signs[c]) for c, cs in concepts.items()}
    if searched:
        t0 = time.perf_counter()
        scored = [_search(cfg, c, cs, sweeps[c], found[c], signs[c], weight[c], runner.device)
                  for c, cs in concepts.items()]
        moves = [s.search["moves"] for s in scored]
        parts["search"] = time.perf_counter() - t0
        log(f"searched the index sets of {len(scored)} channels in {time.perf_counter() - t0:.1f} s "
            f"({sum(moves)} moves kept in all, at most {max(moves)} per channel)")
        if cfg.split_rule == "function":
            t0 = time.perf_counter()
            scored, parts["path pass"] = functional_splits(cfg, runner, model, unit, images, scored, found,
                                                           preprocess, log)
            parts["function"] = time.perf_counter() - t0 - parts["path pass"]
            seconds += parts["path pass"]
        return scored, seconds
    classes = sorted({t for cs in concepts.values() for c in cs for t in c})
    images = training_images(store, cfg.data_dir, classes, cfg.class_index)
    got, scoring, _ = score_channels(runner, model, unit, images, [(c, cs, sweeps[c]) for c, cs in concepts.items()],
                                     preprocess, desc="scoring", signs=[signs[c] for c in concepts])
    scored = [Scored(c, cs, sweeps[c], scores, counts, best_index(scores), signs[c])
              for (c, cs), (scores, counts) in zip(concepts.items(), got)]
    parts["scoring pass"] = scoring
    log(f"scored {len(scored)} channels x 20 rhos on {len(images)} training images in {scoring:.1f} s "
        f"({len(images) / max(scoring, 1e-9):.1f} img/s)")
    return scored, seconds + scoring


def _contributions(cfg: LayerConfig, runner: Runner, store: st.Store, model, unit: Unit,
                   concepts: dict[int, list[list[int]]], preprocess, searched: bool, log):
    """The contributions pass (:func:`utils.passes.contributions.contribution_pass`): with orientation every
    concept image's gradient; for the searched rule each channel's input contributions on up to
    ``search_images`` images per concept and SEARCH_OTHERS times as many others (other channels' concepts
    and up to SEARCH_OTHER_CLASSES classes outside every concept)."""
    mine = sorted({t for cs in concepts.values() for c in cs for t in c})
    images = st.concept_training_images(store, cfg.data_dir, mine, SEARCH_OTHER_CLASSES if searched else 0, cfg.seed,
                                        cfg.class_index)
    requests = [UnitRequest(c, cs, pick_rows(images, cs, cfg.search_images, SEARCH_OTHERS,
                                             cfg.seed) if searched else {}) for c, cs in concepts.items()]
    functional = cfg.split_rule == "function"
    orient = cfg.orientation == "gradient" or functional
    got, seconds = contribution_pass(runner, model, unit, images, requests, preprocess, orient, desc="contributions",
                                     functional=functional)
    n = len({i for r in requests for i in r.rows} | (set(images.indices_of(mine)) if orient else set()))
    log(f"contributions pass: {n} training images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} img/s)"
        + ("; orientations: " + ", ".join(f"{c} {_signs_text(f.signs())}" for c, f in zip(concepts, got))
           if cfg.orientation == "gradient" else ""))
    return dict(zip(concepts, got)), seconds, images


def _signs_text(signs: list[int]) -> str:
    return "(" + " ".join("+" if s > 0 else "-" for s in signs) + ")"


def _search(cfg: LayerConfig, channel: int, concepts: list[list[int]], sw: Sweep, found: Contributions,
            signs: list[int] | None, weight_c, device) -> Scored:
    """One channel's searched split, on ``device`` (the passes'): the start is the paper's sets (on the oriented
    ARVs) at the rho whose sets give the best objective on the fitting images (each rho's "score"), the search goes
    on from there (:func:`utils.method.search.search_from_sweep`), and the sweep's row at that rho takes the
    searched sets."""
    s = torch.tensor(signs or [1] * len(concepts), dtype=torch.float64)
    held = holdout_mask(found.labels, seed=cfg.seed)
    objs, best, res = search_from_sweep(sw, found.V.to(device), found.labels.to(device), s, held, SEARCH_BUDGET,
                                        SEARCH_PATIENCE, SEARCH_SCREEN)
    counts = [int((found.labels == j).sum()) for j in range(1, len(concepts) + 1)]
    return Scored(channel, concepts, sw.replace(best, res.assign, weight_c), objs, counts, best, signs,
                  res.summary(sw.sources(best), held))


def _val_images(cfg: LayerConfig, lm: LoadedModel, store: st.Store, concepts: list[list[list[int]]],
                channels: list[int]) -> ImageList:
    """All validation images (the top-k search looks at every class), mapped by the store's class map; a
    concept without validation images is a UserError naming it."""
    val = list_images(cfg.data_dir, "val", classes=data_class_map(cfg.data_dir, "val", lm.num_classes,
                                                                   cfg.class_index, store.path))
    have = set(val.targets)
    for c, cs in zip(channels, concepts):
        for j, classes in enumerate(cs, 1):
            if not have & set(classes):
                raise UserError(f"concept {j} of channel {c} (classes {classes}) has no validation images in "
                                f"{val.root}; add some, or leave the channel out (--channels)")
    return val


def _check_images(val: ImageList, scored: list[Scored], n: int) -> list[int]:
    """Up to ``n`` validation images for the logit check, spread over every split channel's concepts."""
    groups = [val.indices_of(cs) for s in scored for cs in s.concepts]
    rng = random.Random(0)
    rng.shuffle(groups)
    return check_indices([g for g in groups if g], n)
