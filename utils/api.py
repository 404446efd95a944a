"""The Python API: what a notebook has (an ``nn.Module``, its layer, Datasets or DataLoaders of ``(image,
label)``) in, results as objects out. The commands run the same functions.

    import disentangle_channels as dc
    result = dc.disentangle(model, train_set, val_set, layer="layer4.2.conv3", input_size=224)
    result.network                  # the split network: same logits, one unit per concept
    result.channels[1660].concepts  # per split channel: concepts, best rho, index sets, scores, purity, AUC
    result.units(x)                 # {channel: B x k x H x W}: every split channel's concept activations
    result.report("report")         # the HTML report (result.html(): the same page, self-contained)
    result.save("split"); dc.load("split", model)

The stages one by one: :func:`importances` (stage 1, a store), :func:`polysemantic_pairs` (stage 2),
:func:`split_channel` (stage 3) and :func:`evaluate_channel` (stage 4).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .data.images import Preprocess
from .data.datasets import Datasets, is_datasets
from .defaults import (ABLATION, CERTIFY_TOLERANCE, CLUSTER_K0, CLUSTER_MIN_IMAGES, CLUSTER_TOP_N, DEFAULT_GAMMA,
                       DEFAULT_P, DEFAULT_TAU, EFFECTS_PER_CLASS, STEER)
from .passes.device import resolve_device
from .errors import UserError, api_errors
from .stages.evaluation import Stage4Config, run_stage4
from .stages.layer import LayerConfig, disentangle_layer
from .stages.layer_clusters import ClustersConfig, disentangle_clusters
from .model.loading import LoadedModel, loaded_model, module_weights_id as _weights_id
from .data.preprocess import InputSpec, as_preprocess
from .store.provenance import running
from .store.records import records_dir, store_record
from .stages.result import Result, load  # noqa: F401 - part of the API
from .stages.candidates import find_pairs
from .stages.relevance import Stage1Config, accuracy_lines, compute_relevance
from .stages.splitting import Stage3Config, disentangle_channel
from .store.layout import Store

__all__ = ["Data", "prepare", "importances", "polysemantic_pairs", "split_channel", "evaluate_channel", "disentangle",
           "Result", "load"]


@dataclass
class Data:
    """A model made ready and its images, as every stage function takes them (see :func:`prepare`)."""

    loaded: LoadedModel
    data: Datasets | str  # Datasets, or an ImageFolder root holding train/ and val/
    store_dir: str
    keep: object = None  # the temporary store folder, removed with this object

    @property
    def transform(self) -> Preprocess:
        return self.loaded.preprocess

    def __repr__(self) -> str:  # never the whole model
        return (f"Data({self.loaded.name} ({self.loaded.weights}), {self.data!r}, store_dir={self.store_dir!r}"
                f"{' (temporary)' if self.keep is not None else ''})")


class TemporaryStore:
    """A store folder removed when the last object holding it goes (or at exit), unless :meth:`keep` is called:
    after a fault, what was written stays for the caller to read."""

    def __init__(self):
        self.name = tempfile.mkdtemp(prefix="disentangle_channels-")
        self._remove = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def keep(self) -> str:
        self._remove.detach()
        return self.name


def _transform(train, transform, input_size, resize, mean, std) -> Preprocess:
    """The input transform: ``transform`` (a Preprocess or a dict of its fields), else the flags' values over the
    default (Resize 256, CenterCrop 224, ImageNet statistics); a dataset of tensors sets the input size to its own."""
    asked = SimpleNamespace(input_size=input_size, resize=resize, mean=mean, std=std)
    pre = as_preprocess(transform) if transform is not None else InputSpec.of(asked).applied(Preprocess())
    if is_datasets(train) and train.splits["train"] is not None:
        image = train.item("train", 0)[0]
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[-1] != image.shape[-2]:
                raise UserError(f"the training images are tensors of shape {tuple(image.shape)}; give square "
                                "C x N x N tensors (or PIL images, which the transform makes square)")
            side = int(image.shape[-1])
            pre = dataclasses.replace(pre, resize=side, crop=side)
    return pre


@api_errors
def prepare(model: nn.Module, train=None, val=None, *, name: str | None = None, classes=None, transform=None,
            input_size: int | None = None, resize: int | None = None, mean=None, std=None,
            store_dir: str | None = None, labels_optional: bool = False) -> Data:
    """Make ``model`` ready (a copy: eval mode, frozen, probed with one image of the input size) and wrap the
    images. ``train``/``val``: Datasets or DataLoaders of ``(image, label)`` (a label is the logit index), or
    ``train`` an ImageFolder root holding ``train/`` and ``val/``. ``name``: the model's name in reports and folder
    names (default: its class name). ``classes``: names of the labels.
    ``transform``: a :class:`Preprocess` or a dict of its fields; else ``input_size``/``resize``/``mean``/``std``
    (as the commands' flags). PIL images go through it; tensor images are fed as they are (their normalisation
    is ``mean``/``std``, used to show them). ``store_dir``: where stage 1's store goes (default: a temporary
    folder that lives as long as the returned object). ``labels_optional``: items may be images alone and labels
    need not be the model's logit indices (for concepts from clusters, which read no label)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be an nn.Module, not a {type(model).__name__}")
    if isinstance(train, (str, os.PathLike)):
        if val is not None:
            raise UserError("give either an ImageFolder root (train/ and val/ inside) or train and val datasets")
        data = os.fspath(train)
    else:
        data = Datasets(train, val, classes, name=type(_first(train, val)).__name__, labels_optional=labels_optional)
    pre = _transform(data, transform, input_size, resize, mean, std)
    if is_datasets(data):
        data.mean, data.std = pre.mean, pre.std
    net = copy.deepcopy(model)
    label = name or type(model).__name__
    names = data.names() if is_datasets(data) else None
    lm = loaded_model(net, label, _weights_id(net), names, pre)
    if is_datasets(data) and not labels_optional:  # before any pass: a label is a logit index (read without images where kept)
        for split in ("train", "val"):
            top = max(data.labels(split), default=-1) if data.splits[split] is not None else -1
            if top >= lm.num_classes:
                raise UserError(f"the {split} data of {data.name} has label {top} but the model has {lm.num_classes} outputs: a label is "
                                "the index of its class's logit")
    keep = None
    if store_dir is None:
        keep = TemporaryStore()
        store_dir = keep.name
    return Data(lm, data, store_dir, keep)


def _first(*ds):
    for d in ds:
        if d is not None:
            return getattr(d, "dataset", d) if isinstance(d, torch.utils.data.DataLoader) else d
    raise UserError("no images given: pass train (and val) Datasets, or an ImageFolder root")


def _count(name: str, v, least: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise UserError(f"{name} must be a whole number >= {least}, not {v!r}")


def _run_options(d: Data, layer, batch_size: int, device: str, num_workers: int, progress: bool) -> dict:
    """The options every image pass takes; the caller's numbers and device checked first."""
    if not isinstance(d, Data):
        raise UserError(f"the first argument must be what prepare() returns, not a {type(d).__name__}")
    if layer is not None and not isinstance(layer, str):
        raise UserError(f"layer must be a module's dotted name (a str, e.g. 'layer4.2.conv3'), not {layer!r}")

    resolve_device(str(device))
    return {"model": d.loaded.name, "weights": d.loaded.weights, "layer": layer, "batch_size": batch_size,
            "device": device, "num_workers": num_workers, "progress": progress, "data_dir": d.data,
            "store_dir": d.store_dir}


@api_errors
def importances(d: Data, layer: str | None = None, *, positions: str = "auto", precision: str = "fp32",
                batch_size: int = 64, device: str = "auto", num_workers: int = 0, progress: bool = True,
                wait: bool = False):
    """Stage 1: the relevance of every unit of ``layer`` for every training image, into ``d.store_dir``;
    returns the :class:`utils.store.layout.Store` (``.relevance``, ``.accuracy``, ...). ``precision``: fp32, or bf16 or
    fp16 autocast for the pass (as ``get_importances_for_classes.py --precision``). A store that is complete is
    read, not recomputed; one that another job is writing is refused, or waited for with ``wait=True``."""
    with running("disentangle_channels.importances"):
        s = compute_relevance(Stage1Config(**_run_options(d, layer, batch_size, device, num_workers, progress),
                                             positions=positions, precision=precision, wait=wait),
                                 loaded=d.loaded)
    return Store.open(s["store"])


@api_errors
def polysemantic_pairs(store, tau: float = DEFAULT_TAU, p: float = DEFAULT_P, gamma_high: float = DEFAULT_GAMMA):
    """Stage 2 on a store: candidates, their ARVs and the gamma-polysemantic pairs (``.pairs``: dicts of channel,
    class1, class2, cosine_similarity; :class:`utils.stages.candidates.Stage2Result`).

    The defaults are the paper's and :func:`disentangle`'s (tau 0.03, p 0.75, gamma_high 0.5), so the pairs are
    those the layer pipeline splits. ``get_cosine_similarities.py`` keeps the authors' script defaults (tau 0.05,
    ``--cos_sim_high 1.0``: every pair less alike than 1, for browsing). Pass the same ``tau`` to
    :func:`evaluate_channel`."""
    if not isinstance(store, Store):
        raise UserError(f"store must be what importances() returns, not a {type(store).__name__}")

    return find_pairs(store, tau=tau, p=p, gamma_high=gamma_high)


@api_errors
def split_channel(d: Data, channel: int, concepts, layer: str | None = None, *, split_rule: str = "paper",
                  batch_size: int = 64, device: str = "auto", num_workers: int = 0, progress: bool = True):
    """Stage 3: split ``channel`` between ``concepts`` (lists of class indices) after :func:`importances`;
    writes its record into ``d.store_dir/models_disentangled`` and returns it (:class:`utils.store.records.Record`)."""
    with running("disentangle_channels.split_channel"):
        cfg = Stage3Config(**_run_options(d, layer, batch_size, device, num_workers, progress), channel=channel,
                           concepts=[list(c) for c in concepts], split_rule=split_rule)
        rec, sw = disentangle_channel(cfg, loaded=d.loaded)
        rec, _ = store_record(d.store_dir, rec, sw)
    return rec


@api_errors
def evaluate_channel(d: Data, channel: int, concepts, layer: str | None = None, *, tau: float = DEFAULT_TAU,
                     out_dir: str | None = None, purity_k: int = 0, batch_size: int = 64, device: str = "auto",
                     num_workers: int = 0, progress: bool = True) -> dict:
    """Stage 4 of a channel split by :func:`split_channel`: relative attributions on the concepts' validation
    images with relevance >= ``tau`` (give the tau the pairs were found with), fraction tables and density plots
    in ``out_dir`` (default: ``d.store_dir/results``); its summary."""
    opts = _run_options(d, layer, batch_size, device, num_workers, progress)
    opts.pop("store_dir")
    with running("disentangle_channels.evaluate_channel"):
        cfg = Stage4Config(**opts, model_dir=records_dir(d.store_dir), channel=channel,
                           concepts=[list(c) for c in concepts], purity_k=purity_k, tau=tau,
                           out_dir=out_dir or os.path.join(d.store_dir, "results"))
        return run_stage4(cfg, loaded=d.loaded, log=lambda *a: None)


@api_errors
def disentangle(model: nn.Module, train, val=None, layer: str | None = None, *, name: str | None = None,
                classes=None, transform=None,
                input_size: int | None = None, resize: int | None = None, mean=None, std=None,
                store_dir: str | None = None, out_dir: str | None = None, positions: str = "auto",
                precision: str = "fp32",
                tau: float = 0.03, p: float = 0.75, gamma_high: float = 0.5, min_concepts: int = 2,
                max_channels: int | None = None, channels: list[int] | None = None, split_rule: str = "function",
                orientation: str = "gradient", concepts: str = "classes", top_n: int = CLUSTER_TOP_N,
                clusters: int = CLUSTER_K0, min_images: int = CLUSTER_MIN_IMAGES, ablation: str = ABLATION,
                steer: float | None = STEER, effects_per_class: int = EFFECTS_PER_CLASS,
                certify_tolerance: float = CERTIFY_TOLERANCE, top_k: int = 12,
                check_images: int = 32, seed: int = 0, batch_size: int = 64,
                device: str = "auto", num_workers: int = 0, progress: bool = True, wait: bool = False,
                log=print) -> Result:
    """The layer pipeline in one call: stage 1 (into ``store_dir``, default a temporary folder), every
    polysemantic unit's concepts from the data, each split into one unit per concept, all in one network,
    evaluated on ``val`` (purity, ROC AUC, stage 4) and drawn; returns a :class:`Result`.

    ``train``/``val``, ``name`` (the model's name in reports and folders; default: its class name), ``classes``,
    ``transform``, ``input_size``, ``resize``, ``mean``, ``std``: see :func:`prepare`. The rest are the layer command's settings (``disentangle_layer.py --help``): ``tau``,
    ``p``, ``gamma_high`` (its ``--cos_sim_high``), ``min_concepts``, ``max_channels``, ``channels``,
    ``split_rule`` (``function``, ``search``, ``paper`` or ``positive``), ``orientation`` (``gradient`` or ``none``), ``top_k``,
    ``check_images``, ``seed``; ``positions``, ``precision`` and ``wait`` are stage 1's
    (see :func:`importances`). ``log``: where progress lines go (None: nowhere). ``ablation`` (``mean``, ``zero`` or
    ``none``), ``steer`` (None: no steering), ``effects_per_class`` and ``certify_tolerance``: the proof of each split
    (one ablation-and-steering pass; ``result.channels[c].effects`` and ``.certified``, ``result.arrays()``).

    ``concepts="clusters"``: no label and no class head needed (``disentangle_layer.py --concepts clusters``): no
    store; each unit's ``top_n`` strongest training images clustered (k-means with ``clusters`` groups, those under
    ``min_images`` dropped, those at least ``gamma_high`` alike merged), every unit with two or more concepts split
    between them (``channels``/``max_channels`` choose among them) and evaluated on ``val`` (or a held-out fifth
    of ``train``). ``train`` may be a folder of images with or without class folders, or a Dataset whose items
    are images alone; ``model`` may be headless (its output a feature vector or map). Labels, where given, only
    say which class each concept unit's top images mostly hold. ``tau``, ``p``, ``split_rule``, ``orientation``,
    ``positions`` (unless a Linear's), ``precision`` and ``wait`` are the labelled path's."""
    if concepts not in ("classes", "clusters"):
        raise UserError(f"concepts must be 'classes' or 'clusters', not {concepts!r}")
    if max_channels is not None:
        _count("max_channels", max_channels, 1)  # None: all of them
    if log is not None and not callable(log):
        raise UserError(f"log must be a function such as print, or None, not {type(log).__name__}")
    if concepts == "clusters":
        return _disentangle_clusters(model, train, val, layer, name=name, classes=classes, transform=transform,
                                     input_size=input_size, resize=resize, mean=mean, std=std, store_dir=store_dir,
                                     out_dir=out_dir, positions=positions, gamma_high=gamma_high,
                                     max_channels=max_channels, channels=channels, top_n=top_n, clusters=clusters,
                                     min_images=min_images, ablation=ablation, top_k=top_k,
                                     check_images=check_images, seed=seed,
                                     batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
                                     log=log)
    with running("disentangle_channels.disentangle"):
        d = prepare(model, train, val, name=name, classes=classes, transform=transform, input_size=input_size,
                    resize=resize, mean=mean, std=std, store_dir=store_dir)
        store = importances(d, layer, positions=positions, precision=precision, batch_size=batch_size,
                            device=device, num_workers=num_workers, progress=progress, wait=wait)
        for line in accuracy_lines(store.accuracy, int((store.class_counts > 0).sum())) if log else []:
            log(line)
        cfg = LayerConfig(**_run_options(d, store.meta["layer"], batch_size, device, num_workers, progress),
                          tau=tau, p=p, gamma_high=gamma_high, min_concepts=min_concepts, max_channels=max_channels,
                          channels=channels, split_rule=split_rule, orientation=orientation, top_k=top_k,
                          check_images=check_images, ablation=ablation, steer=steer,
                          effects_per_class=effects_per_class, certify_tolerance=certify_tolerance,
                          seed=seed, out_dir=out_dir)
        summary = disentangle_layer(cfg, loaded=d.loaded, log=log or (lambda *a: None))
    return _result(summary, model, d, store.accuracy)


def _disentangle_clusters(model, train, val, layer, *, name, classes, transform, input_size, resize, mean, std,
                          store_dir, out_dir, positions, gamma_high, max_channels, channels, top_n, clusters,
                          min_images, ablation, top_k, check_images, seed, batch_size, device, num_workers, progress,
                          log) -> Result:
    """:func:`disentangle` with concepts from clusters (no store)."""
    with running("disentangle_channels.disentangle"):
        d = prepare(model, train, val, name=name, classes=classes, transform=transform, input_size=input_size,
                    resize=resize, mean=mean, std=std, store_dir=store_dir, labels_optional=True)
        for what, v, least in (("top_n", top_n, 2), ("clusters", clusters, 2), ("min_images", min_images, 1)):
            _count(what, v, least)
        cfg = ClustersConfig(**_run_options(d, layer, batch_size, device, num_workers, progress), top_n=top_n,
                             clusters=clusters, min_images=min_images, gamma_high=gamma_high, channels=channels,
                             max_channels=max_channels, check_images=check_images, top_k=top_k, positions=positions,
                             ablation=ablation,
                             seed=seed, out_dir=out_dir)
        summary = disentangle_clusters(cfg, loaded=d.loaded, log=log or (lambda *a: None))
    return _result(summary, model, d, None)


def _result(summary: dict, model: nn.Module, d: Data, accuracy: float | None) -> Result:
    """The :class:`Result` of a finished run; the outputs are kept whatever happens here."""
    try:
        return Result.from_summary(summary, model, d.transform, keep=d.keep, accuracy=accuracy)
    except (UserError, RuntimeError, KeyError, OSError) as e:  # the work is done: never delete it with the fault
        kept = d.keep.keep() if d.keep is not None else d.store_dir
        raise UserError(f"the split network could not be loaded back ({str(e).splitlines()[0]}); every output is "
                        f"kept in {summary.get('out_dir') or kept} and the store in {kept}") from None
