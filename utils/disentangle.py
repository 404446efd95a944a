"""Stage 3: split one channel ``c`` of the layer ``L`` into one channel per concept (``disentangle_channel.py``).

    concept ARVs (closed form, from the store)  ->  the rho sweep (``utils.split``)
    ->  ONE truncated forward (up to ``L``) per training image of the concepts, scoring every rho
        (``utils.scoring``)  ->  best rho = first maximal score
    ->  full forwards of the original and the disentangled network on a few images: same logits?

:func:`disentangle_channel` returns the :class:`utils.records.Record` and the sweep; it writes nothing.
:func:`utils.records.save_record` writes them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from . import store as st
from .arv import concept_arvs
from .cli import RunOptions
from .concepts import check_channel, check_concepts, concept_ids, normalise
from .data import ImageList, check_batch, make_loader
from .device import model_on, pin, resolve_device, synchronize, to_device
from .distributed import all_gather_rows, batch_shard, broadcast_float, reduce_over_ranks, run_together
from .errors import UserError
from .models import LoadedModel, default_layer, get_layer, load_model
from .records import Record, rho_key
from .store import training_images
from .relevance import layer_input
from .scoring import batch_ratio_sums, best_index, score_filters, scores_from_sums
from .split import Sweep, sweep
from .surgery import split_network

MAX_LOGIT_DIFF = 1e-3  # above this the disentangled network is reported as broken


@dataclass
class Stage3Config(RunOptions):
    data_dir: str
    store_dir: str
    channel: int
    concepts: list[list[int]] = field(default_factory=list)  # the classes of concept 1, 2, ...
    check_images: int = 32
    rank: int = 0  # under torchrun: this process's rank and the number of processes (see utils.distributed)
    world_size: int = 1


def max_logit_diff(original: nn.Module, disentangled: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Largest |original(images) - disentangled(images)| over all logits (full forwards)."""
    diff = 0.0
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size]
            diff = max(diff, float((original(x).float() - disentangled(x).float()).abs().max()))
    return diff


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
    if cfg.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if cfg.check_images < 1:
        raise UserError("--check_images must be at least 1")
    lm = loaded or load_model(cfg.model, cfg.weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    if check is not None:
        check(conv.out_channels)
    check_channel(cfg.channel, conv.out_channels, layer)
    concepts = normalise(cfg.concepts)
    store, images = _store_and_images(cfg, lm, layer, concepts)
    sw = sweep(conv.weight.detach()[cfg.channel].cpu(), concept_arvs(store, cfg.channel, concepts))
    device = resolve_device(cfg.device, cfg.gpu)
    model = model_on(lm.model, device)
    groups = [images.indices_of(cs) for cs in concepts]
    keep = check_indices(groups, cfg.check_images)
    parts, counts, kept, seconds = _score_pass(cfg, model, model.get_submodule(layer), sw, images, concepts, keep,
                                               lm.preprocess, device)
    scores = scores_from_sums(sw, parts, counts)
    best = best_index(scores)
    diff = _equivalence(cfg, model, layer, sw, best, images, keep, kept, lm.preprocess, device)
    record = Record(
        model=lm.name, weights=lm.weights, layer=layer, default_layer=layer == default_layer(lm.model),
        in_channels=conv.in_channels, out_channels=conv.out_channels, channel=int(cfg.channel), concepts=concepts,
        class_names=store.names.as_dict(t for cs in concepts for t in cs), store=os.path.abspath(store.path),
        data_dir=os.path.abspath(cfg.data_dir), data_fingerprint=store.meta["data_fingerprint"],
        rhos=[round(float(r), 2) for r in sw.rhos], scores={rho_key(r): float(s) for r, s in zip(sw.rhos, scores)},
        best_rho=round(float(sw.rhos[best]), 2), sources={rho_key(r): sw.sources(i) for i, r in enumerate(sw.rhos)},
        max_abs_logit_diff=diff, equivalence_images=len(keep),
        train_images={f"concept{j}": n for j, n in enumerate(counts, 1)}, seconds=seconds,
        images_per_second=sum(counts) / max(seconds, 1e-9))
    return record, sw


def _store_and_images(cfg: Stage3Config, lm: LoadedModel, layer: str,
                      concepts: list[list[int]]) -> tuple[st.Store, ImageList]:
    """The stage-1 store of this model and layer, the concepts checked against it, and the training images
    of the concepts' classes (only those folders are listed and checked)."""
    store = st.Store.open(os.path.join(cfg.store_dir, st.store_name(lm.tag, layer, default_layer(lm.model))))
    store.check(model=lm.name, weights=lm.weights, layer=layer)
    counts = {t: int(n) for t, n in enumerate(store.class_counts)}
    check_concepts(concepts, store.class_index.values(), "the data", counts)
    return store, training_images(store, cfg.data_dir, [t for cs in concepts for t in cs], cfg.class_index)


def _score_pass(cfg: Stage3Config, model: nn.Module, conv: nn.Conv2d, sw: Sweep, images: ImageList,
                concepts: list[list[int]], keep: list[int], preprocess, device: torch.device):
    """One truncated forward per concept image (under torchrun, each rank a block of whole batches).

    Returns the per-batch ratio sums of all ranks in batch order (k x U each), the images per concept,
    the images of ``keep`` this rank saw (index -> image) and the seconds of the slowest rank.
    """
    order = sorted(i for cs in concepts for i in images.indices_of(cs))
    lo, hi = batch_shard(len(order), cfg.batch_size, cfg.rank, cfg.world_size)
    loader = make_loader(images, order[lo:hi], cfg.batch_size, cfg.num_workers, pin_memory=pin(device),
                         transform=preprocess)
    desc = "stage 3" if cfg.world_size == 1 else f"stage 3 (rank 0 of {cfg.world_size})"
    bar = tqdm(total=hi - lo, unit="img", desc=desc, disable=not cfg.progress or cfg.rank != 0, dynamic_ncols=True)
    bank = score_filters(sw)
    bias = None if conv.bias is None else conv.bias.detach()[cfg.channel].expand(len(bank))
    wanted = set(keep)
    t0 = time.perf_counter()

    def run() -> tuple[list[torch.Tensor], list[int], dict[int, torch.Tensor]]:
        parts, kept = [], {}
        counts = torch.zeros(sw.k, dtype=torch.int64)
        with torch.no_grad():
            for x, labels, index in loader:
                check_batch(images, labels, index)
                kept.update({i: x[j].clone() for j, i in enumerate(index.tolist()) if i in wanted})
                concept = concept_ids(labels, concepts)
                counts += torch.bincount(concept, minlength=sw.k + 1)[1:]
                xl = layer_input(model, conv, to_device(x, device, images=True))
                parts.append(batch_ratio_sums(conv, xl, bank, bias, sw.k, concept.to(device)))
                bar.update(len(labels))
        synchronize(device)
        return parts, counts.tolist(), kept

    parts, counts, kept = run_together(run, cfg.world_size, device, "stage 3")
    bar.close()
    seconds = reduce_over_ranks(time.perf_counter() - t0, cfg.world_size, device)
    if cfg.world_size > 1:  # every rank's batch sums, in rank order = batch order of the single-process pass
        parts, counts = _gather_sums(parts, counts, sw.k, len(sw.distinct()[0]), cfg.world_size, device)
    return parts, counts, kept, seconds


def _gather_sums(parts: list[torch.Tensor], counts: list[int], k: int, U: int, world: int, device):
    """All ranks' per-batch ratio sums (in rank order) and the summed image counts, on every rank (CPU)."""
    mine = torch.stack([p.cpu().flatten() for p in parts]) if parts else torch.zeros(0, k * U, dtype=torch.float64)
    rows = all_gather_rows(mine, world, device)
    totals = all_gather_rows(torch.tensor([counts], dtype=torch.float64), world, device).sum(0)
    return list(rows.view(-1, k, U)), [int(v) for v in totals]


def _equivalence(cfg: Stage3Config, model: nn.Module, layer: str, sw: Sweep, best: int, images: ImageList,
                 keep: list[int], kept: dict[int, torch.Tensor], preprocess, device) -> float:
    """Largest logit difference between the original and the disentangled network (best rho) on the
    ``keep`` images, computed on rank 0 and known to every rank; above MAX_LOGIT_DIFF a UserError."""
    def check_logits() -> float | None:  # rank 0 alone; the others wait for its answer
        if cfg.rank != 0:
            return None
        missing = sorted(set(keep) - set(kept))  # check images that were in other ranks' shares
        for x, _, index in make_loader(images, missing, cfg.batch_size, 0, transform=preprocess) if missing else ():
            kept.update({i: x[j] for j, i in enumerate(index.tolist())})
        check_x = torch.stack([kept[i] for i in sorted(kept)]).to(device)
        net = split_network(model, {layer: [sw.split(cfg.channel, best)]})
        return max_logit_diff(model, net, check_x, cfg.batch_size)

    diff = broadcast_float(run_together(check_logits, cfg.world_size, device, "stage 3"), cfg.world_size, device)
    if not diff <= MAX_LOGIT_DIFF:
        raise UserError(f"the disentangled network's logits differ from the original's by {diff:.3g} "
                        f"(> {MAX_LOGIT_DIFF:g}) on {len(keep)} concept images; nothing written")
    return diff
