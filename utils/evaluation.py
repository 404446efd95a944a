"""Stage 4's arithmetic: relative attribution, sub-channel activations, fraction rows, the summary table.

Shapes: ``B`` images in a batch, ``n`` images of a concept, ``C`` output channels of the layer ``L``,
``C_in`` its input channels. On each validation image (label ``t``), in one pass:

    rel  = P[c] / sum_c' P[c'],   P[c'] = sum_hw max(a[c'] * d z_t / d a[c'], 0)   (original network)
    orig = sum_hw a[c],   d1/d2/res = sum_hw (conv(x, D1/D2/Res) + bias)          (before BatchNorm)

and, for the quantitative table, the row ``d1/orig, d2/orig, res/orig`` of every image with
``rel >= tau``. Activations are signed, so a fraction may be negative or above 1.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import ImageList, check_batch, make_loader
from .cli import RunOptions
from .errors import UserError
from .relevance import relevance_batch_positive
from .surgery import Split, check_record_identity, conv_with_filters, find_record

COLUMNS = ("disentangled1", "disentangled2", "residual")
DEFAULT_TAU = 0.03


def relative_attribution(P: torch.Tensor, channel: int) -> torch.Tensor:
    """``rel`` (B,) = ``P[:, c] / P.sum(1)`` from clamped attributions ``P`` (B x C); 0 where the sum is 0."""
    P = P.double()
    total = P.sum(1)
    return torch.where(total > 0, P[:, channel] / total.clamp_min(torch.finfo(P.dtype).tiny), torch.zeros_like(total))


def split_weight(split: Split) -> torch.Tensor:
    """The three filters of a split stacked as one weight (3 x C_in x kh x kw): D1, D2, Res."""
    return torch.stack([split.D1, split.D2, split.Res])


def sub_channel_maps(conv: nn.Conv2d, x: torch.Tensor, split: Split) -> torch.Tensor:
    """Output maps (B x 3 x H' x W') of D1, D2, Res on the layer input ``x`` (B x C_in x H x W).

    Uses the layer's own geometry (stride, padding and padding mode, dilation) and adds its bias
    (channel ``c``'s bias goes to all three sub-channels, as in the disentangled layer).
    """
    b = conv.bias[split.channel].detach().expand(3) if conv.bias is not None else None
    return conv_with_filters(conv, x.to(conv.weight.dtype), split_weight(split), b)


def sub_channel_sums(conv: nn.Conv2d, x: torch.Tensor, split: Split) -> torch.Tensor:
    """``d1, d2, res`` per image (B x 3, float64): spatial sums of :func:`sub_channel_maps`, no clamping."""
    return sub_channel_maps(conv, x, split).double().sum(dim=(2, 3))


def evaluate_batch(model: nn.Module, conv: nn.Conv2d, split: Split, images: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch of stage 4: ``rel``, ``orig``, ``d1``, ``d2``, ``res`` (each B, float64, on CPU)."""
    P, a, x = relevance_batch_positive(model, conv, images, labels)
    d = sub_channel_sums(conv, x, split)
    out = {"rel": relative_attribution(P.double(), split.channel), "orig": a[:, split.channel].double().sum(dim=(1, 2)),
           "d1": d[:, 0], "d2": d[:, 1], "res": d[:, 2]}
    return {k: v.detach().cpu() for k, v in out.items()}


@dataclass
class Activations:
    """Per image of the pass (n each, numpy): label, rel, orig, d1, d2, res; dataset indices too."""

    index: np.ndarray
    labels: np.ndarray
    rel: np.ndarray
    orig: np.ndarray
    d1: np.ndarray
    d2: np.ndarray
    res: np.ndarray

    def subset(self, mask: np.ndarray) -> "Activations":
        """The images where ``mask`` (n, bool) holds."""
        return Activations(**{k: getattr(self, k)[mask] for k in self.__dataclass_fields__})

    def of_classes(self, classes: list[int]) -> "Activations":
        """The images whose label is one of ``classes``."""
        return self.subset(np.isin(self.labels, classes))

    def __len__(self) -> int:
        return len(self.labels)


def evaluate_images(model: nn.Module, conv: nn.Conv2d, split: Split, images: ImageList, indices: list[int],
                    batch_size: int = 64, num_workers: int = 4, device: torch.device | str = "cpu",
                    progress: bool = True, rank: int = 0, world_size: int = 1) -> tuple[Activations, float]:
    """Stage 4's single pass over ``images[indices]``; returns the :class:`Activations` and the seconds taken.

    ``model`` and ``conv`` (its layer of interest) must already be on ``device``. Under torchrun
    (``world_size`` > 1, every rank calls this) each rank evaluates a contiguous block of whole batches
    of ``indices``; every rank gets all images' values back in ``indices`` order (the same batches as a
    single-process run, so the same numbers) and the seconds of the slowest rank. An error on one rank
    stops all of them.
    """
    from .distributed import all_gather_rows, batch_shard, reduce_over_ranks, run_together

    device = torch.device(device)
    lo, hi = batch_shard(len(indices), batch_size, rank, world_size)
    mine = list(indices)[lo:hi]
    loader = make_loader(images, mine, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    parts: dict[str, list] = {k: [] for k in ("index", "labels", "rel", "orig", "d1", "d2", "res")}
    desc = "stage 4" if world_size == 1 else f"stage 4 (rank 0 of {world_size})"
    bar = tqdm(total=len(mine), unit="img", desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
    start = time.perf_counter()

    def run() -> None:
        for x_img, labels, index in loader:
            check_batch(images, labels, index)
            out = evaluate_batch(model, conv, split, x_img.to(device, non_blocking=True), labels.to(device))
            parts["index"].append(index.numpy())
            parts["labels"].append(labels.numpy())
            for k, v in out.items():
                parts[k].append(v.numpy())
            bar.update(len(labels))

    run_together(run, world_size, device, "stage 4")
    bar.close()
    seconds = reduce_over_ranks(time.perf_counter() - start, world_size, device)
    if world_size > 1:  # rank order = the order of ``indices``; ints < 2**53 travel exactly as float64
        keys = list(parts)
        mine = torch.from_numpy(np.stack([np.concatenate(parts[k]).astype(np.float64) if parts[k] else np.zeros(0)
                                          for k in keys], axis=1))
        rows = all_gather_rows(mine, world_size, device).numpy()
        parts = {k: [rows[:, j].astype(np.int64) if k in ("index", "labels") else rows[:, j]]
                 for j, k in enumerate(keys)}
    empty = {"index": np.int64, "labels": np.int64}
    acts = Activations(**{k: np.concatenate(v) if v else np.zeros(0, empty.get(k, np.float64))
                          for k, v in parts.items()})
    if world_size > 1 and not np.array_equal(acts.index, np.asarray(list(indices), dtype=acts.index.dtype)):
        raise AssertionError("stage 4: the gathered images are not those of the pass, in order")  # cannot happen
    return acts, seconds


# ------------------------------------------------------------------ quantitative rows


def fraction_rows(acts: Activations, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Rows (m x 3) ``d1/orig, d2/orig, res/orig`` of the images with ``rel >= tau`` and ``orig != 0``."""
    keep = (acts.rel >= tau) & (acts.orig != 0)
    o = acts.orig[keep]
    return np.stack([acts.d1[keep] / o, acts.d2[keep] / o, acts.res[keep] / o], axis=1).reshape(-1, 3)


def column_means(rows: np.ndarray) -> list[float]:
    """Mean of each column of ``rows`` (m x 3); NaN for every column when there are no rows."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return [float("nan")] * 3 if len(rows) == 0 else [float(v) for v in rows.mean(0)]


def write_rows_csv(path: str, rows: np.ndarray) -> None:
    """Write ``rows`` (m x 3) under the header ``disentangled1,disentangled2,residual``, replacing ``path`` atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in np.asarray(rows, dtype=np.float64).reshape(-1, 3):
        w.writerow([repr(float(v)) for v in r])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows_csv(path: str) -> np.ndarray:
    """Read a rows CSV written by :func:`write_rows_csv` (m x 3, float64)."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not lines or tuple(c.strip() for c in lines[0]) != COLUMNS:
        raise UserError(f"{path} does not start with the header {','.join(COLUMNS)}")
    try:
        rows = [[float(v) for v in line] for line in lines[1:] if line]
    except ValueError:
        raise UserError(f"{path} holds a value that is not a number") from None
    if any(len(r) != 3 for r in rows):
        raise UserError(f"{path} has a row without exactly 3 values")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


# ------------------------------------------------------------------ file names


def result_name(record_folder_name: str, rho: float | None = None, tau: float = DEFAULT_TAU) -> str:
    """Stem of one evaluation's outputs: the record's folder name, plus ``_rho<f>``/``_tau<t>`` when not default."""
    name = record_folder_name
    if rho is not None:
        name += f"_rho{round(float(rho), 2)}"
    if not math.isclose(tau, DEFAULT_TAU):
        name += f"_tau{tau}"
    return name


_STEM = re.compile(r"^(?P<pair>.+?)(?P<setting>(_rho[0-9.]+)?(_tau[0-9.eE+-]+)?)_concept(?P<k>[12])\.csv$")


def setting_label(setting: str) -> str:
    """Human words for a name suffix: '' -> 'best rho, tau 0.03', '_rho0.5' -> 'rho 0.5, tau 0.03', ..."""
    m = re.match(r"^(_rho(?P<rho>[0-9.]+))?(_tau(?P<tau>[0-9.eE+-]+))?$", setting)
    rho = f"rho {m['rho']}" if m and m["rho"] else "best rho"
    tau = f"tau {m['tau']}" if m and m["tau"] else f"tau {DEFAULT_TAU}"
    return f"{rho}, {tau}"


# ------------------------------------------------------------------ the paper's table


def summarize(results_dir: str) -> list[dict]:
    """The paper's table from every ``*_concept1.csv`` / ``*_concept2.csv`` in ``results_dir``.

    One entry per setting (rho/tau suffix) and concept: ``setting``, ``concept`` (1 or 2), ``pairs``,
    ``rows`` and ``mean`` (3 floats: the mean of each column over all rows of all pairs).
    """
    if not os.path.isdir(results_dir):
        raise UserError(f"no results folder {results_dir} (run get_results.py --get_quantitative first)")
    groups: dict[tuple[str, int], list[np.ndarray]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*_concept[12].csv"))):
        m = _STEM.match(os.path.basename(path))
        if m is None:
            continue
        groups.setdefault((m["setting"], int(m["k"])), []).append(read_rows_csv(path))
    if not groups:
        raise UserError(f"{results_dir} holds no *_concept1.csv / *_concept2.csv files "
                        "(run get_results.py --get_quantitative first)")
    table = []
    for setting in sorted({s for s, _ in groups}, key=lambda s: (s != "", s)):
        for k in (1, 2):
            parts = groups.get((setting, k), [])
            rows = np.concatenate(parts) if parts else np.zeros((0, 3))
            table.append({"setting": setting_label(setting), "concept": k, "pairs": len(parts),
                          "rows": int(len(rows)), "mean": column_means(rows)})
    return table


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4f}"


def format_table(table: list[dict]) -> str:
    """The summary as an aligned text table (one block per setting)."""
    lines = []
    for setting in dict.fromkeys(e["setting"] for e in table):
        lines.append(f"{setting}:")
        lines.append(f"  {'images of':<10} {'pairs':>5} {'rows':>7} {'Disentangled 1':>15} {'Disentangled 2':>15} {'Residual':>9}")
        for e in (e for e in table if e["setting"] == setting):
            d1, d2, r = (_fmt(v) for v in e["mean"])
            lines.append(f"  {'concept ' + str(e['concept']):<10} {e['pairs']:>5} {e['rows']:>7} {d1:>15} {d2:>15} {r:>9}")
    return "\n".join(lines)


def write_summary(results_dir: str, table: list[dict]) -> tuple[str, str]:
    """Write ``summary.csv`` and ``summary.md`` into ``results_dir`` (atomically); returns both paths."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("setting", "concept", "pairs", "rows") + COLUMNS)
    for e in table:
        w.writerow([e["setting"], e["concept"], e["pairs"], e["rows"]] + [repr(v) for v in e["mean"]])
    md = ["# Disentanglement results", "",
          f"Mean fraction of the original activation, over all rows of all pairs in `{os.path.abspath(results_dir)}`.", ""]
    for setting in dict.fromkeys(e["setting"] for e in table):
        md += [f"## {setting}", "", "| images of | pairs | rows | Disentangled 1 | Disentangled 2 | Residual |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for e in (e for e in table if e["setting"] == setting):
            md.append(f"| concept {e['concept']} | {e['pairs']} | {e['rows']} | " + " | ".join(_fmt(v) for v in e["mean"]) + " |")
        md.append("")
    paths = []
    for name, text in (("summary.csv", buf.getvalue()), ("summary.md", "\n".join(md))):
        path = os.path.join(results_dir, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


# ------------------------------------------------------------------ the whole stage (files touched here)


@dataclass
class Stage4Config(RunOptions):
    """What one stage-4 run evaluates and where its outputs go (the flags of get_results.py)."""

    data_dir: str
    model_dir: str
    channel: int
    classes1: list[int]
    classes2: list[int]
    rho: float | None = None
    tau: float = DEFAULT_TAU
    out_dir: str = "."
    qualitative: bool = True
    quantitative: bool = True
    nr_channels: int | None = None
    purity_k: int = 0  # > 0: also the purity of the top-k validation images (all classes; one more pass)
    rank: int = 0  # under torchrun: this process's rank and the number of processes (see utils.distributed)
    world_size: int = 1


def check_record(rec: dict, model: str, weights: str, layer: str, conv: nn.Conv2d, split: Split) -> None:
    """Refuse a record made with another model, weights or layer, or with filters that do not fit ``conv``."""
    check_record_identity(rec, model, weights, layer)
    if tuple(split.D1.shape) != tuple(conv.weight.shape[1:]):
        raise UserError(f"disentanglement {rec['dir']} has filters of shape {tuple(split.D1.shape)}, "
                        f"layer {layer} has {tuple(conv.weight.shape[1:])}")


def check_class_folders(rec: dict, images: ImageList) -> None:
    """Refuse val/ class folders that differ from the train/ ones of the record's stage-1 store (when it is at hand)."""
    from .store import read_json

    meta = os.path.join(rec.get("store") or "", "meta.json")
    if not rec.get("store") or not os.path.isfile(meta):
        return
    train = read_json(meta).get("classes")
    if train and list(train) != list(images.classes):
        raise UserError(f"{images.root} has other class folders than the training images of store {rec['store']} "
                        f"({len(images.classes)} vs {len(train)}): class indices would not match")


def _json_floats(values: list[float]) -> list[float | None]:
    """NaN -> None, so that --json writes standard JSON."""
    return [None if math.isnan(v) else v for v in values]


def class_label(t: int, rec: dict, categories: list[str] | None, folders: list[str]) -> str:
    """``"530 digital clock"``: the index and the best name known (record, weights' metadata, folder)."""
    name = (rec.get("class_names") or {}).get(str(t))
    if not name and categories and t < len(categories):
        name = categories[t]
    if not name and t < len(folders):
        name = folders[t]
    return f"{t} {name}" if name else str(t)


def run_stage4(cfg: Stage4Config, loaded=None, log=print) -> dict:
    """Stage 4 end to end: load, one pass over the concepts' val images, write CSVs and plots; a summary dict.

    ``loaded`` (a :class:`utils.models.LoadedModel`) replaces ``cfg.model``/``cfg.weights`` (tests, notebooks).
    Under torchrun (``cfg.world_size`` > 1) every rank calls this and evaluates its share of the images;
    rank 0 alone logs, writes the files (and runs the purity pass) and returns the full summary; the
    other ranks return ``{"rank": r, "images": n}`` after the pass.
    """
    if cfg.rank != 0:
        def log(*_a, **_k) -> None:
            return None
    from .cli import check_channels
    from .data import list_images, resolve_device
    from .models import default_layer, get_layer, load_model
    from .surgery import load_filters

    c1, c2 = list(cfg.classes1), list(cfg.classes2)
    if cfg.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if not c1 or not c2:
        raise UserError("each concept needs at least one class")
    if set(c1) & set(c2):
        raise UserError(f"class(es) {sorted(set(c1) & set(c2))} are in both concepts")
    images = list_images(cfg.data_dir, "val")
    K = len(images.classes)
    for t in c1 + c2:
        if not 0 <= t < K:
            raise UserError(f"class {t} is not in {images.root} (it has {K} class folders, classes 0..{K - 1})")
    device = resolve_device(cfg.device, cfg.gpu)
    lm = loaded or load_model(cfg.model, cfg.weights)
    if lm.num_classes and max(c1 + c2) >= lm.num_classes:
        raise UserError(f"class {max(c1 + c2)} is outside the {lm.num_classes} outputs of {lm.name}")
    layer, conv = get_layer(lm.model, cfg.layer)
    check_channels(cfg.nr_channels, conv.out_channels, f"layer {layer} of {lm.name}")
    if not 0 <= cfg.channel < conv.out_channels:
        raise UserError(f"channel {cfg.channel} is outside layer {layer}'s {conv.out_channels} channels")
    rec = find_record(cfg.model_dir, lm.name, layer, default_layer(lm.model), cfg.channel, c1, c2)
    split = load_filters(rec, cfg.rho)
    check_record(rec, lm.name, lm.weights, layer, conv, split)
    check_class_folders(rec, images)
    rho = round(float(rec["best_rho"] if cfg.rho is None else cfg.rho), 2)
    labels = {k: [class_label(t, rec, lm.categories, images.classes) for t in cl] for k, cl in ((1, c1), (2, c2))}
    log(f"channel {cfg.channel} of {lm.name} {layer}, rho {rho}{' (best)' if cfg.rho is None else ''}; "
        f"concept 1: {', '.join(labels[1])}; concept 2: {', '.join(labels[2])}")

    model = lm.model.to(device)
    indices = images.indices_of(c1 + c2)
    acts, seconds = evaluate_images(model, conv, split, images, indices, cfg.batch_size, cfg.num_workers,
                                    device, cfg.progress, cfg.rank, cfg.world_size)
    if cfg.rank != 0:
        return {"rank": cfg.rank, "images": len(acts)}
    ips = len(acts) / max(seconds, 1e-9)
    log(f"{len(acts)} validation images in {seconds:.1f} s ({ips:.1f} img/s)")

    name = result_name(os.path.basename(os.path.normpath(rec["dir"])), cfg.rho, cfg.tau)
    out: dict = {"record": rec["dir"], "rho": rho, "tau": cfg.tau, "images": len(acts), "seconds": seconds,
                 "images_per_second": ips, "plots": [], "csv": []}
    per_concept = {1: acts.of_classes(c1), 2: acts.of_classes(c2)}
    for k, a in per_concept.items():
        entry = {"images": len(a), "classes": labels[k]}
        if cfg.quantitative:
            folder = os.path.join(cfg.out_dir, "results_quantitative")
            os.makedirs(folder, exist_ok=True)
            rows = fraction_rows(a, cfg.tau)
            path = os.path.join(folder, f"{name}_concept{k}.csv")
            write_rows_csv(path, rows)
            means = column_means(rows)
            entry.update(rows=int(len(rows)), mean=_json_floats(means))
            out["csv"].append(path)
            log(f"concept {k}: {len(rows)} of {len(a)} images with relative attribution >= {cfg.tau}; mean "
                + ", ".join(f"{c} {_fmt(v)}" for c, v in zip(("d1/orig", "d2/orig", "res/orig"), means)))
        out[f"concept{k}"] = entry
    if cfg.purity_k > 0:
        out["purity"] = _purity(cfg, lm, rec, images, device, log)
    if cfg.qualitative:
        plot_name = result_name(os.path.basename(os.path.normpath(rec["dir"])), cfg.rho)  # tau does not enter
        out["plots"] = _write_plots(cfg, lm.name, layer, rho, plot_name, per_concept, labels, log)
    for path in out["csv"] + out["plots"]:
        log(f"wrote {path}")
    return out


def _purity(cfg: Stage4Config, lm, rec: dict, images: ImageList, device, log) -> dict:
    """Purity of Original, D1 and D2: shares of their top-k validation images (all classes) per concept."""
    from .pictures import topk_for_records
    from .topk import purity

    top = topk_for_records(lm, [rec], images, cfg.purity_k, cfg.rho, False, cfg.batch_size, cfg.num_workers,
                           device, cfg.progress)
    out = {name: purity(top.get(cfg.channel, name)["labels"], cfg.classes1, cfg.classes2)
           for name in ("original", "D1", "D2")}
    for name, p in out.items():
        log(f"purity of {name} (top {cfg.purity_k} of {len(images)} val images): concept 1 {p['concept1']:.2f}, "
            f"concept 2 {p['concept2']:.2f}, other {p['other']:.2f}")
    return out


def _write_plots(cfg: Stage4Config, model: str, layer: str, rho: float, name: str,
                 per_concept: dict[int, Activations], labels: dict[int, list[str]], log) -> list[str]:
    """The two density PNGs and the pgfplots .tex of one evaluation; returns their paths."""
    from .plots import degenerate_note, density_curves, density_plot, pgfplots_blocks, write_pgfplots

    folder = os.path.join(cfg.out_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    paths, concepts = [], {}
    for k, a in per_concept.items():
        grid, curves = density_curves({"orig": a.orig, "d1": a.d1, "d2": a.d2})
        for c in curves:
            note = degenerate_note(c)
            if note:
                log(f"note: concept {k}: {note}")
        title = (f"Concept {k}: {', '.join(labels[k])} (validation images)\n"
                 f"{model} {layer}, channel {cfg.channel}, rho {rho}")
        path = os.path.join(folder, f"{name}_concept{k}.png")
        density_plot(path, grid, curves, title)
        paths.append(path)
        concepts[k] = (grid, curves)
    tex = os.path.join(folder, f"{name}_pgfplots.tex")
    comment = (f"Density (Gaussian KDE, Scott's bandwidth) of the activation of channel {cfg.channel} of {model} "
               f"{layer} (rho {rho})\nbefore BatchNorm, on validation images. Concept 1 (c1): "
               f"{', '.join(labels[1])}; concept 2 (c2): {', '.join(labels[2])}.")
    write_pgfplots(tex, pgfplots_blocks(name, concepts), comment)
    paths.append(tex)
    return paths
