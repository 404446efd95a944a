"""Classes and concepts: human class names, and the one check of a channel and its concepts.

A *concept* is a set of class indices (kept sorted); a split has ``k >= 2`` concepts, numbered
1..k in the order the user gave them. Class indices are the model's logit indices.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .errors import UserError


class ClassNames:
    """Human names of class indices: the weights' categories when they name every class, else the
    class folders (``folders[i]`` is the folder of class ``index[i]``; by default ``index[i] = i``)."""

    def __init__(self, categories: Sequence[str] | None, folders: Sequence[str],
                 index: Sequence[int] | None = None):
        index = list(range(len(folders))) if index is None else [int(t) for t in index]
        self.folders = dict(zip(index, folders))
        top = max(index, default=-1)
        self.categories = list(categories) if categories and len(categories) > top else None

    def name(self, t: int) -> str:
        if self.categories is not None and 0 <= t < len(self.categories):
            return str(self.categories[t])
        return str(self.folders.get(int(t), t))

    def label(self, t: int) -> str:
        """``"530 digital clock"``: the index and its name."""
        return f"{t} {self.name(t)}"

    def labels(self, classes: Iterable[int]) -> str:
        return ", ".join(self.label(t) for t in classes)

    def as_dict(self, classes: Iterable[int]) -> dict[str, str]:
        return {str(t): self.name(t) for t in classes}


def normalise(concepts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each concept's classes as sorted ints (a concept is a set: the order of its classes does not matter)."""
    return [sorted(int(t) for t in cs) for cs in concepts]


def check_channel(channel: int, channels: int, layer: str) -> None:
    """Refuse a channel outside the layer's ``channels`` outputs."""
    if not 0 <= channel < channels:
        raise UserError(f"channel {channel} is outside layer {layer}, which has {channels} channels "
                        f"(0..{channels - 1})")


def check_concepts(concepts: Sequence[Sequence[int]], known: Iterable[int], where: str,
                   counts: dict[int, int] | None = None) -> None:
    """Refuse fewer than two concepts, an empty concept, a class listed twice or in two concepts, a class
    that is not one of ``known`` (the classes of ``where``) and, with ``counts``, a concept without images."""
    known = set(int(t) for t in known)
    if len(concepts) < 2:
        raise UserError("a split needs at least two concepts")
    seen: dict[int, int] = {}
    for j, cs in enumerate(concepts, 1):
        if not cs:
            raise UserError(f"concept {j} has no classes")
        if len(set(cs)) != len(cs):
            raise UserError(f"concept {j} lists a class twice: {list(cs)}")
        for t in cs:
            if t not in known:
                lo, hi = (min(known), max(known)) if known else (0, -1)
                raise UserError(f"class {t} of concept {j} is not one of the {len(known)} classes of {where} "
                                f"({lo}..{hi})")
            if t in seen:
                raise UserError(f"class {t} is in both concepts {seen[t]} and {j}; a split needs disjoint concepts")
            seen[t] = j
        if counts is not None and sum(counts.get(int(t), 0) for t in cs) == 0:
            raise UserError(f"concept {j} (classes {list(cs)}) has no training images")


def concept_ids(labels: torch.Tensor, concepts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Concept number (1..k) of each label (B,), 0 for a class in no concept."""
    out = torch.zeros_like(labels)
    for j, cs in enumerate(concepts, 1):
        out[torch.isin(labels, torch.tensor(list(cs), dtype=labels.dtype, device=labels.device))] = j
    return out


def concept_classes_text(concepts: Sequence[Sequence[int]]) -> str:
    """``c1-0-2_c2-1``: the concepts' classes, as used in folder and file names."""
    return "_".join(f"c{j}-" + "-".join(map(str, cs)) for j, cs in enumerate(concepts, 1))
