"""Stage 3: split one polysemantic channel into one channel per concept.

Reads the stage-1 store in STORE_DIR for the concepts' average relevance vectors, sweeps
rho = 0.05, 0.10, ..., 1.00, scores every rho on the TRAINING images of the two concepts (one
forward pass up to the layer per image), picks the best (first maximal score), checks that the
disentangled network computes the original logits, and saves the result to
STORE_DIR/models_disentangled/<model>_channel<c>_c1-<classes>_c2-<classes>/ (record.json, filters.pt).
Several classes per concept (--classes_for_concept1 57 58 53) make one concept of all of them.

Several GPUs or machines: start the same command with torchrun, e.g.
  torchrun --nproc_per_node=4 -- disentangle_channel.py --data_dir D --store_dir S --channel_disentangle C ...
Each process scores a disjoint share of the images; the result equals a single-process run.
"""
import argparse
import time

from .parsing import (add_concept_args, add_image_pass_args, add_json_arg, check_channels, input_options, make_parser,
                   output_path, positive_int, required_concepts, write_json_output)
from ..errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_image_pass_args(p)
    g = p.add_argument_group("disentanglement")
    g.add_argument("--channel_disentangle", type=int, required=True, metavar="C",
                   help="the channel c of the layer to split")
    add_concept_args(g)
    g.add_argument("--check_images", type=positive_int, default=32, metavar="N",
                   help="concept images on which the original and the disentangled network's logits are "
                        "compared (full forwards; default: 32)")
    g.add_argument("--split_rule", choices=("paper", "positive"), default="paper",
                   help="paper: an input goes to the first concept j with rho * A_j > every other A_l (the paper's "
                        "rule, default); positive: the same, but only where A_j > 0, so that inputs that inhibit on "
                        "average stay shared (the record's folder name ends in _positive)")
    g.add_argument("--export", metavar="PATH", type=output_path, default=None,
                   help="also save the whole disentangled network (best rho) as a checkpoint "
                        "with its input transform (disentangle_channels.model.surgery.load_checkpoint rebuilds it; in a "
                        "clone: utils.model.surgery)")
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    from ..stages.splitting import Stage3Config, disentangle_channel
    from ..files import check_writable
    from ..passes.distributed import distributed_context
    from ..model.loading import load_model
    from ..data.preprocess import InputSpec
    from ..store.records import records_dir, store_record
    from ..store.records import export_checkpoint

    start = time.perf_counter()
    check_writable(records_dir(args.store_dir))  # before the pass
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        cfg = Stage3Config(data_dir=args.data_dir, store_dir=args.store_dir, channel=args.channel_disentangle,
                           concepts=required_concepts(args), model=args.model, weights=args.weights, layer=args.layer,
                           batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                           class_index=args.class_index, progress=not args.no_progress,
                           check_images=args.check_images, split_rule=args.split_rule, rank=rank, world_size=world,
                           **input_options(args))
        lm = load_model(args.model, args.weights, inputs=InputSpec.of(args))
        rec, sw = disentangle_channel(cfg, loaded=lm, check=lambda c: check_channels(
            args.nr_channels_in_layer_of_interest, c, f"layer {args.layer or 'last_conv'}"))
    if rank != 0:  # rank 0 alone prints and writes
        return
    print_record(rec)
    rec, files = store_record(args.store_dir, rec, sw)
    print(f"saved {rec.dir}/ (record.json, filters.pt)")
    if args.export:
        export_checkpoint(lm.model.cpu(), rec.model, [rec], args.export, preprocess=lm.preprocess)
        files.append(args.export)
        print(f"exported the disentangled network (rho {rec.best_rho:.2f}) to {args.export}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    write_json_output(args.json, {
        "channel": rec.channel, **{f"classes_for_concept{j}": cs for j, cs in enumerate(rec.concepts, 1)},
        "scores": rec.scores, "best_rho": rec.best_rho,
        "sources": {r: {k: v for k, v in src.items() if k != "shared"} for r, src in rec.sources.items()},
        "max_abs_logit_diff": rec.max_abs_logit_diff, "files": files, "provenance": rec.provenance})


def print_record(rec) -> None:
    """The concepts, the rho sweep (|S_j|, |S0|, score; best marked), the logit check and the pass speed."""
    print(f"channel {rec.channel} of {rec.model} {rec.layer}")
    for j, cs in enumerate(rec.concepts, 1):
        names = ", ".join(f"{t} {rec.class_names[str(t)]}" for t in cs)
        print(f"  concept {j}: {names} ({rec.train_images[f'concept{j}']} training images)")
    print(f"{'rho':>6} " + " ".join(f"{f'|S{j}|':>6}" for j in range(1, rec.k + 1)) + f" {'|S0|':>6} {'score':>14}")
    for r in rec.rhos:
        key = f"{r:.2f}"
        src = rec.sources[key]
        sizes = " ".join(f"{len(src[f'concept{j}']):>6}" for j in range(1, rec.k + 1))
        mark = "  <- best" if r == rec.best_rho else ""
        print(f"{key:>6} {sizes} {len(src['shared']):>6} {rec.scores[key]:>14.6g}{mark}")
    best = f"{rec.best_rho:.2f}"
    print(f"best rho {best} (score {rec.scores[best]:.6g})")
    print(f"max |logit difference| original vs disentangled: {rec.max_abs_logit_diff:.3g} "
          f"(on {rec.equivalence_images} concept images)")
    n = sum(rec.train_images.values())
    print(f"pass: {n} images in {rec.seconds:.1f} s ({rec.images_per_second:.1f} img/s)")


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
