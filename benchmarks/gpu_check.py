#!/usr/bin/env python
"""Check the toolkit on a GPU in one command: correctness against the CPU and speed, as a table.

On generated images (ImageNet wnid folders) with ResNet-50 (random weights):
  1. stage 1 on the device vs on the CPU for the same images: same targets, relevance within 1e-3 of each
     row's largest |R| (fp32), tap sums within 1e-4;
  2. stage-1 images/s vs a plain forward pass at --batch_size, without the loader (tensors on the device)
     and with it (JPEG decoding, --num_workers);
  3. bf16 vs fp32: stage-1 images/s and how far bf16 relevance is from fp32 (reported; checked <= 5%);
  4. stage 3's logit equivalence on the device (a split of layer4.2.conv3, fp32: <= 1e-3);
  5. stage 1 under torchrun with every GPU present (on the CPU: 2 gloo processes) vs one process;
  6. every command as a user types it (stages 1-4, the pictures, the layer command, the demo) on the device
     and on the CPU, each result compared (pairs, best rho, scores, logit check, stage 4's means, purity,
     concepts; see gpu_commands.py), with both timings.
Prints a table on stdout and exits 1 when a check fails.

    python benchmarks/gpu_check.py                                    # cuda, ResNet-50, batch 256
    python benchmarks/gpu_check.py --device cpu --model resnet18 --tiny   # the same checks, small (a test runs this)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_commands import check_commands  # noqa: E402
from stage1 import bench_loader, bench_tensors, make_image_folder  # noqa: E402
from utils.passes.device import model_on, resolve_device  # noqa: E402
from utils.stages.relevance import PRECISIONS, Stage1Config, compute_relevance  # noqa: E402
from utils.model.loading import get_layer, load_model, model_tag  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    p.add_argument("--model", default="resnet50",
                   help="model (random weights: torchvision, timm/<name> or file.py:function) (default: resnet50)")
    p.add_argument("--batch_size", type=int, default=256, help="batch size of the speed checks (default: 256)")
    p.add_argument("--images", type=int, default=2048, help="images of the speed checks (default: 2048)")
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1), help="loader processes")
    p.add_argument("--tiny", action="store_true", help="small sizes (images of 64 px, a few batches): for tests")
    p.add_argument("--keep", default=None, help="keep the generated data and stores in this folder")
    return p


def relevance_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to each row's largest |b| (N x C)."""
    scale = np.abs(b.astype(np.float64)).max(1, keepdims=True).clip(1e-30)
    return float((np.abs(a.astype(np.float64) - b) / scale).max())


def stage1_store(data: str, store: str, model: str, device: str, precision: str = "fp32", batch: int = 8) -> str:
    cfg = Stage1Config(data_dir=data, store_dir=store, model=model, weights="none", batch_size=batch, device=device,
                       num_workers=0, progress=False, precision=precision)
    return compute_relevance(cfg)["store"]


def arrays(path: str) -> dict[str, np.ndarray]:
    return {k: np.load(os.path.join(path, f"{k}.npy")) for k in ("relevance", "targets", "tap_sums")}


def check_against_cpu(args, data: str, tmp: str, rows: list) -> dict:
    """Check 1 (and the data of checks 3 and 5): stage 1 on the device and on the CPU."""
    dev = arrays(stage1_store(data, os.path.join(tmp, "dev"), args.model, args.device))
    dev["path"] = os.path.join(tmp, "dev", f"{model_tag(args.model)}_channel_importances")
    cpu = arrays(stage1_store(data, os.path.join(tmp, "cpu"), args.model, "cpu"))
    err = relevance_error(dev["relevance"], cpu["relevance"])
    taps = float(np.abs(dev["tap_sums"] - cpu["tap_sums"]).max() / max(np.abs(cpu["tap_sums"]).max(), 1e-30))
    same = bool(np.array_equal(dev["targets"], cpu["targets"]))
    rows.append((f"stage 1 {args.device} vs cpu, {len(cpu['targets'])} images", f"targets equal: {same}; "
                 f"relevance err {err:.1e} of row max; tap sums {taps:.1e}", same and err <= 1e-3 and taps <= 1e-4))
    return dev


def check_speed(args, lm, tmp: str, rows: list) -> None:
    """Check 2 and the speed half of 3: stage 1 vs a plain forward pass, fp32 and bf16."""
    device = resolve_device(args.device)
    model = model_on(lm.model, device)
    _, conv = get_layer(model, None)
    size = 64 if args.tiny else 320
    for precision in ("fp32", "bf16"):
        a = SimpleNamespace(classes=8, images=args.images, batch_size=args.batch_size, repeat=1, image_size=size,
                            num_workers=args.num_workers, model=args.model, weights="none", layer=None,
                            device=str(device), precision=precision, data_dir=None)
        best, mem, n, _ = bench_tensors(a, model, conv, device, PRECISIONS[precision])
        rows.append((f"no loader, batch {a.batch_size}, {precision}", f"forward {best['forward']:.1f} img/s, stage 1 "
                     f"{best['stage 1']:.1f} img/s (x{best['stage 1'] / best['forward']:.2f}), peak {mem['stage 1']:.0f} MiB",
                     True))
    a.precision, a.repeat = "fp32", 1
    best, mem, n, _ = bench_loader(a, lm, model, device, None, keep=os.path.join(tmp, "speed"))
    rows.append((f"with loader ({a.num_workers} workers), batch {a.batch_size}, fp32",
                 f"forward {best['forward']:.1f} img/s, stage 1 {best['stage 1']:.1f} img/s "
                 f"(x{best['stage 1'] / best['forward']:.2f}) on {n} JPEGs", True))


def check_bf16(args, data: str, tmp: str, fp32: dict, rows: list) -> None:
    bf16 = arrays(stage1_store(data, os.path.join(tmp, "bf16"), args.model, args.device, "bf16"))
    err = relevance_error(bf16["relevance"], fp32["relevance"])
    rows.append(("bf16 vs fp32 relevance", f"err {err:.1e} of row max", err <= 0.05))


def check_equivalence(args, lm, rows: list) -> None:
    """Check 4: a split channel of the last conv on the device computes the original logits."""
    from utils.method.split import sweep
    from utils.model.surgery import split_network

    device = resolve_device(args.device)
    model = model_on(lm.model, device)
    layer, conv = get_layer(model, None)
    g = torch.Generator().manual_seed(0)
    c = conv.out_channels // 2
    sw = sweep(conv.weight[c].cpu(), torch.randn(2, conv.in_channels, generator=g, dtype=torch.float64))
    net = split_network(model, {layer: [sw.split(c, 9)]})
    x = torch.randn(8, 3, 224, 224, generator=g).to(device)
    with torch.no_grad():
        ref, got = model(x), net(x)
    diff = float((got - ref).abs().max())
    rows.append((f"stage 3 equivalence on {device}", f"max |logit difference| {diff:.1e} (8 images)", diff <= 1e-3))


def check_torchrun(args, data: str, tmp: str, single: dict, rows: list) -> None:
    """Check 5: torchrun over every GPU (CPU: 2 processes) gives the single-process store."""
    n = torch.cuda.device_count() if args.device.startswith("cuda") else 2
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={n}", os.path.join(ROOT, "get_importances_for_classes.py"),
                        "--data_dir", data, "--model", args.model, "--weights", "none", "--batch_size", "8",
                        "--chunk_images", "8", "--num_workers", "0", "--device", args.device, "--store_dir",
                        os.path.join(tmp, "torchrun")], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        rows.append((f"torchrun, {n} processes", "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1], False))
        return
    multi = arrays(os.path.join(tmp, "torchrun", os.path.basename(single["path"])))
    err = relevance_error(multi["relevance"], single["relevance"])
    same = bool(np.array_equal(multi["targets"], single["targets"]))
    rows.append((f"torchrun, {n} processes vs 1", f"targets equal: {same}; relevance err {err:.1e}",
                 same and err <= 1e-3))


def main(args: argparse.Namespace) -> int:
    if args.tiny:
        args.images, args.batch_size, args.num_workers = 16, 8, 0
    tmp = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    rows: list[tuple[str, str, bool]] = []
    try:
        device = resolve_device(args.device)
        lm = load_model(args.model, "none")
        data = make_image_folder(os.path.join(tmp, "data"), 4, 16, 64 if args.tiny else 320)
        dev = check_against_cpu(args, data, tmp, rows)
        check_speed(args, lm, tmp, rows)
        check_bf16(args, data, tmp, dev, rows)
        check_equivalence(args, lm, rows)
        check_torchrun(args, data, tmp, dev, rows)
        check_commands(args, tmp, rows)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{args.model} (random weights) on {device} ({name}), torch {torch.__version__}\n")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  ok    result")
    for what, result, ok in rows:
        print(f"{what:<{width}}  {'yes' if ok else 'NO ':<4}  {result}")
    failed = [r[0] for r in rows if not r[2]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
