"""Classes and concepts: which logit each class folder is, human class names, and the one check of a
channel and its concepts.

A *class index* is always the model's logit index. A *concept* is a set of class indices (kept sorted);
a split has ``k >= 2`` concepts, numbered 1..k in the order the user gave them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from .images import class_folders
from .datasets import Datasets
from ..errors import UserError, say
from ..files import read_json

CLASS_INDEX_HINT = ("say which output each folder is with --class_index FILE (a JSON object "
                    "{\"folder\": index}); folders named by ImageNet wnids (n01440764, ...) map by themselves "
                    "for a 1000-output model")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in logit order (their sorted order), from timm's bundled class info."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@lru_cache(maxsize=1)
def wnid_classes() -> dict[str, int]:
    """wnid -> its logit index in a 1000-output ImageNet model (its position among the 1000 wnids)."""
    return {w: t for t, w in enumerate(imagenet_wnids())}


@dataclass
class ClassMap:
    """Which logit each class folder is: ``index[folder]``; ``num_classes`` is the length of every
    per-class array (the model's outputs)."""

    index: dict[str, int]
    num_classes: int
    skipped: tuple[str, ...] = ()  # folders of this split that no class of the model is known for: left out

    def of(self, folder: str, root: str = "") -> int:
        if folder not in self.index:
            raise UserError(f"class folder {os.path.join(root, folder)} is not in the class index "
                            f"({len(self.index)} folders); {CLASS_INDEX_HINT}")
        return self.index[folder]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an error (json would keep the last one)."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"the folder {k!r} is given twice")
        seen.add(k)
    return dict(pairs)


def read_class_index(path: str) -> dict[str, int]:
    """The ``{folder: index}`` JSON object of ``--class_index`` (each folder once)."""
    try:
        with open(path) as f:
            obj = json.load(f, object_pairs_hook=_unique_keys)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --class_index {path}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                            for k, v in obj.items()):
        raise UserError(f"--class_index {path} must be a JSON object of folder names to integer class indices")
    return obj


def class_map(folders: Sequence[str], outputs: int, class_index: str | dict | None = None,
              where: str = "the data") -> ClassMap:
    """The class map of ``folders``: ``class_index`` (a file or dict) when given; else the folder position
    when there are as many folders as outputs (``outputs`` 0: unknown, position too); else, for a
    1000-output model and ImageNet wnid folders, the wnid's position among the 1000 wnids; else an error."""
    if class_index is not None:
        index = read_class_index(class_index) if isinstance(class_index, str) else dict(class_index)
        source = f"--class_index {class_index}" if isinstance(class_index, str) else "the class index"
        missing = [f for f in folders if f not in index]
        if missing:
            raise UserError(f"class folder {missing[0]} of {where} is not in {source}")
        index = {f: index[f] for f in folders}
        bad = [v for v in index.values() if not 0 <= v < (outputs or max(index.values()) + 1)]
        if bad:
            raise UserError(f"{source} maps a folder to class {bad[0]}, outside the model's {outputs} outputs")
        if len(set(index.values())) != len(index):
            raise UserError(f"{source} maps two folders to one class")
        return ClassMap(index, outputs or max(index.values()) + 1)
    if outputs in (0, len(folders)):
        return ClassMap({f: t for t, f in enumerate(folders)}, len(folders))
    if outputs == 1000 and set(folders) <= wnid_classes().keys():
        return ClassMap({f: wnid_classes()[f] for f in folders}, 1000)
    raise UserError(f"{where} has {len(folders)} class folders but the model has {outputs} outputs: {CLASS_INDEX_HINT}")


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


def concept_classes_text(concepts: Sequence[Sequence[int]]) -> str:
    """``c1-0-2_c2-1``: the concepts' classes, as used in folder and file names."""
    return "_".join(f"c{j}-" + "-".join(map(str, cs)) for j, cs in enumerate(concepts, 1))


def data_class_map(data_dir: str, split: str, outputs: int, class_index: str | None = None,
                   store_path: str | None = None) -> ClassMap:
    """The class map of ``data_dir/split``: the one the stage-1 store at ``store_path`` recorded when it is at
    hand (``--class_index``, if also given, must agree with it), else :func:`utils.data.classes.class_map`.

    A folder of this split that the store does not know (a class with validation images only) is one more
    class of the model when ``--class_index`` or an ImageNet wnid says which; otherwise it is left out, and
    said so once. The class map of a :class:`utils.data.datasets.Datasets` is its own (labels are logit indices)."""
    if isinstance(data_dir, Datasets):
        return dataset_class_map(data_dir, split, outputs)
    folders = class_folders(data_dir, split)
    root = os.path.join(data_dir, split)
    meta_path = os.path.join(store_path or "", "meta.json")
    if not store_path or not os.path.isfile(meta_path):
        return class_map(folders, outputs, class_index, root)
    meta = read_json(meta_path)
    recorded = dict(meta.get("class_index") or {f: t for t, f in enumerate(meta["classes"])})
    num = meta.get("num_classes") or len(meta.get("class_counts") or recorded)
    given = read_class_index(class_index) if class_index is not None else {}
    if any(f in given and given[f] != t for f, t in recorded.items()):
        raise UserError(f"--class_index {class_index} differs from the class map of store {store_path}")
    extra = {f: _extra_class(f, given, num) for f in folders if f not in recorded}
    taken = set(recorded.values())
    clash = [f for f, t in extra.items() if t is not None and t in taken]
    if clash:
        raise UserError(f"class folder {os.path.join(root, clash[0])} maps to class {extra[clash[0]]}, which is "
                        f"another folder's in store {store_path}")
    skipped = tuple(sorted(f for f, t in extra.items() if t is None))
    if skipped:
        _note_once(f"note: {len(skipped)} class folder(s) of {root} ({', '.join(skipped[:3])}"
                   f"{', ...' if len(skipped) > 3 else ''}) have no training images in store {store_path} and no "
                   "--class_index entry: their images are left out")
    return ClassMap({**recorded, **{f: t for f, t in extra.items() if t is not None}}, num, skipped)


def dataset_class_map(data: Datasets, split: str, outputs: int) -> ClassMap:
    """A dataset's classes: each label is its logit index; a label the model has no output for is one line."""
    folders = data.folders(split)
    top = max(folders.values())
    if outputs and top >= outputs:
        raise UserError(f"the {split} data of {data.name} has label {top} but the model has {outputs} outputs "
                        "(a label is the index of its class's logit)")
    return ClassMap(dict(folders), outputs or top + 1)


def _extra_class(folder: str, given: dict[str, int], num: int) -> int | None:
    """The class of a folder the store does not know: ``--class_index``'s, an ImageNet wnid's (1000
    outputs), or None (left out)."""
    if folder in given:
        if not 0 <= given[folder] < num:
            raise UserError(f"--class_index maps {folder} to class {given[folder]}, outside the model's {num} outputs")
        return given[folder]
    return wnid_classes().get(folder) if num == 1000 else None


@lru_cache(maxsize=None)
def _note_once(line: str) -> None:
    say(line)
