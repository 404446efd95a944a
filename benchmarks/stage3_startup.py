#!/usr/bin/env python
"""Stage 3's start-up on an ImageNet-sized tree: list and check only the concepts' classes.

Builds ``<dir>/train/`` with 1000 class folders x 1300 empty ``.JPEG`` files (1.3 M files), a stage-1
store's ``meta.json`` for it (per-class fingerprints, as stage 1 writes them), then times what stage 3
does before its pass for a pair of classes (``utils.store.layout.training_images``: list the two folders, check
their fingerprints against the store) against what it did before (list and fingerprint all 1.3 M files).

    python benchmarks/stage3_startup.py                 # temp dir, deleted afterwards
    python benchmarks/stage3_startup.py --dir D --keep  # keep (and reuse) the tree
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.files import write_json  # noqa: E402
from utils.store.layout import FORMAT_VERSION, Store, training_images  # noqa: E402
from utils.data.images import list_images  # noqa: E402


def make_tree(root: str, classes: int, per_class: int) -> None:
    for k in range(classes):
        d = os.path.join(root, "train", f"n{k:08d}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            os.close(os.open(os.path.join(d, f"{i:05d}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))


def main(args: argparse.Namespace) -> None:
    base = args.dir or tempfile.mkdtemp(prefix="stage3_startup_")
    data, store_path = os.path.join(base, "data"), os.path.join(base, "store")
    try:
        if not os.path.isdir(os.path.join(data, "train")):
            t0 = time.perf_counter()
            make_tree(data, args.classes, args.per_class)
            print(f"made {args.classes} x {args.per_class} empty files in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        full = list_images(data, "train")
        listed = time.perf_counter() - t0
        t0 = time.perf_counter()
        fingerprints, legacy = full.class_fingerprints(), full.legacy_fingerprint()
        hashed = time.perf_counter() - t0
        os.makedirs(store_path, exist_ok=True)
        write_json(os.path.join(store_path, "meta.json"), {
            "format_version": FORMAT_VERSION, "complete": True, "model": "resnet50", "weights": "synthetic",
            "layer": "layer4.2.conv3", "classes": full.classes, "class_index": full.index,
            "num_classes": len(full.classes), "class_counts": full.class_counts(len(full.classes)),
            "class_fingerprints": fingerprints, "data_fingerprint": full.fingerprint(), "max_images_per_class": None})
        store = Store.open(store_path)
        t0 = time.perf_counter()
        pair = training_images(store, data, [args.classes // 3, 2 * args.classes // 3])
        pair_s = time.perf_counter() - t0
        print(f"tree: {len(full)} files in {len(full.classes)} class folders")
        print(f"before (list and fingerprint every file): {listed + hashed:.2f} s "
              f"(listing and stat {listed:.2f} s, hashing {hashed:.2f} s; legacy fingerprint {legacy[:8]})")
        print(f"now (stage 3 for one pair: list and check 2 folders, {len(pair)} files): {pair_s:.3f} s "
              f"({(listed + hashed) / max(pair_s, 1e-9):.0f}x faster)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="folder for the tree (default: a temp dir, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the tree")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per_class", type=int, default=1300)
    main(p.parse_args())
