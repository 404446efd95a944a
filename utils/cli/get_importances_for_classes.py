"""Stage 1: relevance of every channel of the layer of interest for every training image.

One pass over DATA_DIR/train. For each image: R[c] = sum_hw a[c] * d z_label / d a[c] at the
output of the layer (signed), its label and predicted class; per class, the sum of the layer's
input map (for the closed-form ARVs of stage 2). Results go to
STORE_DIR/<model>_channel_importances/. Rerun the same command to continue after a kill.
A Linear layer's units are its neurons and its positions are tokens or cells: the sums run over
the positions that count (--positions).

Several GPUs or machines: start the same command with torchrun, e.g.
  torchrun --nproc_per_node=4 -- get_importances_for_classes.py --data_dir D --store_dir S
Each process takes a disjoint share of the images; the store equals a single-process run.
"""
import argparse

from .parsing import add_image_pass_args, add_json_arg, input_options, make_parser, positive_int, write_json_output
from ..errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_image_pass_args(p)
    p.add_argument("--max_images_per_class", type=positive_int, default=None, metavar="N",
                   help="use only the first N images of each class (quick runs)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the pass (default: fp32); recorded in the store. fp16 scales the "
                        "backward pass (dynamic loss scaling) and refuses logits beyond float16's range (use bf16)")
    p.add_argument("--chunk_images", type=positive_int, default=None, metavar="N",
                   help="images per resumable chunk (default: about 4096, a multiple of --batch_size); "
                        "fixed when the store is created")
    p.add_argument("--positions", choices=("auto", "all", "cls"), default="auto",
                   help="a Linear layer's positions that count: auto (those that reach the logits, measured: a "
                        "ViT's class token after its last block, a distilled DeiT's class and distillation tokens "
                        "(tokens[:2]), an average-pool ViT's patch tokens (tokens[P:], P its class and register "
                        "tokens), every token or cell elsewhere), all, or cls (the class token alone); a Conv2d's "
                        "are all (default: auto); recorded in the store")
    p.add_argument("--wait", action="store_true",
                   help="if another job is writing this store, wait for it to finish (default: stop with one line)")
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    from ..stages.relevance import Stage1Config, accuracy_lines, compute_relevance
    from .parsing import check_channels
    from ..passes.distributed import distributed_context

    if args.chunk_images is not None and args.chunk_images < 1:
        raise UserError("--chunk_images must be at least 1")
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        cfg = Stage1Config(data_dir=args.data_dir, store_dir=args.store_dir, model=args.model, weights=args.weights,
                           layer=args.layer, batch_size=args.batch_size, device=device,
                           class_index=args.class_index,
                           num_workers=args.num_workers, max_images_per_class=args.max_images_per_class,
                           precision=args.precision, chunk_images=args.chunk_images, rank=rank, world_size=world,
                           wait=args.wait, positions=args.positions, progress=not args.no_progress,
                           **input_options(args))
        s = compute_relevance(cfg, check=lambda c: check_channels(args.nr_channels_in_layer_of_interest, c,
                                                                    f"layer {args.layer or 'last_conv'}"))
    if rank != 0:
        return
    if s.get("already_complete"):
        print(f"store {s['store']} is already complete ({s['images']} images, {s['channels']} channels); nothing to do")
    else:
        print(f"done: {s['processed']} images in {s['seconds']:.1f} s ({s['images_per_second']:.1f} img/s); "
              f"store {s['store']} ({s['images']} images x {s['channels']} channels)")
    print("\n".join(accuracy_lines(s["accuracy"], s["classes"])))
    write_json_output(args.json, {k: s[k] for k in ("store", "images", "channels", "seconds", "images_per_second",
                                                    "accuracy", "provenance")})


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
