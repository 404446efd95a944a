"""The whole pipeline in one command, with a report page.

Without arguments: builds a small real-image dataset (scikit-learn's bundled handwritten digits,
upscaled, split into train/ and val/), trains a small torchvision CNN on it (CPU, seeded, cached),
then runs stage 1 and the layer command (disentangle_layer.py) through the same functions as the
scripts: finds each polysemantic channel's concepts from the data, splits the most polysemantic
channels in one network (by the functional split rule, each concept read in the direction that raises its
logit: --split_rule function --orientation gradient, whose concept channels each carry their own concept's
effect on the logits),
evaluates them, draws what each channel responds to, and writes OUT_DIR/report.html. With --model vit the same on a small vision transformer instead of the CNN
(utils/model/demo_models.py:digits_vit, trained on the digits and cached the same way), split at its last
MLP's output neurons as its class token reads them. With --concepts clusters the same model with its head removed
is split without labels (disentangle_layer.py --concepts clusters): no stage 1, each unit's concepts found by
clustering its top training images.

The real setting is the same command with data and a model:
    python demo.py --data_dir /datasets/imagenet --model resnet50 --max_channels 3
(pretrained weights from $TORCH_HOME/hub/checkpoints; nothing is trained then).
"""
import argparse
import os
import time

from .parsing import add_input_args, add_json_arg, make_parser, nonnegative_float, nonnegative_int, positive_int, write_json_output
from ..defaults import DEFAULT_GAMMA, DEFAULT_P
from ..model.demo_models import DIGITS_CNN, DIGITS_CNN_TRAINING, DIGITS_VIT_TRAINING, digits_vit_spec
from ..errors import UserError, run_cli
from ..report.style import per_concept

DEMO_MODEL = DIGITS_CNN
VIT = "vit"  # --model's shortcut for the digits ViT (utils/model/demo_models.py:digits_vit)


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--data_dir", default=None,
                   help="ImageFolder root with train/ and val/ (default: build the digits demo in demo_data/digits)")
    p.add_argument("--model", default=None,
                   help=f"torchvision model, timm/<name> or file.py:function (default: {DEMO_MODEL} trained on the "
                        f"digits, resnet50 with --data_dir); {VIT}: the demo's small vision transformer "
                        "(utils/model/demo_models.py:digits_vit) trained on the digits, split at its last MLP")
    p.add_argument("--weights", default=None,
                   help="weights name, checkpoint file or none (default: the trained demo checkpoint; with "
                        "--data_dir the model's pretrained weights, IMAGENET1K_V1 for resnet50)")
    p.add_argument("--layer", default=None,
                   help="Conv2d or position-wise Linear of interest (default: the model's last conv; a ViT's last "
                        "MLP output)")
    p.add_argument("--store_dir", default=None, help="stage-1 store and disentanglements (default: OUT_DIR/store)")
    p.add_argument("--out_dir", default="demo_output", help="report, plots and results (default: demo_output)")
    p.add_argument("--max_channels", "--top_k", dest="max_channels", type=positive_int, default=4, metavar="N",
                   help="how many polysemantic channels to split, those whose concepts are least alike first "
                        "(default: 4; --top_k is the older name of this flag)")
    p.add_argument("--tau", "--proportion_attribution_required", dest="tau", type=nonnegative_float, default=None,
                   help="importance threshold tau (default: 0.01 for the digits demo, whose small networks spread "
                        "relevance over many channels; 0.03, the paper's, with --data_dir)")
    p.add_argument("--p", type=float, default=DEFAULT_P, help=f"share of a class's images (default: {DEFAULT_P})")
    p.add_argument("--cos_sim_high", type=float, default=DEFAULT_GAMMA,
                   help=f"classes at least this alike form one concept (default: {DEFAULT_GAMMA})")
    p.add_argument("--split_rule", choices=("paper", "positive", "search", "function"), default="function",
                   help="the layer command's split rule (default: function, whose concept units are proven by "
                        "ablation on both demos; search: the sets that tell the concepts apart best, by activation; "
                        "paper: the paper's)")
    p.add_argument("--orientation", choices=("none", "gradient"), default="gradient",
                   help="gradient: read each concept in the direction that raises its logit (default); none: as the "
                        "paper, every concept by +activation")
    p.add_argument("--concepts", choices=("classes", "clusters"), default="classes",
                   help="classes (default): stage 1 and the layer command; clusters: without labels, as "
                        "disentangle_layer.py --concepts clusters, on the model with its head removed (its output: "
                        "the features): each unit's concepts from clusters of its top training images, the labels "
                        "read only to say which class each concept unit's top images mostly hold")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"training epochs of the digits model (default: the model's: "
                        f"{DIGITS_CNN_TRAINING['epochs']} for {DEMO_MODEL}, {DIGITS_VIT_TRAINING['epochs']} for {VIT})")
    p.add_argument("--max_images_per_class", type=positive_int, default=None, help="first N training images per class")
    p.add_argument("--pictures_k", type=positive_int, default=12, help="top activating images per panel (default: 12)")
    p.add_argument("--fv_steps", type=nonnegative_int, default=64, help="feature-visualisation steps, 0 for none (default: 64)")
    p.add_argument("--class_index", metavar="FILE", default=None,
                   help="JSON {\"folder\": logit index} when --data_dir's class folders are neither one per model "
                        "output nor ImageNet wnids (default: automatic)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per batch in every pass (default: 64)")
    p.add_argument("--num_workers", type=nonnegative_int, default=min(4, os.cpu_count() or 1),
                   help="data loader processes (default: min(4, CPUs))")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the digits model's training and of the feature visualisations (default: 0)")
    add_input_args(p)
    add_json_arg(p)
    return p


def main(args: argparse.Namespace) -> dict | None:
    from ..passes.distributed import distributed_context
    from ..stages.demo import DemoConfig, run_demo

    flags = {k: v for k, v in vars(args).items() if k not in ("json", "no_progress", "device")}
    flags["model"] = demo_model(args.model, args.data_dir)
    start = time.perf_counter()
    with distributed_context(args.device) as (rank, world, device):
        out = run_demo(DemoConfig(**flags, device=device, progress=not args.no_progress, rank=rank, world_size=world))
    if rank != 0:  # under torchrun rank 0 alone prints and writes
        return None
    if args.concepts == "clusters":
        from ..files import read_json
        from .disentangle_layer import print_clusters

        print_clusters({**read_json(os.path.join(args.out_dir, "layer.json")), "report": out["report"],
                        "seconds": time.perf_counter() - start})
    else:
        print_summary(args.out_dir, out["report"], args.pictures_k, time.perf_counter() - start)
        print(f"report: {out['report']}")
    write_json_output(args.json, out, seed=args.seed)
    return out


def print_summary(out_dir: str, report: str, top_k: int, seconds: float) -> None:
    """The split channels (from OUT_DIR/layer.json) with the purity of their top images per concept before (the
    original channel) and after (the concept's channel), then both means: the demo's result in two numbers."""
    from ..files import read_json

    layer = read_json(os.path.join(out_dir, "layer.json"))
    rows = sorted(layer["channels"].items(), key=lambda kv: -kv[1]["purity_gain"])
    print(f"\n{'channel':>7} {'k':>2} {'best rho':>8} {'purity before':>14} {'after':>14}  concepts")
    for c, ch in rows:
        before, after = (per_concept(ch["purity"][key]) for key in ("original", "concepts"))
        signs = ch.get("orientation") or [1] * len(ch["class_names"])
        names = " | ".join(", ".join(n) + (" (-)" if s < 0 else "") for n, s in zip(ch["class_names"], signs))
        print(f"{c:>7} {len(ch['concepts']):>2} {ch['best_rho']:>8.2f} {before:>14} {after:>14}  {names}")
    means = [_mean([v for ch in layer["channels"].values() for v in ch["purity"][key]])
             for key in ("original", "concepts")]
    if None not in means:
        print(f"mean purity over the concepts (share of the top-{top_k} validation images in the concept's classes): "
              f"original channels {means[0]:.0%}, concept channels {means[1]:.0%}")
    if any(s < 0 for ch in layer["channels"].values() for s in ch.get("orientation") or []):
        print("(-): a concept served by its unit going down, read as -activation (--orientation gradient)")
    from .disentangle_layer import print_certification

    print_certification(layer)
    print(f"max |logit difference| of the one network: {layer['max_abs_logit_diff']:.3g}; done in {seconds:.0f} s")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def demo_model(model: str | None, data_dir: str | None) -> str | None:
    """``--model`` as the pipeline takes it: the exact word ``vit`` is the own-file spec of the digits ViT (an
    absolute path, so any working directory works); anything else is passed on as it is."""
    if model != VIT:
        return model
    if data_dir is not None:
        raise UserError(f"--model {VIT} is the digits demo's ViT (10 classes, trained here); with --data_dir name "
                        "your model, e.g. timm/vit_small_patch16_224 or file.py:function with --weights")
    return digits_vit_spec()


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
