#!/usr/bin/env python
"""The paper's split rule against the positive rule, on the channels the layer command splits.

Runs the layer command (``disentangle_layer.py``, same flags, no feature visualisations) once per rule on the
same store (read in place; nothing is written into ``--store_dir``): for every split channel each rule's best rho (by the paper's training score), the top-k purity
and the ROC AUC of every concept channel for its concept on all validation images, and the one network's
logit check. Prints a table per channel and the means over channels (of each channel's mean over its
concepts) with 95% bootstrap intervals over channels, and the paired difference positive - paper.

    python get_importances_for_classes.py --data_dir demo_data/digits --model mobilenet_v3_small \\
        --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --store_dir /tmp/rules_store
    python benchmarks/split_rules.py --data_dir demo_data/digits --model mobilenet_v3_small \\
        --weights demo_data/mobilenet_v3_small_digits_e2_s0.pt --store_dir /tmp/rules_store --tau 0.01 \\
        --json rules.json

``--json PATH``: ``{"rules": {"paper": {"mean_purity", "mean_auc", "purity_interval", "auc_interval",
"max_abs_logit_diff", "channels": {"<c>": {"concepts", "best_rho", "purity": [p1, ...], "auc": [a1, ...]}}},
"positive": {...}}, "difference": {"purity": [mean, lo, hi], "auc": [mean, lo, hi]}}``.
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

RULES = ("paper", "positive")


def run_rule(args, rule: str, work: str, lm) -> dict:
    """The layer command with ``rule`` into ``work/rule``: per channel concepts, best rho, purity, AUC."""
    from utils.stages.layer import disentangle_layer as run_layer

    args.split_rule, args.out_dir, args.fv_steps = rule, os.path.join(work, rule), 0
    out = run_layer(disentangle_layer.layer_config(args, args.device), loaded=lm, log=lambda *a: None)
    channels = {c: {"concepts": ch["concepts"], "best_rho": ch["best_rho"], "purity": ch["purity"]["concepts"],
                    "auc": ch["auc"]["concepts"], "purity_original": ch["purity"]["original"],
                    "auc_original": ch["auc"]["original"]} for c, ch in out["channels"].items()}
    return {"channels": channels, "max_abs_logit_diff": out["max_abs_logit_diff"]}


def per_channel(rule: dict, key: str) -> np.ndarray:
    """Each channel's mean over its concepts of ``key`` (purity or auc), in channel order."""
    return np.array([np.mean([v for v in ch[key] if v is not None]) for _, ch in sorted(rule["channels"].items(),
                                                                                      key=lambda kv: int(kv[0]))])


def bootstrap(values: np.ndarray, n: int, seed: int) -> list[float]:
    """``[mean, lo, hi]``: the mean and its 95% percentile interval over ``n`` resamples of the channels."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return [float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarise(rules: dict, n: int, seed: int) -> dict:
    """Means with intervals per rule, and the paired difference (the same channels under both rules)."""
    out = {"rules": rules, "difference": {}}
    for key in ("purity", "auc"):
        for rule in RULES:
            m = bootstrap(per_channel(rules[rule], key), n, seed)
            rules[rule][f"mean_{key}"], rules[rule][f"{key}_interval"] = m[0], m[1:]
        common = sorted(set(rules["paper"]["channels"]) & set(rules["positive"]["channels"]), key=int)
        diff = [np.mean(rules["positive"]["channels"][c][key]) - np.mean(rules["paper"]["channels"][c][key])
                for c in common]
        out["difference"][key] = bootstrap(np.array(diff), n, seed)
    return out


def print_table(out: dict) -> None:
    rules = out["rules"]
    print(f"{'channel':>7} {'k':>2} | {'paper: rho':>10} {'purity':>12} {'AUC':>14} | {'positive: rho':>13} "
          f"{'purity':>12} {'AUC':>14}")
    for c in sorted(rules["paper"]["channels"], key=int):
        cells = []
        for rule in RULES:
            ch = rules[rule]["channels"].get(c)
            cells.append("missing" if ch is None else f"{ch['best_rho']:>10.2f} "
                         f"{'/'.join(f'{v:.0%}' for v in ch['purity']):>12} "
                         f"{'/'.join('-' if v is None else f'{v:.3f}' for v in ch['auc']):>14}")
        print(f"{c:>7} {len(rules['paper']['channels'][c]['concepts']):>2} | {cells[0]} | {cells[1]:>41}")
    for rule in RULES:
        r = rules[rule]
        print(f"{rule:>8}: mean purity {r['mean_purity']:.3f} [{r['purity_interval'][0]:.3f}, "
              f"{r['purity_interval'][1]:.3f}], mean AUC {r['mean_auc']:.3f} [{r['auc_interval'][0]:.3f}, "
              f"{r['auc_interval'][1]:.3f}], max |logit difference| {r['max_abs_logit_diff']:.2g}")
    for key, (m, lo, hi) in out["difference"].items():
        print(f"positive - paper, {key}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% bootstrap interval over channels)")


def main() -> None:
    p = disentangle_layer.get_args_parser()
    p.description = __doc__
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the channels (default: 2000)")
    args = p.parse_args()
    from utils.model.loading import load_model

    from utils.store.layout import is_store

    lm = load_model(args.model, args.weights)
    work = tempfile.mkdtemp(prefix="split_rules_")
    try:  # the store is read where it is; the records of both runs go to a folder of their own
        stores, args.store_dir = args.store_dir, os.path.join(work, "store")
        os.makedirs(args.store_dir)
        for entry in os.listdir(stores):
            if is_store(os.path.join(stores, entry)):
                os.symlink(os.path.abspath(os.path.join(stores, entry)), os.path.join(args.store_dir, entry))
        rules = {rule: run_rule(args, rule, work, lm) for rule in RULES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = summarise(rules, args.bootstrap, args.seed)
    print_table(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
