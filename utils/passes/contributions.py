"""One pass for reading units in their concepts' direction and for the searched split rule.

For every unit ``c`` asked about, over the pass's images:

- its **orientation evidence**: per concept j, the sum over concept j's images of the gradient of the image's
  class logit with respect to the unit's output, summed over the positions that count. Its sign is the
  concept's orientation ``s_j``: +1 where the concept's logit rises with the unit, -1 where it falls (the
  concept is served by the unit going *down*). Needs the whole forward pass and a backward pass from the
  logits to the layer (nothing before the layer is differentiated); without it the pass stops at the layer.
- its **input contributions** on the images it keeps: ``V[i, k']``, what input ``k'`` adds to the unit's
  activation on image ``i`` summed over the positions that count (``sum_k' V[i, k']`` is the activation
  without the bias). From the tap sums of the layer input (:func:`utils.method.arv.batch_tap_sums`) and the
  unit's filter: ``V[i, k'] = sum_t W[c, k', t] * T_i[k', t]``.

Under torchrun each rank reads a block of whole batches; the rows come back in dataset order and the sums are
added in rank order, on every rank.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..data.images import ImageList, Preprocess, class_batches
from ..method.arv import batch_tap_sums, tap_maps, tap_view
from ..method.function import ClassInputs
from ..model.hooks import layer_gradient, layer_input
from ..model.units import Unit, as_unit
from .distributed import reduce_over_ranks
from .image_pass import Runner


@dataclass(frozen=True)
class UnitRequest:
    """What the pass collects for unit ``channel``: its ``concepts`` (class lists, for the orientation sums) and
    ``rows``: dataset index -> label (j for concept j, 0 for any other image) of the images whose input
    contributions it keeps (empty: none)."""

    channel: int
    concepts: list[list[int]]
    rows: dict[int, int]


@dataclass
class Contributions:
    """What the pass found for one unit: ``grad`` (k, float64) the per-concept sums of the class logit's
    gradient at the unit (zeros when the pass did not differentiate), ``counts`` (k) the images summed;
    ``V`` (n x C_in, float64), ``labels`` and ``index`` (n) of its kept images, in dataset order."""

    grad: torch.Tensor
    counts: list[int]
    V: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    F: torch.Tensor | None = None  # functional: n x C_in, sum_t W[c, k, t] sum_q g_i[q] U_i[k, t, q]
    g: torch.Tensor | None = None  # functional: n x Q, the class logit's gradient at the unit per position
    inputs: ClassInputs | None = None  # functional: the pass's per-class input sums (one object for every unit)
    classes: torch.Tensor | None = None  # each kept row's class (n)

    def signs(self) -> list[int]:
        """Each concept's orientation: -1 where the summed gradient is below zero, else +1."""
        return [-1 if float(g) < 0 else 1 for g in self.grad]


def pick_rows(images: ImageList, concepts: list[list[int]], per_concept: int, others: float, seed: int = 0,
              pool: list[int] | None = None) -> dict[int, int]:
    """The images whose contributions the search reads for one unit: up to ``per_concept`` images of each concept
    and ``others`` times as many of the rest as it took of the concepts (among ``pool``, default every image),
    drawn with ``seed``; index -> label."""
    rng = random.Random(seed)
    out: dict[int, int] = {}
    mine = set()
    for j, cs in enumerate(concepts, 1):
        idx = images.indices_of(cs)
        mine |= set(idx)
        out.update({i: j for i in sorted(rng.sample(idx, min(per_concept, len(idx))))})
    rest = [i for i in (range(len(images)) if pool is None else pool) if i not in mine]
    out.update({i: 0 for i in sorted(rng.sample(rest, min(round(others * len(out)), len(rest))))})
    return out


def contribution_pass(runner: Runner, model: nn.Module, unit: Unit | nn.Module, images: ImageList,
                      requests: list[UnitRequest], preprocess: Preprocess | None, orient: bool,
                      desc: str = "contributions", functional: bool = False) -> tuple[list[Contributions], float]:
    """One pass over every image of ``images`` that a request needs (its concepts' images when ``orient``, its
    kept rows), class-aligned batches: per request its :class:`Contributions`; and the slowest rank's seconds.
    ``model`` and ``unit`` are on ``runner``'s device; ``orient``: also the gradient sums (a whole forward
    pass and a backward pass to the layer, else the pass stops at the layer); ``functional`` (needs ``orient``):
    also each kept row's ``F`` and ``g`` and the per-class input sums (:mod:`utils.method.function`)."""
    unit = as_unit(unit)
    if functional and not orient:
        raise ValueError("the functional rows need the gradient (orient=True)")
    need = {i for r in requests for i in r.rows}
    if orient:
        need |= {i for r in requests for i in images.indices_of([t for cs in r.concepts for t in cs])}
    order = sorted(need, key=lambda i: (images.targets[i], i))
    concept_of = [{t: j for j, cs in enumerate(r.concepts) for t in cs} for r in requests]
    weights = [unit.weight.detach()[r.channel].flatten(1).double() for r in requests]  # C_in x T each

    def step(batches):
        grads = [torch.zeros(len(r.concepts), dtype=torch.float64, device=unit.weight.device) for r in requests]
        counts = [[0] * len(r.concepts) for r in requests]
        rows: list[list[tuple]] = [[] for _ in requests]  # per batch: index and label (host), V [F, g] (device)
        inputs: dict[int, torch.Tensor] = {}  # functional: per class, the summed tap view of the input ...
        n_inputs: dict[int, int] = {}  # ... and its images
        maps, q = None, 0  # q: the output positions that count (functional)
        for b in batches:
            if orient:
                _, _, g_full, x = layer_gradient(model, unit, b.x, b.labels)
                g = g_full.float().sum(dim=(2, 3))  # B x C: the gradient summed over the positions that count
            else:
                g, x = None, layer_input(model, unit, b.x)
            xl = unit.counted(x)
            if maps is None:
                maps = tap_maps(unit.geometry(), tuple(xl.shape[-2:])).to(xl.device)
            view = tap_view(xl.float(), unit.geometry()) if functional else None  # B x C_in x T x Q
            if view is not None:
                q = view.shape[-1]
                for t in b.targets.unique().tolist():
                    mask = (b.targets == t).to(view.device)
                    part = view[mask].double().sum(0)
                    inputs[t] = inputs[t] + part if t in inputs else part
                    n_inputs[t] = n_inputs.get(t, 0) + int(mask.sum())
            taps, index = None, b.index.tolist()
            for ri, r in enumerate(requests):
                if g is not None:
                    j = concept_of[ri].get(int(b.targets[0]))
                    if j is not None:
                        grads[ri][j] += g[:, r.channel].double().sum()
                        counts[ri][j] += len(b)
                keep = [p for p, i in enumerate(index) if i in r.rows]
                if not keep:
                    continue
                taps = batch_tap_sums(xl, maps) if taps is None else taps
                sel = torch.tensor(keep, device=xl.device)
                parts = [torch.einsum("bkt,kt->bk", taps[sel], weights[ri].to(taps.device))]
                if view is not None:  # F[i, k] = sum_t W[c, k, t] sum_q g_i[c, q] U_i[k, t, q]; and g_i[c]
                    gq = g_full[sel, r.channel].flatten(1).double()
                    seen = torch.einsum("bq,bktq->bkt", gq, view[sel].double())
                    parts += [(seen * weights[ri].to(seen.device)).sum(-1), gq]
                idx = b.index[keep]
                rows[ri].append((idx, torch.tensor([r.rows[int(i)] for i in idx], dtype=torch.float64), *parts))
        return grads, counts, rows, (inputs, n_inputs), q

    ran = runner.image_pass(images, class_batches(images, order, runner.batch_size), preprocess, desc).run(step, desc)
    grads, counts, rows, sums, q = ran.value
    C_in = unit.in_channels
    if functional:  # Q: the output positions (a rank that read no batch learns it from the others)
        q = int(reduce_over_ranks(float(q), runner.world, runner.device, "max"))
    shared = _class_inputs(runner, sorted({images.targets[i] for i in order}), sums, C_in, unit.kernel_size, q) \
        if functional else None
    out = []
    for r, g, n, mine in zip(requests, grads, counts, rows):
        # one copy to the host per unit at the end, not one per batch
        every = runner.gather_rows(_host_rows(mine, C_in + (C_in + q if functional else 0)))
        every = every[every[:, 0].argsort(stable=True)]
        sums = runner.gather_rows(torch.cat([g.cpu(), torch.tensor(n, dtype=torch.float64)])[None]).sum(0)
        k = len(r.concepts)
        out.append(Contributions(sums[:k], [int(v) for v in sums[k:]], every[:, 2:2 + C_in], every[:, 1].long(),
                                 every[:, 0].long(), every[:, 2 + C_in:2 + 2 * C_in] if functional else None,
                                 every[:, 2 + 2 * C_in:] if functional else None, shared,
                                 torch.tensor([images.targets[int(i)] for i in every[:, 0]], dtype=torch.long)))
    return out, ran.seconds


def _class_inputs(runner: Runner, classes: list[int], seen: tuple[dict, dict], C_in: int, kernel: tuple[int, int],
                  q: int) -> ClassInputs:
    """The pass's :class:`ClassInputs` from this rank's per-class sums and counts (``seen``), added over the
    ranks (every rank gets them all)."""
    sums, counts = seen
    shape = (C_in, kernel[0] * kernel[1], q)
    flat = torch.cat([torch.stack([sums[t].cpu() if t in sums else torch.zeros(shape, dtype=torch.float64)
                                   for t in classes]).flatten(),
                      torch.tensor([float(counts.get(t, 0)) for t in classes], dtype=torch.float64)])
    total = runner.gather_rows(flat[None]).sum(0)
    n = total[-len(classes):]
    total = total[:-len(classes)].reshape(len(classes), *shape)
    return ClassInputs({t: total[i] for i, t in enumerate(classes)}, {t: int(n[i]) for i, t in enumerate(classes)})


def _host_rows(parts: list[tuple], width: int) -> torch.Tensor:
    """One unit's kept rows (n x (2 + width), float64 on the host): dataset index, label, V (and F, g)."""
    if not parts:
        return torch.zeros(0, 2 + width, dtype=torch.float64)
    cols = [torch.cat([p[i] for p in parts]).double().cpu() for i in range(2, len(parts[0]))]
    return torch.cat([torch.cat([p[0] for p in parts]).double()[:, None],
                      torch.cat([p[1] for p in parts])[:, None], *cols], 1)
