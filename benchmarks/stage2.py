#!/usr/bin/env python
"""Benchmark stage 2 on a synthetic ImageNet-sized store (no images, no model weights needed).

Writes ``<dir>/resnet50[_<layer>]_channel_importances/`` in the store format: 1,281,167 x C float32
relevance (``--dtype float16``: as stores of earlier versions, which stage 2 still reads), 1000 classes (sorted labels, 1281-1282 images each), per-class tap sums K x C_in x kh x kw
float64, the layer weight and meta.json. ``--layer layer4.2.conv3`` (default): C = 2048 from 512 inputs,
1x1 (10.5 GB relevance; 5.2 GB in float16); ``--layer layer1``: C = 256 columns from 64 inputs with
layer1.0.conv2's 3x3 taps (1.3 GB relevance; 655 MB in float16; tap sums 4.6 MB). Each class has one or two planted channels that are important in
~85% of its images (a few hundred channels end up relevant to 2+ classes); every image also has random
spikes. Then runs stage 2 in this process and prints seconds per step, total seconds and peak memory
(ru_maxrss). The store is generated in a child process, so the peak memory is stage 2's alone.

    python benchmarks/stage2.py                 # temp dir under /tmp, deleted afterwards
    python benchmarks/stage2.py --layer layer1  # the early-layer store (1.28 M x 256, 3x3 taps)
    python benchmarks/stage2.py --dir D --keep  # reuse / keep the synthetic store in D
    python benchmarks/stage2.py --cold          # evict the relevance file from the page cache first
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N, K = 1_281_167, 1000
# layer -> (channels C, inputs C_in, kernel, input side, padding, layer name in meta.json)
LAYERS = {"layer4.2.conv3": (2048, 512, 1, 7, 0, "layer4.2.conv3"), "layer1": (256, 64, 3, 56, 1, "layer1.0.conv2")}
C, C_IN, KS, HW, PAD, LAYER = LAYERS["layer4.2.conv3"]
DTYPES = {"float32": np.float32, "float16": np.float16}


def set_layer(name: str) -> None:
    global C, C_IN, KS, HW, PAD, LAYER
    C, C_IN, KS, HW, PAD, LAYER = LAYERS[name]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="folder for the synthetic store (default: a temp dir, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic store")
    p.add_argument("--images", type=int, default=N, help=f"number of images (default: {N})")
    p.add_argument("--rows", type=int, default=16384, help="relevance rows per step (default: 16384, as stage 2)")
    p.add_argument("--cold", action="store_true", help="drop the relevance file from the page cache before stage 2")
    p.add_argument("--layer", choices=tuple(LAYERS), default="layer4.2.conv3",
                   help="geometry of the synthetic layer (default: layer4.2.conv3)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the relevance's dtype: float32 (stores of this version) or float16 (earlier ones)")
    p.add_argument("--generate_only", action="store_true", help=argparse.SUPPRESS)
    return p


def class_counts(n: int, k: int) -> np.ndarray:
    counts = np.full(k, n // k, np.int64)
    counts[: n % k] += 1
    return counts


def planted_channels(rng: np.random.Generator) -> list[np.ndarray]:
    """Class t -> its 1 or 2 planted channels (important in ~85% of its images)."""
    return [rng.choice(C, size=rng.integers(1, 3), replace=False) for _ in range(K)]


def expected_candidates(seed: int = 0) -> dict[int, list[int]]:
    """The candidates stage 2 must find: channels planted in two or more classes."""
    planted = planted_channels(np.random.default_rng(seed))
    out: dict[int, list[int]] = {}
    for t, chans in enumerate(planted):
        for c in chans:
            out.setdefault(int(c), []).append(t)
    return {c: ts for c, ts in sorted(out.items()) if len(ts) >= 2}


def generate(path: str, n: int, block_rows: int = 65536, seed: int = 0, dtype: str = "float32") -> None:
    """Write the synthetic store to ``path`` (a ``*_channel_importances`` folder)."""
    from utils import files
    from utils.store import layout as st

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    counts = class_counts(n, K)
    targets = np.repeat(np.arange(K), counts)
    planted = planted_channels(rng)
    # one noise block, reused with a random row shift per step: small signed noise plus ~0.5% spikes
    dt = DTYPES[dtype]
    noise = (rng.standard_normal((block_rows, C), dtype=np.float32) * 0.05).astype(dt)
    spikes = rng.random((block_rows, C), dtype=np.float32) < 0.005
    noise[spikes] = dt(2.0)
    del spikes
    rel = np.lib.format.open_memmap(os.path.join(path, "relevance.npy.partial"), mode="w+", dtype=dt,
                                    shape=(n, C))
    block = np.empty_like(noise)
    for lo in range(0, n, block_rows):
        hi = min(lo + block_rows, n)
        b = block[: hi - lo]
        shift = int(rng.integers(block_rows))
        np.take(noise, (np.arange(hi - lo) + shift) % block_rows, axis=0, out=b)
        t = targets[lo:hi]
        for cls in np.unique(t):
            rows = np.nonzero(t == cls)[0]
            for ch in planted[cls]:
                on = rows[rng.random(len(rows)) < 0.85]
                b[on, ch] = dt(3.0)
        rel[lo:hi] = b
    rel.flush()
    del rel
    os.replace(os.path.join(path, "relevance.npy.partial"), os.path.join(path, "relevance.npy"))
    files.save_npy(os.path.join(path, "targets.npy"), targets)
    files.save_npy(os.path.join(path, "predictions.npy"), targets)
    # sparse non-negative inputs (post-ReLU): each class uses ~20% of the input channels
    mask = rng.random((K, C_IN, 1, 1)) < 0.2
    taps = rng.exponential(HW * HW, (K, C_IN, KS, KS)) * mask * counts[:, None, None, None]
    files.save_npy(os.path.join(path, "tap_sums.npy"), taps)
    weight = (rng.standard_normal((C, C_IN, KS, KS)) * 0.02).astype(np.float32)
    files.save_npy(os.path.join(path, "layer_weight.npy"), weight)
    files.write_json(os.path.join(path, "meta.json"), {
        "format_version": st.FORMAT_VERSION, "complete": True, "model": "resnet50",
        "weights": "ResNet50_Weights.IMAGENET1K_V1", "layer": LAYER, "in_channels": C_IN,
        "out_channels": C, "input_shape": [C_IN, HW, HW], "output_hw": [HW, HW], "tap_shape": [C_IN, KS, KS],
        "conv": {"kernel_size": [KS, KS], "stride": [1, 1], "padding": [PAD, PAD], "dilation": [1, 1],
                 "padding_mode": "zeros", "bias": False},
        "data_root": "synthetic", "split": "train", "data_fingerprint": "synthetic", "max_images_per_class": None,
        "num_images": n, "classes": [f"n{t:08d}" for t in range(K)], "num_classes": K,
        "class_index": {f"n{t:08d}": t for t in range(K)}, "class_names": None,
        "class_counts": counts.tolist(), "relevance_dtype": dtype, "chunk_images": 4096, "batch_size": 256,
        "created": "synthetic"})


def main(args: argparse.Namespace) -> None:
    set_layer(args.layer)
    base = args.dir or tempfile.mkdtemp(prefix="stage2_bench_")
    folder = "resnet50_channel_importances" if LAYER == "layer4.2.conv3" else f"resnet50_{LAYER}_channel_importances"
    path = os.path.join(base, folder)
    if args.generate_only:
        generate(path, args.images, dtype=args.dtype)
        return
    try:
        if not os.path.isfile(os.path.join(path, "meta.json")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--generate_only", "--dir", base,
                            "--images", str(args.images), "--layer", args.layer, "--dtype", args.dtype], check=True)
            size = os.path.getsize(os.path.join(path, "relevance.npy")) / 1e9
            print(f"generated {path} ({size:.2f} GB relevance) in {time.perf_counter() - t0:.1f} s")
        if args.cold:
            fd = os.open(os.path.join(path, "relevance.npy"), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        run_stage2(base, args.rows, None if LAYER == "layer4.2.conv3" else LAYER)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
            print(f"deleted {base}")


def run_stage2(base: str, rows: int, layer: str | None) -> None:
    t_start = time.perf_counter()
    from utils.stages.candidates import find_pairs, results_path, write_pairs
    from utils.store.layout import open_store

    t_imp = time.perf_counter()
    store = open_store(base, "resnet50", layer)
    t_open = time.perf_counter()
    res = find_pairs(store, tau=0.03, p=0.75, gamma_low=0.0, gamma_high=0.5, rows=rows)
    t_find = time.perf_counter()
    write_pairs(results_path(base, "resnet50", 0.03, 0.75, 0.0, 0.5), res.pairs)
    t_end = time.perf_counter()
    steps = {"imports": t_imp - t_start, "open store": t_open - t_imp, **res.seconds,
             "other": (t_find - t_open) - sum(res.seconds.values()), "write txt": t_end - t_find}
    total = t_end - t_start
    n_pairs = sum(len(v) * (len(v) - 1) // 2 for v in res.candidates.values())
    print(f"store: {store.meta['num_images']} images x {store.num_channels} channels, {store.num_classes} classes")
    print(f"found: {len(res.candidates)} candidate channels, {n_pairs} class pairs, {len(res.pairs)} listed (s < 0.5)")
    if store.meta["num_images"] >= 50 * K:  # enough images per class for the planted 85% to clear p = 0.75
        ok = res.candidates == expected_candidates()
        print(f"planted candidates recovered exactly: {'yes' if ok else 'NO'}")
    for k, v in steps.items():
        print(f"  {k:<12} {v:7.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"total {total:.1f} s, peak memory (ru_maxrss) {peak:.2f} GiB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
