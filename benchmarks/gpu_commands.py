"""The commands a user types, on the device and on the CPU, compared (part of ``gpu_check.py``).

Stage 1, stage 2, stage 3, stage 4 (with purity), the pictures, the layer command and the demo each run as
their own process, once with ``--device DEVICE`` and once with ``--device cpu``, on the same generated
images (train/ and val/, ImageNet wnid folders) and random weights. Each pair of results must agree:
relevance rows, pairs, best rho, scores, the logit check, stage 4's means, purity and the layer's concepts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOSE = ["--proportion_attribution_required", "0.0", "--p", "0.25"]  # random weights: many candidates


def make_data(root: str, size: int) -> str:
    """train/ (24 images) and val/ (16 images) of 4 wnid classes."""
    from stage1 import make_image_folder

    make_image_folder(root, 4, 24, size, seed=1)
    make_image_folder(root + "_v", 4, 16, size, seed=2)
    shutil.move(os.path.join(root + "_v", "train"), os.path.join(root, "val"))
    shutil.rmtree(root + "_v")
    return root


def run(script: str, *args: str) -> tuple[dict | None, str, float]:
    """``script`` with ``args`` and ``--json``: its JSON (None on failure), its last error line, seconds."""
    out = args[args.index("--out_json") + 1]
    args = [a if a != "--out_json" else "--json" for a in args]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["?"])[-1], seconds
    return json.load(open(out)), "", seconds


def commands(args, data: str, tmp: str, device: str, pair: dict | None = None) -> tuple[dict, dict | None]:
    """Every command on ``device`` (stages 3, 4 and the pictures on ``pair``, default: stage 2's first pair);
    their JSON results and seconds by name, and the pair."""
    base = os.path.join(tmp, device.replace(":", "_"))
    os.makedirs(base, exist_ok=True)
    store = os.path.join(base, "store")
    common = ["--data_dir", data, "--model", args.model, "--weights", "none", "--batch_size", "8",
              "--num_workers", "0", "--device", device, "--no_progress"]
    j = lambda name: ["--out_json", os.path.join(base, f"{name}.json")]  # noqa: E731
    res = {"stage 1": run("get_importances_for_classes.py", *common, "--store_dir", store, *j("s1"))}
    res["stage 2"] = run("get_cosine_similarities.py", "--model", args.model, "--store_dir", store, *LOOSE,
                         "--cos_sim_high", "0.999", "--no_progress", *j("s2"))
    pair = pair or ((res["stage 2"][0] or {}).get("pairs") or [None])[0]
    if pair is None:
        return res, None
    concept = ["--channel_disentangle", str(pair["channel"]), "--classes_for_concept1", str(pair["class1"]),
               "--classes_for_concept2", str(pair["class2"])]
    res["stage 3"] = run("disentangle_channel.py", *common, "--store_dir", store, *concept, *j("s3"))
    chosen = ["--model_dir", os.path.join(store, "models_disentangled"), "--channel_of_interest",
              str(pair["channel"]), *concept[2:]]
    res["stage 4"] = run("get_results.py", *common, *chosen, "--out_dir", base, "--purity", "4", *j("s4"))
    res["pictures"] = run("visualize_channel.py", *common, *chosen, "--store_dir", store, "--split", "val",
                          "--top_k", "4", "--no_fv", "--out_dir", os.path.join(base, "pics"), *j("pics"))
    res["layer command"] = run("disentangle_layer.py", *common, "--store_dir", store, *LOOSE, "--cos_sim_high",
                               "0.999", "--max_channels", "4", "--top_k", "4", *j("layer"))
    res["demo"] = run("demo.py", *[a for a in common if a != "--no_progress"], "--no_progress", "--store_dir",
                      os.path.join(base, "demo_store"), "--out_dir", os.path.join(base, "demo"), "--tau", "0.0",
                      "--p", "0.25", "--cos_sim_high", "0.999", "--max_channels", "2", "--fv_steps", "0",
                      "--pictures_k", "4", *j("demo"))
    return res, pair


def _close(a, b, tol: float) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))))


def compare(name: str, dev: dict | None, cpu: dict | None) -> tuple[bool, str]:
    """Whether the device's result of command ``name`` agrees with the CPU's, and what was compared."""
    if name == "stage 1":
        return dev["images"] == cpu["images"], f"{dev['images']} images"
    if name == "stage 2":
        same = [(p["channel"], p["class1"], p["class2"]) for p in dev["pairs"]] == \
               [(p["channel"], p["class1"], p["class2"]) for p in cpu["pairs"]]
        s = _close([p["cosine_similarity"] for p in dev["pairs"]], [p["cosine_similarity"] for p in cpu["pairs"]], 1e-3)
        return same and s, f"{len(dev['pairs'])} pairs, same: {same}, s within 1e-3: {s}"
    if name == "stage 3":
        same = dev["best_rho"] == cpu["best_rho"] and _close(list(dev["scores"].values()),
                                                             list(cpu["scores"].values()), 1e-3)
        return same and dev["max_abs_logit_diff"] <= 1e-3, (f"best rho {dev['best_rho']} (cpu {cpu['best_rho']}), "
                                                             f"logit diff {dev['max_abs_logit_diff']:.1e}")
    if name == "stage 4":
        ok = all(_close(dev[f"concept{j}"]["mean"], cpu[f"concept{j}"]["mean"], 1e-3) for j in (1, 2)
                 if dev[f"concept{j}"].get("mean") and None not in dev[f"concept{j}"]["mean"])
        return ok and dev["purity"] == cpu["purity"], f"means within 1e-3: {ok}; purity equal: {dev['purity'] == cpu['purity']}"
    if name == "pictures":
        return dev["purity"] == cpu["purity"], "purity of the top-4 equal"
    if name == "layer command":
        same = {c: (v["concepts"], v["best_rho"]) for c, v in dev["channels"].items()} == \
               {c: (v["concepts"], v["best_rho"]) for c, v in cpu["channels"].items()}
        return same and dev["max_abs_logit_diff"] <= 1e-3, (f"{len(dev['channels'])} channels, concepts and best rho "
                                                             f"equal: {same}, logit diff {dev['max_abs_logit_diff']:.1e}")
    same = [(d["channel"], d["best_rho"]) for d in dev["disentangled"]] == \
           [(d["channel"], d["best_rho"]) for d in cpu["disentangled"]]
    return same, f"{len(dev['disentangled'])} channels, best rho equal: {same}"


def check_commands(args, tmp: str, rows: list) -> None:
    """Every command on ``args.device`` against the CPU: one row per command, with both timings."""
    data = make_data(os.path.join(tmp, "commands_data"), 64 if args.tiny else 160)
    dev, pair = commands(args, data, tmp, args.device)
    cpu, _ = commands(args, data, os.path.join(tmp, "cpu_commands"), "cpu", pair)  # the device's pair
    for name in ("stage 1", "stage 2", "stage 3", "stage 4", "pictures", "layer command", "demo"):
        (d, derr, dt), (c, cerr, ct) = dev.get(name, (None, "not run", 0.0)), cpu.get(name, (None, "not run", 0.0))
        if d is None or c is None:
            rows.append((f"{name}: {args.device} vs cpu", f"failed: {derr or cerr}", False))
            continue
        ok, what = compare(name, d, c)
        rows.append((f"{name}: {args.device} vs cpu", f"{what}; {dt:.1f} s vs {ct:.1f} s", ok))
