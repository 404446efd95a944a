"""Stage 3: split one channel ``c`` of the layer ``L`` into one channel per concept (``disentangle_channel.py``).

    concept ARVs (closed form, from the store)  ->  the rho sweep (``utils.method.split``)
    ->  ONE truncated forward (up to ``L``) per training image of the concepts, scoring every rho
        (``utils.method.scoring``)  ->  best rho = first maximal score
    ->  full forwards of the original and the disentangled network on a few images: same logits?

:func:`disentangle_channel` returns the :class:`utils.store.records.Record` and the sweep; it writes nothing.
:func:`utils.store.records.save_record` writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..store import layout as st
from ..store.arvs import concept_arvs
from ..data.classes import check_channel, check_concepts, normalise
from ..data.images import ImageList, class_batches
from ..errors import UserError
from ..passes.image_pass import RunOptions, Runner
from ..model.loading import LoadedModel, get_layer, load_model
from ..data.preprocess import InputSpec
from ..store.records import CHANNEL_COMMAND, Record, make_record
from ..model.hooks import layer_input
from ..method.scoring import Scored, batch_ratio_sums, best_index, score_bias, score_filters, scores_from_sums
from ..method.split import SPLIT_RULES, Sweep, sweep
from ..store.layout import training_images
from ..model.surgery import check_logit_diff, logit_diff_scale, split_network
from ..passes.distributed import reduce_over_ranks
from ..model.units import Unit, as_unit, unit_at


@dataclass
class Stage3Config(RunOptions):
    data_dir: str
    store_dir: str
    channel: int
    concepts: list[list[int]] = field(default_factory=list)  # the classes of concept 1, 2, ...
    check_images: int = 32
    split_rule: str = "paper"  # or "positive" (utils.method.split)


def check_split_rule(rule: str) -> None:
    if rule not in SPLIT_RULES:
        raise UserError(f"--split_rule must be one of {', '.join(SPLIT_RULES)}, not {rule!r}")


def check_indices(groups: list[list[int]], n: int) -> list[int]:
    """Up to ``n`` image indices for the equivalence check, spread over the concepts (the first images of
    each, as evenly as their sizes allow), sorted."""
    take = [0] * len(groups)
    for _ in range(n):
        open_ = [j for j, g in enumerate(groups) if take[j] < len(g)]
        if not open_:
            break
        take[min(open_, key=lambda j: (take[j], j))] += 1
    return sorted(i for g, t in zip(groups, take) for i in g[:t])


def disentangle_channel(cfg: Stage3Config, loaded: LoadedModel | None = None, check=None) -> tuple[Record, Sweep]:
    """Run stage 3: returns the record and the sweep; writes nothing.

    ``loaded`` replaces ``cfg.model``/``cfg.weights`` by a model already in memory;
    ``check(out_channels)`` is called once the layer is known (the script's channel-count check).
    """
    cfg.check()
    if cfg.check_images < 1:
        raise UserError("--check_images must be at least 1")
    check_split_rule(cfg.split_rule)
    lm = loaded or load_model(cfg.model, cfg.weights, inputs=InputSpec.of(cfg))
    layer, unit = get_layer(lm.model, cfg.layer)
    if check is not None:
        check(unit.out_channels)
    check_channel(cfg.channel, unit.out_channels, layer)
    concepts = normalise(cfg.concepts)
    store, images = _store_and_images(cfg, lm, layer, concepts)
    sw = sweep(unit.weight.detach()[cfg.channel].cpu(), concept_arvs(store, cfg.channel, concepts), rule=cfg.split_rule)
    runner = Runner.of(cfg)
    model = runner.model(lm.model)
    keep = check_indices([images.indices_of(cs) for cs in concepts], cfg.check_images)
    [(scores, counts)], seconds, kept = score_channels(runner, model, unit_at(model, layer, store.positions), images,
                                                       [(cfg.channel, concepts, sw)], lm.preprocess, set(keep))
    best = best_index(scores)
    net = split_network(model, {layer: [sw.split(cfg.channel, best)]})
    diff = logit_check(runner, model, net, kept, f"on {len(keep)} concept images")
    scored = Scored(cfg.channel, concepts, sw, scores, counts, best)
    record = make_record(lm, layer, store, cfg.data_dir, scored, diff, len(keep), CHANNEL_COMMAND, seconds,
                         cfg.split_rule)
    return record, sw


def _store_and_images(cfg: Stage3Config, lm: LoadedModel, layer: str,
                      concepts: list[list[int]]) -> tuple[st.Store, ImageList]:
    """The stage-1 store of this model and layer, the concepts checked against it, and the training images
    of the concepts' classes (only those folders are listed and checked)."""
    store = st.model_store(cfg.store_dir, lm, layer)
    counts = {t: int(n) for t, n in enumerate(store.class_counts)}
    check_concepts(concepts, store.class_index.values(), "the data", counts)
    return store, training_images(store, cfg.data_dir, [t for cs in concepts for t in cs], cfg.class_index)


def score_channels(runner: Runner, model: nn.Module, unit: Unit | nn.Module, images: ImageList,
                   channels: list[tuple[int, list, Sweep]], preprocess, keep: set[int] = frozenset(),
                   desc: str = "stage 3", signs: list[list[int]] | None = None
                   ) -> tuple[list[tuple[torch.Tensor, list[int]]], float, dict]:
    """Score every rho of every channel ``(c, concepts, sweep)`` in ONE truncated pass over the union of the
    concepts' training images (class-aligned batches; under torchrun each rank a block of whole batches).

    Each batch's layer input serves every channel with a concept of its class. Returns per channel
    ``(scores (R,), images per concept)``, the seconds of the slowest rank, and the images of ``keep``
    this rank saw (index -> image, on the host). ``signs``: per channel its concepts' orientations (the score
    then reads concept filter j times s_j, :func:`utils.method.scoring.score_filters`).
    """
    unit = as_unit(unit)
    classes = {t for _, concepts, _ in channels for cs in concepts for t in cs}
    ip = runner.image_pass(images, class_batches(images, images.indices_of(classes), runner.batch_size),
                           preprocess, desc)
    users: dict[int, list[tuple[int, int]]] = {}  # class -> (channel position, concept number)
    for ci, (_, concepts, _) in enumerate(channels):
        for j, cs in enumerate(concepts, 1):
            for t in cs:
                users.setdefault(t, []).append((ci, j))
    dev = dict(device=unit.weight.device, dtype=unit.weight.dtype)  # every filter goes to the device once
    signs = signs or [None] * len(channels)
    banks = [score_filters(sw, s).to(**dev) for (_, _, sw), s in zip(channels, signs)]
    biases = [score_bias(None if unit.bias is None else unit.bias.detach()[c], sw, s)
              for (c, _, sw), s in zip(channels, signs)]

    def step(batches):
        parts, counts, kept = [[] for _ in channels], [[0] * sw.k for _, _, sw in channels], {}
        for b in batches:
            kept.update({i: b.x[j].cpu() for j, i in enumerate(b.index.tolist()) if i in keep})
            xl = unit.counted(layer_input(model, unit, b.x))
            for ci, j in users.get(int(b.targets[0]), []):
                concept = torch.full((len(b),), j, dtype=torch.int64, device=xl.device)
                parts[ci].append(batch_ratio_sums(unit, xl, banks[ci], biases[ci], channels[ci][2].k, concept))
                counts[ci][j - 1] += len(b)
        return parts, counts, kept

    ran = ip.run(step, "stage 3")
    parts, counts, kept = ran.value
    out = []
    for (_, _, sw), p, n in zip(channels, parts, counts):
        if runner.world > 1:  # every rank's batch sums, in rank order = batch order of the single-process pass
            p, n = _gather_sums(runner, p, n, sw.k, len(sw.distinct()[0]))
        out.append((scores_from_sums(sw, p, n), n))
    return out, ran.seconds, kept


def _gather_sums(runner: Runner, parts: list[torch.Tensor], counts: list[int], k: int, U: int):
    """All ranks' per-batch ratio sums (in rank order) and the summed image counts, on every rank (CPU)."""
    mine = torch.stack([p.cpu().flatten() for p in parts]) if parts else torch.zeros(0, k * U, dtype=torch.float64)
    rows = runner.gather_rows(mine)
    totals = runner.gather_rows(torch.tensor([counts], dtype=torch.float64)).sum(0)
    return list(rows.view(-1, k, U)), [int(v) for v in totals]


def logit_check(runner: Runner, model: nn.Module, net: nn.Module, images: dict[int, torch.Tensor],
                where: str) -> float:
    """Largest |logit difference| between ``model`` and its disentangled ``net`` over every rank's ``images``
    (index -> image, each rank those of its share), known to every rank; above its tolerance (relative to the
    largest |logit|, see :func:`check_logit_diff`) a UserError."""
    x = torch.stack([images[i] for i in sorted(images)]).to(runner.device) if images else None
    diff, scale = runner.together(lambda: (0.0, 0.0) if x is None else logit_diff_scale(model, net, x, runner.batch_size),
                                  "the logit check")
    return check_logit_diff(reduce_over_ranks(diff, runner.world, runner.device), where,
                            reduce_over_ranks(scale, runner.world, runner.device))
