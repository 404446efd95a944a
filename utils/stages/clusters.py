"""Label-free candidates of a layer: every unit's concepts found from its strongest images, no class needed.

    one pass over the images, run up to the layer: every unit's top-``top_n`` images by activation (those where
    it fires: activation > 0), :func:`utils.passes.topk.stream_topk` with every unit in one bank
    -> one contributions pass over the union of those images (:mod:`utils.passes.contributions`): each unit's
       contribution vectors on its own top images
    -> each unit's concepts by clustering them (:func:`utils.method.clusters.cluster_concepts`)

A unit is a candidate when two or more concepts remain; candidates are ranked by how alike their two closest
concepts are (least alike first). Labels, where the images have them, are never read here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.images import ImageList, Preprocess
from ..defaults import SEARCH_BUDGET, SEARCH_PATIENCE, SEARCH_SCREEN
from ..method.clusters import Clusters, cluster_concepts
from ..method.scoring import Scored
from ..method.search import holdout_mask, search_from_sweep
from ..method.split import channel_bank, sweep
from ..model.units import Unit, as_unit
from ..passes.contributions import UnitRequest, contribution_pass
from ..passes.image_pass import Runner
from ..passes.topk import stream_topk


@dataclass(frozen=True)
class UnitConcepts:
    """One unit's label-free concepts: ``clusters`` over its top images ``index`` (dataset positions, strongest
    first; ``clusters.members`` are positions in this list), those images' ``activation`` and contribution
    vectors ``V`` (n x C_in, float64)."""

    channel: int
    index: list[int]
    activation: list[float]
    clusters: Clusters
    V: torch.Tensor

    def concept_images(self) -> list[list[int]]:
        """Each concept's images as dataset positions."""
        return [[self.index[r] for r in rows] for rows in self.clusters.members]


@dataclass(frozen=True)
class LabelFree:
    """Every unit's :class:`UnitConcepts` (``units``), the candidates (two or more concepts; least alike first) and
    the seconds of each pass and of the clustering."""

    units: dict[int, UnitConcepts]
    candidates: list[int]
    seconds: dict[str, float]


def label_free_concepts(runner: Runner, model: nn.Module, unit: Unit | nn.Module, images: ImageList,
                        preprocess: Preprocess | None = None, top_n: int = 100, k0: int = 4, min_images: int = 10,
                        gamma: float = 0.5, seed: int = 0, channels: list[int] | None = None) -> LabelFree:
    """The label-free concepts of every unit of ``unit``'s layer (or of ``channels``) from ``images`` (module
    docstring). ``model`` and ``unit`` are on ``runner``'s device."""
    unit = as_unit(unit)
    chans = list(range(unit.out_channels)) if channels is None else [int(c) for c in channels]
    t0 = time.perf_counter()
    top = stream_topk(runner, model, unit, channel_bank(unit, chans), images, top_n, preprocess, desc="top images")
    seconds = {"top-images pass": time.perf_counter() - t0}
    tops = {}
    for c in chans:
        t = top.get(c, "original")
        fires = t["values"] > 0  # an image on which the unit does not fire is none of its concepts'
        tops[c] = ([int(i) for i in t["indices"][fires]], [float(v) for v in t["values"][fires]])
    requests = [UnitRequest(c, [], {i: 0 for i in tops[c][0]}) for c in chans]
    found, seconds["contributions pass"] = contribution_pass(runner, model, unit, images, requests, preprocess,
                                                             orient=False, desc="contributions")
    t0 = time.perf_counter()
    units = {}
    for c, f in zip(chans, found):
        index, act = tops[c]
        row_of = {int(i): r for r, i in enumerate(f.index.tolist())}  # the pass returns rows in dataset order
        V = f.V[[row_of[i] for i in index]] if index else f.V
        units[c] = UnitConcepts(c, index, act, cluster_concepts(V, k0, min_images, gamma, seed), V)
    seconds["clustering"] = time.perf_counter() - t0
    candidates = sorted((c for c, u in units.items() if u.clusters.k >= 2),
                        key=lambda c: (units[c].clusters.closest, c))
    return LabelFree(units, candidates, seconds)


def split_unit(u: UnitConcepts, weight_c: torch.Tensor, seed: int = 0) -> Scored:
    """The exact split of a label-free candidate: the paper's sets on its concepts' ARVs (the clusters' mean
    contributions) at the rho whose sets separate the clusters best on fitting images, then the searched rule
    with cluster membership where the labelled path has classes (each concept against the other concepts and the
    top images of no concept; a quarter of each held out to stop it). ``weight_c``: the unit's filter. Described
    as the labelled path describes a split (:class:`utils.method.scoring.Scored`): its concepts are the clusters'
    images (dataset positions), the sweep's best row holds the searched sets."""
    labels = u.clusters.labels(len(u.index))
    weight_c = weight_c.detach().cpu()
    sw = sweep(weight_c, u.clusters.arvs)
    held = holdout_mask(labels, seed=seed)
    objs, best, res = search_from_sweep(sw, u.V, labels, torch.ones(u.clusters.k, dtype=torch.float64), held,
                                        SEARCH_BUDGET, SEARCH_PATIENCE, SEARCH_SCREEN)
    return Scored(u.channel, u.concept_images(), sw.replace(best, res.assign, weight_c), objs,
                  [len(m) for m in u.clusters.members], best, [1] * u.clusters.k, res.summary(sw.sources(best), held))


def agreement(concepts: UnitConcepts, labels) -> list[dict]:
    """Where the images have labels (evaluation only): per concept its images' most frequent label and that
    label's share (``{"label", "share", "images"}``)."""
    labels = np.asarray(labels)
    out = []
    for rows in concepts.concept_images():
        values, counts = np.unique(labels[rows], return_counts=True)
        best = int(np.argmax(counts))
        out.append({"label": int(values[best]), "share": float(counts[best] / len(rows)), "images": len(rows)})
    return out
