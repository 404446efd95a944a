"""What concept units do to the network's decisions: ablation and steering of split units, many at once.

In the split network the layer is ``Sequential(expanded, merge)`` (:func:`utils.model.surgery.make_split_layer`):
``expanded`` computes every unit, and split unit c's sub-units D_1 .. D_k and Res in columns of its own; ``merge``
adds the D_j and takes k - 1 Res away. An **intervention** changes some columns of ``expanded``'s output before the
merge:

- an **ablation** sets them to their reference value: the mean output map over training images (the default;
  the unit then says "nothing in particular") or zero;
- **steering** multiplies them by a factor.

Ablating concept unit j of channel c is ablating its column, D_j. Ablating the original unit is ablating all of
its columns (D_1 .. D_k, Res), because the merge is linear: the channel's output becomes its own reference (the
mean, or zero), exactly as in the original network.

ONE pass over the images runs every intervention: each batch is fed once per intervention, plus once intact, as one
stacked batch, and a hook on ``expanded`` changes each copy's columns. Per image it keeps the logit and the
probability of its own class and whether it is classified right, intact and under each intervention; per
intervention, the mean change of every class's logit and probability over all images.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.images import ImageList, Preprocess, class_batches
from ..errors import UserError
from ..method.effects import Effects, Intervention
from .image_pass import Runner, plain_batches


def unit_interventions(channel: int, columns: list[int], k: int, steer: float | None = None) -> list[Intervention]:
    """The interventions of one split unit whose ``expanded`` columns are ``columns`` (D_1 .. D_k, Res): the
    original ablated (every column), each concept unit ablated, and, with ``steer``, each concept unit scaled."""
    out = [Intervention(channel, "original", tuple(columns))]
    out += [Intervention(channel, f"D{j}", (columns[j - 1],)) for j in range(1, k + 1)]
    if steer is not None:
        out += [Intervention(channel, f"D{j}", (columns[j - 1],), float(steer)) for j in range(1, k + 1)]
    return out


def split_layer(net: nn.Module, layer: str) -> nn.Module:
    """The split layer (``Sequential(expanded, merge)``) of ``net`` at ``layer``; a UserError otherwise."""
    mod = net.get_submodule(layer)
    if not hasattr(mod, "expanded") or not hasattr(mod, "merge"):
        raise UserError(f"{layer} of this network is not a split layer (no expanded and merge modules)")
    return mod


@torch.no_grad()
def reference_outputs(runner: Runner, net: nn.Module, layer: str, images: ImageList, preprocess: Preprocess | None,
                      mode: str = "mean", max_images: int = 256, seed: int = 0) -> torch.Tensor:
    """Every ``expanded`` column's reference output map (its output without the batch dimension; a Conv2d:
    C_total x H x W): the mean over up to ``max_images`` of ``images`` drawn with ``seed`` (``mode`` mean), or
    zeros (``mode`` zero). On ``runner``'s device."""
    if mode not in ("mean", "zero"):
        raise UserError(f"the ablation reference must be mean or zero, not {mode!r}")
    expanded = split_layer(net, layer).expanded
    rows = sorted(np.random.default_rng(seed).permutation(len(images))[:max_images].tolist())
    total: list[torch.Tensor] = []

    def hook(_m, _i, out):
        total.append(out.double().sum(0))

    def step(batches):
        for b in batches:
            net(b.x)

    handle = expanded.register_forward_hook(hook)
    try:
        runner.image_pass(images, plain_batches(rows, runner.batch_size), preprocess, "reference outputs").run(step)
    finally:
        handle.remove()
    if not total:
        raise UserError("no images to take the ablations' reference outputs from")
    shape = total[0].shape
    summed = runner.gather_rows(torch.stack(total).sum(0).flatten().cpu()[None]).sum(0).view(shape)
    mean = (summed / len(rows)).float().to(runner.device)
    return mean if mode == "mean" else torch.zeros_like(mean)


def intervention_pass(runner: Runner, net: nn.Module, layer: str, images: ImageList,
                      interventions: list[Intervention], reference: torch.Tensor, preprocess: Preprocess | None,
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
    A = len(interventions)
    order = range(len(images)) if indices is None else indices
    conv = isinstance(expanded, nn.Conv2d)  # its units along dim 1; a Linear's along the last dim

    def hook(_m, _i, out):
        B = out.shape[0] // (A + 1)
        out = out.clone()
        for a, iv in enumerate(interventions, 1):
            part, cols = out[a * B:(a + 1) * B], list(iv.columns)
            if not conv:  # a Linear's units along the last dim: the same arithmetic, transposed
                part, ref = part.movedim(-1, 1), reference.movedim(-1, 0)
            else:
                ref = reference
            part[:, cols] = ref[cols] if iv.factor is None else part[:, cols] * iv.factor
        return out

    def step(batches):
        rows, sums = [], None
        for b in batches:
            B = len(b)
            logits = net(b.x.repeat(A + 1, *([1] * (b.x.dim() - 1)))).float().reshape(A + 1, B, -1)
            if measure == "features":  # no classes: each copy's distance from the intact output
                dist = (logits - logits[:1]).norm(dim=-1) / logits[:1].norm(dim=-1).clamp_min(1e-12)
                ev = -dist.T.double().cpu()  # B x (A + 1)
                rows.append(torch.cat([b.index.double()[:, None], b.targets.double()[:, None], ev, ev,
                                       torch.ones_like(ev)], 1))
                continue
            probs = logits.softmax(-1)
            lab = b.labels.view(1, B, 1).expand(A + 1, B, 1)
            own = [logits.gather(2, lab)[..., 0].T, probs.gather(2, lab)[..., 0].T,  # B x (A + 1) each
                   (logits.argmax(-1) == b.labels[None]).T]
            rows.append(torch.cat([b.index.double()[:, None], b.targets.double()[:, None]]
                                  + [t.double().cpu() for t in own], 1))
            change = torch.stack([(logits[1:] - logits[:1]).sum(1), (probs[1:] - probs[:1]).sum(1)]).double()
            sums = change if sums is None else sums + change  # 2 x A x K
        return rows, sums

    handle = expanded.register_forward_hook(hook)
    try:
        per = max(1, runner.batch_size // (A + 1))
        ran = runner.image_pass(images, class_batches(images, order, per), preprocess, desc).run(step)
    finally:
        handle.remove()
    rows, sums = ran.value
    n1 = A + 1
    every = runner.gather_rows(torch.cat(rows) if rows else torch.zeros(0, 2 + 3 * n1, dtype=torch.float64))
    every = every[every[:, 0].argsort(stable=True)].numpy()
    K = 1 if measure == "features" else int(runner.slowest(float(0 if sums is None else sums.shape[-1])))
    mine = torch.zeros(2, A, K, dtype=torch.float64) if sums is None else sums.cpu()
    total = runner.gather_rows(mine.flatten()[None]).sum(0).view(2, A, K).numpy() / max(1, len(every))
    return Effects(interventions, every[:, 0].astype(np.int64), every[:, 1].astype(np.int64), every[:, 2:2 + n1],
                   every[:, 2 + n1:2 + 2 * n1], every[:, 2 + 2 * n1:].astype(bool), total[0], total[1]), ran.seconds
