"""Pictures of what a channel responds to, before and after the split, and a purity score.

Reads the disentanglement of CHANNEL for the two concepts from MODEL_DIR (the models_disentangled
folder of disentangle_channel.py) and, for the original channel, Disentangled 1 and Disentangled 2
(and the residual with --residual):
  - the top-k activating images of --split (all classes; activation = spatial sum of the sub-channel's
    output, before BatchNorm), cropped to the receptive field around the maximum (--heatmap: whole
    image with the activation map over it), found in ONE pass over the images;
  - a feature visualisation (MACO: phase optimised under the magnitude spectrum of your own training
    images; or a 1/f Fourier image), unless --no_fv;
  - teaser.png / teaser.pdf (the paper's teaser layout; frames: blue concept 1, orange concept 2,
    gray other classes), the separate images, and purity.json: the fraction of each sub-channel's
    top-k images in concept 1's classes, concept 2's classes, and others.

  python visualize_channel.py --data_dir /datasets/imagenet --store_dir /store_dir --model resnet50 \\
      --channel_of_interest 1660 --classes_for_concept1 530 --classes_for_concept2 938

Under torchrun (torchrun --nproc_per_node=N -- visualize_channel.py ...) the top-k search is shared out among the
processes and process 0 alone draws the pictures and feature visualisations, writes and prints.
"""
import argparse

from .parsing import (add_concept_args, add_data_args, add_device_args, add_json_arg, add_model_args, check_channels,
                   input_options, make_parser, positive_int, required_concepts, write_json_output)
from ..errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_data_args(p)
    add_model_args(p, layer_flags=("--layer", "--layer_of_interest"))
    add_device_args(p)
    g = p.add_argument_group("disentanglement")
    g.add_argument("--model_dir", default=None, help="the models_disentangled folder (default: STORE_DIR/models_disentangled)")
    g.add_argument("--store_dir", default="./store", help="folder of the store (default: ./store)")
    g.add_argument("--channel_of_interest", "--channel_disentangle", "--channel", dest="channel", type=int, required=True,
                   help="the split channel c")
    add_concept_args(g)
    g.add_argument("--f", dest="rho", type=float, default=None, help="rho of the split (default: the record's best)")
    g = p.add_argument_group("pictures")
    g.add_argument("--split", choices=("train", "val"), default="train", help="images to search (default: train)")
    g.add_argument("--top_k", type=positive_int, default=12, help="top activating images per sub-channel (default: 12)")
    g.add_argument("--residual", action="store_true", help="also show the residual sub-channel")
    g.add_argument("--heatmap", action="store_true",
                   help="show whole images with the activation map instead of receptive-field crops")
    g.add_argument("--crop_size", type=int, default=None, help="crop side in pixels (default: the effective receptive field)")
    g.add_argument("--out_dir", default="./visualizations", help="output folder (default: ./visualizations)")
    g = p.add_argument_group("feature visualisation")
    g.add_argument("--no_fv", action="store_true", help="skip the feature visualisations")
    g.add_argument("--fv_method", choices=("maco", "fourier"), default="maco",
                   help="maco: phase only, magnitude from your training images; fourier: 1/f spectrum (default: maco)")
    g.add_argument("--fv_steps", type=int, default=128, help="optimisation steps (default: 128)")
    g.add_argument("--fv_size", type=int, default=224, help="image side in pixels (default: 224)")
    g.add_argument("--fv_views", type=int, default=2, help="augmented views per step (default: 2)")
    g.add_argument("--fv_spectrum_images", type=int, default=256,
                   help="training images averaged for MACO's magnitude spectrum (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the feature visualisation (default: 0)")
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    import os

    from ..passes.distributed import distributed_context
    from ..passes.featvis import FVConfig
    from ..files import check_writable
    from ..stages.visualize import PicturesConfig, channel_pictures
    from ..store.records import records_dir

    for flag, v, low in (("--fv_steps", args.fv_steps, 1), ("--fv_size", args.fv_size, 16),
                         ("--fv_views", args.fv_views, 1), ("--fv_spectrum_images", args.fv_spectrum_images, 1)):
        if v < low:
            raise UserError(f"{flag} must be at least {low}")
    check_writable(args.out_dir)  # before the passes
    fv = None if args.no_fv else FVConfig(method=args.fv_method, steps=args.fv_steps, size=args.fv_size,
                                          input_size=min(args.fv_size, 224), views=args.fv_views, seed=args.seed)
    # under torchrun the top-k search is shared out; process 0 alone draws, writes and prints
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        cfg = PicturesConfig(
            data_dir=args.data_dir, model_dir=args.model_dir or records_dir(args.store_dir),
            channel=args.channel, concepts=required_concepts(args), model=args.model, weights=args.weights,
            layer=args.layer, rho=args.rho, split=args.split, top_k=args.top_k, out_dir=args.out_dir,
            residual=args.residual, heatmap=args.heatmap, crop_size=args.crop_size, fv=fv,
            fv_spectrum_images=args.fv_spectrum_images, batch_size=args.batch_size, num_workers=args.num_workers,
            device=device, class_index=args.class_index, progress=not args.no_progress, rank=rank, world_size=world,
            **input_options(args))
        s = channel_pictures(cfg, check=lambda c: check_channels(args.nr_channels_in_layer_of_interest, c,
                                                                 f"layer {args.layer or 'last_conv'}"))
    if rank != 0:
        return
    print(f"channel {s['channel']} of {s['model']} {s['layer']} at rho {s['rho']:.2f}: top {s['top_k']} of "
          f"{s['images_searched']} {s['split']} images in {s['seconds_topk']:.1f} s")
    for name, sub in s["subchannels"].items():
        p, fvi = sub["purity"], sub["feature_visualisation"]
        fv_text = (f"; feature visualisation {fvi['activation']:.3g} (noise {fvi['activation_on_noise']:.3g}, "
                   f"{fvi['seconds']:.0f} s)" if fvi else "")
        shares = ", ".join(f"{key.replace('concept', 'concept ')} {v:.0%}" for key, v in p.items() if key != "k")
        print(f"  {sub['label']:<15} purity: {shares}{fv_text}")
    print(f"figure: {os.path.join(s['out_dir'], 'teaser.png')} (and .pdf); purity: {os.path.join(s['out_dir'], 'purity.json')}")
    write_json_output(args.json, s)


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
