"""Density plots of stage 4: Gaussian kernel density estimates (Scott's bandwidth) as PNG and pgfplots data.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and does not disturb a notebook's backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

from ..files import save_figure, write_text
from .style import ORIGINAL, concept_colour, literal


def series_info(key: str) -> tuple[str, str, str]:
    """Legend label, pgfplots block tag and colour of a series key: ``orig`` or ``d<j>``."""
    if key == "orig":
        return "Original", "original", ORIGINAL
    j = int(key[1:])
    return f"Disentangled {j}", f"disentangled{j}", concept_colour(j)


@dataclass
class Curve:
    """One series: ``y`` (G,) density on the shared grid, or ``constant`` when it has no density."""

    key: str
    label: str
    n: int
    y: np.ndarray | None
    constant: float | None = None  # the value of a degenerate series (all equal, or a single image)


def fit_kde(values: np.ndarray) -> gaussian_kde | None:
    """``gaussian_kde`` with Scott's bandwidth, or None when ``values`` (n,) has < 2 points or no variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) < 2 or not np.all(np.isfinite(v)) or np.ptp(v) == 0:
        return None
    try:
        return gaussian_kde(v, bw_method="scott")
    except np.linalg.LinAlgError:  # numerically constant
        return None


def density_curves(series: dict[str, np.ndarray], points: int = 256) -> tuple[np.ndarray, list[Curve]]:
    """A shared grid (G,) and one :class:`Curve` per entry of ``series`` (keys ``orig``, ``d1``, ``d2``, ...).

    The grid spans all values plus three bandwidths on either side. Degenerate series (fewer than
    2 values or zero variance) get ``y = None`` and ``constant`` = their value (or None if empty).
    """
    kdes = {k: fit_kde(v) for k, v in series.items()}
    allv = np.concatenate([np.asarray(series[k], np.float64).ravel() for k in kdes]) if kdes else np.zeros(0)
    allv = allv[np.isfinite(allv)]
    if len(allv) == 0:
        lo, hi = -1.0, 1.0
    else:
        bws = [float(np.sqrt(kde.covariance[0, 0])) for kde in kdes.values() if kde is not None]
        pad = 3 * max(bws) if bws else max(1.0, 0.1 * float(np.abs(allv).max()))
        lo, hi = float(allv.min()) - pad, float(allv.max()) + pad
    grid = np.linspace(lo, hi, points)
    curves = []
    for key in series:
        label = series_info(key)[0]
        v = np.asarray(series[key], np.float64).ravel()
        kde = kdes[key]
        if kde is not None:
            curves.append(Curve(key, label, len(v), kde(grid)))
        else:
            curves.append(Curve(key, label, len(v), None, float(v[0]) if len(v) else None))
    return grid, curves


def degenerate_note(curve: Curve) -> str | None:
    """Why a curve has no density, in words (None when it has one)."""
    if curve.y is not None:
        return None
    if curve.n == 0:
        return f"{curve.label}: no images"
    if curve.n == 1:
        return f"{curve.label}: only 1 image (value {curve.constant:.4g}), no density: drawn as a vertical line"
    return f"{curve.label}: all {curve.n} values equal {curve.constant:.4g}, no density: drawn as a vertical line"


def _spike_height(curves: list[Curve]) -> float:
    peaks = [float(c.y.max()) for c in curves if c.y is not None]
    return max(peaks) if peaks else 1.0


def density_plot(path: str, grid: np.ndarray, curves: list[Curve], title: str) -> None:
    """Write the density plot PNG to ``path`` (atomically): legend, x-axis 'Activation', ``title``."""
    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = _spike_height(curves)
    for c in curves:
        col = series_info(c.key)[2]
        if c.y is not None and c.key == "orig":  # dashed and on top: stays visible where a part equals it
            ax.plot(grid, c.y, color=col, lw=1.8, ls="--", zorder=3, label=f"{c.label} (n={c.n})")
        elif c.y is not None:
            ax.plot(grid, c.y, color=col, lw=2, label=f"{c.label} (n={c.n})")
            ax.fill_between(grid, c.y, color=col, alpha=0.15, lw=0)
        elif c.constant is not None:
            ax.vlines(c.constant, 0, top, colors=col, lw=2, linestyles=":",
                      label=f"{c.label} (all = {c.constant:.3g}, n={c.n})")
    ax.axvline(0.0, color="#999999", lw=0.8, zorder=0)
    ax.set_xlabel("Activation")
    ax.set_ylabel("Density")
    ax.set_title(literal(title), fontsize=10)
    ax.set_ylim(bottom=0)
    ax.set_xlim(grid[0], grid[-1])
    ax.legend(frameon=False)
    save_figure(path, fig)


def curve_points(grid: np.ndarray, curve: Curve, spike: float) -> np.ndarray:
    """Coordinates (G x 2) of a curve; a degenerate one becomes a vertical line ``(v, 0), (v, spike)``."""
    if curve.y is not None:
        return np.stack([grid, curve.y], axis=1)
    if curve.constant is None:
        return np.zeros((0, 2))
    return np.array([[curve.constant, 0.0], [curve.constant, spike]])


def pgfplots_blocks(prefix: str, concepts: dict[int, tuple[np.ndarray, list[Curve]]]) -> list[tuple[str, np.ndarray]]:
    """Named coordinate tables: ``<prefix>_original_c1.dat``, ``<prefix>_disentangled1_c1.dat``, ... (name, G x 2)."""
    blocks = []
    for k, (grid, curves) in concepts.items():
        spike = _spike_height(curves)
        for c in curves:
            blocks.append((f"{prefix}_{series_info(c.key)[1]}_c{k}.dat", curve_points(grid, c, spike)))
    return blocks


def write_pgfplots(path: str, blocks: list[tuple[str, np.ndarray]], comment: str) -> None:
    """Write ``filecontents*`` blocks (header ``x y``) plus a usage comment to the .tex file ``path`` (atomically)."""
    lines = [f"% {line}" for line in comment.splitlines()]
    lines += ["% \\input this file (preamble or body); each block writes its .dat file, then e.g.",
              "%   \\begin{tikzpicture}\\begin{axis}[xlabel=Activation, ylabel=Density]",
              f"%   \\addplot[no marks] table {{{blocks[0][0] if blocks else 'NAME.dat'}}};",
              "%   \\end{axis}\\end{tikzpicture}", ""]
    for name, pts in blocks:
        lines.append(f"\\begin{{filecontents*}}[overwrite]{{{name}}}")
        lines.append("x y")
        lines += [f"{x:.10g} {y:.10g}" for x, y in pts]
        lines.append("\\end{filecontents*}")
        lines.append("")
    write_text(path, "\n".join(lines))
