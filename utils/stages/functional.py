"""The layer command's functional split rule (``--split_rule function``): the searched sets, then the sets whose
concept units carry their own concepts' function and no other's (:mod:`utils.method.function`).

    the contributions pass's rows (each input's gradient-weighted contribution, the gradient at the unit, the
    per-class inputs) -> per unit a first program on the first-order effects
    -> ONE path pass over the same images (:func:`utils.passes.contributions.path_pass`): the gradients at two points
       on the way to where each ablation of those sets takes the unit
    -> per unit the programs again, from the searched sets, on the effects read along the paths
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..data.images import ImageList
from ..defaults import FUNCTION_TARGET
from ..method.function import effect_model, functional_assignment, references
from ..method.scoring import Scored
from ..model.units import Unit
from ..passes.contributions import Contributions, PathRequest, path_pass
from ..passes.image_pass import Runner

PATH_NODES = (0.5 - 0.5 / 3 ** 0.5, 0.5 + 0.5 / 3 ** 0.5)  # two-point Gauss-Legendre on [0, 1], equal weights


def functional_splits(cfg, runner: Runner, model, unit: Unit, images: ImageList, scored: list[Scored],
                      found: dict[int, Contributions], preprocess, log) -> tuple[list[Scored], float]:
    """The functional rule (:mod:`utils.method.function`) on every searched split (``cfg``: the layer command's
    LayerConfig; ``found``: the contributions pass's rows, ``functional=True``): a first program on each input's
    first-order effects at the images; then ONE pass (:func:`utils.passes.contributions.path_pass`) reads the
    gradients at two points on the way to where each ablation of those sets takes the unit (PATH_NODES: the
    two-point Gauss-Legendre rule, exact for a cubic path and at neither end, where a unit ablated to zero sits on
    its ReLU's kink), and a second program, from the searched sets again, chooses on the effects read there. The
    seconds of the pass."""
    mode = "absent" if cfg.ablation == "none" else cfg.ablation
    target = FUNCTION_TARGET * cfg.certify_tolerance
    first, requests = {}, []
    for s in scored:
        f, w = found[s.channel], unit.weight.detach()[s.channel].cpu().flatten(1)
        m = effect_model(f.F, f.g, f.classes, w, f.inputs, s.concepts, mode)
        assign, how = functional_assignment(m, s.sweep.assign[s.best], target)
        first[s.channel] = how
        ref0, refs = references(f.inputs, s.concepts, mode)
        keeps = torch.stack([torch.ones_like(assign, dtype=torch.float64)]
                            + [((assign == 0) | (assign == j)).double() for j in range(1, len(s.concepts) + 1)])
        E = len(keeps)  # each ablation read at both nodes of the path
        requests.append(PathRequest(s.channel, f.index.tolist(), keeps.repeat(len(PATH_NODES), 1),
                                        torch.stack([ref0, *refs]).repeat(len(PATH_NODES), 1, 1, 1),
                                        torch.tensor(PATH_NODES, dtype=torch.float64).repeat_interleave(E)))
    ends, seconds = path_pass(runner, model, unit, images, requests, preprocess)
    out = []
    for s, end in zip(scored, ends):
        f, wc = found[s.channel], unit.weight.detach()[s.channel].cpu()
        E = len(s.concepts) + 1
        along = tuple(t.reshape(len(PATH_NODES), E, *t.shape[1:]).mean(0) for t in end)  # equal weights
        m = effect_model(f.F, f.g, f.classes, wc.flatten(1), f.inputs, s.concepts, mode, along=along)
        assign, how = functional_assignment(m, s.sweep.assign[s.best], target)
        fn = {**how, "first_order": first[s.channel], "predicted": _predicted(m, assign) if m.usable() else None}
        out.append(dataclasses.replace(s, sweep=s.sweep.replace(s.best, assign, wc), search={**s.search, "function": fn}))
    moved = [o.search["function"] for o in out]
    log(f"functional sets: {sum(f['moved'] for f in moved)} inputs moved from the searched sets; the worst predicted "
        f"share {_worst(moved, 0)} -> {_worst(moved, 1)} (largest over the channels; path pass over "
        f"{len({i for r in requests for i in r.rows})} training images in {seconds:.1f} s)")
    return out, seconds


def _worst(fn: list[dict], i: int) -> str:
    """The largest worst predicted share (before ``i`` 0, after 1) over the channels whose rule could read one."""
    v = [f["worst"][i] for f in fn if f["worst"][i] is not None]
    return f"{max(v):.2f}" if v else "n/a"


def _predicted(model, assign) -> dict:
    """The functional rule's predicted shares of ``assign``, as layer.json keeps them (``cross[j][j]`` None)."""
    sh = model.shares(assign.numpy())
    return {"own": sh["own"].tolist(), "elsewhere": sh["elsewhere"].tolist(),
            "cross": [[None if np.isnan(v) else float(v) for v in row] for row in sh["cross"]]}
