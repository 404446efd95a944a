"""The whole pipeline as one function (demo.py): the demo's classifier trained on the digits (cached), stage 1,
then the layer command (concepts found from the data, every polysemantic channel split in one network,
evaluated, pictured), whose report is the demo's."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..store import layout as st
from ..defaults import DEFAULT_GAMMA, DEFAULT_P, DEFAULT_TAU
from ..data.digits import make_digits_folder
from ..data.images import list_images, load_image
from ..model.demo_models import DIGITS_CNN, digits_training
from ..passes.distributed import run_together
from ..errors import UserError
from ..passes.featvis import FVConfig
from ..files import check_writable, read_json, save_torch, write_json
from .layer import LayerConfig, disentangle_layer
from .layer_clusters import ClustersConfig, disentangle_clusters
from ..store.provenance import provenance
from .relevance import Stage1Config, accuracy_lines, compute_relevance
from ..model.sources import split_file_spec
from ..model.loading import build_model, file_sha256, get_layer, load_model, model_tag
from ..data.preprocess import InputSpec


@dataclass
class DemoConfig:
    data_dir: str | None = None
    model: str | None = None
    weights: str | None = None
    layer: str | None = None
    store_dir: str | None = None
    out_dir: str = "demo_output"
    max_channels: int = 4  # channels to split: the most polysemantic first
    tau: float | None = None  # default: 0.01 for the digits demo, 0.03 (the paper's) for real data
    p: float = DEFAULT_P
    cos_sim_high: float = DEFAULT_GAMMA
    split_rule: str = "function"  # the layer command's rule and orientation (the demo's: its defaults)
    orientation: str = "gradient"
    concepts: str = "classes"  # or "clusters": concepts from the images alone, the model's head removed
    epochs: int | None = None  # training epochs of the digits model; None: the model's (2 for the CNN)
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
    rank: int = 0  # under torchrun: this process's rank and the number of processes
    world_size: int = 1
    input_size: int | None = None  # --input_size, --resize, --mean, --std (None: the model's declared transform)
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _stage(name: str, cfg: DemoConfig):
    if cfg.rank == 0:
        print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _prepare_digits(cfg: DemoConfig, say: bool = True) -> tuple[str, str, str, dict]:
    """Build the digits folder and train (or reuse) the demo model; returns data_dir, model, weights, info
    (info holds the training's accuracies, seconds and ``epochs``)."""
    model = cfg.model or DIGITS_CNN
    training = digits_training(model)
    if cfg.epochs is not None:
        training["epochs"] = cfg.epochs
    data_dir = make_digits_folder(os.path.join(cfg.demo_root, "digits"))
    ckpt = os.path.join(cfg.demo_root, f"{_cache_tag(model, training['epochs'], cfg)}.pt")
    info_path = ckpt[:-len(".pt")] + ".json"
    if os.path.isfile(ckpt) and os.path.isfile(info_path):
        info = {**read_json(info_path), "cached": True}
        print_ = print if say else (lambda *a: None)
        print_(f"using the trained model {ckpt} (val accuracy {info['val_accuracy']:.3f}); delete it to retrain")
    else:
        info = train_classifier(data_dir, model, ckpt, seed=cfg.seed, max_train=cfg.max_train, progress=cfg.progress,
                                **training)
        write_json(info_path, {**info, "provenance": provenance(cfg.seed)})
        print(f"trained {model_tag(model)}: train accuracy {info['train_accuracy']:.3f}, val accuracy "
              f"{info['val_accuracy']:.3f} in {info['seconds']:.0f} s -> {ckpt}")
    return data_dir, model, ckpt, {**info, "epochs": training["epochs"]}


def _cache_tag(model: str, epochs: int, cfg: DemoConfig) -> str:
    """The trained model's file name (no extension) in ``cfg.demo_root``: the model as file names spell it
    (an own file's name, function and a hash of its text, so that an edited file trains anew), epochs, seed."""
    own = split_file_spec(model)
    name = model_tag(model) + (f"-{file_sha256(own[0])[:8]}" if own and os.path.isfile(own[0]) else "")
    return f"{name}_digits_e{epochs}_s{cfg.seed}" + (f"_n{cfg.max_train}" if cfg.max_train else "")


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
    tau: float  # the demo's tau: --tau, else 0.01 for the bundled digits and the paper's 0.03 for real data


def run_demo(cfg: DemoConfig) -> dict:
    """Run everything and write ``cfg.out_dir/report.html``; returns ``{"report": path, "store": path,
    "disentangled": [{"channel", "concepts", "best_rho", "record"}, ...]}``."""
    if cfg.max_channels < 1:
        raise UserError("--max_channels must be at least 1")
    if cfg.rank == 0:
        check_writable(cfg.out_dir)
    t0 = _stage("data and model", cfg)
    run = _setup(cfg)
    timings = {"data and model": time.perf_counter() - t0}
    if cfg.concepts == "clusters":
        return _demo_clusters(cfg, run)
    store, images = _stage1(cfg, run, timings)
    t0 = _stage("the layer: concepts from the data, every polysemantic channel split in one network, evaluated", cfg)
    notes = {"training images": images, "stage 1 (seconds)": f"{timings['stage 1']:.1f}"}
    if run.training:
        notes["demo model"] = (f"{model_tag(run.model_name)} trained {run.training['epochs']} epochs from scratch: "
                               f"train accuracy {run.training['train_accuracy']:.3f}, val accuracy "
                               f"{run.training['val_accuracy']:.3f}")
    out = disentangle_layer(LayerConfig(
        data_dir=run.data_dir, store_dir=run.store_dir, model=run.model_name, weights=run.weights, layer=run.layer,
        progress=cfg.progress, tau=run.tau, p=cfg.p, gamma_high=cfg.cos_sim_high, max_channels=cfg.max_channels,
        top_k=cfg.pictures_k, seed=cfg.seed, out_dir=cfg.out_dir, notes=notes, split_rule=cfg.split_rule,
        orientation=cfg.orientation,
        fv=FVConfig(steps=cfg.fv_steps, seed=cfg.seed) if cfg.fv_steps > 0 else None, **run.common), loaded=run.lm)
    if cfg.rank != 0:  # under torchrun rank 0 alone writes and reports
        return {"rank": cfg.rank}
    return {"report": os.path.abspath(out["report"]), "store": store.path,
            "disentangled": [{"channel": int(c), "concepts": ch["concepts"], "best_rho": ch["best_rho"],
                              "record": ch["record"]} for c, ch in out["channels"].items()]}


def _demo_clusters(cfg: DemoConfig, run: Setup) -> dict:
    """The label-free demo: the model without its head (its output: the features), no store, every unit's
    concepts from clusters of its top training images; the labels are read only to say which class each concept
    unit's top images mostly hold."""
    _stage("the layer without labels: concepts from clusters of each unit's top images, the model's head removed, "
           "every unit with two or more split in one network", cfg)
    lm = dataclasses.replace(run.lm, model=headless(run.lm.model))
    notes = {"the model's head": "removed: the network's output is its features (what is checked to stay the same)"}
    if run.training:
        notes["demo model"] = (f"{model_tag(run.model_name)} trained {run.training['epochs']} epochs on the digits' "
                               f"labels, then its head removed")
    out = disentangle_clusters(ClustersConfig(
        data_dir=run.data_dir, store_dir=run.store_dir, model=run.model_name, weights=run.weights, layer=run.layer,
        progress=cfg.progress, max_channels=cfg.max_channels, top_k=cfg.pictures_k, seed=cfg.seed,
        out_dir=cfg.out_dir, notes=notes, fv=FVConfig(steps=cfg.fv_steps, seed=cfg.seed) if cfg.fv_steps > 0 else None,
        **run.common), loaded=lm)
    if cfg.rank != 0:
        return {"rank": cfg.rank}
    return {"report": os.path.abspath(out["report"]), "concepts_from": "clusters",
            "disentangled": [{"channel": int(c), "concept_images": ch["concept_images"], "best_rho": ch["best_rho"]}
                             for c, ch in out["channels"].items()]}


def headless(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its class head replaced by the identity (the same module, changed in place): a timm model's
    ``reset_classifier(0)``, else its ``classifier``, ``fc`` or ``head``; its output is then its features."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
        return model
    for name in ("classifier", "fc", "head"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, torch.nn.Identity())
            return model
    raise UserError(f"{type(model).__name__} has no classifier, fc or head to remove; give --concepts classes, or "
                    "a model without a head")


def _setup(cfg: DemoConfig) -> Setup:
    """The data (the digits, built and a model trained for them, unless ``--data_dir``), model and layer."""
    training = None
    if cfg.data_dir is None:  # under torchrun rank 0 builds and trains, then the others find its cache
        first = run_together(lambda: _prepare_digits(cfg) if cfg.rank == 0 else None, cfg.world_size, cfg.device,
                             "the demo")
        data_dir, model_name, weights, training = first or _prepare_digits(cfg, say=False)
        weights = cfg.weights or weights
    else:
        data_dir, model_name, weights = cfg.data_dir, cfg.model or "resnet50", cfg.weights or "default"
    lm = load_model(model_name, weights, inputs=InputSpec.of(cfg))
    layer, conv = get_layer(lm.model, cfg.layer)
    return Setup(data_dir, model_name, weights, lm, layer, conv.out_channels,
                 cfg.store_dir or os.path.join(cfg.out_dir, "store"), training,
                 dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
                      class_index=cfg.class_index, rank=cfg.rank, world_size=cfg.world_size),
                 cfg.tau if cfg.tau is not None else 0.01 if cfg.data_dir is None else DEFAULT_TAU)


def _stage1(cfg: DemoConfig, run: Setup, timings: dict) -> tuple[st.Store, int]:
    """Stage 1 (or the complete store of an earlier run); the store and its number of training images."""
    t0 = _stage("stage 1: relevance of every channel for every training image", cfg)
    s1 = compute_relevance(Stage1Config(data_dir=run.data_dir, store_dir=run.store_dir, model=run.model_name,
                                          weights=run.weights, layer=run.layer,
                                          max_images_per_class=cfg.max_images_per_class, progress=cfg.progress,
                                          **run.common), loaded=run.lm)
    if cfg.rank == 0:
        if s1.get("already_complete"):
            print(f"store {s1['store']} is already complete; reusing it")
        print("\n".join(accuracy_lines(s1.get("accuracy"), s1["classes"])))
    timings["stage 1"] = time.perf_counter() - t0
    return st.Store.open(s1["store"]), s1["images"]


# ------------------------------------------------------------------ the demo's classifier


def _tensors(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = list_images(data_dir, split)
    return torch.stack([load_image(images, i) for i in range(len(images))]), torch.tensor(images.targets)


def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Set every BatchNorm's running statistics to the exact average over ``x`` (N x 3 x H x W).

    A short training run leaves them far from the data when the momentum is small (MobileNetV3 uses
    0.01), which makes the eval-mode network near chance. Leaves the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:  # a ViT: LayerNorm only, nothing to recalibrate (and no pass over x to spend)
        model.eval()
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over all batches
    model.train()
    with torch.no_grad():
        for b in range(0, len(x), batch_size):
            model(x[b:b + batch_size])
    model.eval()


def train_classifier(data_dir: str, model_name: str, out_path: str, epochs: int = 3, batch_size: int = 32,
                     lr: float = 2e-3, seed: int = 0, max_train: int | None = None, progress: bool = True) -> dict:
    """Train model ``model_name`` (any name ``utils.model.loading.build_model`` knows: torchvision, ``timm/<name>``,
    ``file.py:function``) from scratch on ``data_dir/train`` (eval transform, no augmentation, seeded: the
    same seed gives the same weights).

    Saves the state_dict to ``out_path`` (atomically) and returns train/val accuracy and seconds.
    ``progress``: a progress bar of the steps.
    """
    torch.manual_seed(seed)
    x, y = _tensors(data_dir, "train")
    if max_train:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_train]
        x, y = x[keep], y[keep]
    xv, yv = _tensors(data_dir, "val")
    model = _untrained(model_name, int(y.max()) + 1, x[:1], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"train {model_tag(model_name)}", unit="step", dynamic_ncols=True,
               disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), batch_size):
            i = perm[b:b + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    recalibrate_batchnorm(model, x, batch_size=64)
    with torch.no_grad():
        acc = {name: float((torch.cat([model(xx[b:b + 256]).argmax(1) for b in range(0, len(yy), 256)]) == yy)
                           .float().mean()) for name, xx, yy in (("train", x, y), ("val", xv, yv))}
    save_torch(out_path, model.state_dict())
    return {"train_accuracy": acc["train"], "val_accuracy": acc["val"], "seconds": time.perf_counter() - start}


def _untrained(model_name: str, classes: int, probe: torch.Tensor, seed: int) -> torch.nn.Module:
    """``model_name`` freshly initialised from ``seed`` with ``classes`` outputs, trainable; a model with another
    number of outputs (an own file's fixed head) is one line."""
    model = build_model(model_name, classes, seed)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        out = model.eval()(probe).shape[-1]
    if out != classes:
        raise UserError(f"{model_name} has {out} outputs; the digits have {classes} classes")
    return model
