#!/usr/bin/env python
"""Every split rule (paper, positive, search, function), each read raw and in its concepts' directions, on the
channels the layer command splits.

Runs the layer command (``disentangle_layer.py``, same flags, no feature visualisations) once per variant on the
same store (read in place; nothing is written into ``--store_dir``): for every split channel the top-k purity, the
ROC AUC (concept against every other validation image) and the pairwise AUC (concept against the other concepts'
images) of every concept channel, how many concept channels the ablation pass certifies (``--ablation``; the
layer command's proof of each split), the one network's logit check and the command's seconds. Prints a table per
channel and, per variant, the means over channels (of each channel's mean over its concepts) with 95% bootstrap
intervals over channels, the paired difference to the paper's rule read raw (as the authors' code reads it), and which variant wins
on purity outside every interval (or that none does).

    python get_importances_for_classes.py --data_dir demo_data/digits --model mobilenet_v3_small \\
        --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --store_dir /tmp/rules_store
    python benchmarks/split_rules.py --data_dir demo_data/digits --model mobilenet_v3_small \\
        --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --store_dir /tmp/rules_store --tau 0.01 \\
        --json rules.json

``--variants paper:none search:gradient ...`` runs only those. ``--json PATH``: ``{"variants": {"paper:none":
{"mean_purity", "purity_interval", "mean_auc", "auc_interval", "mean_pair_auc", "pair_auc_interval",
"max_abs_logit_diff", "seconds", "timings", "certified": [n, of], "channels": {"<c>": {"concepts", "best_rho",
"orientation", "purity": [p1, ...], "auc": [...], "pair_auc": [...], "certified": [true, ...]}}}, ...}, "difference": {"<variant>": {"purity": [mean, lo, hi], "auc":
[...], "pair_auc": [...]}}, "winner": "<variant>[ = <variant> ...]" or null}`` (variants with the same purity on
every channel count as one).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import disentangle_layer  # noqa: E402

VARIANTS = tuple(f"{r}:{o}" for r in ("paper", "positive", "search", "function") for o in ("none", "gradient"))
BASE = "paper:none"  # the paper's rule, read as the authors' code reads it
KEYS = ("purity", "auc", "pair_auc")


def run_variant(args, variant: str, work: str, lm) -> dict:
    """The layer command with ``variant`` (``rule:orientation``) into ``work/<variant>``: per channel concepts,
    best rho, orientation, purity, AUC, pairwise AUC; the logit check and the seconds."""
    from utils.stages.layer import disentangle_layer as run_layer

    args.split_rule, args.orientation = variant.split(":")
    args.out_dir, args.fv_steps = os.path.join(work, variant.replace(":", "_")), 0
    out = run_layer(disentangle_layer.layer_config(args, args.device), loaded=lm, log=lambda *a: None)
    timings = json.load(open(os.path.join(out["out_dir"], "layer.json")))["timings"]
    channels = {c: {"concepts": ch["concepts"], "best_rho": ch["best_rho"], "orientation": ch["orientation"],
                    "purity": ch["purity"]["concepts"], "auc": ch["auc"]["concepts"],
                    "pair_auc": ch["pair_auc"]["concepts"], "purity_original": ch["purity"]["original"],
                    "auc_original": ch["auc"]["original"],
                    "certified": [e["certified"] for e in ch.get("effects") or []]} for c, ch in out["channels"].items()}
    proven = [v for ch in channels.values() for v in ch["certified"]]
    return {"channels": channels, "max_abs_logit_diff": out["max_abs_logit_diff"], "seconds": out["seconds"],
            "timings": timings, "certified": [sum(proven), len(proven)]}


def per_channel(run: dict, key: str, channels: list[str]) -> np.ndarray:
    """Each of ``channels``' mean over its concepts of ``key`` (purity, auc, pair_auc)."""
    return np.array([np.mean([v for v in run["channels"][c][key] if v is not None] or [np.nan]) for c in channels])


def bootstrap(values: np.ndarray, n: int, seed: int) -> list[float]:
    """``[mean, lo, hi]``: the mean and its 95% percentile interval over ``n`` resamples of the channels."""
    values = values[~np.isnan(values)]
    if not len(values):
        return [float("nan")] * 3
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return [float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarise(runs: dict, n: int, seed: int) -> dict:
    """Means with intervals per variant; paired differences to BASE (the same channels); the winner on purity:
    the variant whose paired purity difference to every other variant has an interval above 0 (None if none);
    variants with the same purity on every channel count as one ("search:none = search:gradient")."""
    channels = sorted(set.intersection(*(set(r["channels"]) for r in runs.values())), key=int)
    out = {"variants": runs, "channels": channels, "difference": {}, "winner": None}
    for v, r in runs.items():
        for key in KEYS:
            m = bootstrap(per_channel(r, key, channels), n, seed)
            r[f"mean_{key}"], r[f"{key}_interval"] = m[0], m[1:]
        if v != BASE and BASE in runs:
            out["difference"][v] = {key: bootstrap(per_channel(r, key, channels) - per_channel(runs[BASE], key, channels),
                                                   n, seed) for key in KEYS}
    purity = {v: per_channel(r, "purity", channels) for v, r in runs.items()}
    for v in runs:  # variants with the same purity on every channel are one (their readings agree there)
        same = [w for w in runs if np.array_equal(purity[w], purity[v], equal_nan=True)]
        beats = [bootstrap(purity[v] - purity[w], n, seed)[1] > 0 for w in runs if w not in same]
        if beats and all(beats):
            out["winner"] = " = ".join(same)
    return out


def _cells(ch: dict | None) -> str:
    if ch is None:
        return f"{'missing':>34}"
    signs = "".join("-" if s < 0 else "+" for s in (ch["orientation"] or [])) or "·"
    proven = "/".join("yes" if v else "no" for v in ch["certified"]) or "-"
    return (f"{signs:>4} {'/'.join(f'{v:.0%}' for v in ch['purity']):>10} "
            f"{'/'.join('-' if v is None else f'{v:.2f}' for v in ch['auc']):>9} "
            f"{'/'.join('-' if v is None else f'{v:.2f}' for v in ch['pair_auc']):>9} {proven:>7}")


def print_table(out: dict) -> None:
    runs = out["variants"]
    print("per channel and variant: orientation, purity, AUC, pairwise AUC of its concept channels, certified")
    for c in out["channels"]:
        print(f"channel {c} (k = {len(next(iter(runs.values()))['channels'][c]['concepts'])})")
        for v, r in runs.items():
            print(f"  {v:>17} {_cells(r['channels'].get(c))}")
    print(f"\n{'variant':>17} {'purity':>22} {'AUC':>22} {'pairwise AUC':>22} {'certified':>10} {'max |diff|':>10} "
          f"{'seconds':>8}")
    for v, r in runs.items():
        cells = [f"{r[f'mean_{k}']:.3f} [{r[f'{k}_interval'][0]:.3f}, {r[f'{k}_interval'][1]:.3f}]" for k in KEYS]
        proven = f"{r['certified'][0]} of {r['certified'][1]}"
        print(f"{v:>17} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {proven:>10} {r['max_abs_logit_diff']:>10.2g} "
              f"{r['seconds']:>8.1f}")
    for v, d in out["difference"].items():
        print(f"{v} - {BASE}: " + ", ".join(f"{k} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (m, lo, hi) in d.items()))
    print(f"winner on purity (paired interval above 0 against every other variant): {out['winner'] or 'none'}"
          f" ({len(out['channels'])} channels; 95% bootstrap intervals over channels)")


def main() -> None:
    p = disentangle_layer.get_args_parser()
    p.description = __doc__
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the channels (default: 2000)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="RULE:ORIENTATION",
                   help=f"the variants to run (default: all eight: {' '.join(VARIANTS)})")
    args = p.parse_args()
    from utils.model.loading import load_model

    from utils.store.layout import is_store

    lm = load_model(args.model, args.weights)
    work = tempfile.mkdtemp(prefix="split_rules_")
    try:  # the store is read where it is; the records of every run go to a folder of their own
        stores, args.store_dir = args.store_dir, os.path.join(work, "store")
        os.makedirs(args.store_dir)
        for entry in os.listdir(stores):
            if is_store(os.path.join(stores, entry)):
                os.symlink(os.path.abspath(os.path.join(stores, entry)), os.path.join(args.store_dir, entry))
        runs = {v: run_variant(args, v, work, lm) for v in args.variants}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = summarise(runs, args.bootstrap, args.seed)
    print_table(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
