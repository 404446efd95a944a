"""The composite figure, laid out like the paper's teaser: one panel per sub-channel (Original,
Disentangled 1 .. k, optionally Residual), each a feature visualisation in the middle with the top-k
images around it, framed by concept (blue: concept 1, orange: concept 2, green, purple, ...; gray: other
classes). Drawn on matplotlib's Agg canvas directly: no pyplot, no global backend switch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path, save_figure
from .style import OTHER, concept_colour, literal


@dataclass
class Panel:
    """One sub-channel's panel: ``title``, the centre image (3 x H x W in [0, 1], or None), the top-k
    ``images`` (3 x h x w each, best first), their ``captions`` and ``concepts`` (1, 2 or 0)."""

    title: str
    center: torch.Tensor | None
    images: list[torch.Tensor]
    captions: list[str]
    concepts: list[int]
    purity: dict | None = None
    center_caption: str = "feature visualisation"
    extra: dict = field(default_factory=dict)


def ring_side(k: int) -> int:
    """Grid side ``n`` whose border (4n - 4 cells) holds ``k`` images around an (n-2)^2 centre (n >= 3)."""
    n = 3
    while 4 * n - 4 < k:
        n += 1
    return n


def ring_cells(n: int) -> list[tuple[int, int]]:
    """Border cells of an n x n grid, clockwise from the top-left corner."""
    top = [(0, j) for j in range(n)]
    right = [(i, n - 1) for i in range(1, n)]
    bottom = [(n - 1, j) for j in range(n - 2, -1, -1)]
    left = [(i, 0) for i in range(n - 2, 0, -1)]
    return top + right + bottom + left


def to_hwc(img: torch.Tensor) -> np.ndarray:
    """3 x H x W tensor in [0, 1] -> H x W x 3 float array for matplotlib."""
    return img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def overlay(image: torch.Tensor, amap: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> torch.Tensor:
    """``image`` (3 x H x W, [0, 1]) with the positive part of an activation map (h x w) over it."""
    from matplotlib import colormaps

    a = F.interpolate(amap.float()[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    a = a.clamp_min(0)
    a = a / a.max() if a.max() > 0 else a
    heat = torch.from_numpy(colormaps[cmap](a.cpu().numpy())[..., :3]).permute(2, 0, 1).float()
    w = alpha * a[None].cpu()
    return image.cpu() * (1 - w) + heat * w


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """``image`` (3 x H x W, [0, 1]) under a pixel heatmap (H x W, e.g. gradient x input): its positive part,
    smoothed over about 1/16 of the side (pixel attributions are speckled), scaled to its largest value."""
    k = max(3, (heat.shape[-1] // 16) | 1)
    smooth = F.avg_pool2d(heat.float().clamp_min(0)[None, None], k, stride=1, padding=k // 2)[0, 0]
    return overlay(image, smooth, alpha)


def purity_line(p: dict | None) -> str:
    if not p:
        return ""
    k = sum(key.startswith("concept") for key in p)
    return " · ".join([f"concept {j} {p[f'concept{j}']:.0%}" for j in range(1, k + 1)] + [f"other {p['other']:.0%}"])


def teaser_figure(panels: list[Panel], title: str = "", legend: Sequence[str] = ("", ""),
                  paths: Sequence[str] = (), panel_inches: float = 4.0, dpi: int = 100):
    """Draw the panels side by side and save to every path in ``paths`` (PNG, PDF, ...).

    ``legend[j - 1]`` names concept j's classes. The figure is ``len(panels) * panel_inches`` wide and
    ``panel_inches + 1`` high (inches, no tight bounding box), so a PNG is exactly that times ``dpi``
    pixels. Returns the matplotlib figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    k = max((len(p.images) for p in panels), default=0)
    n = ring_side(k)
    fig = Figure(figsize=(len(panels) * panel_inches, panel_inches + 1.0), dpi=dpi)
    FigureCanvasAgg(fig)
    outer = GridSpec(1, len(panels), figure=fig, left=0.01, right=0.99, bottom=0.1,
                     top=1 - 0.8 / (panel_inches + 1.0), wspace=0.06)
    for pi, panel in enumerate(panels):
        grid = GridSpecFromSubplotSpec(n, n, subplot_spec=outer[pi], wspace=0.08, hspace=0.22)
        for r, (i, j) in enumerate(ring_cells(n)):
            ax = fig.add_subplot(grid[i, j])
            _frame(ax, concept_colour(0 if r >= len(panel.images) else panel.concepts[r]), 2.5)
            if r < len(panel.images):
                ax.imshow(to_hwc(panel.images[r]))
                ax.set_xlabel(literal(panel.captions[r]), fontsize=5.5, labelpad=1)
            else:
                ax.set_visible(False)
        ax = fig.add_subplot(grid[1:n - 1, 1:n - 1])
        _frame(ax, "black", 1.0)
        if panel.center is not None:
            ax.imshow(to_hwc(panel.center))
        ax.set_xlabel(literal(panel.center_caption), fontsize=6.5, labelpad=1)
        box = outer[pi].get_position(fig)
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.045, literal(panel.title), ha="center", va="bottom", fontsize=10)
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.012, purity_line(panel.purity), ha="center", va="bottom",
                 fontsize=7, color="#444444")
    if title:
        fig.text(0.5, 1 - 0.12 / (panel_inches + 1.0), literal(title), ha="center", va="top", fontsize=10, weight="bold")
    _legend(fig, list(legend))
    for path in paths:
        save_figure(path, fig, dpi=dpi)
    return fig


def _legend(fig, legend: list[str]) -> None:
    """One coloured line per concept along the bottom, and "other" (for two concepts: left, right, middle)."""
    if not any(legend):
        return
    k = len(legend)
    xs = [0.25, 0.75, 0.5] if k == 2 else [(j + 0.5) / (k + 1) for j in range(k + 1)]
    for j, text in enumerate(legend, 1):
        if text:
            fig.text(xs[j - 1], 0.03, literal(f"\u25a0 concept {j}: {text}"), color=concept_colour(j), ha="center", va="bottom",
                     fontsize=8)
    fig.text(xs[k], 0.03, "\u25a0 other", color=OTHER, ha="center", va="bottom", fontsize=8)


def _frame(ax, color: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(color)
        s.set_linewidth(width)


def save_image(img: torch.Tensor, path: str) -> None:
    """Write a 3 x H x W tensor in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    arr = (to_hwc(img) * 255 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def save_strip(images: list[torch.Tensor], path: str, gap: int = 4) -> None:
    """Write ``images`` (3 x H x W each, in [0, 1], one size) side by side with a white ``gap`` as one PNG (a
    blank square without images)."""
    if not images:
        save_image(torch.ones(3, 8, 8), path)
        return
    h = images[0].shape[1]
    parts = []
    for i, img in enumerate(images):
        parts += ([torch.ones(3, h, gap)] if i else []) + [img.float().clamp(0, 1)]
    save_image(torch.cat(parts, 2), path)


def strips_figure(rows: list[tuple[str, str, list[torch.Tensor]]], path: str, title: str = "",
                  cell_inches: float = 0.7, dpi: int = 100) -> None:
    """One figure of labelled rows of images (``(label, colour, images)`` each; images 3 x H x W in [0, 1]), a
    row's label above its images, saved to ``path``: a split unit's clusters and concept units at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max((len(imgs) for _, _, imgs in rows), default=1) or 1
    head = 0.35 if title else 0.0
    fig = Figure(figsize=(n * cell_inches, len(rows) * (cell_inches + 0.3) + head), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), n, left=0.01, right=0.99, bottom=0.01,
                            top=1 - head / (len(rows) * (cell_inches + 0.3) + head), hspace=0.45, wspace=0.05)
    for r, (label, colour, imgs) in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(grid[r, i])
            _frame(ax, colour, 1.5)
            if i < len(imgs):
                ax.imshow(to_hwc(imgs[i]))
            else:
                ax.set_visible(False)
            if i == 0:
                ax.set_title(literal(label), loc="left", fontsize=8, color=colour, pad=3)
    if title:
        fig.suptitle(literal(title), fontsize=10, weight="bold", y=0.995)
    save_figure(path, fig, dpi=dpi)
