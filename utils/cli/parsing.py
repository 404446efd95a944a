"""Flags shared by the scripts, in one place, with the reference's names mapped to the paper's words.

reference flag                        paper
--proportion_attribution_required     tau
--p                                   p
--cos_sim_low / --cos_sim_high        gamma_low / gamma_high
--channel_disentangle / --channel_of_interest   c
--classes_for_concept1/2              the two concepts
--f                                   rho
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from ..errors import UserError, say
from ..files import check_writable, write_json


class Parser(argparse.ArgumentParser):
    """argparse in the project's error style: one line ``error: ...`` on stderr, exit code 2. Output files
    (``--json``, ``--export``) that would overwrite an input or land inside a stage-1 store are refused."""

    def error(self, message: str) -> None:  # argparse's own prints the usage first: two lines and more
        say(f"error: {message} (see --help)")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        problem = output_problem(ns)
        if problem:
            say(f"error: {problem}")
            sys.exit(2)
        return ns


OUTPUT_FLAGS = ("json", "export")
INPUT_FLAGS = ("weights", "class_index", "model")


def output_problem(ns: argparse.Namespace) -> str | None:
    """Why an output file of the command line must not be written (None: it may): it is one of the inputs
    (weights, class index, model file), or it lies inside a stage-1 store, whose files only stage 1 writes."""
    from ..store.layout import is_store

    inputs = {os.path.realpath(str(getattr(ns, k)).split(":")[0]) for k in INPUT_FLAGS
              if getattr(ns, k, None) and os.path.isfile(str(getattr(ns, k)).split(":")[0])}
    for flag in OUTPUT_FLAGS:
        path = getattr(ns, flag, None)
        if not path:
            continue
        real = os.path.realpath(path)
        if real in inputs:
            return f"--{flag} {path} is an input of this command; write the output elsewhere"
        folder = os.path.dirname(real)
        while folder and folder != os.path.dirname(folder):
            if is_store(folder):
                return f"--{flag} {path} lies inside the stage-1 store {folder}; write the output elsewhere"
            folder = os.path.dirname(folder)
    return None


def make_parser(doc: str | None) -> Parser:
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _number(kind, ok, words: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}")
        return v
    parse.__name__ = words
    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
nonnegative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number of at least 0")


def add_model_args(p: argparse.ArgumentParser, layer_flags=("--layer",), weights_default: str | None = "default",
                   weights_help: str | None = None, inputs: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet50",
                   help="a torchvision classification model (resnet50, vgg16, ...), timm/<name> (a timm model, e.g. "
                        "timm/resnet50.a1_in1k), or path/to/file.py:function (your own: the function returns the "
                        "nn.Module, or (module, class names)) (default: resnet50)")
    g.add_argument("--weights", default=weights_default,
                   help=weights_help or "default (torchvision: IMAGENET1K_V1, read offline from "
                                        "$TORCH_HOME/hub/checkpoints; timm: its pretrained weights from the local "
                                        "Hugging Face cache; your own: as the function returns it), a torchvision "
                                        "weights name, a checkpoint file (state_dict), or none (random, seeded)")
    g.add_argument(*layer_flags, dest="layer", default=None,
                   help="dotted name of the layer of interest: a Conv2d (its channels) or a Linear applied at every "
                        "position (its neurons: ConvNeXt, ViT, DeiT, Swin MLPs) (default: the last such layer before "
                        "the head, never the classifier: layer4.2.conv3 for resnet50, the last block's MLP output "
                        "for ViT and ConvNeXt; 'last_conv' means the same)")
    g.add_argument("--nr_channels_in_layer_of_interest", type=int, default=None,
                   help="output channels of the layer (2048 for resnet50); checked, not needed")
    if inputs:  # a command that feeds images
        add_input_args(p)


def add_input_args(p: argparse.ArgumentParser) -> None:
    """--input_size, --resize, --mean, --std: the evaluation transform, when not the model's declared one."""
    g = p.add_argument_group("input transform (default: what the weights declare; own models: Resize 256, "
                             "CenterCrop 224, ImageNet mean and std; give the same in every command)")
    g.add_argument("--input_size", type=positive_int, default=None, metavar="N",
                   help="side of the network's input: CenterCrop N (the shorter side is resized to N too, unless "
                        "--resize)")
    g.add_argument("--resize", type=positive_int, default=None, metavar="N",
                   help="resize the shorter side to N before the centre crop")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="Normalize's mean: one value or one per colour channel")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="Normalize's standard deviation: one value or one per colour channel")


def input_options(args: argparse.Namespace) -> dict:
    """The transform flags of ``args`` as fields of the stages' options (:class:`utils.passes.image_pass.RunOptions`)."""
    return {k: getattr(args, k, None) for k in ("input_size", "resize", "mean", "std")}


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=required, help="ImageFolder root holding train/ and val/")
    g.add_argument("--batch_size", type=positive_int, default=64, help="images per batch (default: 64)")
    g.add_argument("--num_workers", type=nonnegative_int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes (default: min(8, CPUs))")
    g.add_argument("--class_index", metavar="FILE", default=None,
                   help="JSON {\"folder\": logit index} for class folders that are neither one per model output nor "
                        "ImageNet wnids (n01440764, ...) with a 1000-output model (default: automatic)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--gpu", type=int, default=None, help="GPU index (same as --device cuda:N)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


def add_store_arg(p: argparse.ArgumentParser, default: str = "./store") -> None:
    p.add_argument("--store_dir", default=default, help=f"folder of the stage-1 store(s) (default: {default})")


def add_image_pass_args(p: argparse.ArgumentParser) -> None:
    """The flags of a script that runs the model over images into a store: data, model, store, device."""
    add_data_args(p)
    add_model_args(p)
    add_store_arg(p)
    add_device_args(p)


def output_path(path: str) -> str:
    """argparse type of an output file: its folder must exist and take files (checked before any pass)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {path} into")
    try:
        check_writable(folder)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", type=output_path, default=None,
                   help="also write the results as JSON to PATH")


def write_json_output(path: str | None, obj: dict, seed: int | None = None) -> None:
    """``--json PATH``: ``obj`` with its ``provenance`` (what made it; ``seed`` when the command draws anything)."""
    if path:
        from ..store.provenance import provenance

        write_json(path, {**obj, "provenance": obj.get("provenance") or provenance(seed)})


MAX_CONCEPT_FLAGS = 8


def add_selection_args(g, tau_default: float, gamma_default: float, gamma_help: str, tau_why: str = "") -> None:
    """Stage 2's thresholds (the authors' code's names): ``--proportion_attribution_required`` (tau), ``--p`` and
    ``--cos_sim_high`` (gamma_high, stored as ``args.cos_sim_high``). ``tau_why``: why this command's
    default differs from the paper's."""
    g.add_argument("--proportion_attribution_required", "--tau", dest="tau", type=nonnegative_float, default=tau_default,
                   help="tau: share of an image's positive relevance a channel needs to be important "
                        f"(default: {tau_default}{tau_why}; the paper uses 0.03)")
    g.add_argument("--p", type=float, default=0.75,
                   help="p: share of a class's training images for which the channel must be important (default: 0.75)")
    g.add_argument("--cos_sim_high", "--gamma", type=float, default=gamma_default, help=gamma_help)


def add_concept_args(g) -> None:
    """The concepts: ``--classes_for_concept1 T [T ...]``, ``--classes_for_concept2``, ... (the authors' code's flags, up
    to 8), or ``--concept T [T ...]`` once per concept; several classes make one concept."""
    for j in range(1, MAX_CONCEPT_FLAGS + 1):
        g.add_argument(f"--classes_for_concept{j}", type=int, nargs="+", default=None, metavar="T",
                       help=f"class index(es) of concept {j}" if j <= 3 else argparse.SUPPRESS)
    g.add_argument("--concept", dest="concept_list", type=int, nargs="+", action="append", default=None, metavar="T",
                   help="the class index(es) of one concept; give it once per concept (instead of "
                        "--classes_for_conceptJ), e.g. --concept 57 58 53 --concept 515 808")


def concepts_of(args: argparse.Namespace) -> list[list[int]] | None:
    """The concepts given on the command line, in order; None when none were given."""
    numbered = [getattr(args, f"classes_for_concept{j}") for j in range(1, MAX_CONCEPT_FLAGS + 1)]
    given = [j for j, c in enumerate(numbered, 1) if c is not None]
    if args.concept_list and given:
        raise UserError("give the concepts either as --classes_for_conceptJ or as --concept, not both")
    if args.concept_list:
        return [list(c) for c in args.concept_list]
    if not given:
        return None
    if given != list(range(1, len(given) + 1)):
        missing = next(j for j in range(1, len(given) + 2) if j not in given)
        raise UserError(f"--classes_for_concept{missing} is missing (concepts are numbered 1, 2, 3, ...)")
    return [numbered[j - 1] for j in given]


def required_concepts(args: argparse.Namespace) -> list[list[int]]:
    """The concepts of the command line, two or more (a UserError otherwise)."""
    concepts = concepts_of(args)
    if not concepts or len(concepts) < 2:
        raise UserError("give two or more concepts: --classes_for_concept1 T [T ...] --classes_for_concept2 T "
                        "[T ...] (or --concept T [T ...] once per concept)")
    return concepts


def check_channels(expected: int | None, actual: int, what: str) -> None:
    if expected is not None and expected != actual:
        raise UserError(f"--nr_channels_in_layer_of_interest {expected} does not match {what}, "
                        f"which has {actual} channels")
