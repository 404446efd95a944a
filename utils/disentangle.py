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
from .concepts import check_channel, check_concepts, normalise
from .data import ImageList, check_batch, class_batches, make_loader
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
    [(scores, counts)], seconds, kept = score_channels(
        model, model.get_submodule(layer), images, [(cfg.channel, concepts, sw)], cfg.batch_size, cfg.num_workers,
        lm.preprocess, device, cfg.progress, cfg.rank, cfg.world_size, set(keep))
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


def score_channels(model: nn.Module, conv: nn.Conv2d, images: ImageList, channels: list[tuple[int, list, Sweep]],
                   batch_size: int, num_workers: int, preprocess, device: torch.device, progress: bool = True,
                   rank: int = 0, world: int = 1, keep: set[int] = frozenset(), desc: str = "stage 3"):
    """Score every rho of every channel ``(c, concepts, sweep)`` in ONE truncated pass over the union of the
    concepts' training images (class-aligned batches; under torchrun each rank a block of whole batches).

    Each batch's layer input serves every channel with a concept of its class. Returns per channel
    ``(scores (R,), images per concept)``, the seconds of the slowest rank, and the images of ``keep``
    this rank saw (index -> image).
    """
    classes = {t for _, concepts, _ in channels for cs in concepts for t in cs}
    batches = class_batches(images, images.indices_of(classes), batch_size)
    lo, hi = batch_shard(len(batches), 1, rank, world)
    loader = make_loader(images, batch_sampler=batches[lo:hi], num_workers=num_workers, pin_memory=pin(device),
                         transform=preprocess)
    users: dict[int, list[tuple[int, int]]] = {}  # class -> (channel position, concept number)
    for ci, (_, concepts, _) in enumerate(channels):
        for j, cs in enumerate(concepts, 1):
            for t in cs:
                users.setdefault(t, []).append((ci, j))
    banks = [score_filters(sw) for _, _, sw in channels]
    biases = [None if conv.bias is None else conv.bias.detach()[c].expand(len(b)) for (c, _, _), b in zip(channels, banks)]
    bar = tqdm(total=sum(len(b) for b in batches[lo:hi]), unit="img", disable=not progress or rank != 0,
               desc=desc if world == 1 else f"{desc} (rank 0 of {world})", dynamic_ncols=True)
    t0 = time.perf_counter()

    def run():
        parts, counts, kept = [[] for _ in channels], [[0] * sw.k for _, _, sw in channels], {}
        with torch.no_grad():
            for x, labels, index in loader:
                check_batch(images, labels, index)
                kept.update({i: x[j].clone() for j, i in enumerate(index.tolist()) if i in keep})
                xl = layer_input(model, conv, to_device(x, device, images=True))
                for ci, j in users[int(labels[0])]:
                    concept = torch.full((len(labels),), j, dtype=torch.int64, device=device)
                    parts[ci].append(batch_ratio_sums(conv, xl, banks[ci], biases[ci], channels[ci][2].k, concept))
                    counts[ci][j - 1] += len(labels)
                bar.update(len(labels))
        synchronize(device)
        return parts, counts, kept

    parts, counts, kept = run_together(run, world, device, "stage 3")
    bar.close()
    seconds = reduce_over_ranks(time.perf_counter() - t0, world, device)
    out = []
    for (_, _, sw), p, n in zip(channels, parts, counts):
        if world > 1:  # every rank's batch sums, in rank order = batch order of the single-process pass
            p, n = _gather_sums(p, n, sw.k, len(sw.distinct()[0]), world, device)
        out.append((scores_from_sums(sw, p, n), n))
    return out, seconds, kept


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
