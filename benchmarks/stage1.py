#!/usr/bin/env python
"""Stage-1 throughput against a plain forward pass, on the same images, in the same run.

Prints images/s of stage 1 (get_importances_for_classes: forward + backward to the layer +
per-class input sums + chunk files) and of a plain ``torch.no_grad()`` forward pass over the same
loader with the same batch size, their ratio, peak memory, and bytes stored per image.

    python benchmarks/stage1.py                      # ResNet-50 (random weights), 240 images, CPU
    python benchmarks/stage1.py --no_loader          # pre-made tensors: compute only
    python benchmarks/stage1.py --model resnet18 --images 96 --device cuda --precision bf16
    python benchmarks/stage1.py --model vit_b_16 --weights none   # a Linear layer: the last MLP's output

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

from utils.data.images import class_folders, list_images, make_loader  # noqa: E402
from utils.method.arv import tap_maps  # noqa: E402
from utils.data.classes import class_map, imagenet_wnids  # noqa: E402
from utils.stages.relevance import PRECISIONS, Stage1Config, add_class_tap_sums, compute_relevance  # noqa: E402
from utils.model.loading import get_layer, load_model  # noqa: E402
from utils.model.hooks import relevance_batch, resolve_positions  # noqa: E402
from utils.model.units import Unit  # noqa: E402


def make_image_folder(root: str, classes: int, images: int, size: int, seed: int = 0) -> str:
    """``root/train/<wnid k>/i.jpg``: ``images`` noisy JPEGs of ``size`` px, one per class first, the rest
    spread unevenly over the ``classes`` (the first ``classes`` ImageNet classes, so that a 1000-output model
    maps them by itself)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        k = i if i < classes else (i * i) % classes  # every class, then uneven class sizes
        d = os.path.join(root, "train", imagenet_wnids()[k])  # wnid folders: ImageNet logits for any subset
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
    sums, maps = None, None
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            if stage1:
                R, pred, _, xin = relevance_batch(model, conv, x, y)
                xin = conv.counted(xin)
            else:
                with torch.no_grad():
                    model(x).argmax(1)
        if stage1:
            if sums is None:
                maps = tap_maps(conv.geometry(), tuple(xin.shape[-2:])).to(device)
                sums = torch.zeros(K, xin.shape[1] * maps.shape[0], dtype=torch.float64, device=device)
            add_class_tap_sums(sums, y, xin, maps)
            R.to(torch.float32).cpu()  # the store keeps float32 rows
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
    conv = Unit(conv.module, resolve_positions(model, conv.module, "auto", lm.preprocess.crop, device))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    print(f"{args.model} ({args.weights} weights), layer {layer} ({conv.kind} {conv.in_channels} -> "
          f"{conv.out_channels}, positions {conv.positions}), "
          f"batch {args.batch_size}, {args.device}, {args.precision}, torch threads {torch.get_num_threads()}, "
          f"CPUs {os.cpu_count()}")

    if args.no_loader:
        report(*bench_tensors(args, model, conv, device, dtype))
    else:
        bench_loader(args, lm, model, device, dtype)  # reports while its store exists


def bench_tensors(args, model, conv, device, dtype) -> tuple[dict, dict, int, None]:
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
    return best, mem, args.images, None


def bench_loader(args, lm, model, device, dtype, keep: str | None = None) -> tuple[dict, dict, int, str | None]:
    """Plain forward vs the whole stage 1 (compute_relevance) over generated JPEGs, loader included.
    Images/s and peak MiB of each, the images, and the last store (kept, with the data, in ``keep``)."""
    tmp = keep or tempfile.mkdtemp(prefix="bench_stage1_")
    try:
        data = args.data_dir or make_image_folder(os.path.join(tmp, "data"), args.classes, args.images,
                                                  args.image_size)
        images = list_images(data, "train", classes=class_map(class_folders(data, "train"), lm.num_classes))
        loader = make_loader(images, batch_size=args.batch_size, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda", transform=lm.preprocess)
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
                s = compute_relevance(cfg, loaded=lm)
            best["stage 1"] = max(best["stage 1"], s["images_per_second"])
            mem["stage 1"] = max(mem.get("stage 1", 0), m["MiB"])
            store = s["store"]
        if keep is None:
            report(best, mem, len(images), store)  # before the store is deleted
        return best, mem, len(images), store
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def report(best: dict, mem: dict, n: int, store: str | None) -> None:
    print(f"images: {n}")
    for k in ("forward", "stage 1"):
        print(f"{k:>8}: {best[k]:8.2f} img/s   peak memory {mem[k]:8.0f} MiB")
    print(f"   ratio: {best['stage 1'] / best['forward']:.3f} (stage 1 / plain forward)")
    if store is None:
        return
    fixed = ("tap_sums.npy", "layer_weight.npy", "layer_bias.npy", "meta.json")
    sizes = {f: os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)}
    per_image = sum(v for f, v in sizes.items() if f not in fixed) / n
    import json
    meta = json.load(open(os.path.join(store, "meta.json")))
    C, K, (c_in, h, w) = meta["out_channels"], meta["num_classes"], meta["input_shape"]
    print(f"  stored: {per_image:.1f} bytes/image (relevance float32, targets, predictions; bar 4*C+32 = {4 * C + 32}); "
          f"fixed: tap_sums {sizes['tap_sums.npy']} B, layer_weight {sizes['layer_weight.npy']} B, "
          f"meta.json {sizes['meta.json']} B")
    print(f"  class sums: {K} x {' x '.join(map(str, meta['tap_shape']))} float64 = {K * np.prod(meta['tap_shape']) * 8 / 2**20:.1f} "
          f"MiB (held once on the device and once per chunk file); whole input maps would be {K} x {c_in} x {h} x {w} "
          f"= {K * c_in * h * w * 8 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
