#!/usr/bin/env python
"""Stage-1 throughput against a plain forward pass, on the same images, in the same run.

Prints images/s of stage 1 (get_importances_for_classes: forward + backward to the layer +
per-class input sums + chunk files) and of a plain ``torch.no_grad()`` forward pass over the same
loader with the same batch size, their ratio, peak memory, and bytes stored per image.

    python benchmarks/stage1.py                      # ResNet-50 (random weights), 240 images, CPU
    python benchmarks/stage1.py --no_loader          # pre-made tensors: compute only
    python benchmarks/stage1.py --model resnet18 --images 96 --device cuda --precision bf16

Runs alternate (forward, stage 1, forward, stage 1, ...) and the best of ``--repeat`` is kept,
so a machine shared with other jobs disturbs both sides alike.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.data import list_images, make_loader  # noqa: E402
from utils.importances import PRECISIONS, Stage1Config, _add_class_sums, compute_importances  # noqa: E402
from utils.models import get_layer, load_model  # noqa: E402
from utils.relevance import relevance_batch  # noqa: E402


def make_image_folder(root: str, classes: int, images: int, size: int, seed: int = 0) -> str:
    """``root/train/class_k/i.jpg``: ``images`` noisy JPEGs of ``size`` px spread unevenly over ``classes``."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        k = (i * i) % classes  # uneven class sizes
        d = os.path.join(root, "train", f"class_{k:03d}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 255, 3)
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
    return root


class PeakRSS:
    """Peak resident memory of this process (MiB) while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) // 1024)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets ``"MiB"``: peak host RSS, or peak CUDA allocation on a GPU."""
    out = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        with PeakRSS() as p:
            yield out
        out["MiB"] = p.peak


def forward_pass(model, loader, device, dtype) -> tuple[float, int]:
    """Plain inference over the loader; returns (seconds, images)."""
    cuda = device.type == "cuda"
    n = 0
    start = time.perf_counter()
    with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
        for x, _, _ in loader:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last if cuda else torch.preserve_format)
            model(x).argmax(1)
            n += len(x)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, n


def tensor_passes(model, conv, batches, K, device, dtype, stage1: bool) -> float:
    """--no_loader: the per-batch work of stage 1 (or a plain forward) on pre-made tensors; seconds."""
    start = time.perf_counter()
    sums = None
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            if stage1:
                R, pred, _, xin = relevance_batch(model, conv, x, y)
            else:
                with torch.no_grad():
                    model(x).argmax(1)
        if stage1:
            if sums is None:
                sums = torch.zeros((K, *xin.shape[1:]), dtype=torch.float64, device=device)
            _add_class_sums(sums, y, xin)
            R.to(torch.float16).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--layer", default=None)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--image_size", type=int, default=320, help="side of the generated JPEGs (default: 320)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best of each is kept")
    p.add_argument("--no_loader", action="store_true", help="measure on pre-made tensors (no decoding)")
    p.add_argument("--data_dir", default=None, help="use this ImageFolder instead of generated images")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = PRECISIONS[args.precision]
    lm = load_model(args.model, args.weights)
    layer, conv = get_layer(lm.model, args.layer)
    model = lm.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    print(f"{args.model} ({args.weights} weights), layer {layer} ({conv.in_channels} -> {conv.out_channels}), "
          f"batch {args.batch_size}, {args.device}, {args.precision}, torch threads {torch.get_num_threads()}, "
          f"CPUs {os.cpu_count()}")

    if args.no_loader:
        bench_tensors(args, model, conv, device, dtype)
    else:
        bench_loader(args, lm, model, device, dtype)


def bench_tensors(args, model, conv, device, dtype) -> None:
    """Plain forward vs stage 1 on random tensors already on the device (no loader, no decoding)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(len(idx), 3, 224, 224, generator=g).to(device),
                torch.tensor([i % args.classes for i in idx], device=device))
               for idx in np.array_split(np.arange(args.images), max(1, args.images // args.batch_size))]
    tensor_passes(model, conv, batches[:1], args.classes, device, dtype, True)  # warm-up
    best = {"forward": 0.0, "stage 1": 0.0}
    mem = {}
    for _ in range(args.repeat):
        for name, s1 in (("forward", False), ("stage 1", True)):
            with peak_memory(device) as m:
                sec = tensor_passes(model, conv, batches, args.classes, device, dtype, s1)
            best[name] = max(best[name], args.images / sec)
            mem[name] = max(mem.get(name, 0), m["MiB"])
    report(best, mem, args.images, None)


def bench_loader(args, lm, model, device, dtype) -> None:
    """Plain forward vs the whole stage 1 (compute_importances) over generated JPEGs, loader included."""
    tmp = tempfile.mkdtemp(prefix="bench_stage1_")
    try:
        data = args.data_dir or make_image_folder(os.path.join(tmp, "data"), args.classes, args.images,
                                                  args.image_size)
        images = list_images(data, "train")
        loader = make_loader(images, batch_size=args.batch_size, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda")
        next(iter(loader))  # warm the page cache and the decoder
        best = {"forward": 0.0, "stage 1": 0.0}
        mem = {}
        store = None
        for r in range(args.repeat):
            with peak_memory(device) as m:
                sec, n = forward_pass(model, loader, device, dtype)
            best["forward"] = max(best["forward"], n / sec)
            mem["forward"] = max(mem.get("forward", 0), m["MiB"])
            cfg = Stage1Config(data_dir=data, store_dir=os.path.join(tmp, f"store{r}"), model=args.model,
                               weights=args.weights, layer=args.layer, batch_size=args.batch_size, device=args.device,
                               num_workers=args.num_workers, progress=False, precision=args.precision)
            with peak_memory(device) as m:
                s = compute_importances(cfg, loaded=lm)
            best["stage 1"] = max(best["stage 1"], s["images_per_second"])
            mem["stage 1"] = max(mem.get("stage 1", 0), m["MiB"])
            store = s["store"]
        report(best, mem, len(images), store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(best: dict, mem: dict, n: int, store: str | None) -> None:
    print(f"images: {n}")
    for k in ("forward", "stage 1"):
        print(f"{k:>8}: {best[k]:8.2f} img/s   peak memory {mem[k]:8.0f} MiB")
    print(f"   ratio: {best['stage 1'] / best['forward']:.3f} (stage 1 / plain forward)")
    if store is None:
        return
    fixed = ("input_sums.npy", "layer_weight.npy", "layer_bias.npy", "meta.json")
    sizes = {f: os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)}
    per_image = sum(v for f, v in sizes.items() if f not in fixed) / n
    import json
    C = json.load(open(os.path.join(store, "meta.json")))["out_channels"]
    print(f"  stored: {per_image:.1f} bytes/image (relevance, targets, predictions; bar 2*C+32 = {2 * C + 32}); "
          f"fixed: input_sums {sizes['input_sums.npy']} B, layer_weight {sizes['layer_weight.npy']} B, "
          f"meta.json {sizes['meta.json']} B")


if __name__ == "__main__":
    main()
