"""Stage 1: one pass over train/ that fills the store (relevance, labels, predictions, input sums).

Work is cut into chunks of consecutive images (a fixed number of batches each). A finished chunk is
one atomically written ``chunks/chunk_XXXXXX.npz``; a rerun skips finished chunks, so a kill at any
moment loses at most the chunk in flight. When every chunk exists, they are assembled, in order,
into the final arrays. The per-class input sums are added chunk by chunk in chunk order, so the
result does not depend on how chunks were split between runs or processes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import store as st
from .data import ImageList, check_batch, list_images, make_loader, resolve_device
from .cli import RunOptions
from .distributed import reduce_over_ranks, run_together
from .errors import UserError
from .models import LoadedModel, default_layer, get_layer, load_model
from .relevance import capture_layer, relevance_batch

DEFAULT_CHUNK_IMAGES = 4096
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Test hook: "RANK:K" makes process RANK exit abruptly (as if killed) after writing K chunks.
EXIT_AFTER_ENV = "DISENTANGLE_TEST_EXIT_AFTER_CHUNKS"


@dataclass
class Stage1Config(RunOptions):
    data_dir: str
    store_dir: str
    max_images_per_class: int | None = None
    chunk_images: int | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast dtype of the forward and backward pass
    rank: int = 0
    world_size: int = 1
    after_chunk: Callable[[int], None] | None = field(default=None, repr=False)  # test hook


class _Chunks:
    """The chunk plan: chunk ``j`` covers images ``[j*size, min((j+1)*size, N))``."""

    def __init__(self, n: int, size: int, batch_size: int):
        self.n, self.size, self.batch_size = n, size, batch_size
        self.count = (n + size - 1) // size

    def bounds(self, j: int) -> tuple[int, int]:
        return j * self.size, min((j + 1) * self.size, self.n)

    def batches(self, chunks: list[int]):
        for j in chunks:
            lo, hi = self.bounds(j)
            for b in range(lo, hi, self.batch_size):
                yield list(range(b, min(b + self.batch_size, hi)))


def _chunk_path(path: str, j: int) -> str:
    return os.path.join(path, "chunks", f"chunk_{j:06d}.npz")


def _new_meta(cfg: Stage1Config, lm: LoadedModel, layer: str, conv, images: ImageList, in_shape, out_hw,
              chunk_images: int) -> dict:
    names = lm.categories if lm.categories and len(lm.categories) >= len(images.classes) else None
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
        "class_names": names[: len(images.classes)] if names else None,
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


def _assemble(path: str, meta: dict, plan: _Chunks) -> None:
    """Join the chunk files, in order, into the final arrays; then mark the store complete."""
    n, C = meta["num_images"], meta["out_channels"]
    K = len(meta["classes"])
    rel_tmp = os.path.join(path, "relevance.npy.partial")
    rel = np.lib.format.open_memmap(rel_tmp, mode="w+", dtype=np.float16, shape=(n, C))
    targets = np.empty(n, np.int64)
    preds = np.empty(n, np.int64)
    sums = np.zeros((K, *meta["input_shape"]), np.float64)
    for j in range(plan.count):
        lo, hi = plan.bounds(j)
        with np.load(_chunk_path(path, j), allow_pickle=False) as z:
            rel[lo:hi] = z["relevance"]
            targets[lo:hi] = z["targets"]
            preds[lo:hi] = z["predictions"]
            sums[z["sum_classes"]] += z["sums"]
    rel.flush()
    del rel
    os.replace(rel_tmp, os.path.join(path, "relevance.npy"))
    st.save_npy(os.path.join(path, "targets.npy"), targets)
    st.save_npy(os.path.join(path, "predictions.npy"), preds)
    st.save_npy(os.path.join(path, "input_sums.npy"), sums)
    meta["complete"] = True
    st.write_json(os.path.join(path, "meta.json"), meta)
    # rmtree, not rmdir: a killed run can leave a half-written chunk_*.tmp-* behind
    shutil.rmtree(os.path.join(path, "chunks"), ignore_errors=True)


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
    meta_path = os.path.join(path, "meta.json")
    wanted = {"model": lm.name, "weights": lm.weights, "layer": layer,
              "data_fingerprint": images.fingerprint(), "max_images_per_class": cfg.max_images_per_class}
    summary = {"store": path, "images": len(images), "channels": conv.out_channels}
    if os.path.isfile(meta_path):
        meta = st.read_json(meta_path)
        diff = st.identity_difference(meta, wanted)
        if diff is None and meta.get("precision", "fp32") != cfg.precision:
            diff = f"--precision: store has {meta.get('precision', 'fp32')!r}, this run has {cfg.precision!r}"
        if diff:
            raise UserError(f"store {path} was made with another {diff}; use another --store_dir")
        if meta.get("complete"):
            return {**summary, "already_complete": True, "processed": 0, "seconds": 0.0, "images_per_second": 0.0}
    model = lm.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    in_shape, out_hw = _probe_shapes(model, conv, device)
    created = not os.path.isfile(meta_path)

    def create() -> None:
        if created and cfg.rank == 0:
            os.makedirs(os.path.join(path, "chunks"), exist_ok=True)
            chunk_images = cfg.chunk_images or max(1, DEFAULT_CHUNK_IMAGES // cfg.batch_size) * cfg.batch_size
            meta = _new_meta(cfg, lm, layer, conv, images, in_shape, out_hw, chunk_images)
            st.save_npy(os.path.join(path, "layer_weight.npy"), conv.weight.detach().float().cpu().numpy())
            if conv.bias is not None:
                st.save_npy(os.path.join(path, "layer_bias.npy"), conv.bias.detach().float().cpu().numpy())
            st.write_json(meta_path, meta)

    run_together(create, cfg.world_size, device, "stage 1")  # rank 0 writes meta.json; the others read it after
    meta = st.read_json(meta_path)
    os.makedirs(os.path.join(path, "chunks"), exist_ok=True)
    plan = _Chunks(len(images), meta["chunk_images"], cfg.batch_size)
    todo = [j for j in range(plan.count) if j % cfg.world_size == cfg.rank and not os.path.isfile(_chunk_path(path, j))]
    result = {}

    def run() -> None:
        result["seconds"], result["done"] = _run_chunks(cfg, model, conv, images, path, plan, todo, device)

    try:
        run_together(run, cfg.world_size, device, "stage 1")
    except UserError:
        if created and cfg.rank == 0:  # every rank has stopped writing by now
            st.remove_partial(path)
        raise
    done = int(reduce_over_ranks(result["done"], cfg.world_size, device, "sum"))
    seconds = reduce_over_ranks(result["seconds"], cfg.world_size, device)  # the job's time: its slowest process
    if cfg.rank == 0:
        missing = [j for j in range(plan.count) if not os.path.isfile(_chunk_path(path, j))]
        if missing:
            raise UserError(f"store {path} is missing {len(missing)} chunks; rerun to finish it")
        _assemble(path, meta, plan)
    return {**summary, "processed": done, "seconds": seconds, "images_per_second": done / max(seconds, 1e-9)}


def _exit_hook(rank: int) -> Callable[[int], None] | None:
    """The ``EXIT_AFTER_ENV`` test hook, or None when the variable is not set for this rank."""
    spec = os.environ.get(EXIT_AFTER_ENV)
    if not spec:
        return None
    r, k = (int(v) for v in spec.split(":"))
    if r != rank:
        return None
    written = []

    def hook(j: int) -> None:
        written.append(j)
        if len(written) >= k:
            os._exit(17)

    return hook


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


def _run_chunks(cfg, model, conv, images, path, plan: _Chunks, todo: list[int], device) -> tuple[float, int]:
    """The pass itself: stream the pending chunks' batches, write each chunk when it is full.

    Results stay on the device until their chunk is complete, then come to the host in one copy:
    no per-batch host synchronisation on CUDA.
    """
    cuda = device.type == "cuda"
    batches = list(plan.batches(todo))
    loader = make_loader(images, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=cuda)
    total = sum(len(b) for b in batches)
    desc = "stage 1" if cfg.world_size == 1 else f"stage 1 (rank 0 of {cfg.world_size})"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not cfg.progress or cfg.rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        done = _stream(cfg, model, conv, images, path, plan, todo, device, iter(loader), bar)
    except BaseException:
        bar.leave = False  # clear the bar, so that an error message starts on a clean line
        raise
    finally:
        bar.close()
    return time.perf_counter() - start, done


def _stream(cfg, model, conv, images, path, plan: _Chunks, todo: list[int], device, it, bar) -> int:
    """Consume the batches of ``todo`` from ``it``, writing one chunk file per chunk; return images done."""
    K = len(images.classes)
    cuda = device.type == "cuda"
    dtype = PRECISIONS[cfg.precision]
    after_chunk = cfg.after_chunk or _exit_hook(cfg.rank)
    done = 0
    for j in todo:
        lo, hi = plan.bounds(j)
        rels, preds, tgts = [], [], []
        sums = None
        pos = 0
        while pos < hi - lo:
            x_img, labels, index = next(it)
            check_batch(images, labels, index)  # on the host labels: no device round trip
            x_img = x_img.to(device, non_blocking=True, memory_format=torch.channels_last if cuda else torch.preserve_format)
            lab = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                R, pred, x = relevance_batch(model, conv, x_img, lab)
            if sums is None:
                sums = torch.zeros((K, *x.shape[1:]), dtype=torch.float64, device=device)
            _add_class_sums(sums, lab, x)
            rels.append(R.to(torch.float16))
            preds.append(pred)
            tgts.append(labels)
            pos += len(labels)
            done += len(labels)
            bar.update(len(labels))
        tgt = torch.cat(tgts).numpy().astype(np.int64)
        present = np.unique(tgt)
        st.save_npz(_chunk_path(path, j), relevance=torch.cat(rels).cpu().numpy(),
                    targets=tgt, predictions=torch.cat(preds).cpu().numpy().astype(np.int64), sum_classes=present,
                    sums=sums[torch.from_numpy(present).to(device)].cpu().numpy())
        if after_chunk is not None:
            after_chunk(j)
    return done
