"""What concept units do to the network's decisions: ablation and steering of split units, many at once.

In the split network the layer is ``Sequential(expanded, merge)`` (:func:`utils.model.surgery.make_split_layer`):
``expanded`` computes every unit, and split unit c's sub-units D_1 .. D_k and Res in columns of its own; ``merge``
adds the D_j and takes k - 1 Res away. An **intervention** changes some columns of ``expanded``'s output before the
merge:

- an **ablation** sets them to their reference value (:class:`References`): by default the mean output map over
  training images where the intervention's concepts are absent (the unit then says what it says when its concept
  is not there), or the mean over all of them, or zero;
- **steering** multiplies them by a factor.

Ablating concept unit j of channel c is ablating its column, D_j. Ablating the original unit is ablating all of
its columns (D_1 .. D_k, Res), because the merge is linear: the channel's output becomes its own reference (the
mean, or zero), exactly as in the original network.

ONE pass over the images runs every intervention: each batch is stacked once per intervention, plus once intact,
and a hook on ``expanded`` changes each copy's columns. Where the network after the layer reads nothing from before
it, the copies are made at the layer (the network before it runs once per batch); otherwise each copy runs the
whole network (the first batch decides, by comparing both ways). Per image it keeps the logit and the
probability of its own class and whether it is classified right, intact and under each intervention; per
intervention, the mean change of every class's logit and probability over all images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.images import ImageList, Preprocess, class_batches
from ..errors import UserError
from ..method.effects import Effects, Intervention
from .image_pass import Runner, add_by_label, layer_copies_agree, plain_batches


def unit_interventions(channel: int, columns: list[int], k: int, steer: float | None = None,
                       concepts: list[list[int]] | None = None) -> list[Intervention]:
    """The interventions of one split unit whose ``expanded`` columns are ``columns`` (D_1 .. D_k, Res): the
    original ablated (every column), each concept unit ablated, and, with ``steer``, each concept unit scaled.
    ``concepts`` (labels per concept): what each ablation's ``absent`` reference leaves out (concept j's for D_j,
    every concept's for the original)."""
    concepts = concepts or [[] for _ in range(k)]
    every = tuple(sorted({t for cs in concepts for t in cs}))
    out = [Intervention(channel, "original", tuple(columns), absent=every)]
    out += [Intervention(channel, f"D{j}", (columns[j - 1],), absent=tuple(concepts[j - 1])) for j in range(1, k + 1)]
    if steer is not None:
        out += [Intervention(channel, f"D{j}", (columns[j - 1],), float(steer)) for j in range(1, k + 1)]
    return out


def split_layer(net: nn.Module, layer: str) -> nn.Module:
    """The split layer (``Sequential(expanded, merge)``) of ``net`` at ``layer``; a UserError otherwise."""
    mod = net.get_submodule(layer)
    if not hasattr(mod, "expanded") or not hasattr(mod, "merge"):
        raise UserError(f"{layer} of this network is not a split layer (no expanded and merge modules)")
    return mod


ABLATION_REFERENCES = ("absent", "mean", "zero")


@dataclass(frozen=True)
class References:
    """What an ablated column is set to: per label of the reference images, the sum of every ``expanded`` column's
    output map (``sums[label]``: C_total x ..., float64) and the number of images (``counts``); ``mode``:

    - ``absent`` (the default): the mean over the images where the intervention's concepts are absent (labels
      outside ``Intervention.absent``): a unit ablated says what it says when its concept is not there;
    - ``mean``: the mean over all of them;
    - ``zero``: zeros.

    The columns come first in every map (a Linear's too: C_total x tokens)."""

    sums: dict[int, torch.Tensor]
    counts: dict[int, int]
    mode: str

    def of(self, iv: Intervention) -> torch.Tensor:
        """The reference maps of ``iv``'s columns (len(columns) x ...)."""
        labels = [t for t in self.sums if self.mode != "absent" or t not in set(iv.absent)] or list(self.sums)
        total = sum(self.sums[t] for t in labels)[list(iv.columns)]
        mean = (total / sum(self.counts[t] for t in labels)).float()
        return torch.zeros_like(mean) if self.mode == "zero" else mean


@torch.no_grad()
def reference_outputs(runner: Runner, net: nn.Module, layer: str, images: ImageList, preprocess: Preprocess | None,
                      mode: str = "absent", max_images: int = 256, seed: int = 0) -> References:
    """The :class:`References` of the split layer ``layer`` of ``net`` from up to ``max_images`` of ``images``
    drawn with ``seed`` (their labels: ``images.targets``), on ``runner``'s device."""
    if mode not in ABLATION_REFERENCES:
        raise UserError(f"the ablation reference must be one of {', '.join(ABLATION_REFERENCES)}, not {mode!r}")
    expanded = split_layer(net, layer).expanded
    conv = isinstance(expanded, nn.Conv2d)
    rows = sorted(np.random.default_rng(seed).permutation(len(images))[:max_images].tolist())
    if not rows:
        raise UserError("no images to take the ablations' reference outputs from")
    seen: list[torch.Tensor] = []

    def step(batches):
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for b in batches:
            net(b.x)
            out = seen.pop().double()
            add_by_label(sums, counts, out if conv else out.movedim(-1, 1), b.targets)  # columns first, as a conv's
        return sums, counts

    handle = expanded.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:  # every rank reads the same few images (no sharing out): each has the whole reference
        ran = runner.image_pass(images, plain_batches(rows, runner.batch_size), preprocess, "reference outputs",
                                shard=False).run(step)
    finally:
        handle.remove()
    sums, counts = ran.value
    return References(sums, counts, mode)


class _Copies:
    """How a batch becomes A + 1 copies with their interventions (a forward hook on the split layer's ``expanded``):
    copied at the layer (``fast``: the network before it runs once) or at the input (every copy runs the whole
    network). The first batch decides (:meth:`first`)."""

    def __init__(self, net: nn.Module, expanded: nn.Module, interventions: list[Intervention], references: References):
        self.net, self.interventions = net, interventions
        self.refs = [references.of(iv) for iv in interventions]  # each intervention's maps of its own columns
        self.conv = isinstance(expanded, nn.Conv2d)  # its units along dim 1; a Linear's along the last dim
        self.expand, self.fast = False, None

    @property
    def n(self) -> int:
        return len(self.interventions) + 1

    def hook(self, _m, _i, out):
        # fed once (fast): the copies start here; fed A + 1 times: every copy ran the network up to here
        out = out.repeat(self.n, *([1] * (out.dim() - 1))) if self.expand else out.clone()
        B = out.shape[0] // self.n
        for a, (iv, ref) in enumerate(zip(self.interventions, self.refs), 1):
            part, cols = out[a * B:(a + 1) * B], list(iv.columns)
            if not self.conv:  # a Linear's units along the last dim: the same arithmetic with them first
                part = part.movedim(-1, 1)
            part[:, cols] = ref if iv.factor is None else part[:, cols] * iv.factor
        return out

    def forward(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """(A + 1) x B x outputs: the batch intact and under each intervention."""
        self.expand = fast
        return self.net(x if fast else x.repeat(self.n, *([1] * (x.dim() - 1)))).float().reshape(self.n, len(x), -1)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        """The first batch of two or more images decides how copies are made: from the layer on when that gives the same outputs as
        copying the input; a network whose later part reuses a tensor from before the layer (a residual connection)
        fails that, or raises, and every copy then runs the whole network."""
        slow = self.forward(x, False)
        self.fast = layer_copies_agree(slow, lambda: self.forward(x, True))
        return slow

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:  # a batch of one image cannot tell the two ways apart: a later batch decides
            return self.first(x) if len(x) > 1 else self.forward(x, False)
        return self.forward(x, self.fast)


def _batch_rows(out: torch.Tensor, b, measure: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's rows (B x (2 + 3 (A + 1)): index, label, own-class logit, probability and rightness per copy) from
    its outputs ``out`` ((A + 1) x B x K), and its per-intervention sums of every class's logit and probability
    change (2 x A x K; None for ``measure`` features, whose evidence is each copy's distance from the intact
    output)."""
    head = [b.index.double()[:, None], b.targets.double()[:, None]]
    if measure == "features":
        dist = (out - out[:1]).norm(dim=-1) / out[:1].norm(dim=-1).clamp_min(1e-12)
        ev = -dist.T.double().cpu()  # B x (A + 1)
        return torch.cat(head + [ev, ev, torch.ones_like(ev)], 1), None
    probs = out.softmax(-1)
    lab = b.labels.view(1, -1, 1).expand(out.shape[0], -1, 1)
    own = [out.gather(2, lab)[..., 0].T, probs.gather(2, lab)[..., 0].T,  # B x (A + 1) each
           (out.argmax(-1) == b.labels[None]).T]
    change = torch.stack([(out[1:] - out[:1]).sum(1), (probs[1:] - probs[:1]).sum(1)]).double()
    return torch.cat(head + [t.double().cpu() for t in own], 1), change


def intervention_pass(runner: Runner, net: nn.Module, layer: str, images: ImageList,
                      interventions: list[Intervention], references: References, preprocess: Preprocess | None,
                      indices: list[int] | None = None, desc: str = "ablations",
                      measure: str = "logits") -> tuple[Effects, float]:
    """ONE pass over ``images`` (or ``indices`` of them) through the split network ``net`` (on ``runner``'s
    device): each batch intact and under every intervention (module docstring); the :class:`Effects` and the
    slowest rank's seconds. Batches never mix classes and hold at most ``runner.batch_size`` images in all copies
    together (``batch_size // (A + 1)`` images, at least 1, each fed A + 1 times).

    ``measure="features"`` (a model without a class head): an image's evidence is how close the output stays to
    the intact one, ``-|f_a - f| / |f|`` over the whole output (0 intact), in ``logit`` and ``prob``; ``correct``
    is all true and ``dlogit``/``dprob`` are zeros (A x 1)."""
    if measure not in ("logits", "features"):
        raise ValueError(f"measure must be logits or features, not {measure!r}")
    expanded = split_layer(net, layer).expanded
    copies = _Copies(net, expanded, interventions, references)
    order = range(len(images)) if indices is None else indices

    def step(batches):
        rows, sums = [], None
        for b in batches:
            row, change = _batch_rows(copies(b.x), b, measure)
            rows.append(row)
            if change is not None:
                sums = change if sums is None else sums + change  # 2 x A x K
        return rows, sums

    handle = expanded.register_forward_hook(copies.hook)
    try:
        per = max(1, runner.batch_size // copies.n)
        ran = runner.image_pass(images, class_batches(images, order, per), preprocess, desc).run(step)
    finally:
        handle.remove()
    return _effects(runner, interventions, *ran.value, measure, "layer" if copies.fast else "input"), ran.seconds


def _effects(runner: Runner, interventions: list[Intervention], rows: list[torch.Tensor],
             sums: torch.Tensor | None, measure: str, copies: str) -> Effects:
    """Every rank's rows in dataset order and the summed class changes, as :class:`Effects`."""
    A, n1 = len(interventions), len(interventions) + 1
    every = runner.gather_rows(torch.cat(rows) if rows else torch.zeros(0, 2 + 3 * n1, dtype=torch.float64))
    every = every[every[:, 0].argsort(stable=True)].numpy()
    K = 1 if measure == "features" else int(runner.slowest(float(0 if sums is None else sums.shape[-1])))
    mine = torch.zeros(2, A, K, dtype=torch.float64) if sums is None else sums.cpu()
    total = runner.gather_rows(mine.flatten()[None]).sum(0).view(2, A, K).numpy() / max(1, len(every))
    return Effects(interventions, every[:, 0].astype(np.int64), every[:, 1].astype(np.int64), every[:, 2:2 + n1],
                   every[:, 2 + n1:2 + 2 * n1], every[:, 2 + 2 * n1:].astype(bool), total[0], total[1], copies)
