"""Stage 2: candidate channels and gamma-polysemantic pairs, from the stage-1 store alone.

A channel c is important for a training image when R[c] >= tau * (sum of the image's positive R);
c is relevant to class t when it is important for at least p * n_t of t's images; a candidate is
relevant to two or more classes. For each candidate and each pair of its classes, the cosine
similarity s of the two average relevance vectors (ARVs, exact, from the stored per-class input
sums) is computed in float64; pairs with cos_sim_low <= s < cos_sim_high are listed, high to low,
and written to STORE_DIR/results_get_cosine_similarities/. Reads no images.
"""
import argparse
import os

from .parsing import (add_json_arg, add_model_args, add_selection_args, add_store_arg, make_parser, positive_int,
                   write_json_output)
from ..errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_model_args(p, weights_default=None, inputs=False,
                   weights_help="only checked against the store when given (a torchvision weights name, a "
                                "checkpoint file, or 'none'); stage 2 never loads weights")
    add_store_arg(p)
    g = p.add_argument_group("selection")
    add_selection_args(g, 0.05, 1.0, "gamma_high: list pairs with s < this (default: 1.0, every pair, as the "
                                      "authors' code; the paper's gamma is 0.5)", ", the authors' code's default")
    g.add_argument("--cos_sim_low", type=float, default=0.0, help="gamma_low: list pairs with s >= this (default: 0.0)")
    g.add_argument("--rows", type=positive_int, default=16384, help="relevance rows read per step (default: 16384)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    c = p.add_argument_group("accepted for compatibility (stage 2 reads no images)")
    c.add_argument("--data_dir", default=None, help="ignored")
    c.add_argument("--batch_size", type=int, default=None, help="ignored")
    add_json_arg(p)
    return p


def pairs_table(pairs: list, label) -> str:
    """The pairs with class names, one per line (``label(t)`` gives e.g. ``530 digital clock``)."""
    if not pairs:
        return ""
    rows = [(str(d["channel"]), label(d["class1"]), label(d["class2"]), f"{d['cosine_similarity']:.4f}") for d in pairs]
    head = ("channel", "class 1", "class 2", "cos sim")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = lambda r: f"{r[0]:>{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}"  # noqa: E731
    return "\n".join(fmt(r) for r in [head, *rows])


def main(args: argparse.Namespace) -> None:
    from .parsing import check_channels
    from ..errors import UserError
    from ..stages.candidates import check_params, find_pairs, results_path, write_pairs
    from ..files import check_writable
    from ..store.layout import open_store, store_head

    check_params(args.tau, args.p, args.cos_sim_low, args.cos_sim_high)
    if args.rows < 1:
        raise UserError("--rows must be at least 1")
    store = open_store(args.store_dir, args.model, args.layer, args.weights)
    check_channels(args.nr_channels_in_layer_of_interest, store.num_channels,
                   f"layer {store.meta['layer']} in store {store.path}")
    m = store.meta
    path = results_path(args.store_dir, store_head(store.path), args.tau, args.p, args.cos_sim_low, args.cos_sim_high)
    check_writable(os.path.dirname(path))  # before the pass over the relevance rows
    print(f"store {store.path}: {m['model']} {m['layer']}, {m['num_images']} training images, "
          f"{store.num_classes} classes, {store.num_channels} channels")
    res = find_pairs(store, args.tau, args.p, args.cos_sim_low, args.cos_sim_high, rows=args.rows,
                     progress=not args.no_progress)
    print(f"tau={args.tau}, p={args.p}: {len(res.candidates)} candidate channels (relevant to 2+ classes), "
          f"{sum(len(v) * (len(v) - 1) // 2 for v in res.candidates.values())} class pairs; "
          f"{len(res.pairs)} with {args.cos_sim_low} <= s < {args.cos_sim_high} "
          f"({sum(res.seconds.values()):.1f} s)")
    table = pairs_table(res.pairs, store.names.label)
    if table:
        print(table)
    print("Objects with cosine similarity below threshold:")
    print([{**d, "cosine_similarity": round(d["cosine_similarity"], 4)} for d in res.pairs])
    print(len(res.pairs))
    write_pairs(path, res.pairs)
    print(f"written: {path}")
    write_json_output(args.json, {"pairs": res.pairs,
                                  "candidates": {str(c): ts for c, ts in res.candidates.items()},
                                  "txt": path})


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
