#!/usr/bin/env python
"""The layer command against the separate calls it replaces, on the same store, in one run.

For the channels the layer command splits with two concepts of one class each (the channels a user would
otherwise disentangle pair by pair), it times ``disentangle_layer.py`` (``--fv_steps 0``) and, for the same
pairs, one ``disentangle_channel.py`` plus one ``get_results.py --get_qualitative --get_quantitative
--purity K`` call per pair, each as a user runs it (a new process). Prints both times, their ratio, and the
peak memory (ru_maxrss) of the layer command.

    python benchmarks/layer.py --data_dir demo_data/digits --store_dir demo_output/store \\
        --model mobilenet_v3_small --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --tau 0.01

Without ``--data_dir`` and ``--store_dir`` it makes ``--images`` noisy JPEGs (ImageNet wnid folders, a quarter
of them more as val/) and runs stage 1 on them first; ``--no_pairs`` times the layer command alone, e.g. the
peak memory of a vision transformer's last MLP with random weights:

    python benchmarks/layer.py --model vit_b_16 --weights none --images 200 --tau 0.005 --p 0.5 --no_pairs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/stage1.py's image maker


def call(script: str, *args: str) -> float:
    """Run one script as a user does (a new process); its seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{script} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return time.perf_counter() - t0


def live_head(args: argparse.Namespace, work: str) -> None:
    """``--weights none`` with a head initialised to zero (torchvision's ViT): no relevance would reach any unit,
    so the benchmark uses a checkpoint of the same random model with a random normal head (said once)."""
    import torch

    from utils.model.loading import load_model

    model = load_model(args.model, "none").model
    zero = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not m.weight.any()]
    if args.weights != "none" or not zero:
        return
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in zero:
            w = model.get_submodule(n).weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    args.weights = os.path.join(work, "random_live_head.pt")
    torch.save(model.state_dict(), args.weights)
    print(f"--weights none: {', '.join(zero)} started at zero; using the same random model with a random head")


def made_data(args: argparse.Namespace, work: str, store: str) -> float:
    """No --store_dir: stage 1 into ``store`` on --data_dir, or without one on ``args.images`` generated training
    images (and a quarter more for val/); its seconds."""
    from stage1 import make_image_folder

    if args.data_dir is None:
        args.data_dir = os.path.join(work, "data")
        make_image_folder(args.data_dir, args.classes, args.images, 256)
        make_image_folder(os.path.join(work, "val"), args.classes, max(args.classes, args.images // 4), 256, seed=1)
        os.rename(os.path.join(work, "val", "train"), os.path.join(args.data_dir, "val"))
    return call("get_importances_for_classes.py", "--data_dir", args.data_dir, "--model", args.model, "--weights",
                args.weights, "--store_dir", store, "--num_workers", str(args.num_workers), "--batch_size",
                str(args.batch_size), "--no_progress", *(["--layer", args.layer] if args.layer else []))


def main(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix="bench_layer_")
    try:
        store = os.path.join(work, "store")
        if args.store_dir:
            shutil.copytree(args.store_dir, store, ignore=shutil.ignore_patterns(
                "models_disentangled", "layer_disentangled", "results_*"))
        else:
            live_head(args, work)
            print(f"stage 1: {made_data(args, work, store):.1f} s")
        common = ["--data_dir", args.data_dir, "--model", args.model, "--weights", args.weights, "--num_workers",
                  str(args.num_workers), "--batch_size", str(args.batch_size), "--no_progress"]
        if args.layer:
            common += ["--layer", args.layer]
        selection = ["--tau", str(args.tau), "--p", str(args.p), "--cos_sim_high", str(args.gamma)]
        out = os.path.join(work, "layer.json")
        t_layer = call("disentangle_layer.py", *common, "--store_dir", store, *selection, "--top_k", str(args.top_k),
                       "--json", out, *(["--max_channels", str(args.max_channels)] if args.max_channels else []))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # stage 1 and the layer command
        channels = json.load(open(out))["channels"]
        pairs = [] if args.no_pairs else [(c, ch["concepts"]) for c, ch in channels.items()
                                          if all(len(cs) == 1 for cs in ch["concepts"]) and len(ch["concepts"]) == 2]
        t_pairs = 0.0
        for c, concepts in pairs:
            classes = ["--classes_for_concept1", str(concepts[0][0]), "--classes_for_concept2", str(concepts[1][0])]
            t_pairs += call("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", c,
                            *classes)
            t_pairs += call("get_results.py", *common, "--model_dir", os.path.join(store, "models_disentangled"),
                            "--channel_of_interest", c, *classes, "--get_qualitative", "--get_quantitative",
                            "--tau", str(args.tau), "--purity", str(args.top_k), "--out_dir", os.path.join(work, "pairs"))
        print(f"layer command: {len(channels)} channels split ({len(pairs)} of them two single-class concepts) in "
              f"{t_layer:.1f} s; peak memory of the largest process until then (ru_maxrss): {peak:.2f} GiB")
        if args.no_pairs:
            return
        print(f"separate calls: {len(pairs)} x (disentangle_channel.py + get_results.py) for those pairs: {t_pairs:.1f} s")
        if pairs:
            print(f"ratio: {t_layer / t_pairs:.2f} (the layer command also did {len(channels) - len(pairs)} more channels)")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"peak memory of the largest process (ru_maxrss): {peak:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="ImageFolder root (default: --images generated JPEGs)")
    p.add_argument("--store_dir", default=None, help="a folder with a complete stage-1 store of --data_dir (copied, "
                                                     "not changed; default: stage 1 on the generated images)")
    p.add_argument("--images", type=int, default=200, help="generated training images (default: 200)")
    p.add_argument("--classes", type=int, default=5, help="classes of the generated images (default: 5)")
    p.add_argument("--no_pairs", action="store_true", help="time the layer command alone")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="default")
    p.add_argument("--layer", default=None)
    p.add_argument("--tau", type=float, default=0.03)
    p.add_argument("--p", type=float, default=0.75)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--top_k", type=int, default=12)
    p.add_argument("--max_channels", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0)
    main(p.parse_args())
