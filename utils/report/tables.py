"""Stage 4's result files: the per-concept fraction CSVs, their names, the density plots of one evaluation,
and the paper's averaged table over a folder of CSVs (``summarize_results.py``)."""
from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from ..defaults import DEFAULT_TAU
from ..errors import UserError
from ..files import write_text
from .plots import degenerate_note, density_curves, density_plot, pgfplots_blocks, write_pgfplots


def columns(k: int) -> tuple[str, ...]:
    """CSV header of ``k`` concepts: ``disentangled1, ..., disentangledk, residual``."""
    return tuple(f"disentangled{j}" for j in range(1, k + 1)) + ("residual",)


def column_labels(k: int) -> tuple[str, ...]:
    return tuple(f"Disentangled {j}" for j in range(1, k + 1)) + ("Residual",)


def column_means(rows: np.ndarray, width: int = 3) -> list[float]:
    """Mean of each column of ``rows`` (m x width); NaN for every column when there are no rows."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, width)
    return [float("nan")] * width if len(rows) == 0 else [float(v) for v in rows.mean(0)]


def fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4f}"


def json_floats(values: list[float]) -> list[float | None]:
    """NaN -> None, so that --json writes standard JSON."""
    return [None if v is None or math.isnan(v) else float(v) for v in values]


# ------------------------------------------------------------------ the rows CSV of one concept


def write_rows_csv(path: str, rows: np.ndarray, k: int = 2) -> None:
    """Write ``rows`` (m x (k+1)) under the header of :func:`columns`, replacing ``path`` atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns(k))
    for r in np.asarray(rows, dtype=np.float64).reshape(-1, k + 1):
        w.writerow([repr(float(v)) for v in r])
    write_text(path, buf.getvalue())


def read_rows_csv(path: str) -> np.ndarray:
    """Read a rows CSV written by :func:`write_rows_csv` (m x (k+1), float64)."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    head = tuple(c.strip() for c in lines[0]) if lines else ()
    if len(head) < 3 or head != columns(len(head) - 1):
        raise UserError(f"{path} does not start with the header {','.join(columns(2))} (or one column per concept)")
    try:
        rows = [[float(v) for v in line] for line in lines[1:] if line]
    except ValueError:
        raise UserError(f"{path} holds a value that is not a number") from None
    if any(len(r) != len(head) for r in rows):
        raise UserError(f"{path} has a row without exactly {len(head)} values")
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(head))


# ------------------------------------------------------------------ file names


def result_name(record_folder_name: str, rho: float | None = None, tau: float = DEFAULT_TAU) -> str:
    """Stem of one evaluation's outputs: the record's folder name, plus ``_rho<f>``/``_tau<t>`` when not default."""
    name = record_folder_name
    if rho is not None:
        name += f"_rho{round(float(rho), 2)}"
    if not math.isclose(tau, DEFAULT_TAU):
        name += f"_tau{tau}"
    return name


_STEM = re.compile(r"^(?P<pair>.+?)(?P<setting>(_rho[0-9.]+)?(_tau[0-9.eE+-]+)?)_concept(?P<k>\d+)\.csv$")


def setting_label(setting: str) -> str:
    """Human words for a name suffix: '' -> 'best rho, tau 0.03', '_rho0.5' -> 'rho 0.5, tau 0.03', ..."""
    m = re.match(r"^(_rho(?P<rho>[0-9.]+))?(_tau(?P<tau>[0-9.eE+-]+))?$", setting)
    rho = f"rho {m['rho']}" if m and m["rho"] else "best rho"
    tau = f"tau {m['tau']}" if m and m["tau"] else f"tau {DEFAULT_TAU}"
    return f"{rho}, {tau}"


# ------------------------------------------------------------------ the outputs of one evaluation


def fraction_rows(acts, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Rows (m x (k+1)) ``d_1/orig, ..., d_k/orig, res/orig`` of the images with ``rel >= tau`` and ``orig != 0``
    (``acts``: a stage-4 pass's :class:`utils.stages.evaluation.Activations`)."""
    keep = (acts.rel >= tau) & (acts.orig != 0)
    return (acts.sub[keep] / acts.orig[keep][:, None]).reshape(-1, acts.sub.shape[1])


def share_rows(rows: np.ndarray) -> np.ndarray:
    """Shares of the original activation that sum to 1 (m x (k+1)), from :func:`fraction_rows`: each concept unit's
    exclusive part ``(d_j - res) / orig`` and the shared part ``res / orig`` once (the bias is in ``res``, so in
    the shared part once: ``sum_j (d_j - res) + res = sum_j d_j - (k - 1) res = orig``). The rows of
    ``fraction_rows`` count the shared part and the bias in every d_j, so they never sum to 1."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.concatenate([rows[:, :-1] - rows[:, -1:], rows[:, -1:]], 1) if len(rows) else rows


def share_summary(rows: np.ndarray) -> dict:
    """Means and medians of :func:`share_rows`: ``{"exclusive": [k], "shared", "exclusive_median": [k],
    "shared_median"}`` (None without rows)."""
    sh = share_rows(rows)
    width = rows.shape[1] if np.ndim(rows) == 2 else 1
    mean = json_floats(list(sh.mean(0)) if len(sh) else [None] * width)
    med = json_floats(list(np.median(sh, 0)) if len(sh) else [None] * width)
    return {"exclusive": mean[:-1], "shared": mean[-1], "exclusive_median": med[:-1], "shared_median": med[-1]}


@dataclass(frozen=True)
class ResultFiles:
    """One evaluation's result files: ``out_dir/results_quantitative/<stem>_concept<j>.csv`` and
    ``out_dir/plots/<stem>_concept<j>.png`` (+ pgfplots), ``<stem>`` = the record's folder name, with
    ``_rho<f>`` when a rho other than the best was asked for and ``_tau<t>`` (CSVs only) for another tau."""

    out_dir: str
    record_name: str
    model: str
    layer: str
    channel: int
    k: int
    rho: float  # the rho evaluated
    rho_asked: float | None = None  # None: the record's best rho
    tau: float = DEFAULT_TAU

    def write_quantitative(self, per_concept: list, log) -> list[dict]:
        """Per concept, the fraction rows CSV; returns per concept ``{"rows", "mean", "csv"}``."""
        folder = os.path.join(self.out_dir, "results_quantitative")
        os.makedirs(folder, exist_ok=True)
        name, k, out = result_name(self.record_name, self.rho_asked, self.tau), self.k, []
        for j, a in enumerate(per_concept, 1):
            rows = fraction_rows(a, self.tau)
            path = os.path.join(folder, f"{name}_concept{j}.csv")
            write_rows_csv(path, rows, k)
            means = column_means(rows, k + 1)
            out.append({"rows": int(len(rows)), "mean": json_floats(means), "median": json_floats(
                list(np.median(rows, 0)) if len(rows) else [None] * (k + 1)), "shares": share_summary(rows),
                "csv": path})
            parts = [f"d{i}/orig" for i in range(1, k + 1)] + ["res/orig"]
            log(f"concept {j}: {len(rows)} of {len(a)} images with relative attribution >= {self.tau}; mean "
                + ", ".join(f"{c} {fmt(v)}" for c, v in zip(parts, means)))
        return out

    def write_density_plots(self, per_concept: list, labels: list[list[str]], log) -> list[str]:
        """Per concept a density PNG, and the pgfplots .tex of all of them, in ``plots/``; their paths."""
        folder = os.path.join(self.out_dir, "plots")
        os.makedirs(folder, exist_ok=True)
        name = result_name(self.record_name, self.rho_asked)  # tau does not enter
        where = f"{self.model} {self.layer}, channel {self.channel}, rho {self.rho}"
        paths, concepts = [], {}
        for j, a in enumerate(per_concept, 1):
            series = {"orig": a.orig, **{f"d{i + 1}": a.sub[:, i] for i in range(self.k)}}
            grid, curves = density_curves(series)
            for c in curves:
                note = degenerate_note(c)
                if note:
                    log(f"note: concept {j}: {note}")
            path = os.path.join(folder, f"{name}_concept{j}.png")
            density_plot(path, grid, curves, f"Concept {j}: {', '.join(labels[j - 1])} (validation images)\n{where}")
            paths.append(path)
            concepts[j] = (grid, curves)
        tex = os.path.join(folder, f"{name}_pgfplots.tex")
        named = "; ".join(f"concept {j} (c{j}): {', '.join(lab)}" for j, lab in enumerate(labels, 1))
        comment = (f"Density (Gaussian KDE, Scott's bandwidth) of the activation of channel {self.channel} of "
                   f"{self.model} {self.layer} (rho {self.rho})\nbefore BatchNorm, on validation images. "
                   f"{named[0].upper()}{named[1:]}.")
        write_pgfplots(tex, pgfplots_blocks(name, concepts), comment)
        return paths + [tex]


# ------------------------------------------------------------------ the paper's table


def summarize(results_dir: str) -> list[dict]:
    """The paper's table from every ``*_concept<j>.csv`` in ``results_dir``.

    One entry per setting (rho/tau suffix, and the number of concepts when not 2) and concept: ``setting``,
    ``concept`` (1..k), ``pairs``, ``rows`` and ``mean`` (k + 1 floats: the mean of each column over all
    rows of all pairs).
    """
    if not os.path.isdir(results_dir):
        raise UserError(f"no results folder {results_dir} (run get_results.py --get_quantitative first)")
    groups: dict[tuple[str, int, int], list[np.ndarray]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*_concept*.csv"))):
        m = _STEM.match(os.path.basename(path))
        if m is None:
            continue
        rows = read_rows_csv(path)
        groups.setdefault((m["setting"], rows.shape[1] - 1, int(m["k"])), []).append(rows)
    if not groups:
        raise UserError(f"{results_dir} holds no *_concept1.csv / *_concept2.csv files "
                        "(run get_results.py --get_quantitative first)")
    table = []
    for setting, k in sorted({(s, k) for s, k, _ in groups}, key=lambda sk: (sk[0] != "", sk[1] != 2, sk)):
        label = setting_label(setting) + ("" if k == 2 else f", {k} concepts")
        for j in range(1, k + 1):
            parts = groups.get((setting, k, j), [])
            rows = np.concatenate(parts) if parts else np.zeros((0, k + 1))
            table.append({"setting": label, "concept": j, "pairs": len(parts), "rows": int(len(rows)),
                          "mean": column_means(rows, k + 1)})
    return table


def format_table(table: list[dict]) -> str:
    """The summary as an aligned text table (one block per setting)."""
    lines = []
    for setting in dict.fromkeys(e["setting"] for e in table):
        entries = [e for e in table if e["setting"] == setting]
        labels = column_labels(len(entries[0]["mean"]) - 1)
        widths = [max(9, len(c) + 1) for c in labels]
        lines.append(f"{setting}:")
        lines.append(f"  {'images of':<10} {'pairs':>5} {'rows':>7} " + " ".join(f"{c:>{w}}" for c, w in zip(labels, widths)))
        for e in entries:
            lines.append(f"  {'concept ' + str(e['concept']):<10} {e['pairs']:>5} {e['rows']:>7} "
                         + " ".join(f"{fmt(v):>{w}}" for v, w in zip(e["mean"], widths)))
    return "\n".join(lines)


def write_summary(results_dir: str, table: list[dict]) -> tuple[str, str]:
    """Write ``summary.csv`` and ``summary.md`` into ``results_dir`` (atomically); returns both paths."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    k = max((len(e["mean"]) - 1 for e in table), default=2)
    w.writerow(("setting", "concept", "pairs", "rows") + columns(k))
    for e in table:
        w.writerow([e["setting"], e["concept"], e["pairs"], e["rows"]] + [repr(v) for v in e["mean"]]
                   + [""] * (k + 1 - len(e["mean"])))
    md = ["# Disentanglement results", "",
          f"Mean fraction of the original activation, over all rows of all pairs in `{os.path.abspath(results_dir)}`.", ""]
    for setting in dict.fromkeys(e["setting"] for e in table):
        entries = [e for e in table if e["setting"] == setting]
        labels = column_labels(len(entries[0]["mean"]) - 1)
        md += [f"## {setting}", "", "| images of | pairs | rows | " + " | ".join(labels) + " |",
               "| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |"]
        md += [f"| concept {e['concept']} | {e['pairs']} | {e['rows']} | " + " | ".join(fmt(v) for v in e["mean"]) + " |"
               for e in entries]
        md.append("")
    paths = (os.path.join(results_dir, "summary.csv"), os.path.join(results_dir, "summary.md"))
    write_text(paths[0], buf.getvalue())
    write_text(paths[1], "\n".join(md))
    return paths
