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
from .image_pass import Runner, add_by_label, layer_copies_agree


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
                g_full, g, x = None, None, layer_input(model, unit, b.x)
            xl = unit.counted(x)
            if maps is None:
                maps = tap_maps(unit.geometry(), tuple(xl.shape[-2:])).to(xl.device)
            view = tap_view(xl.float(), unit.geometry()) if functional else None  # B x C_in x T x Q
            if view is not None:
                q = view.shape[-1]
                add_by_label(inputs, n_inputs, view.double(), b.targets)
            taps = None
            for ri, r in enumerate(requests):
                if g is not None:
                    j = concept_of[ri].get(int(b.targets[0]))
                    if j is not None:
                        grads[ri][j] += g[:, r.channel].double().sum()
                        counts[ri][j] += len(b)
                if any(i in r.rows for i in b.index.tolist()):
                    taps = batch_tap_sums(xl, maps) if taps is None else taps
                    rows[ri].append(_kept_rows(b, r, taps, weights[ri], view, g_full))
        return grads, counts, rows, (inputs, n_inputs), q

    ran = runner.image_pass(images, class_batches(images, order, runner.batch_size), preprocess, desc).run(step, desc)
    grads, counts, rows, sums, q = ran.value
    if functional:  # Q: the output positions (a rank that read no batch learns it from the others)
        q = int(reduce_over_ranks(float(q), runner.world, runner.device, "max"))
    shared = _class_inputs(runner, sorted({images.targets[i] for i in order}), sums, unit.in_channels,
                           unit.kernel_size, q) if functional else None
    return [_gathered(runner, images, r, g, n, mine, unit.in_channels, q if functional else None, shared)
            for r, g, n, mine in zip(requests, grads, counts, rows)], ran.seconds


def _kept_rows(b, r: UnitRequest, taps: torch.Tensor, weight: torch.Tensor, view: torch.Tensor | None,
               g_full: torch.Tensor | None) -> tuple:
    """Batch ``b``'s rows that request ``r`` keeps: their dataset index and label (host), ``V`` and, with the
    tap ``view`` (functional), ``F[i, k] = sum_t W[c, k, t] sum_q g_i[c, q] U_i[k, t, q]`` and ``g_i[c]``."""
    keep = [p for p, i in enumerate(b.index.tolist()) if i in r.rows]
    sel = torch.tensor(keep, device=taps.device)
    parts = [torch.einsum("bkt,kt->bk", taps[sel], weight.to(taps.device))]
    if view is not None:
        gq = g_full[sel, r.channel].flatten(1).double()
        seen = torch.einsum("bq,bktq->bkt", gq, view[sel].double())
        parts += [(seen * weight.to(seen.device)).sum(-1), gq]
    idx = b.index[keep]
    return (idx, torch.tensor([r.rows[int(i)] for i in idx], dtype=torch.float64), *parts)


def _gathered(runner: Runner, images: ImageList, r: UnitRequest, g: torch.Tensor, n: list[int], mine: list[tuple],
              C_in: int, q: int | None, shared: ClassInputs | None) -> Contributions:
    """One request's :class:`Contributions` from every rank's rows (in dataset order) and gradient sums; ``q``
    (the output positions that count) and ``shared`` with the functional rows, else None."""
    # one copy to the host per unit at the end, not one per batch
    every = runner.gather_rows(_host_rows(mine, C_in + (0 if q is None else C_in + q)))
    every = every[every[:, 0].argsort(stable=True)]
    sums = runner.gather_rows(torch.cat([g.cpu(), torch.tensor(n, dtype=torch.float64)])[None]).sum(0)
    k = len(r.concepts)
    functional = q is not None
    return Contributions(sums[:k], [int(v) for v in sums[k:]], every[:, 2:2 + C_in], every[:, 1].long(),
                         every[:, 0].long(), every[:, 2 + C_in:2 + 2 * C_in] if functional else None,
                         every[:, 2 + 2 * C_in:] if functional else None, shared,
                         torch.tensor([images.targets[int(i)] for i in every[:, 0]], dtype=torch.long))


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


@dataclass(frozen=True)
class PathRequest:
    """One unit's points for :func:`path_pass`: ``channel``, its kept ``rows`` (dataset indices, as
    :class:`Contributions` ``index``), per point ``e`` the inputs its ablation changes (``keeps``: E x C_in, 0 or 1),
    the reference input they move to (``refs``: E x C_in x taps x Q) and how far along the way (``at``: E, 1 = all
    the way)."""

    channel: int
    rows: list[int]
    keeps: torch.Tensor
    refs: torch.Tensor
    at: torch.Tensor


FAST_COPIES = 16  # copies made at the layer: up to this many batches' worth per forward pass (the rest is cheap)


class _ShiftedCopies:
    """Blocks of copies of a batch's images, each with one unit's output shifted by its own maps, through the
    network, and the gradient of each copy's class logit at the shifted output. The copies are made at the layer
    where that gives the logits that copies of the input give (the first batch decides, as the ablation pass's
    copies do): the network then runs one image up to the layer, whose output the copies replace; otherwise each
    copy runs the whole network."""

    def __init__(self, model: nn.Module, unit: Unit):
        self.model, self.unit, self.fast = model, unit, None

    def run(self, x: torch.Tensor, labels: torch.Tensor, blocks: list[tuple[torch.Tensor, int, torch.Tensor]],
            fast: bool, layer_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``blocks``: (positions in the batch, channel, shifts E x n x Q); ``layer_out``: the layer's output for the
        batch. The logits and the gradient at the layer's output (counted, conv layout) of every copy, block after
        block, point after point."""
        seen: dict[str, torch.Tensor] = {}
        sel = torch.cat([p.repeat(len(s)) for p, _, s in blocks])

        def hook(_m, _i, out):
            out = (layer_out[sel.to(layer_out.device)] if fast else out).detach().clone()
            start = 0
            for p, c, s in blocks:
                n = len(p) * len(s)
                self.unit.add_counted(out[start:start + n], c, s.reshape(n, -1))
                start += n
            seen["a"] = out.requires_grad_(True)
            return out.clone()

        handle = self.unit.module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = self.model(x[:1] if fast else x[sel.to(x.device)])
                (g,) = torch.autograd.grad(logits.gather(1, labels[sel.to(labels.device)][:, None]).sum(), seen["a"])
        finally:
            handle.remove()
        return logits.detach(), self.unit.counted(g)

    def __call__(self, x, labels, blocks, layer_out) -> torch.Tensor:
        if self.fast is None:
            slow_logits, g = self.run(x, labels, blocks, False, layer_out)
            if all(int(i) == 0 for p, _, _ in blocks for i in p):
                return g  # copies of the first image alone cannot tell the two ways apart: decide on a later group
            self.fast = layer_copies_agree(slow_logits, lambda: self.run(x, labels, blocks, True, layer_out)[0])
            return g
        return self.run(x, labels, blocks, self.fast, layer_out)[1]


@torch.no_grad()
def path_pass(runner: Runner, model: nn.Module, unit: Unit | nn.Module, images: ImageList,
              requests: list[PathRequest], preprocess: Preprocess | None,
              desc: str = "path") -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """The functional rule's second look (:mod:`utils.method.function`): for every request and point e, each row
    image's gradient of its class logit at the unit *on the way to where an ablation takes the unit* (its output
    moved by ``at[e]`` times ``-sum over the changed inputs of W (U - U_ref)``) and the gradient-weighted
    contributions there. Per request ``(F, g)``: E x n x C_in and E x n x Q (float64, rows in dataset order); and
    the slowest rank's seconds."""
    unit = as_unit(unit)
    order = sorted({i for r in requests for i in r.rows}, key=lambda i: (images.targets[i], i))
    weights = [unit.weight.detach()[r.channel].flatten(1).double() for r in requests]  # C_in x T each
    copies = _ShiftedCopies(model, unit)
    member = [set(r.rows) for r in requests]

    def step(batches):
        rows: list[list[torch.Tensor]] = [[] for _ in requests]
        for b in batches:
            x_in = layer_input(model, unit, b.x)
            out = unit.module(x_in)  # the layer's output: the copies made at the layer start from it
            view = tap_view(unit.counted(x_in).float(), unit.geometry()).double()
            group: list[tuple] = []  # (request, positions, shifts): the copies of one forward pass
            for ri, r in enumerate(requests):
                keep = [p for p, i in enumerate(b.index.tolist()) if i in member[ri]]
                E = len(r.keeps)
                for part in range(0, len(keep), max(1, runner.batch_size // E)):
                    p = torch.tensor(keep[part:part + max(1, runner.batch_size // E)], device=view.device)
                    w, refs = weights[ri].to(view.device), r.refs.to(view.device, torch.float64)
                    moved = r.keeps.to(view.device, torch.float64)[:, :, None] * w[None]  # E x C_in x T
                    shifts = r.at.to(view.device, torch.float64)[:, None, None] * (
                        torch.einsum("ekt,ektq->eq", moved, refs)[:, None] - torch.einsum("ekt,bktq->ebq", moved, view[p]))
                    cap = runner.batch_size * (FAST_COPIES if copies.fast else 1)  # copies per forward pass
                    if group and sum(len(q) * len(sh) for _, q, sh in group) + E * len(p) > cap:
                        _path_rows(copies, b, out, view, group, requests, weights, rows)
                        group = []
                    group.append((ri, p, shifts))
            if group:
                _path_rows(copies, b, out, view, group, requests, weights, rows)
        return rows

    ran = runner.image_pass(images, class_batches(images, order, runner.batch_size), preprocess, desc).run(step, desc)
    out = []
    for ri, r in enumerate(requests):
        E, C_in = len(r.keeps), unit.in_channels
        q = r.refs.shape[-1]
        mine = torch.cat(ran.value[ri]) if ran.value[ri] else torch.zeros(0, 1 + E * (C_in + q), dtype=torch.float64)
        every = runner.gather_rows(mine)
        every = every[every[:, 0].argsort(stable=True)]
        n = len(every)
        out.append((every[:, 1:1 + E * C_in].reshape(n, E, C_in).transpose(0, 1),
                    every[:, 1 + E * C_in:].reshape(n, E, q).transpose(0, 1)))
    return out, ran.seconds


def _path_rows(copies: _ShiftedCopies, b, out: torch.Tensor, view: torch.Tensor, group: list[tuple],
                   requests: list[PathRequest], weights: list[torch.Tensor], rows: list[list[torch.Tensor]]) -> None:
    """One forward and backward pass of a group of (request, positions, shifts) blocks of batch ``b`` (``out``: the
    layer's output for it): each row's index, F and g per point appended to its request's ``rows``."""
    g = copies(b.x, b.labels, [(p, requests[ri].channel, sh) for ri, p, sh in group], out)
    start = 0
    for ri, p, sh in group:
        E, n = len(sh), len(p)
        ge = g[start:start + E * n, requests[ri].channel].reshape(E, n, -1).double()
        start += E * n
        Fe = torch.einsum("enq,nktq->enkt", ge, view[p]).mul(weights[ri].to(ge.device)).sum(-1)  # E x n x C_in
        idx = b.index[p.cpu()].double()[:, None]
        rows[ri].append(torch.cat([idx, Fe.permute(1, 0, 2).flatten(1).cpu(), ge.permute(1, 0, 2).flatten(1).cpu()], 1))
