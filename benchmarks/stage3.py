#!/usr/bin/env python
"""Benchmark stage 3: ResNet-50 (random weights) on CPU, ~120 training images per concept.

Makes a two-class ImageFolder of generated 224 px images, builds its stage-1 store with the
stage-1 CLI, then runs ``disentangle_channel.py`` in a fresh process and reports: seconds for
the image pass, images/s, peak memory (``ru_maxrss`` of that process), the largest logit
difference, and the time the same number of bare truncated forwards (up to the layer, tensors
already in memory) take, i.e. how close the pass is to one truncated forward per image.

    python benchmarks/stage3.py [--images_per_class 120] [--batch_size 64] [--keep DIR]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_images(root: str, n: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        # ImageNet wnid folders: classes 0 and 1 of the 1000-output model, mapped by themselves
        for c, base in (("n01440764", (200, 60, 40)), ("n01443537", (40, 90, 200))):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                img = np.clip(np.array(base)[None, None] + rng.normal(0, 40, (224, 224, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    return root


def stage3_child(args) -> None:
    """Runs in a fresh process: stage 3, then bare truncated forwards for comparison; prints JSON."""
    import torch

    from disentangle_channel import get_args_parser, main
    from utils.model.loading import get_layer, load_model
    from utils.model.hooks import layer_input

    out = os.path.join(args.work, "stage3.json")
    t0 = time.perf_counter()
    main(get_args_parser().parse_args([
        "--data_dir", args.data, "--model", "resnet50", "--weights", "none", "--nr_channels_in_layer_of_interest",
        "2048", "--channel_disentangle", "1660", "--classes_for_concept1", "0", "--classes_for_concept2", "1",
        "--store_dir", args.store, "--device", "cpu", "--batch_size", str(args.batch_size), "--json", out]))
    total = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    rec_path = next(p for p in json.load(open(out))["files"] if p.endswith("record.json"))
    rec = json.load(open(rec_path))
    n = rec["train_images"]["concept1"] + rec["train_images"]["concept2"]

    lm = load_model("resnet50", "none")
    _, conv = get_layer(lm.model, None)
    x = torch.randn(args.batch_size, 3, 224, 224)
    layer_input(lm.model, conv, x[:2])  # warm-up
    t = time.perf_counter()
    for b in range(0, n, args.batch_size):
        layer_input(lm.model, conv, x[: min(args.batch_size, n - b)])
    bare = time.perf_counter() - t
    print("RESULT " + json.dumps({"images": n, "pass_seconds": rec["seconds"], "images_per_second": rec["images_per_second"],
                                  "total_seconds": total, "bare_truncated_forward_seconds": bare,
                                  "peak_memory_gb": peak_gb, "max_abs_logit_diff": rec["max_abs_logit_diff"],
                                  "equivalence_images": rec["equivalence_images"], "best_rho": rec["best_rho"],
                                  "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images_per_class", type=int, default=120)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--keep", default=None, help="work folder to keep (reused if it holds a finished store)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return stage3_child(args)

    work = args.keep or tempfile.mkdtemp(prefix="bench_stage3_")
    os.makedirs(work, exist_ok=True)
    data, store = os.path.join(work, "data"), os.path.join(work, "store")
    if not os.path.isdir(data):
        make_images(data, args.images_per_class)
    t = time.perf_counter()
    subprocess.run([sys.executable, "get_importances_for_classes.py", "--data_dir", data, "--model", "resnet50",
                    "--weights", "none", "--store_dir", store, "--device", "cpu", "--batch_size",
                    str(args.batch_size)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"stage-1 store ready in {time.perf_counter() - t:.1f} s (not part of the stage-3 figures)")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--data", data, "--store", store,
                        "--work", work, "--batch_size", str(args.batch_size)], cwd=ROOT, check=True,
                       capture_output=True, text=True)
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"stage 3, resnet50 layer4.2.conv3, channel 1660, {res['images']} concept images, "
          f"batch {args.batch_size}, {res['threads']} threads")
    print(f"  image pass:            {res['pass_seconds']:.1f} s ({res['images_per_second']:.1f} img/s)")
    print(f"  bare truncated fwds:   {res['bare_truncated_forward_seconds']:.1f} s "
          f"(pass / bare = {res['pass_seconds'] / res['bare_truncated_forward_seconds']:.2f})")
    print(f"  whole command:         {res['total_seconds']:.1f} s (incl. model load, ARVs, equivalence check "
          f"on {res['equivalence_images']} images, saving)")
    print(f"  peak memory (maxrss):  {res['peak_memory_gb']:.2f} GB")
    print(f"  max |logit diff|:      {res['max_abs_logit_diff']:.3g}  (best rho {res['best_rho']:.2f})")
    print(f"  work folder: {work}")


if __name__ == "__main__":
    main()
