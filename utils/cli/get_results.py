"""Stage 4: how well a disentanglement worked, on the validation images of the two concepts.

One pass over DATA_DIR/val images of both concepts' classes. Per image: the relative attribution of
the channel in the original network and the spatial sums (before BatchNorm) of the original channel
and of its sub-channels Disentangled 1, Disentangled 2 and Residual.

  --get_qualitative   density plots (PNG) per concept, and the same curves as pgfplots data (.tex),
                      in OUT_DIR/plots/
  --get_quantitative  per concept, the rows d1/orig, d2/orig, res/orig of the images whose relative
                      attribution is >= tau, as OUT_DIR/results_quantitative/<name>_concept{1,2}.csv
                      (a rerun replaces its own files)
  --summarize DIR     print the paper's table over every CSV in DIR (same as summarize_results.py)

The disentanglement is read from MODEL_DIR/<name>/ as written by disentangle_channel.py.

Several GPUs or machines: start the same command with torchrun (torchrun --nproc_per_node=4 --
get_results.py ...; the -- ends torchrun's own options); each process evaluates a disjoint share of the images, process 0 gathers them
and writes outputs equal to a single-process run.
"""
from __future__ import annotations

import argparse
import os

from .parsing import (add_concept_args, add_data_args, add_device_args, add_json_arg, add_model_args, check_channels,
                   input_options, make_parser, nonnegative_float, nonnegative_int, required_concepts, write_json_output)
from ..errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_data_args(p, required=False)
    add_model_args(p, layer_flags=("--layer_of_interest", "--layer"))
    add_device_args(p)
    g = p.add_argument_group("disentanglement")
    g.add_argument("--model_dir", default=os.path.join("store", "models_disentangled"),
                   help="folder of the disentanglements, STORE_DIR/models_disentangled/ of disentangle_channel.py "
                        "(default: ./store/models_disentangled)")
    g.add_argument("--channel_of_interest", "--channel", dest="channel", type=int, default=None,
                   help="the disentangled channel c")
    add_concept_args(g)
    g.add_argument("--f", "--rho", dest="rho", type=float, default=None,
                   help="evaluate this rho of the sweep (0.05 .. 1.0) instead of the best one")
    o = p.add_argument_group("outputs")
    o.add_argument("--get_qualitative", action="store_true", help="write the density plots and pgfplots data")
    o.add_argument("--get_quantitative", action="store_true", help="write the per-image fraction rows as CSV")
    o.add_argument("--proportion_attribution_required", "--tau", dest="tau", type=nonnegative_float, default=0.03,
                   help="tau: minimum relative attribution of the channel for an image to give a row (default: 0.03)")
    o.add_argument("--out_dir", default=".", help="where plots/ and results_quantitative/ go (default: .)")
    o.add_argument("--purity", dest="purity_k", type=nonnegative_int, default=0, metavar="K",
                   help="also the purity of Original, D1, D2: shares of their top-K val images (all classes) "
                        "that belong to each concept (one more pass over val/; default: off)")
    o.add_argument("--summarize", metavar="DIR", default=None,
                   help="only print (and write summary.csv/.md into DIR) the table over the CSVs in DIR")
    add_json_arg(p)
    return p


def summarize_command(results_dir: str) -> dict:
    """Print the paper's table for ``results_dir`` and write summary.csv / summary.md there."""
    from ..report.tables import format_table, summarize, write_summary

    table = summarize(results_dir)
    print(f"results in {results_dir}")
    print(format_table(table))
    csv_path, md_path = write_summary(results_dir, table)
    print(f"wrote {csv_path} and {md_path}")
    rows = [{**e, "mean": [None if v != v else v for v in e["mean"]]} for e in table]  # NaN -> null
    return {"table": rows, "csv": csv_path, "markdown": md_path}


def main(args: argparse.Namespace, loaded=None) -> dict:
    """Run stage 4 (or the summary); ``loaded`` (a utils.model.loading.LoadedModel) replaces --model/--weights."""
    if args.summarize:
        out = summarize_command(args.summarize)
        write_json_output(args.json, out)
        return out
    from ..stages.evaluation import Stage4Config, run_stage4

    missing = [f for f, v in (("--data_dir", args.data_dir), ("--channel_of_interest", args.channel)) if v is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or pass --summarize DIR)")
    concepts = required_concepts(args)
    from ..passes.distributed import distributed_context
    from ..files import check_writable

    qualitative, quantitative = args.get_qualitative, args.get_quantitative
    both = not (qualitative or quantitative)
    for wanted, sub in ((qualitative or both, "plots"), (quantitative or both, "results_quantitative")):
        if wanted:
            check_writable(os.path.join(args.out_dir, sub))  # before the pass
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        if both:
            if rank == 0:
                print("neither --get_qualitative nor --get_quantitative given: doing both")
            qualitative = quantitative = True
        cfg = Stage4Config(data_dir=args.data_dir, model_dir=args.model_dir, model=args.model, weights=args.weights,
                           layer=args.layer, channel=args.channel, concepts=concepts, rho=args.rho,
                           tau=args.tau, out_dir=args.out_dir,
                           qualitative=qualitative, quantitative=quantitative, batch_size=args.batch_size,
                           num_workers=args.num_workers, device=device,
                           class_index=args.class_index,
                           progress=not args.no_progress,
                           purity_k=args.purity_k, rank=rank, world_size=world, **input_options(args))
        out = run_stage4(cfg, loaded=loaded, log=print, check=lambda c: check_channels(
            args.nr_channels_in_layer_of_interest, c, f"layer {args.layer or 'last_conv'}"))
    if rank == 0:  # rank 0 alone writes
        write_json_output(args.json, out)
    return out


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
