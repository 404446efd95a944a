#!/usr/bin/env python
"""Label-free candidates over a whole layer (utils.stages.clusters), beside the labelled path's, on the same data.

Runs the label-free search on the training images of ``--data_dir`` (labels are not read by it): every unit's
top ``--top_n`` images, their contribution vectors, clustered. Prints the seconds of each pass and of the
clustering, the peak memory, the number of candidates, and, since the digits have labels, how well each
candidate's concepts match classes (the share of each concept's images in its most frequent class; units whose
concepts are each at least ``--match`` of one class, a different class for each). With ``--store_dir`` (a stage-1
store of the same model and layer) it also times the labelled path's candidates (stage 2's rules and the
linkage: ``utils.stages.candidates.channel_concepts``) and says how many label-free candidates are labelled ones.

With ``--labelled`` it runs the labelled path alone instead, in its own process so that its peak memory is its
own: stage 1 into a new store (in ``--store_dir``, default a temporary folder) and stage 2's candidates, timed.
Run it beside a plain run on the same data and layer to compare the two paths:

    python benchmarks/label_free.py --data_dir demo_data/digits --model resnet50 --weights none \
        --layer layer4.2.conv3 --split 0
    python benchmarks/label_free.py --data_dir demo_data/digits --model resnet50 --weights none \
        --layer layer4.2.conv3 --labelled

    python benchmarks/label_free.py --data_dir demo_data/digits --model mobilenet_v3_small \\
        --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --layer features.12.0 \\
        --store_dir demo_output/store --tau 0.01
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--store_dir", default=None)
    p.add_argument("--tau", type=float, default=0.03)
    p.add_argument("--p", type=float, default=0.75)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--top_n", type=int, default=100)
    p.add_argument("--k0", type=int, default=4)
    p.add_argument("--min_images", type=int, default=10)
    p.add_argument("--match", type=float, default=0.75)
    p.add_argument("--split", type=int, default=4, metavar="N",
                   help="split the N most separated candidates by their clusters and read their concept units' "
                        "top-12 validation images (default: 4)")
    p.add_argument("--labelled", action="store_true",
                   help="time the labelled path alone: stage 1 into a new store, then stage 2's candidates")
    p.add_argument("--class_index", default=None, metavar="FILE",
                   help="--labelled: JSON {folder: logit index} where the folders are not one per output")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from utils.data.images import list_images
    from utils.model.loading import get_layer, load_model
    from utils.model.units import unit_at
    from utils.passes.image_pass import Runner
    from utils.stages.clusters import agreement, label_free_concepts

    lm = load_model(args.model, args.weights)
    layer, _ = get_layer(lm.model, args.layer)
    if args.labelled:
        labelled_path(args, lm, layer)
        return
    images = list_images(args.data_dir, "train")
    runner = Runner(torch.device(args.device), args.batch_size, args.num_workers, progress=False)
    model = runner.model(lm.model)
    unit = unit_at(model, layer, "all")
    t0 = time.perf_counter()
    found = label_free_concepts(runner, model, unit, images, lm.preprocess, args.top_n, args.k0, args.min_images,
                                args.gamma)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"label-free: {unit.out_channels} units of {lm.name} {layer} on {len(images)} training images in "
          f"{total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in found.seconds.items())
          + f"); peak RSS {peak:.2f} GB; {len(found.candidates)} candidates")
    matched = []
    for c in found.candidates:
        agree = agreement(found.units[c], images.targets)
        labels = [a["label"] for a in agree]
        ok = all(a["share"] >= args.match for a in agree) and len(set(labels)) == len(labels)
        matched += [c] if ok else []
        print(f"  unit {c}: " + " | ".join(f"{a['images']} images, {a['share']:.0%} class {a['label']}" for a in agree)
              + ("  <- each concept one class" if ok else ""))
    print(f"{len(matched)} of {len(found.candidates)} candidates have concepts that are each >= {args.match:.0%} "
          f"of one class, a different class each: {matched}")
    if args.split:
        split_candidates(args, runner, model, unit, lm, found, layer)
    if args.store_dir:
        from utils.stages.candidates import channel_concepts
        from utils.store import layout as st

        t0 = time.perf_counter()
        concepts, _, _, _ = channel_concepts(st.model_store(args.store_dir, lm, layer), args.tau, args.p, args.gamma)
        labelled = sorted(c for c, g in concepts.items() if len(g) >= 2)
        print(f"labelled path (stage 2 on the store, tau {args.tau}, p {args.p}): {len(labelled)} candidates with "
              f"2+ concepts in {time.perf_counter() - t0:.1f} s (after stage 1's pass); both: "
              f"{sorted(set(labelled) & set(found.candidates))}")


def labelled_path(args, lm, layer: str) -> None:
    """Stage 1 into a new store and stage 2's candidates (with the linkage into concepts), timed; peak memory."""
    import tempfile

    from utils.stages.candidates import channel_concepts
    from utils.stages.relevance import Stage1Config, compute_relevance
    from utils.store import layout as st

    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.store_dir or tmp
        t0 = time.perf_counter()
        s1 = compute_relevance(Stage1Config(data_dir=args.data_dir, store_dir=store_dir, model=args.model,
                                            weights=args.weights, layer=layer, batch_size=args.batch_size,
                                            num_workers=args.num_workers, device=args.device, progress=False,
                                            class_index=args.class_index),
                               loaded=lm)
        stage1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        concepts, _, _, _ = channel_concepts(st.model_store(store_dir, lm, layer), args.tau, args.p, args.gamma)
        stage2 = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(s1["store"]) for f in fs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    many = sorted(c for c, g in concepts.items() if len(g) >= 2)
    print(f"labelled path: {lm.name} {layer} on {s1['images']} training images: stage 1 {stage1:.1f} s "
          f"({'reused' if s1.get('already_complete') else 'computed'}; store {size / 2 ** 20:.1f} MB), stage 2 "
          f"{stage2:.1f} s (tau {args.tau}, p {args.p}); peak RSS {peak:.2f} GB; {len(concepts)} candidates, "
          f"{len(many)} with 2+ concepts")


def split_candidates(args, runner, model, unit, lm, found, layer) -> None:
    """Split the ``--split`` most separated candidates (their clusters as concepts, the searched rule), check the
    one network's outputs against the original's, and give each concept unit's top-12 validation images' most
    frequent class and its share (the labels read only here)."""
    from utils.data.images import list_images
    from utils.method.split import filter_bank
    from utils.model.surgery import split_network
    from utils.passes.topk import stream_topk
    from utils.stages.clusters import split_unit

    chosen = found.candidates[: args.split]
    t0 = time.perf_counter()
    splits = [split_unit(found.units[c], unit.weight[c]).split() for c in chosen]
    seconds = time.perf_counter() - t0
    val = list_images(args.data_dir, "val")
    top = stream_topk(runner, model, unit, filter_bank(unit, splits), val, 12, lm.preprocess)
    net = split_network(model, {layer: splits})
    x = torch.stack([_image(val, i, lm.preprocess) for i in range(min(32, len(val)))]).to(runner.device)
    with torch.no_grad():
        diff = float((net(x) - model(x)).abs().max())
    good = 0
    for s in splits:
        cells, classes = [], []
        for j in range(1, s.k + 1):
            labels = top.get(s.channel, f"D{j}")["labels"].tolist()
            best = max(set(labels), key=labels.count)
            classes.append((best, labels.count(best) / len(labels)))
            cells.append(f"D{j}: {classes[-1][1]:.0%} class {best}")
        ok = all(share >= args.match for _, share in classes) and len({c for c, _ in classes}) == len(classes)
        good += ok
        print(f"  split unit {s.channel}: " + " | ".join(cells) + ("  <- each concept unit one class" if ok else ""))
    print(f"split {len(splits)} candidates in {seconds:.1f} s; {good} of them have concept units whose top-12 "
          f"validation images are each >= {args.match:.0%} of one class, a different class each; max |output "
          f"difference| of the one network {diff:.2g} on {len(x)} validation images")


def _image(images, i, transform):
    from utils.data.images import load_image

    return load_image(images, i, transform)


if __name__ == "__main__":
    main()
