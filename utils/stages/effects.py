"""The layer command's proof of each split (``--ablation``): what every concept unit does to the network's decisions.

    the one split network -> the reference outputs (each sub-unit's output maps summed per class over up to
    REFERENCE_IMAGES training images of the concepts' classes and up to SEARCH_OTHER_CLASSES others: an ablation
    takes the mean where its concepts are absent, ``--ablation absent``; or over all of them; or zero)
    -> ONE pass over up to ``--effects_per_class`` validation images of every class
       (:func:`utils.passes.interventions.intervention_pass`): each split unit's original ablated, each concept unit
       ablated and (``--steer``) scaled, all stacked in each batch
    -> per split unit and concept: the own effect, the original's, the largest collateral effect on any other
       class, steering and whether the concept unit is certified (:mod:`utils.method.effects`)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..defaults import REFERENCE_IMAGES, SEARCH_OTHER_CLASSES
from ..data.images import ImageList
from ..method.effects import Effects, unit_effects
from ..method.scoring import Scored
from ..model.surgery import appended_channels
from ..passes.interventions import intervention_pass, reference_outputs, unit_interventions
from ..store.layout import concept_training_images


@dataclass(frozen=True)
class LayerEffects:
    """The intervention pass of a layer (``effects``), per split channel its concepts' entries
    (:func:`utils.method.effects.concept_effect`), and how they were measured."""

    effects: Effects
    channels: dict[int, list[dict]]
    reference: str
    tolerance: float
    steer: float | None
    images: int
    seconds: float

    @property
    def certified(self) -> int:
        return sum(e["certified"] for es in self.channels.values() for e in es)

    @property
    def concept_units(self) -> int:
        return sum(len(es) for es in self.channels.values())

    def summary(self) -> dict:
        """The layer's line: how it was measured and how many concept units are certified."""
        return {"reference": self.reference, "tolerance": self.tolerance, "steer": self.steer, "images": self.images,
                "seconds": self.seconds, "certified": self.certified, "concept_units": self.concept_units,
                "copies": self.effects.copies}


def layer_effects(cfg, runner, store, net, layer: str, out_channels: int, scored: list[Scored], val: ImageList,
                  num_classes: int, preprocess, log) -> LayerEffects | None:
    """The proof of every split of the layer (module docstring); None with ``cfg.ablation`` none."""
    if cfg.ablation == "none":
        return None
    t0 = time.perf_counter()
    cols = appended_channels(out_channels, [s.split() for s in scored])
    ivs = [iv for s, c in zip(scored, cols)
           for iv in unit_interventions(s.channel, c, len(s.concepts), cfg.steer, s.concepts)]
    train = concept_training_images(store, cfg.data_dir, [t for s in scored for cs in s.concepts for t in cs],
                                    SEARCH_OTHER_CLASSES, cfg.seed, cfg.class_index)
    ref = reference_outputs(runner, net, layer, train, preprocess, cfg.ablation, REFERENCE_IMAGES, cfg.seed)
    seen: dict[int, int] = {}
    indices = []
    for i, t in enumerate(val.targets):  # the first effects_per_class images of each class
        if seen.get(t, 0) < cfg.effects_per_class:
            seen[t] = seen.get(t, 0) + 1
            indices.append(i)
    effects, seconds = intervention_pass(runner, net, layer, val, ivs, ref, preprocess, indices)
    channels = {s.channel: unit_effects(effects, s.channel, s.concepts, num_classes, cfg.certify_tolerance, cfg.steer)
                for s in scored}
    out = LayerEffects(effects, channels, cfg.ablation, cfg.certify_tolerance, cfg.steer, len(indices),
                       time.perf_counter() - t0)
    where = "from the layer on" if effects.copies == "layer" else "each through the whole network"
    log(f"ablation pass: {len(ivs)} interventions on {len(indices)} validation images in {seconds:.1f} s (copies "
        f"{where}); {out.certified} of "
        f"{out.concept_units} concept units certified (tolerance {cfg.certify_tolerance})")
    return out
