"""Stage 1: one pass over train/ that fills the store (relevance, labels, predictions, input sums).

Work is cut into chunks of consecutive images (a fixed number of batches each), written and assembled
by ``utils.chunks``: a rerun continues where a killed run stopped and ends with the same arrays.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from . import chunks, store as st
from .chunks import ChunkPlan, assemble, chunk_path, missing_chunks, remove_partial
from .cli import RunOptions
from .concepts import ClassNames
from .data import ImageList, check_batch, list_images, make_loader, resolve_device
from .distributed import reduce_over_ranks, run_together
from .errors import UserError
from .models import LoadedModel, default_layer, get_layer, load_model
from .files import read_json, save_npy, write_json
from .relevance import capture_layer, relevance_batch

DEFAULT_CHUNK_IMAGES = 4096
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Stage1Config(RunOptions):
    data_dir: str
    store_dir: str
    max_images_per_class: int | None = None
    chunk_images: int | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast dtype of the forward and backward pass
    rank: int = 0
    world_size: int = 1


def _new_meta(cfg: Stage1Config, lm: LoadedModel, layer: str, conv, images: ImageList, in_shape, out_hw,
              chunk_images: int) -> dict:
    names = ClassNames(lm.categories, images.classes)
    return {
        "format_version": st.FORMAT_VERSION,
        "complete": False,
        "model": lm.name,
        "weights": lm.weights,
        "layer": layer,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "input_shape": list(in_shape),
        "output_hw": list(out_hw),
        "conv": {"kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
                 "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
                 "dilation": list(conv.dilation), "padding_mode": conv.padding_mode,
                 "bias": conv.bias is not None},
        "data_root": os.path.dirname(images.root),
        "split": os.path.basename(images.root),
        "data_fingerprint": images.fingerprint(),
        "max_images_per_class": cfg.max_images_per_class,
        "num_images": len(images),
        "classes": images.classes,
        "class_names": [names.name(t) for t in range(len(images.classes))] if names.categories else None,
        "class_counts": images.class_counts(),
        "relevance_dtype": "float16",
        "precision": cfg.precision,
        "chunk_images": chunk_images,
        "batch_size": cfg.batch_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _probe_shapes(model, conv, device) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Layer input shape (C_in, H, W) and output size (H', W') for one 224x224 image."""
    with torch.no_grad():
        with capture_layer(conv) as cap:
            model(torch.zeros(1, 3, 224, 224, device=device))
    return tuple(cap.x.shape[1:]), tuple(cap.a.shape[2:])


def prepare(cfg: Stage1Config, loaded: LoadedModel | None = None):
    """Validate inputs and load what the pass needs; raises UserError before anything is written."""
    if cfg.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    images = list_images(cfg.data_dir, "train", cfg.max_images_per_class)
    lm = loaded or load_model(cfg.model, cfg.weights)
    if lm.num_classes and len(images.classes) > lm.num_classes:
        raise UserError(f"{cfg.data_dir}/train has {len(images.classes)} classes but {cfg.model} "
                        f"has only {lm.num_classes} outputs")
    layer, conv = get_layer(lm.model, cfg.layer)
    path = os.path.join(cfg.store_dir, st.store_name(lm.name, layer, default_layer(lm.model)))
    return images, lm, layer, conv, path


def compute_importances(cfg: Stage1Config, check: Callable[[int], None] | None = None,
                        loaded: LoadedModel | None = None) -> dict:
    """Run stage 1 (or continue it) and return a summary dict (store path, images, seconds, ...).

    ``check`` is called with the layer's number of output channels before anything is written.
    ``loaded`` replaces ``cfg.model``/``cfg.weights`` by a model already in memory (tests, notebooks).
    Under ``torchrun`` (``cfg.world_size > 1``) every rank calls this; a UserError on any rank
    stops all of them (none waits forever for a failed peer).
    """
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")
    images, lm, layer, conv, path = prepare(cfg, loaded)
    if check is not None:
        check(conv.out_channels)
    device = resolve_device(cfg.device, cfg.gpu)
    summary = {"store": path, "images": len(images), "channels": conv.out_channels}
    created = not _existing_store_fits(cfg, lm, layer, images, path)
    if _is_complete(path):
        return {**summary, "already_complete": True, "processed": 0, "seconds": 0.0, "images_per_second": 0.0}
    model = lm.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    in_shape, out_hw = _probe_shapes(model, conv, device)
    run_together(lambda: _create_store(cfg, lm, layer, conv, images, in_shape, out_hw, path)
                 if created and cfg.rank == 0 else None, cfg.world_size, device, "stage 1")
    meta = read_json(os.path.join(path, "meta.json"))  # rank 0 wrote it before the others got here
    os.makedirs(os.path.join(path, "chunks"), exist_ok=True)
    plan = ChunkPlan(len(images), meta["chunk_images"], cfg.batch_size)
    todo = [j for j in range(plan.count) if j % cfg.world_size == cfg.rank and not os.path.isfile(chunk_path(path, j))]
    try:
        seconds, done = run_together(lambda: _run_chunks(cfg, model, conv, images, path, plan, todo, device),
                                     cfg.world_size, device, "stage 1")
    except UserError:
        if created and cfg.rank == 0:  # every rank has stopped writing by now
            remove_partial(path)
        raise
    done = int(reduce_over_ranks(done, cfg.world_size, device, "sum"))
    seconds = reduce_over_ranks(seconds, cfg.world_size, device)  # the job's time: its slowest process
    if cfg.rank == 0:
        missing = missing_chunks(path, plan)
        if missing:
            raise UserError(f"store {path} is missing {len(missing)} chunks; rerun to finish it")
        assemble(path, meta, plan)
    return {**summary, "processed": done, "seconds": seconds, "images_per_second": done / max(seconds, 1e-9)}


def _existing_store_fits(cfg: Stage1Config, lm: LoadedModel, layer: str, images: ImageList, path: str) -> bool:
    """True when ``path`` holds a store of this very run (to continue or reuse); False when there is none.

    A store made with another model, weights, layer, image list or precision is refused.
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    meta = read_json(meta_path)
    wanted = {"model": lm.name, "weights": lm.weights, "layer": layer, "data_fingerprint": images.fingerprint(),
              "max_images_per_class": cfg.max_images_per_class}
    diff = st.identity_difference(meta, wanted)
    if diff is None and meta.get("precision", "fp32") != cfg.precision:
        diff = f"--precision: store has {meta.get('precision', 'fp32')!r}, this run has {cfg.precision!r}"
    if diff:
        raise UserError(f"store {path} was made with another {diff}; use another --store_dir")
    return True


def _is_complete(path: str) -> bool:
    meta_path = os.path.join(path, "meta.json")
    return os.path.isfile(meta_path) and bool(read_json(meta_path).get("complete"))


def _create_store(cfg: Stage1Config, lm: LoadedModel, layer: str, conv, images: ImageList, in_shape, out_hw,
                  path: str) -> dict:
    """Write a new store's layer weights and ``meta.json`` (rank 0); returns the meta."""
    os.makedirs(os.path.join(path, "chunks"), exist_ok=True)
    chunk_images = cfg.chunk_images or max(1, DEFAULT_CHUNK_IMAGES // cfg.batch_size) * cfg.batch_size
    meta = _new_meta(cfg, lm, layer, conv, images, in_shape, out_hw, chunk_images)
    save_npy(os.path.join(path, "layer_weight.npy"), conv.weight.detach().float().cpu().numpy())
    if conv.bias is not None:
        save_npy(os.path.join(path, "layer_bias.npy"), conv.bias.detach().float().cpu().numpy())
    write_json(os.path.join(path, "meta.json"), meta)
    return meta


def _add_class_sums(sums: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> None:
    """``sums[t] += sum of x over the batch's images of class t`` (float64), deterministically.

    CPU ``index_add_`` adds in a fixed order; on CUDA it uses atomics, so a one-hot matmul is used
    (built with scatter_, which unlike one_hot never synchronises with the host).
    """
    if x.is_cuda:
        onehot = torch.zeros(len(labels), sums.shape[0], dtype=torch.float64, device=x.device)
        onehot.scatter_(1, labels[:, None], 1.0)
        sums += (onehot.T @ x.flatten(1).double()).view_as(sums)
    else:
        sums.index_add_(0, labels, x.double())


def _run_chunks(cfg, model, conv, images, path, plan: ChunkPlan, todo: list[int], device) -> tuple[float, int]:
    """The pass itself: stream the pending chunks' batches, write each chunk when it is full.
    Returns the seconds taken and the images done."""
    batches = list(plan.batches(todo))
    loader = make_loader(images, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    desc = "stage 1" if cfg.world_size == 1 else f"stage 1 (rank 0 of {cfg.world_size})"
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=desc,
               disable=not cfg.progress or cfg.rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    done = 0
    try:
        it = iter(loader)
        for j in todo:
            lo, hi = plan.bounds(j)
            chunks.write_chunk(path, j, *_chunk_results(cfg, model, conv, images, device, it, hi - lo, bar))
            done += hi - lo
    except BaseException:
        bar.leave = False  # clear the bar, so that an error message starts on a clean line
        raise
    finally:
        bar.close()
    return time.perf_counter() - start, done


def _chunk_results(cfg, model, conv, images, device, it: Iterator, n: int, bar):
    """Relevance, predictions, labels and per-class input sums of the next ``n`` images of ``it``.

    Results stay on the device until the chunk is complete, then come to the host in one copy:
    no per-batch host synchronisation on CUDA.
    """
    cuda = device.type == "cuda"
    dtype = PRECISIONS[cfg.precision]
    rels, preds, tgts, sums = [], [], [], None
    while n > 0:
        x_img, labels, index = next(it)
        check_batch(images, labels, index)  # on the host labels: no device round trip
        x_img = x_img.to(device, non_blocking=True, memory_format=torch.channels_last if cuda else torch.preserve_format)
        lab = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            R, pred, _, x = relevance_batch(model, conv, x_img, lab)
        if sums is None:
            sums = torch.zeros((len(images.classes), *x.shape[1:]), dtype=torch.float64, device=device)
        _add_class_sums(sums, lab, x)
        rels.append(R.to(torch.float16))
        preds.append(pred)
        tgts.append(labels)
        n -= len(labels)
        bar.update(len(labels))
    return torch.cat(rels), torch.cat(preds), torch.cat(tgts), sums
