"""The record of one disentanglement on disk: ``models_disentangled/<name>/{record.json, filters.pt}``.

The schema is :class:`Record`, defined here once; writing, reading and the tests use it. In
``record.json`` the concepts appear as ``classes_for_concept1 .. classes_for_conceptk`` (the authors' code's
flag names). ``filters.pt`` holds ``rhos`` (R,) and, per sub-channel, ``D1 .. Dk`` and ``Res``
(R x C_in x kh x kw each), read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.classes import check_concepts, concept_classes_text
from ..data.images import data_root
from ..errors import UserError
from ..model.loading import default_layer, model_tag
from ..model.sources import moved_spec
from ..data.preprocess import INPUT_FLAGS
from .provenance import provenance
from ..files import read_json, save_torch, write_json
from ..method.split import Split, Sweep, sub_names
from .layout import layer_head
from ..model.surgery import export_network, split_network
from ..model.units import Unit, unit_at

RECORD_VERSION = 1
# written only when set, so that a Conv2d split by the paper's rule, unoriented, reads as before
OPTIONAL = ("positions", "split_rule", "orientation", "search")
CHANNEL_COMMAND = "disentangle_channel.py"
LAYER_COMMAND = "disentangle_layer.py"
LAYER_SUFFIX = "_layer"  # a layer command's record never replaces disentangle_channel.py's of the same concepts
RULE_SUFFIX = "_positive"  # nor does a split by the positive rule replace the paper's
# nor a split of another rule or read in its concepts' directions: every variant's folder suffix, the paper's first
VARIANT_SUFFIXES = ("", RULE_SUFFIX, "_oriented", "_positive_oriented", "_search", "_search_oriented", "_function",
                    "_function_oriented")


def variant_suffix(split_rule: str | None, oriented: bool) -> str:
    """A record's (and a layer folder's) suffix: ``_<rule>`` unless the paper's, then ``_oriented`` when its
    concepts' orientations were measured."""
    return ("" if split_rule in (None, "paper") else f"_{split_rule}") + ("_oriented" if oriented else "")


@dataclass
class Record:
    """One disentanglement of ``channel`` of ``layer`` between ``concepts`` (lists of class indices)."""

    model: str
    weights: str
    layer: str
    default_layer: bool
    in_channels: int
    out_channels: int
    channel: int
    concepts: list[list[int]]
    class_names: dict[str, str]
    store: str
    data_dir: str
    data_fingerprint: str
    rhos: list[float]
    scores: dict[str, float]  # "0.05" -> score
    best_rho: float
    sources: dict[str, dict[str, list[int]]]  # "0.05" -> {"concept1": [...], ..., "shared": [...]}
    max_abs_logit_diff: float | None
    equivalence_images: int
    train_images: dict[str, int]  # "concept1" -> images scored
    seconds: float
    images_per_second: float
    filters: str = "filters.pt"
    command: str | None = None  # what made it: disentangle_channel.py or disentangle_layer.py (None: older records)
    positions: str | None = None  # a Linear layer's positions that count (all, cls); None: a Conv2d (all)
    split_rule: str | None = None  # "positive", "search"; None: the paper's rule (records of the paper's rule are as before)
    orientation: list[int] | None = None  # per concept +1 or -1 (measured); None: not measured, every concept +1
    search: dict | None = None  # a searched split: its start sets, moves and objectives (the best rho holds its sets)
    provenance: dict | None = None  # utils.store.provenance: command, seed, versions, commit, transform (None: older records)
    format_version: int = RECORD_VERSION
    dir: str | None = field(default=None, compare=False)  # the folder it was read from (not stored)

    @property
    def k(self) -> int:
        return len(self.concepts)

    def name(self) -> str:
        """Folder name under ``models_disentangled/``."""
        name = record_name(layer_head(model_tag(self.model), self.layer, self.default_layer), self.channel,
                           self.concepts)
        name += variant_suffix(self.split_rule, self.orientation is not None)
        return name + LAYER_SUFFIX if self.command == LAYER_COMMAND else name

    def to_json(self) -> dict:
        """The ``record.json`` object: the fields in schema order, ``concepts`` as ``classes_for_conceptj``."""
        out = {"format_version": self.format_version}
        for f in dataclasses.fields(self):
            if f.name == "concepts":
                out.update({f"classes_for_concept{j}": list(cs) for j, cs in enumerate(self.concepts, 1)})
            elif f.name not in ("format_version", "dir") and not (f.name in OPTIONAL and getattr(self, f.name) is None):
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_json(cls, obj: dict, folder: str | None = None) -> "Record":
        concepts = []
        while f"classes_for_concept{len(concepts) + 1}" in obj:
            concepts.append([int(t) for t in obj[f"classes_for_concept{len(concepts) + 1}"]])
        names = {f.name for f in dataclasses.fields(cls)} - {"concepts", "dir"}
        return cls(concepts=concepts, dir=folder, **{k: v for k, v in obj.items() if k in names})


def record_keys(k: int = 2) -> set[str]:
    """The keys of a ``record.json`` with ``k`` concepts (a Linear layer's records add ``positions``, the positive
    rule's ``split_rule``)."""
    return ({f.name for f in dataclasses.fields(Record)} - {"concepts", "dir", *OPTIONAL}) | {
        f"classes_for_concept{j}" for j in range(1, k + 1)}


def record_name(head: str, channel: int, concepts: list[list[int]]) -> str:
    """``<model>[_<layer>]_channel<c>_c1-<classes>_c2-<classes>``, classes sorted within each concept."""
    return f"{head}_channel{channel}_{concept_classes_text([sorted(cs) for cs in concepts])}"


def rho_key(rho: float) -> str:
    return f"{float(rho):.2f}"


def make_record(lm, layer: str, store, data_dir: str, scored, diff: float, checked: int, command: str,
                seconds: float, split_rule: str = "paper", seed: int | None = None) -> Record:
    """The record of one scored channel (a :class:`utils.method.scoring.Scored`), made by ``command`` from ``store``:
    the one factory of stage 3 and the layer command. ``seconds``: the scoring pass that scored it; ``split_rule``:
    the rule of its sweep."""
    unit, sw = unit_at(lm.model, layer, store.positions), scored.sweep
    return Record(
        model=lm.name, weights=lm.weights, layer=layer, default_layer=layer == default_layer(lm.model),
        in_channels=unit.in_channels, out_channels=unit.out_channels, channel=int(scored.channel),
        concepts=scored.concepts, class_names=store.names.as_dict(t for cs in scored.concepts for t in cs),
        store=os.path.abspath(store.path), data_dir=data_root(data_dir),
        data_fingerprint=store.meta["data_fingerprint"], rhos=[round(float(r), 2) for r in sw.rhos],
        scores={rho_key(r): float(v) for r, v in zip(sw.rhos, scored.scores)}, best_rho=scored.best_rho,
        sources={rho_key(r): sw.sources(i) for i, r in enumerate(sw.rhos)}, max_abs_logit_diff=diff,
        equivalence_images=checked, train_images={f"concept{j}": n for j, n in enumerate(scored.counts, 1)},
        seconds=seconds, images_per_second=sum(scored.counts) / max(seconds, 1e-9), command=command,
        positions=unit.positions if unit.linear else None, split_rule=None if split_rule == "paper" else split_rule,
        orientation=None if scored.signs is None else [int(v) for v in scored.signs], search=scored.search,
        provenance=provenance(seed, lm.preprocess))


RECORDS_DIR = "models_disentangled"  # a store folder's sub-folder of records (the authors' name)


def records_dir(store_dir: str) -> str:
    """Where the records of the stores in ``store_dir`` go: ``<store_dir>/models_disentangled``."""
    return os.path.join(store_dir, RECORDS_DIR)


def store_record(store_dir: str, record: Record, sw: Sweep) -> tuple[Record, list[str]]:
    """Save ``record`` and its filters (``sw``) as ``<store_dir>/models_disentangled/<record.name()>/``; returns
    the record as saved (its ``dir`` that folder) and the files written."""
    folder = os.path.join(records_dir(store_dir), record.name())
    files = save_record(folder, record, sw)
    return dataclasses.replace(record, dir=folder), files


def save_record(folder: str, record: Record, sw: Sweep) -> list[str]:
    """Write ``filters.pt`` and ``record.json`` into ``folder``, each atomically; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    fpath = os.path.join(folder, record.filters)
    filters = {"rhos": sw.rhos.clone()}
    for j, name in enumerate(sub_names(sw.k)):
        filters[name] = (sw.D[:, j] if name != "Res" else sw.Res).contiguous().clone()
    save_torch(fpath, filters)
    rpath = os.path.join(folder, "record.json")
    write_json(rpath, record.to_json())
    return [rpath, fpath]


def load_record(folder: str) -> Record:
    """The record in ``folder`` (``record.dir`` is set to it)."""
    path = os.path.join(folder, "record.json")
    if not os.path.isfile(path):
        raise UserError(f"no disentanglement record at {folder} (run disentangle_channel.py first)")
    try:
        return Record.from_json(read_json(path), folder)
    except TypeError as e:
        raise UserError(f"{path} is not a disentanglement record ({e})") from None


def record_head(lm, layer: str) -> str:
    """The start of a record folder's name: the model's tag, and the layer unless it is the default one."""
    return layer_head(lm.tag, layer, layer == default_layer(lm.model))


def find_record(model_dir: str, head: str, channel: int, concepts: list[list[int]], known=None) -> Record:
    """The record of ``channel`` split between ``concepts`` in ``model_dir``, whatever the order of the
    classes within each concept in its folder name; a missing one is a UserError naming the folder, or, when
    ``known()`` (the data's class indices, if they can be told without the record) lacks a class, naming it."""
    if not os.path.isdir(model_dir):
        raise UserError(f"no folder {model_dir} (--model_dir: STORE_DIR/models_disentangled/ of disentangle_channel.py)")
    wanted = record_name(head, channel, concepts)
    prefix = f"{head}_channel{channel}_"
    entries = sorted(os.listdir(model_dir))
    # the paper's rule first (disentangle_channel.py's record, then the layer command's), then the other variants
    for suffix in [v + s for v in VARIANT_SUFFIXES for s in ("", LAYER_SUFFIX)]:
        for entry in entries:
            tail = entry[len(prefix):]
            if not entry.startswith(prefix) or not tail.endswith(suffix):
                continue
            if _folder_concepts(tail[:len(tail) - len(suffix)]) == [sorted(c) for c in concepts] and \
                    os.path.isfile(os.path.join(model_dir, entry, "record.json")):
                return load_record(os.path.join(model_dir, entry))
    if known is not None:
        try:
            classes = set(known())
        except UserError:  # the data's classes need the record's store to be told: say what is missing
            classes = None
        if classes is not None:
            check_concepts(concepts, classes, f"{os.path.dirname(os.path.normpath(model_dir))} data")
    text = " / ".join(str(list(c)) for c in concepts)
    raise UserError(f"no disentanglement of channel {channel} for classes {text} at {os.path.join(model_dir, wanted)}: "
                    "disentangle_channel.py makes it (same --model, --layer)")


def _folder_concepts(tail: str) -> list[list[int]] | None:
    parts = tail.split("_")
    if not all(re.fullmatch(rf"c{j}(-\d+)+", p) for j, p in enumerate(parts, 1)):
        return None
    return [sorted(int(t) for t in p.split("-")[1:]) for p in parts]


def check_record(rec: Record, model: str, weights: str, layer: str, conv: Unit | None = None,
                 transform=None) -> None:
    """Refuse a record made with another model, weights or layer, (``conv``, the layer) for another shape, or
    (``transform``, a Preprocess) from images fed otherwise."""
    for key, have in (("model", model), ("weights", weights), ("layer", layer)):
        if (moved_spec(rec.model) if key == "model" else getattr(rec, key)) != have:
            old = key == "weights" and str(rec.weights).startswith("as-built:") and str(have).startswith("module:")
            raise UserError(f"disentanglement {rec.dir} was made with {key} {getattr(rec, key)!r}, "
                            f"this run uses {have!r}" + (" (an earlier version identified an own model file by its "
                                                          ".py file alone; rerun disentangle_channel.py to make the "
                                                          "record anew)" if old else ""))
    made = (rec.provenance or {}).get("transform")
    if transform is not None and made is not None and made != transform.to_json():
        raise UserError(f"disentanglement {rec.dir} was made from images fed as {made}, this run feeds them as "
                        f"{transform.to_json()}: give the same {INPUT_FLAGS}")
    if conv is not None and (rec.in_channels, rec.out_channels) != (conv.in_channels, conv.out_channels):
        raise UserError(f"disentanglement {rec.dir} is for a layer of {rec.in_channels} -> {rec.out_channels} "
                        f"channels, layer {layer} has {conv.in_channels} -> {conv.out_channels}")


def load_split(rec: Record, rho: float | None = None) -> Split:
    """The split of a record at ``rho`` (default: its best rho)."""
    path = os.path.join(rec.dir or "", rec.filters)
    try:
        f = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad or missing file
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    rhos = [round(float(r), 2) for r in f["rhos"]]
    rho = round(float(rec.best_rho if rho is None else rho), 2)
    if rho not in rhos:
        raise UserError(f"rho {rho} is not one of the swept values {rhos[0]}..{rhos[-1]} (step 0.05)")
    i = rhos.index(rho)
    names = sub_names(rec.k)
    return Split(int(rec.channel), torch.stack([f[n][i] for n in names[:-1]]), f["Res"][i])


def record_splits(records: list[Record], rho: float | None = None) -> dict[str, list[Split]]:
    """The splits of ``records`` (best rho, or ``rho``) by layer, in the records' order."""
    by_layer: dict[str, list[Split]] = {}
    for rec in records:
        by_layer.setdefault(rec.layer, []).append(load_split(rec, rho))
    return by_layer


def disentangle_model(model: nn.Module, records: list[Record], rho: float | None = None,
                      inplace: bool = False) -> nn.Module:
    """The disentangled network of ``records``: every record's layer split (best rho, or ``rho``); several
    channels of one layer and channels of different layers both work."""
    return split_network(model, record_splits(records, rho), inplace)


def export_checkpoint(model: nn.Module, model_name: str, records: list[Record], path: str, rho: float | None = None,
                      preprocess=None) -> None:
    """:func:`utils.model.surgery.export_network` of the splits of ``records`` (best rho, or ``rho``)."""
    export_network(model, model_name, record_splits(records, rho), path, preprocess)
