#!/usr/bin/env python
"""The cost of proving a layer's splits: the ablation-and-steering pass, batched, against one pass per intervention.

Reads a layer command's output folder (its split network and layer.json) and the data it was run on, and times,
on the same validation images (up to ``--per_class`` of each class):

- a plain forward pass of the split network (the unit of cost);
- the layer command's pass: every intervention of every split unit stacked in each batch (one pass);
- one pass per intervention (what the batching replaces), and checks that both give the same logits.

Prints seconds, images/s and forwards/s of each, and the peak memory.

    python benchmarks/ablation.py --out_dir demo_output --data_dir demo_data/digits
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="a layer command's output folder (layer.json, disentangled.pt)")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model", default=None, help="the original model (default: the checkpoint's name)")
    p.add_argument("--weights", default=None)
    p.add_argument("--per_class", type=int, default=25)
    p.add_argument("--steer", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import disentangle_channels as dc
    from utils.data.images import list_images
    from utils.model.loading import load_model
    from utils.model.surgery import appended_channels
    from utils.passes.image_pass import Runner, plain_batches
    from utils.passes.interventions import intervention_pass, reference_outputs, unit_interventions

    model = load_model(args.model, args.weights).model if args.model else None
    res = dc.load(args.out_dir, model)
    layer, transform = res.layer, res.transform
    val = list_images(args.data_dir, "val")
    seen, rows = {}, []
    for i, t in enumerate(val.targets):
        if seen.get(t, 0) < args.per_class:
            seen[t] = seen.get(t, 0) + 1
            rows.append(i)
    runner = Runner(torch.device(args.device), args.batch_size, 0, progress=False)
    net = runner.model(res.network)
    C = net.get_submodule(layer).merge.out_channels if hasattr(net.get_submodule(layer).merge, "out_channels") \
        else net.get_submodule(layer).merge.out_features
    order = sorted(res.channels)
    cols = {c: col for c, col in zip(order, appended_channels(C, [_k(res.channels[c]) for c in order]))}
    ivs = [iv for c in order for iv in unit_interventions(c, cols[c], res.channels[c].k, args.steer)]
    ref = reference_outputs(runner, net, layer, list_images(args.data_dir, "train"), transform, "mean")

    t0 = time.perf_counter()
    runner.image_pass(val, plain_batches(rows, args.batch_size), transform, "plain").run(
        lambda batches: [net(b.x) for b in batches])
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    together, _ = intervention_pass(runner, net, layer, val, ivs, ref, transform, rows)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    worst = 0.0
    for iv in ivs:
        alone, _ = intervention_pass(runner, net, layer, val, [iv], ref, transform, rows)
        worst = max(worst, float(np.abs(alone.logit[:, 1] - together.logit[:, together.column(iv)]).max()))
    single = time.perf_counter() - t0
    n, A = len(rows), len(ivs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"{len(order)} split units, {A} interventions (ablations and steering), {n} validation images, {args.device}")
    print(f"plain forward:          {plain:7.1f} s  {n / plain:8.1f} images/s")
    print(f"one batched pass:       {batched:7.1f} s  {n * (A + 1) / batched:8.1f} image copies/s  "
          f"({batched / plain:.1f} x a plain pass; copies made at the {together.copies})")
    print(f"one pass per intervention: {single:4.1f} s  ({single / batched:.1f} x the batched pass; the intact "
          f"forward is repeated in each)")
    print(f"largest |logit difference| between the two: {worst:.2g}; peak RSS {peak:.2f} GB")


def _k(split):
    """A stand-in with the two fields appended_channels reads (channel, k)."""
    from types import SimpleNamespace

    return SimpleNamespace(channel=split.channel, k=split.k)


if __name__ == "__main__":
    main()
