"""What :func:`utils.api.disentangle` returns: the split network, per split unit its concepts and scores, the
concept units' activations, the report, and a folder that saves and loads it from anywhere."""
from __future__ import annotations

import base64
import html
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.images import Preprocess, read_rgb
from ..errors import UserError, api_errors
from ..files import read_json, write_json
from ..report.style import per_concept
from ..model.surgery import checkpoint_splits, checkpoint_transform, load_checkpoint
from ..model.units import Unit

RESULT_FILE = "result.json"
NETWORK_FILE = "disentangled.pt"


@dataclass(frozen=True)
class ChannelSplit:
    """One split unit: its ``concepts`` (class indices) and their ``class_names``; ``best_rho``; ``inputs[j]``:
    the layer's input channels that concept j's filter keeps at the best rho, ``shared``: those the residual
    keeps; ``scores``: every rho's score; ``purity`` and ``auc``: ``{"original": [...], "concepts": [...]}`` per
    concept (purity's ``baseline`` too), ``pair_auc`` the same for each concept against the other concepts' images;
    ``flags``: per concept unit what to be wary of; ``columns``: the split layer's ``expanded`` outputs that are its
    concept units D_1 .. D_k; ``orientation``: per concept +1, or -1 where the concept is served by the unit going
    down (every reading of it above is of -activation); ``search``: how a searched split's sets were found (None
    for the other rules); ``by_relevance``: per concept its reference images by relevance (``indices``, ``labels``,
    ``relevance``, ``paths``: the validation images where the concept unit contributes most to their own logit);
    ``effects``: per concept what ablating and steering its concept unit does to the network's decisions and whether
    it is certified (:func:`utils.method.effects.concept_effect`; None without an ablation pass)."""

    channel: int
    concepts: list[list[int]]
    class_names: list[list[str]]
    best_rho: float
    inputs: list[list[int]]
    shared: list[int]
    scores: dict[float, float]
    purity: dict
    auc: dict
    flags: list[list[str]]
    columns: list[int]
    pair_auc: dict | None = None
    orientation: list[int] | None = None
    search: dict | None = None
    by_relevance: list[dict] | None = None
    effects: list[dict] | None = None

    @property
    def k(self) -> int:
        return len(self.concepts)

    @classmethod
    def of(cls, channel: int, ch: dict, columns: list[int]) -> "ChannelSplit":
        at = ch["sources"][f"{float(ch['best_rho']):.2f}"]
        k = len(ch["concepts"])
        return cls(channel, ch["concepts"], ch["class_names"], ch["best_rho"],
                   [at[f"concept{j}"] for j in range(1, k + 1)], at["shared"],
                   {float(r): v for r, v in ch["scores"].items()}, ch["purity"], ch["auc"], ch["flags"], columns,
                   ch.get("pair_auc"), ch.get("orientation") or [1] * k, ch.get("search"), ch.get("by_relevance"),
                   ch.get("effects"))

    @property
    def certified(self) -> list[bool] | None:
        """Per concept, whether its concept unit is certified by ablation (None without an ablation pass)."""
        return None if self.effects is None else [bool(e["certified"]) for e in self.effects]


class Result:
    """The split ``network`` (an ``nn.Module``: the same logits as the original), its ``layer`` and
    ``positions``, ``channels`` (channel -> :class:`ChannelSplit`), the input ``transform``, the model's
    ``accuracy`` on the training images as fed, ``warnings`` (what to know before reading any split, e.g. a
    model near chance) and ``summary`` (the layer command's ``layer.json``)."""

    def __init__(self, network: nn.Module, summary: dict, transform: Preprocess, folder: str, keep=None,
                 accuracy: float | None = None):
        self.network, self.summary, self.transform, self.folder = network.eval(), summary, transform, folder
        self.layer, self.positions, self.accuracy = summary["layer"], summary.get("positions", "all"), accuracy
        self.warnings: list[str] = list(summary.get("warnings", []))
        self._keep = keep  # a temporary store folder: lives as long as this result
        C = Unit(network.get_submodule(self.layer).merge).out_channels
        nxt, self.channels = C, {}
        for c in checkpoint_splits(os.path.join(folder, NETWORK_FILE))[self.layer]:  # the split layer's order
            ch = summary["channels"][str(c)]
            k = len(ch["concepts"])
            self.channels[c] = ChannelSplit.of(c, ch, [c] + list(range(nxt, nxt + k - 1)))
            nxt += k

    def __repr__(self) -> str:
        return "".join(f"WARNING: {w}\n" for w in self.warnings) + (
            f"Result({self.summary['model']} {self.layer}: {len(self.channels)} split units "
            f"{sorted(self.channels)[:8]}{' ...' if len(self.channels) > 8 else ''})")

    @classmethod
    def from_summary(cls, summary: dict, model: nn.Module, transform: Preprocess, keep=None,
                     accuracy: float | None = None) -> "Result":
        folder = os.path.dirname(summary["report"])
        net = load_checkpoint(summary["export"], model)
        return cls(net, summary, transform, folder, keep, accuracy)

    @api_errors
    @torch.no_grad()
    def units(self, x: torch.Tensor, pooled: bool = False) -> dict[int, torch.Tensor]:
        """Every split unit's k concept activations for the batch ``x`` (already transformed, ``self.transform``):
        ``{channel: B x k x H x W}`` at the positions that count (a Linear's tokens: N x 1; the class token alone:
        1 x 1); ``pooled``: their sum over those positions, ``B x k`` (the sum, as the toolkit ranks images and
        scores splits everywhere else)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise UserError(f"x must be a batch of images, a B x C x H x W tensor, not "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        expanded = self.network.get_submodule(self.layer).expanded
        got = {}
        hook = expanded.register_forward_hook(lambda m, i, o: got.__setitem__("a", o))
        try:
            p = next(self.network.parameters())
            self.network(x.to(p.device, p.dtype))
        except RuntimeError as e:
            raise UserError(f"the network does not take x of shape {tuple(x.shape)} (the transform makes "
                            f"{self.transform.crop} x {self.transform.crop} images): {str(e).splitlines()[0]}") from None
        finally:
            hook.remove()
        a = Unit(expanded, self.positions).counted(got["a"])
        out = {c: a[:, s.columns] for c, s in self.channels.items()}
        return {c: v.sum((2, 3)) for c, v in out.items()} if pooled else out

    @api_errors
    def reference_images(self, channel: int, j: int) -> torch.Tensor:
        """Concept j's (1-based) reference images of split unit ``channel`` (the validation images where its concept
        unit contributes most to their own logit, ``channels[channel].by_relevance``) as the network takes them:
        an n x 3 x H x W tensor through ``self.transform``; ``arrays()["heatmap_<channel>_D<j>"]`` are their
        heatmaps, in the same order."""
        if channel not in self.channels:
            raise UserError(f"unit {channel} is not split here; split units: {sorted(self.channels)}")
        refs = self.channels[channel].by_relevance or []
        if not 1 <= j <= len(refs):
            raise UserError(f"unit {channel} has {len(refs)} concepts with reference images; j must be 1 to {len(refs)}")
        paths = refs[j - 1].get("paths") or []
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"reference image {missing[0]} is not there (images given as a Dataset have no file); "
                            "read them from your dataset by refs['indices']")
        return torch.stack([self.transform(read_rgb(p)) for p in paths]) if paths else torch.zeros(0)

    @api_errors
    def arrays(self) -> dict:
        """The arrays behind the report (numpy, read from the folder's ``arrays.npz`` without pickle): every
        validation image's activation of each original and concept unit (``act_index``, ``act_labels``,
        ``act_<c>_original``, ``act_<c>_D<j>``), the ablation pass (``effects_names``, ``effects_index``,
        ``effects_labels``; ``effects_logit``, ``effects_prob``, ``effects_correct``: per image its own class, intact
        (column 0) and under each intervention; ``effects_dlogit``, ``effects_dprob``: per intervention the mean
        change of every class) and the conditional heatmaps of each concept's reference images
        (``heatmap_<c>_D<j>``, n x H x W, with ``heatmap_<c>_D<j>_index``); the reference images themselves:
        :meth:`reference_images`."""
        path = os.path.join(self.folder, "arrays.npz")
        if not os.path.isfile(path):
            raise UserError(f"{self.folder} holds no arrays.npz (a result from before it was written)")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    @api_errors
    def report(self, path: str) -> str:
        """Write the HTML report (with its pictures and plots) into the folder ``path``; its page's path."""
        os.makedirs(path, exist_ok=True)
        for name in ("pictures", "plots"):
            if os.path.isdir(os.path.join(self.folder, name)):
                shutil.copytree(os.path.join(self.folder, name), os.path.join(path, name), dirs_exist_ok=True)
        shutil.copy2(os.path.join(self.folder, "report.html"), os.path.join(path, "report.html"))
        return os.path.join(path, "report.html")

    def html(self) -> str:
        """The report as one self-contained page (pictures inlined): ``IPython.display.HTML(result.html())``."""
        with open(os.path.join(self.folder, "report.html"), encoding="utf-8") as f:
            page = f.read()

        def inline(m: re.Match) -> str:
            path = os.path.join(self.folder, html.unescape(m[2]))
            if not os.path.isfile(path):
                return m[0]
            with open(path, "rb") as f:
                return f'{m[1]}="data:image/png;base64,{base64.b64encode(f.read()).decode()}"'

        return re.sub(r'(src|href)="([^"#:]+\.png)"', inline, page)

    def show(self, height: int = 900) -> "Page":
        """The report inside a notebook (the cell's value): a frame holding :meth:`html`, so its styles stay its own."""
        return Page(f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" style="width: 100%; height: {height}px; '
                    'border: 1px solid #ccc"></iframe>')

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{c}</td><td>{s.k}</td><td>{html.escape(' | '.join(', '.join(n) for n in s.class_names))}</td>"
            f"<td>{s.best_rho:.2f}</td><td>{per_concept(s.purity['original'])}</td><td>{per_concept(s.purity['concepts'])}</td></tr>"
            for c, s in self.channels.items())
        return (f"<p>{html.escape(repr(self))}</p><table><tr><th>unit</th><th>k</th><th>concepts</th><th>best rho</th>"
                f"<th>purity before</th><th>after</th></tr>{rows}</table>")

    @api_errors
    def save(self, path: str) -> str:
        """Save into the folder ``path``, self-contained: the network, the transform, the summary, the report and
        every file it names (stage 4's tables, plots, pictures, each split's record under ``records/``), with
        paths relative to ``path``. Load it with :func:`load` from any working directory, after the store it came
        from is gone. ``result.json`` is written last: a folder without it is not a saved result."""
        path = os.fspath(path)
        if os.path.abspath(path) != os.path.abspath(self.folder):
            os.makedirs(path, exist_ok=True)
            for name in os.listdir(self.folder):
                src, dst = os.path.join(self.folder, name), os.path.join(path, name)
                if name in (RESULT_FILE, "layer.json"):  # result.json (below) replaces the layer command's
                    continue
                if os.path.isdir(src):
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, dst)
        summary = _relocated(self.summary, self.folder, path)
        write_json(os.path.join(path, RESULT_FILE), {"summary": summary, "transform": self.transform.to_json(),
                                                      "accuracy": self.accuracy})
        return path


def _relocated(summary: dict, old: str, new: str) -> dict:
    """``summary`` with every path under the folder ``old`` relative (to the saved folder ``new``), and each split's
    record (it lives in the stage-1 store, which may be temporary) copied into ``new/records/``."""
    old_abs = os.path.abspath(old) + os.sep

    def move(v):
        if isinstance(v, dict):
            return {k: (_record(x) if k == "record" and isinstance(x, str) else move(x)) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, str) and (os.path.abspath(v) + os.sep).startswith(old_abs):
            return os.path.relpath(os.path.abspath(v), os.path.abspath(old))
        return v

    def _record(src: str) -> str | None:
        if not os.path.isabs(src):
            src = os.path.join(old, src)
        if not os.path.isdir(src):
            return None
        rel = os.path.join("records", os.path.basename(os.path.normpath(src)))
        if os.path.abspath(os.path.join(new, rel)) != os.path.abspath(src):
            shutil.copytree(src, os.path.join(new, rel), dirs_exist_ok=True)
        return rel

    return move(summary)


def _resolved(summary: dict, folder: str) -> dict:
    """A saved summary's relative paths as absolute paths into ``folder`` (the inverse of :func:`_relocated`)."""
    def back(v, key=""):
        if isinstance(v, dict):
            return {k: back(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [back(x, key) for x in v]
        if isinstance(v, str) and key in PATH_KEYS and not os.path.isabs(v):
            return os.path.abspath(os.path.join(folder, v))
        return v

    return back(summary)


PATH_KEYS = {"record", "plots", "csv", "out_dir", "teaser", "export", "report", "arrays", "heatmaps", "relevance"}


class Page:
    """HTML that a notebook shows as a cell's value."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text


@api_errors
def load(path: str, model: nn.Module | None = None) -> Result:
    """A :class:`Result` saved by :meth:`Result.save` (or the layer command's output folder). ``model``: the
    original network (its architecture; needed unless the checkpoint's model can be built by name: a
    torchvision or timm name, or an own file)."""
    if not os.path.isdir(path):
        raise UserError(f"no saved result {path}")
    saved = os.path.join(path, RESULT_FILE)
    if os.path.isfile(saved):
        obj = read_json(saved)
        summary, transform, accuracy = (_resolved(obj["summary"], path), Preprocess.from_json(obj["transform"]),
                                        obj.get("accuracy"))
    elif os.path.isfile(os.path.join(path, "layer.json")):
        summary, accuracy = read_json(os.path.join(path, "layer.json")), None
        transform = checkpoint_transform(os.path.join(path, NETWORK_FILE)) or Preprocess()
    else:
        raise UserError(f"{path} holds no {RESULT_FILE} (Result.save) nor layer.json (the layer command)")
    try:
        net = load_checkpoint(os.path.join(path, NETWORK_FILE), model)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"the network in {path} does not fit the model given: {str(e).splitlines()[0]}") from None
    except UserError as e:
        if model is not None:
            raise
        raise UserError(f"{e}; pass the original network: load({path!r}, model)") from None
    return Result(net, summary, transform, path, accuracy=accuracy)

