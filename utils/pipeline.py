"""The whole pipeline as one function (demo.py): stages 1-4 and the pictures, then the report."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from . import store as st
from .disentangle import Stage3Config, disentangle_channel
from .errors import UserError
from .evaluation import Stage4Config, run_stage4
from .files import check_writable, read_json, write_json
from .importances import Stage1Config, compute_importances
from .models import get_layer, load_model
from .records import save_record
from .selection import find_pairs


@dataclass
class DemoConfig:
    data_dir: str | None = None
    model: str | None = None
    weights: str | None = None
    layer: str | None = None
    store_dir: str | None = None
    out_dir: str = "demo_output"
    top_k: int = 2
    tau: float | None = None  # default: 0.01 for the digits demo, 0.03 (the paper's) for real data
    p: float = 0.75
    cos_sim_high: float = 0.5
    epochs: int = 2
    max_images_per_class: int | None = None
    pictures_k: int = 12
    fv_steps: int = 64
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    class_index: str | None = None
    seed: int = 0
    demo_root: str = "demo_data"
    max_train: int | None = None  # fewer training images for the digits model (tests)
    progress: bool = True


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def pick_pairs(pairs: list[dict], k: int) -> list[dict]:
    """The ``k`` most polysemantic pairs (lowest cosine similarity first), one per channel."""
    chosen, seen = [], set()
    for pair in sorted(pairs, key=lambda q: q["cosine_similarity"]):
        if pair["channel"] not in seen:
            chosen.append(pair)
            seen.add(pair["channel"])
        if len(chosen) == k:
            break
    return chosen


def _prepare_digits(cfg: DemoConfig) -> tuple[str, str, str, dict]:
    """Build the digits folder and train (or reuse) the demo model; returns data_dir, model, weights, info."""
    from .demo_data import make_digits_folder, train_classifier

    model = cfg.model or "mobilenet_v3_small"
    data_dir = make_digits_folder(os.path.join(cfg.demo_root, "digits"))
    tag = f"{model}_digits_e{cfg.epochs}_s{cfg.seed}" + (f"_n{cfg.max_train}" if cfg.max_train else "")
    ckpt = os.path.join(cfg.demo_root, f"{tag}.pt")
    info_path = ckpt.replace(".pt", ".json")
    if os.path.isfile(ckpt) and os.path.isfile(info_path):
        info = {**read_json(info_path), "cached": True}
        print(f"using the trained model {ckpt} (val accuracy {info['val_accuracy']:.3f}); delete it to retrain")
    else:
        info = train_classifier(data_dir, model, ckpt, epochs=cfg.epochs, seed=cfg.seed, max_train=cfg.max_train)
        write_json(info_path, info)
        print(f"trained {model}: train accuracy {info['train_accuracy']:.3f}, val accuracy "
              f"{info['val_accuracy']:.3f} in {info['seconds']:.0f} s -> {ckpt}")
    return data_dir, model, ckpt, info


@dataclass
class Setup:
    """What every stage of the demo shares: data, model, layer and the store folder."""

    data_dir: str
    model_name: str
    weights: str
    lm: object
    layer: str
    channels: int
    store_dir: str
    training: dict | None
    common: dict


def run_demo(cfg: DemoConfig) -> dict:
    """Run everything and write ``cfg.out_dir/report.html``; returns ``{"report": path, "store": path,
    "disentangled": [{"channel", "concepts", "best_rho", "record"}, ...]}``."""
    from .report import write_report

    if cfg.top_k < 1:
        raise UserError("--top_k must be at least 1")
    check_writable(cfg.out_dir)
    timings: dict[str, dict] = {}
    t0 = _stage("data and model")
    run = _setup(cfg)
    timings["data and model"] = {"seconds": time.perf_counter() - t0}
    store, images = _stage1(cfg, run, timings)
    found = _stage2(cfg, store, timings)
    chosen = pick_pairs(found.pairs, cfg.top_k)
    results = [_disentangle_pair(cfg, run, pair, i, len(chosen), timings) for i, pair in enumerate(chosen)]
    if results:
        t0 = _stage("pictures: what the channels respond to (one top-k pass over val/ for all of them)")
        _pictures(cfg, run.lm, run.data_dir, os.path.join(run.store_dir, "models_disentangled"), run.layer, results)
        timings["pictures"] = {"seconds": time.perf_counter() - t0}
    for key in ("stage 3", "stage 4"):
        if key in timings and timings[key]["seconds"] > 0:
            timings[key]["images_per_second"] = timings[key]["images"] / timings[key]["seconds"]
    settings = {"data_dir": os.path.abspath(run.data_dir), "model": run.model_name, "weights": run.lm.weights,
                "layer": run.layer, "channels": run.channels, "training images": images, "tau": cfg.tau, "p": cfg.p,
                "gamma": f"[0.0, {cfg.cos_sim_high})", "pairs disentangled": len(chosen)}
    if run.training:
        settings["demo model"] = (f"{run.model_name} trained {cfg.epochs} epochs from scratch: train accuracy "
                                  f"{run.training['train_accuracy']:.3f}, val accuracy "
                                  f"{run.training['val_accuracy']:.3f}")
    path = os.path.join(cfg.out_dir, "report.html")
    write_report(path, settings=settings, store=store, pairs=found.pairs, candidates=found.candidates,
                 results=results, timings=timings)
    return {"report": os.path.abspath(path), "store": store.path,
            "disentangled": [{"channel": r["record"].channel, "concepts": r["record"].concepts,
                              "best_rho": r["record"].best_rho, "record": r["record"].dir} for r in results]}


def _setup(cfg: DemoConfig) -> Setup:
    """The data (the digits, built and a model trained for them, unless ``--data_dir``), model and layer."""
    training = None
    if cfg.data_dir is None:
        data_dir, model_name, weights, training = _prepare_digits(cfg)
        weights = cfg.weights or weights
    else:
        data_dir, model_name, weights = cfg.data_dir, cfg.model or "resnet50", cfg.weights or "default"
    if cfg.tau is None:
        cfg.tau = 0.01 if cfg.data_dir is None else 0.03
    lm = load_model(model_name, weights)
    layer, conv = get_layer(lm.model, cfg.layer)
    return Setup(data_dir, model_name, weights, lm, layer, conv.out_channels,
                 cfg.store_dir or os.path.join(cfg.out_dir, "store"), training,
                 dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
                      class_index=cfg.class_index))


def _stage1(cfg: DemoConfig, run: Setup, timings: dict) -> tuple[st.Store, int]:
    """Stage 1 (or the complete store of an earlier run); the store and its number of training images."""
    t0 = _stage("stage 1: relevance of every channel for every training image")
    s1 = compute_importances(Stage1Config(data_dir=run.data_dir, store_dir=run.store_dir, model=run.model_name,
                                          weights=run.weights, layer=run.layer,
                                          max_images_per_class=cfg.max_images_per_class, progress=cfg.progress,
                                          **run.common), loaded=run.lm)
    if s1.get("already_complete"):
        print(f"store {s1['store']} is already complete; reusing it")
    timings["stage 1"] = {"seconds": time.perf_counter() - t0, "images": s1.get("processed", 0),
                          "images_per_second": s1.get("images_per_second", 0.0)}
    return st.Store.open(s1["store"]), s1["images"]


def _stage2(cfg: DemoConfig, store: st.Store, timings: dict):
    """Stage 2 on the store: candidates and pairs, the first 20 printed."""
    t0 = _stage("stage 2: candidate channels and gamma-polysemantic pairs")
    found = find_pairs(store, cfg.tau, cfg.p, 0.0, cfg.cos_sim_high)
    timings["stage 2"] = {"seconds": time.perf_counter() - t0}
    print(f"{len(found.candidates)} candidate channels, {len(found.pairs)} pairs with s < {cfg.cos_sim_high}")
    for pair in found.pairs[:20]:
        print(f"  channel {pair['channel']}: {store.names.label(pair['class1'])} / {store.names.label(pair['class2'])}"
              f"  s = {pair['cosine_similarity']:.4f}")
    return found


def _disentangle_pair(cfg: DemoConfig, run: Setup, pair: dict, i: int, n: int, timings: dict) -> dict:
    """Stages 3 and 4 for one pair: the record (saved) and stage 4's summary."""
    c, concepts = pair["channel"], [[pair["class1"]], [pair["class2"]]]
    model_dir = os.path.join(run.store_dir, "models_disentangled")
    t0 = _stage(f"stage 3 ({i + 1}/{n}): disentangle channel {c}")
    rec, sw = disentangle_channel(Stage3Config(data_dir=run.data_dir, store_dir=run.store_dir, channel=c,
                                               concepts=concepts, model=run.model_name, weights=run.weights,
                                               layer=run.layer, progress=cfg.progress, **run.common), loaded=run.lm)
    rec.dir = os.path.join(model_dir, rec.name())
    save_record(rec.dir, rec, sw)
    t3 = time.perf_counter() - t0
    print(f"best rho {rec.best_rho}, max |logit difference| {rec.max_abs_logit_diff:.2e}")
    t0 = _stage(f"stage 4 ({i + 1}/{n}): evaluate channel {c} on the validation images")
    s4 = run_stage4(Stage4Config(data_dir=run.data_dir, model_dir=model_dir, channel=c, concepts=concepts,
                                 model=run.model_name, weights=run.weights, layer=run.layer, tau=cfg.tau,
                                 out_dir=cfg.out_dir, progress=cfg.progress, **run.common), loaded=run.lm)
    for key, sec, k in (("stage 3", t3, sum(rec.train_images.values())),
                        ("stage 4", time.perf_counter() - t0, s4["images"])):
        entry = timings.setdefault(key, {"seconds": 0.0, "images": 0})
        entry["seconds"] += sec
        entry["images"] += k
    return {"pair": pair, "record": rec, "stage4": s4}


def _pictures(cfg: DemoConfig, lm, data_dir, model_dir, layer, results: list[dict]) -> None:
    """Teaser figure, top-k crops and purity of every disentangled channel (``result["pictures"]``).

    The top-k images of all channels come from ONE pass over the validation images.
    """
    from . import featvis
    from .data import list_images
    from .device import resolve_device
    from .store import data_class_map
    from .pictures import PicturesConfig, channel_pictures, topk_for_records

    cmap = data_class_map(data_dir, "val", lm.num_classes, cfg.class_index, results[0]["record"].store)
    top = topk_for_records(lm, [r["record"] for r in results], list_images(data_dir, "val", classes=cmap), cfg.pictures_k,
                           batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                           device=resolve_device(cfg.device), progress=cfg.progress)
    fv = featvis.FVConfig(steps=cfg.fv_steps) if cfg.fv_steps > 0 else None
    for r in results:
        rec = r["record"]
        pc = PicturesConfig(data_dir=data_dir, model_dir=model_dir, channel=rec.channel, concepts=rec.concepts,
                            model=lm.name, layer=layer, split="val", top_k=cfg.pictures_k,
                            out_dir=os.path.join(cfg.out_dir, "pictures"), fv=fv, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, device=cfg.device, progress=cfg.progress,
                            class_index=cfg.class_index)
        r["pictures"] = channel_pictures(pc, loaded=lm, top=top)
