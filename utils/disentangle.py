"""Stage 3: disentangle one channel ``c`` of the layer ``L`` into one sub-channel per concept.

The math (ALGORITHM.md, stage 3), as pure functions on tensors:

    concept ARVs A1, A2 (C_in,)  ->  sweep: index sets + D1/D2/Res per rho (R = 20 values)
    ->  one conv with the R D1 and R D2 filters stacked (2R outputs), applied to each concept
        image's layer input x once  ->  pos(y) = sum_hw max(y, 0)
    ->  score(rho) = mean_{concept 1} pos(D1)/(pos(D2)+1e-5) + mean_{concept 2} pos(D2)/(pos(D1)+1e-5)
    ->  best rho = first maximal score in sweep order.

:func:`disentangle_channel` runs it on a stage-1 store and the concepts' training images: one
truncated forward (up to ``L``) per image, then full forwards of the original and the
disentangled network on a few images to check that the logits agree. :func:`save_record`
writes ``models_disentangled/<name>/{record.json, filters.pt}``, which
:func:`utils.surgery.disentangle_model` and :func:`utils.surgery.export_checkpoint` read.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from . import store as st
from .data import check_batch, list_images, make_loader, resolve_device
from .distributed import all_gather_rows, batch_shard, broadcast_float, reduce_over_ranks, run_together
from .cli import RunOptions
from .errors import UserError
from .models import LoadedModel, default_layer, get_layer, load_model, set_module
from .relevance import layer_input
from .selection import concept_arv
from .surgery import (RECORD_VERSION, RHOS, Split, conv_with_filters, index_sets, make_split_layer, record_name,
                      split_filters)

EPS = 1e-5  # the score's denominator offset
MAX_LOGIT_DIFF = 1e-3  # above this the disentangled network is reported as broken


# ------------------------------------------------------------------ pure math


@dataclass
class Sweep:
    """All rho values of one split. ``R`` rhos; masks (R x C_in, bool); filters (R x C_in x kh x kw)."""

    rhos: torch.Tensor  # (R,) float64
    S1: torch.Tensor
    S2: torch.Tensor
    S0: torch.Tensor
    D1: torch.Tensor
    D2: torch.Tensor
    Res: torch.Tensor

    def split(self, channel: int, i: int) -> Split:
        """The i-th rho's filters as a :class:`utils.surgery.Split` of ``channel``."""
        return Split(channel, self.D1[i], self.D2[i], self.Res[i])


def sweep(weight_c: torch.Tensor, A1: torch.Tensor, A2: torch.Tensor, rhos: Iterable[float] = RHOS) -> Sweep:
    """Index sets and D1/D2/Res for every rho, from filter ``W[c]`` (C_in x kh x kw) and ARVs (C_in,)."""
    rhos = [float(r) for r in rhos]
    masks = [index_sets(A1.double(), A2.double(), r) for r in rhos]
    filters = [split_filters(weight_c.detach(), S1, S2) for S1, S2, _ in masks]
    S1, S2, S0 = (torch.stack([m[j] for m in masks]) for j in range(3))
    D1, D2, Res = (torch.stack([f[j] for f in filters]) for j in range(3))
    if not torch.equal(D1 + D2 - Res, weight_c.detach().expand_as(D1)):
        raise AssertionError("D1 + D2 - Res differs from the original filter")  # cannot happen: masks partition C_in
    return Sweep(torch.tensor(rhos, dtype=torch.float64), S1, S2, S0, D1, D2, Res)


def distinct_splits(sw: Sweep) -> tuple[torch.Tensor, torch.Tensor]:
    """Rhos with the same index sets share filters (and so scores): ``first`` (U,) = one rho index per
    distinct split, in sweep order; ``inverse`` (R,) = which distinct split each rho has."""
    _, inverse = torch.unique(torch.cat([sw.S1, sw.S2], 1), dim=0, return_inverse=True)
    order = {}
    for i, u in enumerate(inverse.tolist()):
        order.setdefault(u, len(order))
    first = torch.tensor([inverse.tolist().index(u) for u in order])
    return first, torch.tensor([order[u] for u in inverse.tolist()])


def positive_mass(y: torch.Tensor) -> torch.Tensor:
    """``pos(y) = sum_hw max(y, 0)`` per image and channel: (B x n x H' x W') -> (B x n), float64."""
    return y.clamp_min(0).double().sum(dim=(2, 3))


def ratio_sums(pos: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """Sums over a batch of the score's ratios (2 x R, float64).

    ``pos``: (B x 2R) positive masses of D1 (first R) and D2 (last R); ``concept``: (B,) in {1, 2}.
    Row 0: sum over concept-1 images of pos(D1)/(pos(D2)+eps); row 1: concept 2, pos(D2)/(pos(D1)+eps).
    """
    R = pos.shape[1] // 2
    p1, p2 = pos[:, :R], pos[:, R:]
    in1 = (concept == 1).to(pos)[:, None]
    in2 = (concept == 2).to(pos)[:, None]
    return torch.stack([(in1 * p1 / (p2 + EPS)).sum(0), (in2 * p2 / (p1 + EPS)).sum(0)])


def scores_from_sums(sums: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """score(rho) (R,) from accumulated ratio sums (2 x R) and the images per concept."""
    return sums[0] / n1 + sums[1] / n2


def best_index(scores: torch.Tensor) -> int:
    """Index of the first maximal score (sweep order decides ties)."""
    top = scores.max()
    return int((scores == top).nonzero()[0, 0])


def sweep_batch_sums(model: nn.Module, conv: nn.Conv2d, channel: int, sw: Sweep,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], int, int]:
    """The score's ratio sums of each batch (a list of 2 x U float64, U distinct splits), plus n1, n2.

    Under torchrun each rank runs this on its batches; added up in batch order (see
    :func:`scores_from_batch_sums`) they give exactly the single-process sums.
    """
    first, _ = distinct_splits(sw)
    weight = torch.cat([sw.D1[first], sw.D2[first]])  # 2n x C_in x kh x kw: the n D1s, then the n D2s
    bias = None if conv.bias is None else conv.bias.detach()[channel].expand(len(weight))
    parts: list[torch.Tensor] = []
    n1 = n2 = 0
    with torch.no_grad():
        for images, concept in batches:
            x = layer_input(model, conv, images)
            parts.append(ratio_sums(positive_mass(conv_with_filters(conv, x, weight, bias)), concept))
            n1 += int((concept == 1).sum())
            n2 += int((concept == 2).sum())
    return parts, n1, n2


def scores_from_batch_sums(sw: Sweep, parts: list[torch.Tensor], n1: int, n2: int,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """score per rho (R,, on the CPU) from the per-batch ratio sums, added in list order from zero."""
    first, inverse = distinct_splits(sw)
    sums = torch.zeros(2, len(first), dtype=torch.float64, device=device)
    for p in parts:
        sums += p.to(device)
    if n1 == 0 or n2 == 0:
        raise UserError("a concept has no images to score on")
    return scores_from_sums(sums, n1, n2).cpu()[inverse]


def sweep_scores(model: nn.Module, conv: nn.Conv2d, channel: int, sw: Sweep,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int, int]:
    """score per rho (R,) over ``batches`` of (images B x 3 x H x W, concept B in {1, 2}); plus n1, n2.

    Each image goes through the network once, and only up to ``conv``; rhos with the same index sets
    are scored once, so they tie exactly.
    """
    parts, n1, n2 = sweep_batch_sums(model, conv, channel, sw, batches)
    return scores_from_batch_sums(sw, parts, n1, n2, conv.weight.device), n1, n2


def max_logit_diff(original: nn.Module, disentangled: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Largest |original(images) - disentangled(images)| over all logits (full forwards)."""
    diff = 0.0
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size]
            diff = max(diff, float((original(x).float() - disentangled(x).float()).abs().max()))
    return diff


def check_concepts(c1: list[int], c2: list[int], class_counts: list[int]) -> None:
    """Refuse class indices outside the data, a class in both concepts, or a concept without images."""
    K = len(class_counts)
    for name, cs in (("concept 1", c1), ("concept 2", c2)):
        if not cs:
            raise UserError(f"{name} has no classes")
        for t in cs:
            if not 0 <= t < K:
                raise UserError(f"class {t} of {name} is outside the data's {K} classes (0..{K - 1})")
        if len(set(cs)) != len(cs):
            raise UserError(f"{name} lists a class twice: {cs}")
        if sum(class_counts[t] for t in cs) == 0:
            raise UserError(f"{name} (classes {cs}) has no training images")
    both = sorted(set(c1) & set(c2))
    if both:
        raise UserError(f"class {both[0]} is in both concepts; a concept split needs two different sets of classes")


# ------------------------------------------------------------------ the run


@dataclass
class Stage3Config(RunOptions):
    data_dir: str
    store_dir: str
    channel: int
    classes_for_concept1: list[int]
    classes_for_concept2: list[int]
    check_images: int = 32
    rank: int = 0  # under torchrun: this process's rank and the number of processes (see utils.distributed)
    world_size: int = 1


def _check_indices(idx1: list[int], idx2: list[int], n: int) -> set[int]:
    """Up to ``n`` images for the equivalence check, half from each concept where they have enough."""
    k2 = min(len(idx2), n // 2)
    k1 = min(len(idx1), n - k2)
    k2 = min(len(idx2), n - k1)
    return set(idx1[:k1] + idx2[:k2])


def _concept_batches(loader, images, device, members1: set[int], keep: set[int], kept: dict, bar) -> Iterator:
    """(images, concept) batches on ``device``; images whose index is in ``keep`` are copied into ``kept``."""
    for x, labels, index in loader:
        check_batch(images, labels, index)
        concept = torch.tensor([1 if int(t) in members1 else 2 for t in labels])
        for j, i in enumerate(index.tolist()):
            if i in keep:
                kept[i] = x[j].clone()
        yield x.to(device, non_blocking=True), concept.to(device)
        bar.update(len(labels))


def disentangle_channel(cfg: Stage3Config, loaded: LoadedModel | None = None, check=None) -> tuple[dict, Sweep]:
    """Run stage 3: returns the record (see :func:`save_record`) and the sweep; writes nothing.

    ``loaded`` replaces ``cfg.model``/``cfg.weights`` by a model already in memory;
    ``check(out_channels)`` is called once the layer is known (the script's channel-count check).
    """
    if cfg.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if cfg.check_images < 1:
        raise UserError("--check_images must be at least 1")
    c1, c2 = [int(t) for t in cfg.classes_for_concept1], [int(t) for t in cfg.classes_for_concept2]
    lm = loaded or load_model(cfg.model, cfg.weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    default = default_layer(lm.model)
    if check is not None:
        check(conv.out_channels)
    if not 0 <= cfg.channel < conv.out_channels:
        raise UserError(f"channel {cfg.channel} is outside layer {layer}, which has {conv.out_channels} "
                        f"channels (0..{conv.out_channels - 1})")
    store = st.Store.open(os.path.join(cfg.store_dir, st.store_name(lm.name, layer, default)))
    store.check(model=lm.name, weights=lm.weights, layer=layer)
    counts = [int(n) for n in store.class_counts]
    check_concepts(c1, c2, counts)
    images = list_images(cfg.data_dir, "train", store.meta.get("max_images_per_class"))
    if images.fingerprint() != store.meta["data_fingerprint"]:
        raise UserError(f"the training images in {cfg.data_dir} are not those of store {store.path} "
                        f"(made from {store.meta.get('data_root')}); pass the same --data_dir as in stage 1")
    device = resolve_device(cfg.device, cfg.gpu)

    # ARVs and the sweep (closed form, no images)
    A1, A2 = concept_arv(store, cfg.channel, c1), concept_arv(store, cfg.channel, c2)  # as stage 2 computes them
    sw = sweep(conv.weight.detach()[cfg.channel].cpu(), A1, A2)

    # the pass: one truncated forward per concept image (under torchrun, each rank a block of whole batches)
    model = lm.model.to(device).eval()
    members1 = set(c1)
    idx1, idx2 = images.indices_of(c1), images.indices_of(c2)
    keep = _check_indices(idx1, idx2, cfg.check_images)
    kept: dict[int, torch.Tensor] = {}
    order = sorted(idx1 + idx2)
    rank, world = cfg.rank, cfg.world_size
    lo, hi = batch_shard(len(order), cfg.batch_size, rank, world)
    mine = order[lo:hi]
    loader = make_loader(images, mine, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")
    desc = "stage 3" if world == 1 else f"stage 3 (rank 0 of {world})"
    bar = tqdm(total=len(mine), unit="img", desc=desc, disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    result: dict = {}

    def run() -> None:
        result["pass"] = sweep_batch_sums(model, conv.to(device), cfg.channel, sw,
                                          _concept_batches(loader, images, device, members1, keep, kept, bar))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run_together(run, world, device, "stage 3")
    seconds = reduce_over_ranks(time.perf_counter() - t0, world, device)
    bar.close()
    parts, n1, n2 = result["pass"]
    if world > 1:  # every rank's batch sums, in rank order = batch order of the single-process pass
        U = len(distinct_splits(sw)[0])
        mine = torch.stack([p.cpu().flatten() for p in parts]) if parts else torch.zeros(0, 2 * U, dtype=torch.float64)
        parts = list(all_gather_rows(mine, world, device).view(-1, 2, U))
        counts = all_gather_rows(torch.tensor([[n1, n2]], dtype=torch.float64), world, device)
        n1, n2 = (int(v) for v in counts.sum(0))
    scores = scores_from_batch_sums(sw, parts, n1, n2, device if world == 1 else "cpu")
    best = best_index(scores)

    # equivalence: full forwards of both networks on a few concept images, at the best rho (rank 0)
    record = {
        "format_version": RECORD_VERSION,
        "model": lm.name,
        "weights": lm.weights,
        "layer": layer,
        "default_layer": layer == default,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "channel": int(cfg.channel),
        "classes_for_concept1": c1,
        "classes_for_concept2": c2,
        "class_names": {str(t): _class_name(store.meta, t) for t in c1 + c2},
        "store": os.path.abspath(store.path),
        "data_dir": os.path.abspath(cfg.data_dir),
        "data_fingerprint": store.meta["data_fingerprint"],
        "rhos": [round(float(r), 2) for r in sw.rhos],
        "scores": {_key(r): float(s) for r, s in zip(sw.rhos, scores)},
        "best_rho": round(float(sw.rhos[best]), 2),
        "sources": {_key(r): {"concept1": _ids(sw.S1[i]), "concept2": _ids(sw.S2[i]), "shared": _ids(sw.S0[i])}
                    for i, r in enumerate(sw.rhos)},
        "max_abs_logit_diff": None,
        "equivalence_images": len(keep),
        "train_images": {"concept1": n1, "concept2": n2},
        "filters": "filters.pt",
        "seconds": seconds,
        "images_per_second": (n1 + n2) / max(seconds, 1e-9),
    }
    checked: dict = {}

    def check_logits() -> None:  # rank 0 alone; the others wait for its answer
        if rank != 0:
            return
        missing = sorted(keep - set(kept))  # check images that were in other ranks' shares
        for x, _, index in make_loader(images, missing, cfg.batch_size, 0) if missing else ():
            for j, i in enumerate(index.tolist()):
                kept[i] = x[j]
        check_x = torch.stack([kept[i] for i in sorted(kept)]).to(device)
        net = _split_network(model, layer, sw.split(cfg.channel, best))
        checked["diff"] = max_logit_diff(model, net, check_x, cfg.batch_size)

    run_together(check_logits, world, device, "stage 3")
    diff = broadcast_float(checked.get("diff"), world, device)
    record["max_abs_logit_diff"] = diff
    if not diff <= MAX_LOGIT_DIFF:
        raise UserError(f"the disentangled network's logits differ from the original's by {diff:.3g} "
                        f"(> {MAX_LOGIT_DIFF:g}) on {len(keep)} concept images; nothing written")
    return record, sw


def _split_network(model: nn.Module, layer: str, split: Split) -> nn.Module:
    """``model`` with ``layer`` replaced by its split layer (a copy; the original is untouched)."""
    net = copy.deepcopy(model)
    _, conv = get_layer(net, layer)
    set_module(net, layer, make_split_layer(conv, [split]))
    return net.eval()


def _class_name(meta: dict, t: int) -> str:
    names = meta.get("class_names") or meta["classes"]
    return str(names[t])


def _key(rho) -> str:
    return f"{float(rho):.2f}"


def _ids(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


RECORD_KEYS = ("format_version", "model", "weights", "layer", "default_layer", "in_channels", "out_channels",
               "channel", "classes_for_concept1", "classes_for_concept2", "class_names", "store", "data_dir",
               "data_fingerprint", "rhos", "scores", "best_rho", "sources", "max_abs_logit_diff",
               "equivalence_images", "train_images", "filters", "seconds", "images_per_second")


def record_folder(store_dir: str, record: dict) -> str:
    """``<store_dir>/models_disentangled/<record_name>``."""
    default = record["layer"] if record["default_layer"] else None  # record_name only compares the two
    name = record_name(record["model"], record["layer"], default, record["channel"],
                       record["classes_for_concept1"], record["classes_for_concept2"])
    return os.path.join(store_dir, "models_disentangled", name)


def save_record(folder: str, record: dict, sw: Sweep) -> list[str]:
    """Write ``filters.pt`` and ``record.json`` into ``folder``, each atomically; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    fpath = os.path.join(folder, "filters.pt")
    tmp = f"{fpath}.tmp-{os.getpid()}"
    filters = {"rhos": sw.rhos.clone(), "D1": sw.D1.contiguous().clone(), "D2": sw.D2.contiguous().clone(),
               "Res": sw.Res.contiguous().clone()}
    try:
        torch.save(filters, tmp)
        os.replace(tmp, fpath)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    rpath = os.path.join(folder, "record.json")
    st.write_json(rpath, {k: record[k] for k in RECORD_KEYS})
    return [rpath, fpath]
