#!/usr/bin/env python
"""What the searched split rule's arithmetic costs at a given size, with no images: synthetic input contributions.

For ``--units`` split units of a layer with ``--inputs`` inputs (the oracle size: ResNet-50's last conv, 512 inputs,
12 splits), each with ``--concepts`` concepts of ``--images`` training images and twice as many others, it times
:func:`utils.method.search.search_assignment` from a random start with the layer command's budget and patience, on
``--device``. Prints seconds per unit and in all, the moves made, and the peak memory of the contributions kept
(``V``, float64). Compare the total with the layer command's seconds on that layer (``layer.json``'s timings).

    python benchmarks/search_cost.py --units 12 --inputs 512 --concepts 2 --images 500
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.defaults import SEARCH_BUDGET, SEARCH_OTHERS, SEARCH_PATIENCE, SEARCH_SCREEN  # noqa: E402
from utils.method.search import search_assignment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--concepts", type=int, default=2)
    p.add_argument("--images", type=int, default=500, help="training images per concept (default: 500)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--screen", type=int, default=SEARCH_SCREEN,
                   help=f"inputs scored first per concept and direction, 0 for all (default: {SEARCH_SCREEN})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    k, n = args.concepts, args.images
    labels = torch.cat([torch.full((n,), j) for j in range(1, k + 1)] + [torch.zeros(SEARCH_OTHERS * n * k // 2)])
    seconds, moves = [], []
    for _ in range(args.units):
        # each concept excites its own tenth of the inputs, the rest is noise: a search with something to find
        V = torch.randn(len(labels), args.inputs, generator=g, dtype=torch.float64).abs() * 0.1
        for j in range(1, k + 1):
            cols = torch.randperm(args.inputs, generator=g)[: args.inputs // 10]
            V[(labels == j).nonzero()[:, 0][:, None], cols] += torch.rand(n, len(cols), generator=g, dtype=torch.float64)
        start = torch.randint(0, k + 1, (args.inputs,), generator=g)
        V = V.to(args.device)
        t0 = time.perf_counter()
        res = search_assignment(V, labels.to(args.device), start, budget=SEARCH_BUDGET, patience=SEARCH_PATIENCE,
                                screen=args.screen or None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        moves.append(len(res.moves))
    mb = len(labels) * args.inputs * 8 / 2 ** 20
    print(f"{args.units} units x {args.inputs} inputs, k = {k}, {len(labels)} images each ({n} per concept), "
          f"{args.device}, screen {args.screen or 'none'}: {sum(seconds):.2f} s in all, {sum(seconds) / len(seconds):.3f} s per unit "
          f"(max {max(seconds):.3f}); moves tried per unit: mean {sum(moves) / len(moves):.0f}, max {max(moves)}; "
          f"contributions kept: {mb:.1f} MB per unit, {mb * args.units:.0f} MB in all")


if __name__ == "__main__":
    main()
