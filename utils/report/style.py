"""How concepts and sub-channels are named and coloured: one place for every plot, figure and page, so
that concept j has the same colour in the density plots, the teaser frames and the report."""
from __future__ import annotations

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
ORIGINAL = "#222222"  # the original channel's curve
OTHER = "#9a9a9a"  # images of classes in no concept


def concept_colour(j: int) -> str:
    """The colour of concept ``j`` (1..k) and of its concept channel Disentangled j; 0: other classes."""
    return OTHER if j == 0 else PALETTE[(j - 1) % len(PALETTE)]


def sub_label(name: str) -> str:
    """Words for a sub-channel name: ``original`` -> Original, ``Dj`` -> Disentangled j, ``Res`` -> Residual."""
    if name == "original":
        return "Original"
    return "Residual" if name == "Res" else f"Disentangled {name[1:]}"


def concept_label(j: int, class_labels: list[str]) -> str:
    """``concept j: label, label`` (class labels as ClassNames.label gives them)."""
    return f"concept {j}: {', '.join(class_labels)}"


def per_concept(values, fmt: str = ".0%") -> str:
    """One number per concept as the tables show it: ``83%/17%`` (``fmt`` ".2f" for AUCs), ``-`` where undefined."""
    return "/".join("-" if v is None else format(v, fmt) for v in values)


def literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` (in a class folder's name, say) would start
    mathtext, and a name like ``a$\\foo$b`` stop the drawing with a parse error."""
    return str(text).replace("$", r"\$")
