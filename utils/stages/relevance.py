"""Stage 1: one pass over train/ that fills the store (relevance, labels, predictions, per-class tap sums).

For a position-wise Linear, positions are those that count (``utils.model.units``): the store records the choice.

Work is cut into chunks of consecutive images (a fixed number of batches each), written and assembled
by ``utils.store.chunks``: a rerun continues where a killed run stopped and ends with the same arrays.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..store import chunks
from ..store import layout as st
from ..method.arv import batch_tap_sums, tap_maps
from ..store.chunks import ChunkPlan, assemble, chunk_path, missing_chunks, remove_partial
from ..data.classes import ClassMap, ClassNames, data_class_map
from ..data.images import ImageList, list_images
from ..passes.distributed import check_one_folder
from ..passes.image_pass import Batch, RunOptions, Runner, finite_rows
from ..defaults import NEAR_CHANCE
from ..errors import UserError
from ..files import check_writable, read_json, save_npy, write_json
from ..store.lock import writer_lock
from ..model.loading import LoadedModel, get_layer, load_model
from ..data.preprocess import InputSpec
from ..store.provenance import provenance
from ..model.hooks import LossScale, capture_layer, relevance_logits, resolve_positions
from ..model.units import Unit

DEFAULT_CHUNK_IMAGES = 4096
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Stage1Config(RunOptions):
    data_dir: str
    store_dir: str
    max_images_per_class: int | None = None
    chunk_images: int | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast dtype of the forward and backward pass (fp16: loss-scaled)
    wait: bool = False  # another job writes this store: wait for it (else one line and stop)
    positions: str = "auto"  # a Linear's positions that count: auto (those that reach the logits), all, cls


def _new_meta(cfg: Stage1Config, lm: LoadedModel, layer: str, unit: Unit, images: ImageList, cmap: ClassMap,
              in_shape, out_hw, chunk_images: int) -> dict:
    """A new store's ``meta.json``; a Linear layer adds ``unit`` and ``positions`` (a Conv2d's store is as before)."""
    names = ClassNames(lm.categories, images.classes, [cmap.index[f] for f in images.classes])
    conv = unit.geometry()
    kind = {"unit": "Linear", "positions": unit.positions} if unit.linear else {}
    return {
        "format_version": st.FORMAT_VERSION, "complete": False, "model": lm.name, "weights": lm.weights,
        "layer": layer, **kind, "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "input_shape": list(in_shape), "output_hw": list(out_hw), "tap_shape": [conv.in_channels, *conv.kernel_size],
        "conv": {"kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
                 "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
                 "dilation": list(conv.dilation), "padding_mode": conv.padding_mode, "bias": conv.bias is not None},
        "preprocess": lm.preprocess.to_json(), "provenance": provenance(transform=lm.preprocess),
        "data_root": os.path.dirname(images.root), "split": os.path.basename(images.root),
        "data_fingerprint": images.fingerprint(), "class_fingerprints": images.class_fingerprints(),
        "max_images_per_class": cfg.max_images_per_class, "num_images": len(images),
        "classes": images.classes, "class_index": cmap.index, "num_classes": cmap.num_classes,
        "class_names": [names.name(t) for t in range(cmap.num_classes)] if names.categories else None,
        "class_counts": images.class_counts(cmap.num_classes),
        "relevance_dtype": "float32", "precision": cfg.precision, "chunk_images": chunk_images,
        "batch_size": cfg.batch_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _probe_shapes(model, unit: Unit, side: int, device) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Layer input shape (C_in, H, W) and output size (H', W') at the positions that count, for one image of
    ``side`` x ``side`` pixels."""
    with torch.no_grad():
        with capture_layer(unit) as cap:
            model(torch.zeros(1, 3, side, side, device=device))
    return tuple(unit.counted(cap.x).shape[1:]), tuple(unit.counted(cap.a).shape[2:])


@dataclass
class Prepared:
    """What the pass needs, checked before anything is written."""

    images: ImageList
    classes: ClassMap
    lm: LoadedModel
    layer: str
    unit: Unit  # the layer, with the positions that count resolved
    path: str


def prepare(cfg: Stage1Config, loaded: LoadedModel | None = None) -> Prepared:
    """Validate inputs and load what the pass needs; raises UserError before anything is written."""
    cfg.check()
    if cfg.max_images_per_class is not None and cfg.max_images_per_class < 1:
        raise UserError("--max_images_per_class must be at least 1")
    lm = loaded or load_model(cfg.model, cfg.weights, inputs=InputSpec.of(cfg))
    cmap = data_class_map(cfg.data_dir, "train", lm.num_classes, cfg.class_index)
    images = list_images(cfg.data_dir, "train", cfg.max_images_per_class, cmap)
    layer, unit = get_layer(lm.model, cfg.layer)
    unit = Unit(unit.module, resolve_positions(lm.model, unit.module, cfg.positions, lm.preprocess.crop))
    path = st.store_path(cfg.store_dir, lm, layer)
    return Prepared(images, cmap, lm, layer, unit, path)


def compute_relevance(cfg: Stage1Config, check: Callable[[int], None] | None = None,
                        loaded: LoadedModel | None = None) -> dict:
    """Run stage 1 (or continue it) and return a summary dict (store path, images, seconds, ...).

    ``check`` is called with the layer's number of output channels before anything is written.
    ``loaded`` replaces ``cfg.model``/``cfg.weights`` by a model already in memory (tests, notebooks); it is
    left as it was given. One job writes a store at a time (``cfg.wait``: wait for another one to finish).
    Under ``torchrun`` (``cfg.world_size > 1``) every rank calls this and rank 0 holds the store's lock; a
    UserError on any rank stops all of them within one chunk (none waits forever for a failed peer).
    """
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")
    check_one_folder(cfg.store_dir, cfg.world_size, Runner.of(cfg).device, "--store_dir", "stage 1")
    job = prepare(cfg, loaded)
    if check is not None:
        check(job.unit.out_channels)
    runner = Runner.of(cfg)
    with contextlib.ExitStack() as held:
        runner.together(lambda: _claim(cfg, job, held), "stage 1")
        summary = _fill(cfg, job, runner)
    if runner.lead:
        summary["accuracy"] = st.Store.open(job.path).accuracy
    runner.together(lambda: None, "stage 1")  # every rank returns once rank 0 has assembled the store and let go
    return summary


def accuracy_lines(accuracy: float | None, classes: int) -> list[str]:
    """The model's accuracy on the training images as this tool feeds them; a note when it is near chance (below
    twice 1/classes), which asks after the input transform."""
    if accuracy is None:
        return []
    lines = [f"the model's accuracy on these training images, as fed to it: {accuracy:.1%}"]
    if classes > 1 and accuracy < NEAR_CHANCE / classes:
        lines.append(f"note: that is near chance (1/{classes} = {1 / classes:.1%}): is the input transform the one "
                     "the model was trained with? (--input_size, --resize, --mean, --std)")
    return lines


def _claim(cfg: Stage1Config, job: Prepared, held: contextlib.ExitStack) -> None:
    """Rank 0: the store's folder takes files, and this job holds its write lock until it returns."""
    if cfg.rank == 0:
        check_writable(cfg.store_dir)
        held.enter_context(writer_lock(job.path, cfg.wait))


def _fill(cfg: Stage1Config, job: Prepared, runner: Runner) -> dict:
    """Create or continue the store at ``job.path`` (its lock held): the pass, then the assembly."""
    summary = {"store": job.path, "images": len(job.images), "channels": job.unit.out_channels,
               "classes": len(set(job.images.targets)), "provenance": provenance(transform=job.lm.preprocess)}
    created = not _existing_store_fits(cfg, job)
    if _is_complete(job.path):
        st.Store.open(job.path, writer=True)  # checked file by file before it is called complete
        return {**summary, "already_complete": True, "processed": 0, "seconds": 0.0, "images_per_second": 0.0}
    model = runner.model(job.lm.model)
    unit = Unit(model.get_submodule(job.layer), job.unit.positions)
    in_shape, out_hw = _probe_shapes(model, unit, job.lm.preprocess.crop, runner.device)
    runner.together(lambda: _create_store(cfg, job, in_shape, out_hw, created) if runner.lead else None, "stage 1")
    meta = read_json(os.path.join(job.path, "meta.json"))  # rank 0 wrote it before the others got here
    os.makedirs(os.path.join(job.path, "chunks"), exist_ok=True)
    plan = ChunkPlan(len(job.images), meta["chunk_images"], cfg.batch_size)
    todo = [j for j in range(plan.count) if j % runner.world == runner.rank and not os.path.isfile(chunk_path(job.path, j))]
    ip = runner.image_pass(job.images, list(plan.batches(todo)), job.lm.preprocess, "stage 1", shard=False)
    try:
        ran = ip.run(lambda batches: _run_chunks(cfg, job, model, unit, in_shape, plan, todo, batches))
    except UserError:
        if runner.lead:  # every rank has stopped writing by now
            _clear_stop(job.path)
            if created:
                remove_partial(job.path)
        raise
    runner.together(lambda: _assemble(job, meta, plan) if runner.lead else None, "stage 1")
    return {**summary, "processed": ran.images, "seconds": ran.seconds,
            "images_per_second": ran.images / max(ran.seconds, 1e-9)}


def _assemble(job: Prepared, meta: dict, plan: ChunkPlan) -> None:
    """Rank 0: every chunk is there; the final arrays from them."""
    missing = missing_chunks(job.path, plan)
    if missing:
        raise UserError(f"store {job.path} is missing {len(missing)} chunks; rerun to finish it")
    assemble(job.path, meta, plan)


def _stop_path(path: str) -> str:
    """Under torchrun, a failing process leaves this flag; the others stop before their next chunk."""
    return os.path.join(path, ".stop")


def _clear_stop(path: str) -> None:
    if os.path.exists(_stop_path(path)):
        os.remove(_stop_path(path))


def _existing_store_fits(cfg: Stage1Config, job: Prepared) -> bool:
    """True when ``job.path`` holds a store of this very run (to continue or reuse); False when there is none.

    A store made with another model, weights, layer, image list or precision is refused.
    """
    if not os.path.isfile(os.path.join(job.path, "meta.json")):
        return False
    meta = st.read_meta(job.path)
    legacy = meta.get("format_version") == 1
    diff = st.model_difference(job.path, meta, job.lm, job.layer, job.unit, max_images_per_class=cfg.max_images_per_class,
                               data_fingerprint=job.images.legacy_fingerprint() if legacy else job.images.fingerprint())
    if diff is None and meta.get("positions", "all") != job.unit.positions:
        diff = f"--positions: store has {meta.get('positions', 'all')!r}, this run has {job.unit.positions!r}"
    if diff is None and meta.get("precision", "fp32") != cfg.precision:
        diff = f"--precision: store has {meta.get('precision', 'fp32')!r}, this run has {cfg.precision!r}"
    if diff:
        raise UserError(f"store {job.path} was made with another {diff}; use another --store_dir")
    if legacy and not meta.get("complete"):
        raise UserError(f"store {job.path} is an unfinished store of an older format; run stage 1 into a new --store_dir")
    return True


def _is_complete(path: str) -> bool:
    meta_path = os.path.join(path, "meta.json")
    return os.path.isfile(meta_path) and bool(read_json(meta_path).get("complete"))


def _create_store(cfg: Stage1Config, job: Prepared, in_shape, out_hw, created: bool) -> None:
    """Rank 0: write a new store's layer weights and ``meta.json`` (``created``), and clear a stop flag an
    earlier failed job left."""
    if not created:
        _clear_stop(job.path)
        return
    os.makedirs(os.path.join(job.path, "chunks"), exist_ok=True)
    chunk_images = cfg.chunk_images or max(1, DEFAULT_CHUNK_IMAGES // cfg.batch_size) * cfg.batch_size
    meta = _new_meta(cfg, job.lm, job.layer, job.unit, job.images, job.classes, in_shape, out_hw, chunk_images)
    save_npy(os.path.join(job.path, "layer_weight.npy"), job.unit.weight.detach().float().cpu().numpy())
    if job.unit.bias is not None:
        save_npy(os.path.join(job.path, "layer_bias.npy"), job.unit.bias.detach().float().cpu().numpy())
    write_json(os.path.join(job.path, "meta.json"), meta)


def _run_chunks(cfg, job: Prepared, model, unit: Unit, in_shape, plan: ChunkPlan, todo: list[int],
                batches: Iterator[Batch]) -> None:
    """The pass itself: the pending chunks' batches, each chunk written when it is full. Under torchrun a
    failing process leaves the stop flag, and the others stop before their next chunk."""
    maps = tap_maps(unit.geometry(), tuple(in_shape[1:])).to(unit.weight.device)
    try:
        for j in todo:
            if cfg.world_size > 1 and os.path.exists(_stop_path(job.path)):
                raise UserError("stage 1 stopped: another process of this job failed (see its error)")
            lo, hi = plan.bounds(j)
            sums = torch.zeros(job.classes.num_classes, unit.in_channels * maps.shape[0], dtype=torch.float64,
                               device=maps.device)
            chunks.write_chunk(job.path, j, *_chunk_results(cfg, job, model, unit, maps, sums, batches, hi - lo))
    except BaseException:
        if cfg.world_size > 1:  # tell the other processes to stop at their next chunk
            open(_stop_path(job.path), "w").close()
        raise


def add_class_tap_sums(sums: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, maps: torch.Tensor) -> None:
    """``sums[t] += tap sums of the batch's images of class t`` (K x C_in*T, float64), deterministically on
    every device: a one-hot matmul (built with scatter_, which never waits for the host)."""
    onehot = torch.zeros(len(labels), sums.shape[0], dtype=torch.float64, device=sums.device)
    sums += onehot.scatter_(1, labels[:, None], 1.0).T @ batch_tap_sums(x, maps).flatten(1)


def _chunk_results(cfg, job: Prepared, model, unit: Unit, maps, sums, batches: Iterator[Batch], n: int):
    """Relevance (float32), predictions and labels of the next ``n`` images of ``batches``, and their per-class tap
    sums added into ``sums`` (K x C_in*T).

    Results stay on the device until the chunk is complete, then come to the host in one copy:
    no per-batch host synchronisation on a GPU (``--precision fp16`` excepted: its loss scaling looks at every
    batch's gradient, see :class:`utils.model.hooks.LossScale`; each chunk starts at the same scale, so a resumed run
    computes a chunk as an uninterrupted one does). An image, logit or relevance that is not finite (a NaN
    image, a float16 overflow) is a UserError naming the image; the chunk is not written.
    """
    dtype = PRECISIONS[cfg.precision]
    scale = LossScale() if dtype == torch.float16 else None
    rels, preds, tgts, index, finite = [], [], [], [], []
    while n > 0:
        b = next(batches)
        with torch.autocast(b.x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            R, logits, _, x = relevance_logits(model, unit, b.x, b.labels, scale=scale)
        add_class_tap_sums(sums, b.labels, unit.counted(x), maps)
        rels.append(R)
        preds.append(logits.argmax(1))
        tgts.append(b.targets)
        index.append(b.index)
        finite.append(torch.stack([finite_rows(b.x), finite_rows(logits), finite_rows(R)], 1))
        n -= len(b)
    finite = torch.cat(finite).cpu()
    if not bool(finite.all()):
        raise UserError(_not_finite(cfg, job.images, torch.cat(index), finite))
    return torch.cat(rels), torch.cat(preds), torch.cat(tgts), sums


def _not_finite(cfg, images: ImageList, index: torch.Tensor, finite: torch.Tensor) -> str:
    """The line for the first image of a chunk whose image, logits or relevance (``finite``: B x 3) is not finite."""
    row = int((~finite.all(1)).nonzero()[0, 0])
    image, logits, _ = finite[row].tolist()
    what = f"training image {images.paths[int(index[row])]}"
    if not image:
        return f"{what} holds NaN or infinite values: fix it or leave it out (stage 1 stopped there)"
    where = {"fp16": " in float16 (beyond +-65504)", "bf16": " in bfloat16"}.get(cfg.precision, "")
    instead = {"fp16": "; run stage 1 with --precision bf16 (float32's range) or fp32",
               "bf16": "; run stage 1 with --precision fp32"}.get(cfg.precision, "")
    if not logits:
        return f"the model's logits are not finite (inf or NaN) on {what}, a finite image: they overflow{where}{instead}"
    return f"the relevance of {what} is not finite: the backward pass overflows{where}{instead}"
