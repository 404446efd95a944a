#!/usr/bin/env python
"""Stage 3: split one polysemantic channel into one channel per concept.

Reads the stage-1 store in STORE_DIR for the concepts' average relevance vectors, sweeps
rho = 0.05, 0.10, ..., 1.00, scores every rho on the TRAINING images of the two concepts (one
forward pass up to the layer per image), picks the best (first maximal score), checks that the
disentangled network computes the original logits, and saves the result to
STORE_DIR/models_disentangled/<model>_channel<c>_c1-<classes>_c2-<classes>/ (record.json, filters.pt).
Several classes per concept (--classes_for_concept1 57 58 53) make one concept of all of them.

Several GPUs or machines: start the same command with torchrun, e.g.
  torchrun --nproc_per_node=4 disentangle_channel.py --data_dir D --store_dir S --channel_disentangle C ...
Each process scores a disjoint share of the images; the result equals a single-process run.
"""
import argparse
import os
import time

from utils.cli import (add_data_args, add_device_args, add_json_arg, add_model_args, add_store_arg, check_channels,
                       write_json_output)
from utils.errors import run_cli


def _export_path(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {path} into")
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_model_args(p)
    add_store_arg(p)
    add_device_args(p)
    g = p.add_argument_group("disentanglement")
    g.add_argument("--channel_disentangle", type=int, required=True, metavar="C",
                   help="the channel c of the layer to split")
    g.add_argument("--classes_for_concept1", type=int, nargs="+", required=True, metavar="T",
                   help="class index(es) of concept 1")
    g.add_argument("--classes_for_concept2", type=int, nargs="+", required=True, metavar="T",
                   help="class index(es) of concept 2")
    g.add_argument("--check_images", type=int, default=32, metavar="N",
                   help="concept images on which the original and the disentangled network's logits are "
                        "compared (full forwards; default: 32)")
    g.add_argument("--export", metavar="PATH", type=_export_path, default=None,
                   help="also save the whole disentangled network (best rho) as a checkpoint "
                        "(utils.surgery.load_checkpoint rebuilds it)")
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    from utils.disentangle import Stage3Config, disentangle_channel, record_folder, save_record
    from utils.models import load_model
    from utils.surgery import export_checkpoint
    from utils.distributed import distributed_context

    start = time.perf_counter()
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        cfg = Stage3Config(data_dir=args.data_dir, store_dir=args.store_dir, channel=args.channel_disentangle,
                           classes_for_concept1=args.classes_for_concept1,
                           classes_for_concept2=args.classes_for_concept2, model=args.model, weights=args.weights,
                           layer=args.layer, batch_size=args.batch_size, device=device, gpu=args.gpu,
                           num_workers=args.num_workers, check_images=args.check_images, rank=rank, world_size=world)
        lm = load_model(args.model, args.weights)
        rec, sw = disentangle_channel(cfg, loaded=lm, check=lambda c: check_channels(
            args.nr_channels_in_layer_of_interest, c, f"layer {args.layer or 'last_conv'}"))
    if rank != 0:  # rank 0 alone prints and writes
        return

    names = rec["class_names"]
    concept = {k: ", ".join(f"{t} {names[str(t)]}" for t in rec[f"classes_for_{k}"]) for k in ("concept1", "concept2")}
    print(f"channel {rec['channel']} of {rec['model']} {rec['layer']}")
    print(f"  concept 1: {concept['concept1']} ({rec['train_images']['concept1']} training images)")
    print(f"  concept 2: {concept['concept2']} ({rec['train_images']['concept2']} training images)")
    print(f"{'rho':>6} {'|S1|':>6} {'|S2|':>6} {'|S0|':>6} {'score':>14}")
    for r in rec["rhos"]:
        key, src = f"{r:.2f}", rec["sources"][f"{r:.2f}"]
        mark = "  <- best" if r == rec["best_rho"] else ""
        print(f"{key:>6} {len(src['concept1']):>6} {len(src['concept2']):>6} {len(src['shared']):>6} "
              f"{rec['scores'][key]:>14.6g}{mark}")
    best = f"{rec['best_rho']:.2f}"
    print(f"best rho {best} (score {rec['scores'][best]:.6g})")
    print(f"max |logit difference| original vs disentangled: {rec['max_abs_logit_diff']:.3g} "
          f"(on {rec['equivalence_images']} concept images)")
    n = rec["train_images"]["concept1"] + rec["train_images"]["concept2"]
    print(f"pass: {n} images in {rec['seconds']:.1f} s ({rec['images_per_second']:.1f} img/s)")

    folder = record_folder(args.store_dir, rec)
    files = save_record(folder, rec, sw)
    print(f"saved {folder}/ (record.json, filters.pt)")
    if args.export:
        export_checkpoint(lm.model.cpu(), rec["model"], [{**rec, "dir": folder}], args.export)
        files.append(args.export)
        print(f"exported the disentangled network (rho {rec['best_rho']:.2f}) to {args.export}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    write_json_output(args.json, {
        "channel": rec["channel"],
        "classes_for_concept1": rec["classes_for_concept1"],
        "classes_for_concept2": rec["classes_for_concept2"],
        "scores": rec["scores"],
        "best_rho": rec["best_rho"],
        "sources": {k: {"concept1": v["concept1"], "concept2": v["concept2"]} for k, v in rec["sources"].items()},
        "max_abs_logit_diff": rec["max_abs_logit_diff"],
        "files": files,
    })


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
