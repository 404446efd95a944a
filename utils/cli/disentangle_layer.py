"""A whole layer in one command: every polysemantic channel, its concepts found from the data, split into
as many channels as it has concepts, all in ONE network, evaluated and shown on one page.

Reads the stage-1 store (stage 2's rules and flags: a channel is a candidate when it is relevant to two or
more classes), groups each candidate's relevant classes into concepts by complete linkage of their average
relevance vectors (two classes stay in one concept when their cosine similarity is at least
--cos_sim_high), and splits every channel with --min_concepts or more concepts (or only --channels) into
one channel per concept plus a shared residual. By default (--split_rule function --orientation gradient) one
pass over the concepts' training images finds each concept's direction (a concept served by the unit going
down is read as -activation), each unit's input contributions and what each input does to the class logits;
the index sets are searched, from the paper's, for concept channels that tell their concepts apart, then
chosen so that each concept channel carries its own concepts' effect on the logits and no other's (the
proof that follows, --ablation, measures it); with --split_rule paper --orientation none it is
the paper's rule, every channel's 20 rho values scored in ONE pass (run only up to the layer). The one network
with every split is checked against the original's logits on validation images; every split is evaluated on
its concepts' validation images (stage 4), by the purity, AUC and pairwise AUC of its channels on all
validation images (one pass), against random other channels of the layer as a baseline.

Writes STORE_DIR/layer_disentangled/<model>_<layer>_required<tau>_p<p>_cossim<gamma>[_<rule>][_oriented]/: layer.json,
disentangled.pt (the whole network and its input transform), results_quantitative/, plots/, pictures/ and
report.html; and one record per channel in STORE_DIR/models_disentangled/ (so that get_results.py and
visualize_channel.py work on each channel too). In Python the folder loads as a result:
disentangle_channels.load(OUT_DIR) (the split network, per channel its concepts and scores, units(x)).

  python disentangle_layer.py --data_dir /datasets/imagenet --store_dir /store_dir --model resnet50 \\
      --proportion_attribution_required 0.03 --p 0.75 --cos_sim_high 0.5

With --concepts clusters no label, class head or store is needed: each unit's concepts are clusters of its
strongest training images (by which inputs carry its activation on them), every unit with two or more is split
between them, evaluated on held-out images (AUC and purity per cluster) and drawn; DATA_DIR holds train/ (and
val/) or is itself a folder of images, class folders optional. Writes
STORE_DIR/layer_disentangled/<model>_<layer>_clusters_top<N>_cossim<gamma>/ (layer.json, disentangled.pt,
pictures/, report.html):

  python disentangle_layer.py --concepts clusters --data_dir /images --model resnet50 --store_dir /out
"""
import argparse

from .parsing import (add_image_pass_args, add_json_arg, add_selection_args, check_channels, input_options,
                   make_parser, nonnegative_int, positive_int, write_json_output)
from ..defaults import (ABLATION, CERTIFY_TOLERANCE, CLUSTER_K0, CLUSTER_MIN_IMAGES, CLUSTER_TOP_N, DEFAULT_GAMMA,
                        DEFAULT_TAU, EFFECTS_PER_CLASS, SEARCH_IMAGES, SEARCH_OTHERS, STEER)
from ..errors import run_cli
from ..report.style import per_concept


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_image_pass_args(p)
    g = p.add_argument_group("which channels and concepts (stage 2's rules)")
    add_selection_args(g, DEFAULT_TAU, DEFAULT_GAMMA, "gamma_high: classes whose ARVs are at least this similar "
                       f"(complete linkage) form one concept (default: {DEFAULT_GAMMA})")
    g.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                   help="split only these channels (each needs --min_concepts or more concepts)")
    g.add_argument("--min_concepts", type=positive_int, default=2, help="split channels with at least this many "
                   "concepts (default: 2)")
    g.add_argument("--max_channels", type=positive_int, default=None, metavar="N",
                   help="split at most N channels: those whose concepts are least alike first (default: all)")
    g.add_argument("--split_rule", choices=("function", "search", "paper", "positive"), default="function",
                   help="function (default): the searched sets, then the fewest inputs moved so that ablating each "
                        "concept unit (as --ablation does) takes, as predicted along the ablation's path on training "
                        "images, its own concepts' logit evidence and the least of any other class's (small integer "
                        "programs, one more pass over those images); search: from the paper's "
                        "sets, move single inputs while the concept units tell their concepts apart better on "
                        "training images (stopped by held-out ones); paper: an input goes to the first concept j "
                        "with rho * A_j > every other A_l; positive: only where A_j > 0")
    g.add_argument("--orientation", choices=("gradient", "none"), default="gradient",
                   help="gradient (default): read each concept's unit in the direction that raises the concept's "
                        "logit (the sign of the mean gradient over its training images; a concept served by the unit "
                        "going down is read as -activation), in the split rule, top-k, purity, AUC and pictures; "
                        "none: every concept +1, as the paper")
    g.add_argument("--search_images", type=positive_int, default=SEARCH_IMAGES, metavar="N",
                   help=f"--split_rule function and search: training images per concept they read (and "
                        f"{SEARCH_OTHERS} x N of other classes; a quarter of each held out to stop the search) "
                        f"(default: {SEARCH_IMAGES})")
    a = p.add_argument_group("the proof of each split: ablation and steering of the concept units")
    a.add_argument("--ablation", choices=("absent", "mean", "zero", "none"), default=ABLATION,
                   help="what an ablated unit's output is set to (default: absent, its mean output map over training "
                        "images where its concepts are absent: the unit then says what it says when its concept is "
                        "not there; mean: over all of them; zero: zeros, which before a BatchNorm is not 'off'); "
                        "none: no ablation pass. One pass over the validation images ablates every original unit and "
                        "concept unit and steers every concept unit, all stacked in each batch")
    a.add_argument("--steer", type=float, default=STEER, metavar="F",
                   help=f"steering: each concept unit's output times F; 0 for none (default: {STEER})")
    a.add_argument("--effects_per_class", type=positive_int, default=EFFECTS_PER_CLASS, metavar="N",
                   help=f"validation images of each class the ablation pass reads (default: {EFFECTS_PER_CLASS})")
    a.add_argument("--certify_tolerance", type=float, default=CERTIFY_TOLERANCE, metavar="T",
                   help="a concept unit is certified when ablating it takes at least 1 - T of what ablating the "
                        "original unit takes from its concept's own logits, at most T of what that takes from each "
                        "other concept's, and from any other class at most T x its own effect more than the "
                        f"original's ablation does (default: {CERTIFY_TOLERANCE}, six times the sampling noise of those "
                        "shares measured on the digits demo)")
    c = p.add_argument_group("concepts from clusters (--concepts clusters: no labels, no store, any backbone)")
    c.add_argument("--concepts", choices=("classes", "clusters"), default="classes",
                   help="classes (default): from the stage-1 store, as above; clusters: from the images alone, for a "
                        "model with or without a class head: each unit's top --top_n training images clustered by how "
                        "they reach it (which inputs carry its activation), a unit with two or more clusters split "
                        "between them by the searched rule. DATA_DIR holds train/ (and val/), or is itself a folder "
                        "of images; class folders are optional and only say, afterwards, which class each unit's top "
                        "images mostly hold")
    c.add_argument("--top_n", type=positive_int, default=CLUSTER_TOP_N, metavar="N",
                   help=f"each unit's strongest training images that are clustered (default: {CLUSTER_TOP_N})")
    c.add_argument("--clusters", type=positive_int, default=CLUSTER_K0, metavar="K",
                   help=f"k-means' k per unit, before small clusters go and alike ones merge at --cos_sim_high "
                        f"(default: {CLUSTER_K0})")
    c.add_argument("--min_images", type=positive_int, default=CLUSTER_MIN_IMAGES, metavar="M",
                   help=f"a concept holds at least M of the unit's top images (default: {CLUSTER_MIN_IMAGES})")
    c.add_argument("--positions", choices=("auto", "all", "cls"), default="auto",
                   help="a Linear layer's positions that count (as get_importances_for_classes.py's; default: auto)")
    o = p.add_argument_group("evaluation and pictures")
    o.add_argument("--check_images", type=positive_int, default=32, metavar="N",
                   help="validation images on which the one network's logits are checked (default: 32)")
    o.add_argument("--top_k", type=positive_int, default=12, help="top validation images per channel (default: 12)")
    o.add_argument("--baseline_channels", type=nonnegative_int, default=None, metavar="N",
                   help="random non-candidate channels for the purity baseline (default: as many as are split)")
    o.add_argument("--fv_steps", type=nonnegative_int, default=0,
                   help="feature-visualisation steps per channel in the pictures (default: 0, none; ~40 s per "
                        "channel for ResNet-50 on a CPU at 128)")
    o.add_argument("--seed", type=int, default=0, help="seed of the baseline channels and visualisations (default: 0)")
    o.add_argument("--out_dir", default=None,
                   help="output folder (default: STORE_DIR/layer_disentangled/<model>_<layer>_required<tau>_p<p>_cossim<gamma>"
                        "[_<rule>][_oriented], the rule unless the paper's: _function_oriented by default)")
    add_json_arg(p)
    return p


def layer_config(args: argparse.Namespace, device: str = "auto", rank: int = 0, world: int = 1):
    """The layer command's :class:`utils.stages.layer.LayerConfig` from its flags (also benchmarks/split_rules.py's)."""
    from ..passes.featvis import FVConfig
    from ..stages.layer import LayerConfig

    return LayerConfig(data_dir=args.data_dir, store_dir=args.store_dir, model=args.model, weights=args.weights,
                       layer=args.layer, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                       class_index=args.class_index, progress=not args.no_progress, rank=rank, world_size=world,
                       tau=args.tau, p=args.p, gamma_high=args.cos_sim_high, channels=args.channels,
                       min_concepts=args.min_concepts, max_channels=args.max_channels,
                       check_images=args.check_images, top_k=args.top_k, baseline=args.baseline_channels,
                       seed=args.seed, out_dir=args.out_dir, split_rule=args.split_rule,
                       orientation=args.orientation, search_images=args.search_images, ablation=args.ablation,
                       steer=args.steer or None, effects_per_class=args.effects_per_class,
                       certify_tolerance=args.certify_tolerance,
                       fv=FVConfig(steps=args.fv_steps, seed=args.seed) if args.fv_steps > 0 else None,
                       **input_options(args))


def clusters_config(args: argparse.Namespace, device: str = "auto", rank: int = 0, world: int = 1):
    """The label-free layer command's :class:`utils.stages.layer_clusters.ClustersConfig` from its flags."""
    from ..passes.featvis import FVConfig
    from ..stages.layer_clusters import ClustersConfig

    return ClustersConfig(data_dir=args.data_dir, store_dir=args.store_dir, model=args.model, weights=args.weights,
                          layer=args.layer, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          progress=not args.no_progress, rank=rank, world_size=world, top_n=args.top_n,
                          clusters=args.clusters, min_images=args.min_images, gamma_high=args.cos_sim_high,
                          channels=args.channels, max_channels=args.max_channels, check_images=args.check_images,
                          top_k=args.top_k, positions=args.positions, seed=args.seed, out_dir=args.out_dir,
                          ablation=args.ablation, certify_tolerance=args.certify_tolerance,
                          fv=FVConfig(steps=args.fv_steps, seed=args.seed) if args.fv_steps > 0 else None,
                          **input_options(args))


def main(args: argparse.Namespace) -> dict | None:
    from ..passes.distributed import distributed_context
    from ..stages.layer import disentangle_layer
    from ..stages.layer_clusters import disentangle_clusters
    from ..model.loading import get_layer, load_model
    from ..data.preprocess import InputSpec

    lm = load_model(args.model, args.weights, inputs=InputSpec.of(args))
    check_channels(args.nr_channels_in_layer_of_interest, get_layer(lm.model, args.layer)[1].out_channels,
                   f"layer {args.layer or 'last_conv'}")
    with distributed_context(args.device, args.gpu) as (rank, world, device):
        if args.concepts == "clusters":
            out = disentangle_clusters(clusters_config(args, device, rank, world), loaded=lm)
        else:
            out = disentangle_layer(layer_config(args, device, rank, world), loaded=lm)
    if rank != 0:  # rank 0 alone prints and writes
        return None
    if args.concepts == "clusters":
        print_clusters(out)
        write_json_output(args.json, {k: out[k] for k in ("concepts_from", "channels", "candidates", "certification",
                                                          "max_abs_logit_diff", "export", "seconds", "report",
                                                          "provenance")})
        return out
    print_layer(out, args.top_k)
    write_json_output(args.json, {k: out[k] for k in ("warnings", "split_rule", "orientation", "channels",
                                                      "baseline_purity", "certification", "arrays",
                                                      "max_abs_logit_diff", "export", "seconds", "report",
                                                      "provenance")})
    return out


def print_layer(out: dict, top_k: int) -> None:
    """One line per split channel (k, best rho, purity before, after and its baseline, concepts), the baseline,
    the logit check and the report's path."""
    rows = sorted(out["channels"].items(), key=lambda kv: -kv[1]["purity_gain"])
    for w in out.get("warnings", []):
        print(f"WARNING: {w}")
    print(f"{'channel':>7} {'k':>2} {'best rho':>8} {'purity before':>14} {'after':>14} {'baseline':>14} "
          f"{'AUC before':>17} {'after':>17}  concepts")
    for c, ch in rows:
        before, after, base = (per_concept(ch["purity"][key]) for key in ("original", "concepts", "baseline"))
        auc = [per_concept(ch["auc"][key], ".2f") for key in ("original", "concepts")]
        signs = ch.get("orientation") or [1] * len(ch["class_names"])
        names = " | ".join(", ".join(n) + (" (-)" if s < 0 else "") for n, s in zip(ch["class_names"], signs))
        flags = "; ".join(f"D{j}: {', '.join(fl)}" for j, fl in enumerate(ch["flags"], 1) if fl)
        print(f"{c:>7} {len(ch['concepts']):>2} {ch['best_rho']:>8.2f} {before:>14} {after:>14} {base:>14} "
              f"{auc[0]:>17} {auc[1]:>17}  {names}" + (f"  [flagged: {flags}]" if flags else ""))
    b = out["baseline_purity"]
    if b["mean"] is not None:
        print(f"purity of the concept channels: {b['concept_channels_mean']:.0%}; baseline: {len(b['channels'])} "
              f"random channels that are no candidate, share of their top-{top_k} images in the n classes each is "
              f"most relevant to on the training images (n = each concept's number of classes): {b['mean']:.0%}")
    if any(s < 0 for ch in out["channels"].values() for s in ch.get("orientation") or []):
        print("(-): a concept served by its unit going down, read as -activation (--orientation gradient)")
    print_certification(out)
    print(f"max |logit difference| of the one network: {out['max_abs_logit_diff']:.3g}; done in {out['seconds']:.1f} s")
    print(f"report: {out['report']}")


def print_certification(out: dict) -> None:
    """One line per concept unit of the ablation pass (its own effect and the original's, the shares that certify
    it, the largest collateral) and how many are certified."""
    cert = out.get("certification")
    if not cert:
        return
    print(f"{'channel':>7} {'unit':>4} {'own':>7} {'original':>8} {'own share':>9} {'cross share':>11} "
          f"{'elsewhere':>9}  certified  largest collateral")
    num = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    for c, ch in out["channels"].items():
        for j, e in enumerate(ch["effects"], 1):
            print(f"{c:>7} {'D' + str(j):>4} {num(e['own']):>7} {num(e['own_original']):>8} "
                  f"{num(e['own_share'], '.0%'):>9} {num(e['cross_share'], '.0%'):>11} {num(e['elsewhere'], '.0%'):>9}  "
                  f"{'yes' if e['certified'] else 'no':<9}  {e['collateral']:.3f} ({e.get('collateral_class_name') or '-'})")
    t = cert["tolerance"]
    what = ("the relative change of each image's output (features)" if cert.get("measure") == "features"
            else "each image's own-class logit")
    print(f"certified: {cert['certified']} of {cert['concept_units']} concept units ({what}, units ablated to their "
          f"{cert['reference']} output, {cert['images']} validation images; own share >= {1 - t:.0%}, cross share "
          f"and elsewhere <= {t:.0%})")


def print_clusters(out: dict) -> None:
    """One line per unit split by its clusters (k, the clusters' cosine, AUC and purity before and after, and where
    the images have labels the class each concept unit's top images mostly hold), the output check and the report."""
    print(f"{'unit':>6} {'k':>2} {'cosine':>6} {'AUC before':>17} {'after':>17} {'purity before':>14} {'after':>14}"
          + ("  concept units' top images mostly" if out["labelled"] else ""))
    for c, ch in out["channels"].items():
        auc = [per_concept(ch["auc"][key], ".2f") for key in ("original", "concepts")]
        pur = [per_concept(ch["purity"][key]) for key in ("original", "concepts")]
        lab = ch.get("labels")
        mostly = " | ".join(f"{lab[f'D{j}']['name']} {lab[f'D{j}']['share']:.0%}"
                            for j in range(1, len(ch["concepts"]) + 1)) if lab else ""
        print(f"{c:>6} {len(ch['concepts']):>2} {ch['closest']:>6.2f} {auc[0]:>17} {auc[1]:>17} {pur[0]:>14} "
              f"{pur[1]:>14}  {mostly}".rstrip())
    print(f"concepts from clusters of each unit's top {out['top_n']} training images: {out['candidates']} of "
          f"{out['units']} units have 2+, {len(out['channels'])} split; AUC and purity are for each concept's "
          f"held-out images ({out['held_out']})" + ("; labels read only for the last column" if out["labelled"] else ""))
    print_certification(out)
    print(f"max |output difference| of the one network: {out['max_abs_logit_diff']:.3g}; done in {out['seconds']:.1f} s")
    print(f"report: {out['report']}")


def cli() -> None:
    """The command line (the script's and the console script's): flags from sys.argv."""
    run_cli(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
