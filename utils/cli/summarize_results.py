"""The paper's table: mean fractions over every per-pair CSV of a results folder.

Reads every <name>_concept1.csv and <name>_concept2.csv that get_results.py --get_quantitative wrote
into RESULTS_DIR (default: ./results_quantitative) and prints, for concept-1 and for concept-2
images, the mean of each column (Disentangled 1, Disentangled 2, Residual: fractions of the
original activation) over all rows of all pairs, with the number of pairs and rows. Evaluations
with a non-default rho (--f) or tau are kept apart, one table each. Also writes summary.csv and
summary.md into RESULTS_DIR. Same as: python get_results.py --summarize RESULTS_DIR
"""
from __future__ import annotations

import argparse
import os

from .parsing import add_json_arg, make_parser, write_json_output
from ..errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--results_dir", default=os.path.join(".", "results_quantitative"),
                   help="folder of the per-pair CSVs (default: ./results_quantitative)")
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> dict:
    from .get_results import summarize_command

    out = summarize_command(args.results_dir)
    write_json_output(args.json, out)
    return out


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
