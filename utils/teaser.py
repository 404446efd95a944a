"""The composite figure, laid out like the paper's teaser: one panel per sub-channel (Original,
Disentangled 1, Disentangled 2, optionally Residual), each a feature visualisation in the middle with the
top-k images around it, framed by concept (blue: concept 1, orange: concept 2, gray: other classes)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

COLORS = {1: "#1f77b4", 2: "#ff7f0e", 0: "#9a9a9a"}  # concept 1, concept 2, other


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


def purity_line(p: dict | None) -> str:
    if not p:
        return ""
    return f"concept 1 {p['concept1']:.0%} · concept 2 {p['concept2']:.0%} · other {p['other']:.0%}"


def teaser_figure(panels: list[Panel], title: str = "", legend: tuple[str, str] = ("", ""),
                  paths: tuple[str, ...] = (), panel_inches: float = 4.0, dpi: int = 100):
    """Draw the panels side by side and save to every path in ``paths`` (PNG, PDF, ...).

    The figure is ``len(panels) * panel_inches`` wide and ``panel_inches + 1`` high (inches, no tight
    bounding box), so a PNG is exactly that times ``dpi`` pixels. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    k = max((len(p.images) for p in panels), default=0)
    n = ring_side(k)
    fig = plt.figure(figsize=(len(panels) * panel_inches, panel_inches + 1.0), dpi=dpi)
    outer = GridSpec(1, len(panels), figure=fig, left=0.01, right=0.99, bottom=0.1,
                     top=1 - 0.8 / (panel_inches + 1.0), wspace=0.06)
    for pi, panel in enumerate(panels):
        grid = GridSpecFromSubplotSpec(n, n, subplot_spec=outer[pi], wspace=0.08, hspace=0.22)
        for r, (i, j) in enumerate(ring_cells(n)):
            ax = fig.add_subplot(grid[i, j])
            _frame(ax, COLORS[0] if r >= len(panel.images) else COLORS[panel.concepts[r]], 2.5)
            if r < len(panel.images):
                ax.imshow(to_hwc(panel.images[r]))
                ax.set_xlabel(panel.captions[r], fontsize=5.5, labelpad=1)
            else:
                ax.set_visible(False)
        ax = fig.add_subplot(grid[1:n - 1, 1:n - 1])
        _frame(ax, "black", 1.0)
        if panel.center is not None:
            ax.imshow(to_hwc(panel.center))
        ax.set_xlabel(panel.center_caption, fontsize=6.5, labelpad=1)
        box = outer[pi].get_position(fig)
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.045, panel.title, ha="center", va="bottom", fontsize=10)
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.012, purity_line(panel.purity), ha="center", va="bottom",
                 fontsize=7, color="#444444")
    if title:
        fig.text(0.5, 1 - 0.12 / (panel_inches + 1.0), title, ha="center", va="top", fontsize=10, weight="bold")
    for (x, key), text in zip(((0.25, 1), (0.75, 2)), legend):
        if text:
            fig.text(x, 0.03, f"\u25a0 concept {key}: {text}", color=COLORS[key], ha="center", va="bottom", fontsize=8)
    if any(legend):
        fig.text(0.5, 0.03, "\u25a0 other", color=COLORS[0], ha="center", va="bottom", fontsize=8)
    for path in paths:
        fig.savefig(path, dpi=dpi)
    return fig


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
    Image.fromarray(arr).save(path)
