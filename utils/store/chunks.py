"""Stage 1's resumable writing: the chunk plan, one atomic ``.npz`` per finished chunk, and the assembly
of all chunks, in order, into the store's final arrays.

Chunk ``j`` covers images ``[j*size, min((j+1)*size, N))`` of the dataset order. A rerun skips finished
chunks, so a kill at any moment loses at most the chunks in flight; the per-class tap sums are added
chunk by chunk in chunk order, so the result does not depend on how chunks were split between runs or
processes.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_path, read_json, save_npy, save_npz, write_json
from .layout import relevance_dtype


class ChunkPlan:
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


def chunk_path(path: str, j: int) -> str:
    return os.path.join(path, "chunks", f"chunk_{j:06d}.npz")


def missing_chunks(path: str, plan: ChunkPlan) -> list[int]:
    return [j for j in range(plan.count) if not os.path.isfile(chunk_path(path, j))]


def write_chunk(path: str, j: int, rel: torch.Tensor, pred: torch.Tensor, tgt: torch.Tensor,
                 sums: torch.Tensor) -> None:
    """One finished chunk as ``chunks/chunk_<j>.npz`` (atomic): relevance, labels, predictions, and the tap
    sums (K x C_in*T) of the classes present in it."""
    tgt = tgt.numpy().astype(np.int64)
    present = np.unique(tgt)
    save_npz(chunk_path(path, j), relevance=rel.cpu().numpy(), targets=tgt,
             predictions=pred.cpu().numpy().astype(np.int64), sum_classes=present,
             sums=sums[torch.from_numpy(present).to(sums.device)].cpu().numpy())


def assembled_bytes(meta: dict) -> int:
    """Bytes the final arrays of a store take (known before assembly, from its meta)."""
    n, C, K = meta["num_images"], meta["out_channels"], meta["num_classes"]
    return n * C * relevance_dtype(meta).itemsize + 2 * n * 8 + K * int(np.prod(meta["tap_shape"])) * 8 + 3 * 4096


def assemble(path: str, meta: dict, plan: ChunkPlan) -> dict:
    """Join the chunk files, in order, into the final arrays; then mark the store complete: its meta.json
    becomes ``meta`` with ``train_accuracy`` and ``complete``, which is returned (``meta`` is left as given).

    The space the arrays need is checked first; every file is written as a stream (no memory map, so a
    full disk is an error, not a SIGBUS) under a temporary name, and the chunks stay until the end, so
    a failed assembly is redone by the next run.
    """
    need, free = assembled_bytes(meta), shutil.disk_usage(path).free
    if free < need:
        raise UserError(f"not enough space in {path} to assemble the store: it needs {need / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space and rerun the same command (the "
                        f"{plan.count} finished chunks are kept)")
    n, C, K = meta["num_images"], meta["out_channels"], meta["num_classes"]
    dtype = relevance_dtype(meta)  # float32; a store begun by an earlier version is finished in its float16
    targets, preds = np.empty(n, np.int64), np.empty(n, np.int64)
    sums = np.zeros((K, int(np.prod(meta["tap_shape"]))), np.float64)
    with atomic_path(os.path.join(path, "relevance.npy")) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (n, C)})
        for j in range(plan.count):
            lo, hi = plan.bounds(j)
            with np.load(chunk_path(path, j), allow_pickle=False) as z:
                f.write(np.ascontiguousarray(z["relevance"], dtype=dtype).tobytes())
                targets[lo:hi] = z["targets"]
                preds[lo:hi] = z["predictions"]
                sums[z["sum_classes"]] += z["sums"]
    save_npy(os.path.join(path, "targets.npy"), targets)
    save_npy(os.path.join(path, "predictions.npy"), preds)
    save_npy(os.path.join(path, "tap_sums.npy"), sums.reshape(K, *meta["tap_shape"]))
    done = {**meta, "train_accuracy": float((preds == targets).mean()) if n else None,  # the model as fed
            "complete": True}
    write_json(os.path.join(path, "meta.json"), done)
    # rmtree, not rmdir: a killed run can leave a half-written chunk_*.tmp-* behind
    shutil.rmtree(os.path.join(path, "chunks"), ignore_errors=True)
    return done


def remove_partial(path: str) -> None:
    """Delete a store folder that holds no finished work (used when the first chunk fails)."""
    chunks = os.path.join(path, "chunks")
    if os.path.isdir(path) and not (os.path.isdir(chunks) and os.listdir(chunks)):
        meta = os.path.join(path, "meta.json")
        if not os.path.isfile(meta) or not read_json(meta).get("complete"):
            shutil.rmtree(path, ignore_errors=True)
