"""Stage 4 (get_results.py): attribution and activations against independent computations, the planted
network's known answer, plots and pgfplots data, the summary table, the shell scripts and the CLI."""
from __future__ import annotations

import argparse
import csv
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import get_results
from conftest import arv_autograd, class_index_for, make_record
from utils.data.images import list_images, make_loader
from utils.errors import UserError
from utils.stages.evaluation import Activations, Stage4Config, evaluate_batch, relative_attribution, run_stage4
from utils.model.loading import LoadedModel, get_layer
from utils.report.plots import density_curves, density_plot, fit_kde, pgfplots_blocks, write_pgfplots
from utils.store.records import load_split
from utils.model.hooks import layer_input
from utils.report.tables import fraction_rows, read_rows_csv, summarize, write_rows_csv
from utils.method.split import assign_inputs
from utils.store.records import disentangle_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The paper's 20 triples (channel, class1, class2), as listed at the end of docs/ALGORITHM.md.
PAPER_TRIPLES = [(522, 62, 687), (1404, 385, 834), (895, 631, 946), (242, 515, 619), (522, 61, 687),
                 (1660, 530, 938), (242, 515, 846), (242, 619, 808), (895, 467, 946), (242, 808, 846),
                 (1349, 27, 889), (1832, 852, 984), (1773, 791, 958), (1349, 27, 486), (1698, 57, 515),
                 (1698, 57, 808), (1698, 58, 515), (1698, 58, 808), (1698, 53, 515), (1698, 53, 808)]


# ------------------------------------------------------------------ helpers


def class_arv(lm: LoadedModel, layer: str, channel: int, data_dir: str, t: int) -> torch.Tensor:
    """ARV(c, t) by autograd over class t's training images."""
    _, conv = get_layer(lm.model, layer)
    conv = conv.module  # the Conv2d itself
    images = list_images(data_dir, "train")
    xs = [layer_input(lm.model, conv, x) for x, _, _ in make_loader(images, images.indices_of([t]), 16, 0)]
    return arv_autograd(conv, channel, torch.cat(xs))


def read_pgfplots(path: str) -> dict[str, np.ndarray]:
    """Parse the ``filecontents*`` blocks of a .tex file into {name: (G x 2) array}, independently of utils.report.plots."""
    with open(path) as f:
        text = f.read()
    out = {}
    for m in re.finditer(r"\\begin\{filecontents\*\}(?:\[[^\]]*\])?\{([^}]*)\}\n(.*?)\\end\{filecontents\*\}", text, re.S):
        rows = [line.split() for line in m.group(2).splitlines()[1:] if line.strip()]
        out[m.group(1)] = np.array(rows, dtype=np.float64).reshape(-1, 2)
    return out


class TinyNet(nn.Module):
    """A small CNN whose layer of interest has a bias, stride 2, padding and a reflect padding mode."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.bn.running_mean.copy_(torch.randn(5, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)

    def forward(self, x):
        a = self.conv(torch.relu(self.stem(x)))
        return self.fc(torch.relu(self.bn(a)).mean((2, 3)))


def _tiny_loaded() -> LoadedModel:
    m = TinyNet().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return LoadedModel(m, "tiny", "tiny-v1", 3, None)


def _namespace(**kw) -> argparse.Namespace:
    argv = []
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k}")
        elif isinstance(v, list):
            argv += [f"--{k}", *map(str, v)]
        else:
            argv += [f"--{k}", str(v)]
    return get_results.get_args_parser().parse_args(argv)


# ------------------------------------------------------------------ the arithmetic


def test_attribution_and_activations_match_independent_computations(tmp_path):
    lm = _tiny_loaded()
    channel, C = 2, 5
    g = torch.Generator().manual_seed(3)
    A1 = torch.tensor([2.0, 0.1, 1.0, -1.0, 1.0, 0.5])
    A2 = torch.tensor([0.1, 2.0, 1.0, 0.3, 0.9, -0.2])
    rec = make_record(str(tmp_path), lm, "conv", channel, [[0], [1]], torch.stack([A1, A2]).double(), best_rho=0.5)
    assert set(assign_inputs(torch.stack([A1, A2]), 0.5).tolist()) == {0, 1, 2}  # all three sub-channels differ
    images = torch.randn(4, 3, 17, 19, generator=g)
    labels = torch.tensor([0, 2, 1, 0])

    got = evaluate_batch(lm.model, lm.model.conv, load_split(rec), images, labels)

    # sub-channels from the DISENTANGLED network: hook on the expanded conv of the split layer
    net = disentangle_model(lm.model, [rec])
    seen = {}
    h = net.conv.expanded.register_forward_hook(lambda m, i, o: seen.__setitem__("e", o))
    with torch.no_grad():
        net(images)
    h.remove()
    e = seen["e"].double().sum((2, 3))
    torch.testing.assert_close(got["sub"], e[:, [channel, C, C + 1]], rtol=1e-5, atol=1e-5)  # d1, d2, res

    # original activation and the attribution by plain autograd from the image
    x = images.clone().requires_grad_(True)
    kept = {}

    def keep(m, i, o):
        o.retain_grad()
        kept["a"] = o

    h = lm.model.conv.register_forward_hook(keep)
    logits = lm.model(x)
    h.remove()
    logits[torch.arange(4), labels].sum().backward()
    a = kept["a"]
    P = (a * a.grad).clamp_min(0).sum((2, 3)).double()
    torch.testing.assert_close(got["orig"], a[:, channel].detach().double().sum((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["rel"], P[:, channel] / P.sum(1), rtol=1e-5, atol=1e-6)
    # D1 + D2 - Res = W[c] (the bias enters b + b - b = b): the parts add up to the original
    d1, d2, res = got["sub"].T
    torch.testing.assert_close(d1 + d2 - res, got["orig"], rtol=1e-4, atol=1e-4)

    # each sub-channel's relevance for the image's own logit, by autograd through the DISENTANGLED network:
    # sum over positions of its output times the gradient of the label logit with respect to that output
    kept = {}

    def keep_e(m, i, o):
        o.retain_grad()
        kept["e"] = o

    h = net.conv.expanded.register_forward_hook(keep_e)
    with torch.enable_grad():
        net(images.clone().requires_grad_(True))[torch.arange(4), labels].sum().backward()
    h.remove()
    e = kept["e"]
    R = (e * e.grad).sum((2, 3)).double()
    torch.testing.assert_close(got["subrel"], R[:, [channel, C, C + 1]], rtol=1e-4, atol=1e-5)
    # ... and they add up to the original unit's relevance in the original network
    torch.testing.assert_close(got["subrel"].sum(1), (a * a.grad).sum((2, 3))[:, channel].detach().double(),
                               rtol=1e-4, atol=1e-5)


def test_relative_attribution_of_an_image_without_positive_attribution_is_zero():
    P = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    rel = relative_attribution(P, 0)
    assert rel.dtype == torch.float64 and rel.tolist() == [0.25, 0.0, 0.5]  # no 0/0 = NaN for the silent image
    assert relative_attribution(P, 1).tolist() == [0.75, 0.0, 0.0]


def test_fraction_rows_keep_images_above_tau():
    acts = Activations(index=np.arange(4), labels=np.zeros(4, int), rel=np.array([0.5, 0.02, 0.03, 0.9]),
                       orig=np.array([2.0, 1.0, 4.0, 0.0]),
                       sub=np.array([[1.0, 3.0, 2.0], [1.0, 1.0, 1.0], [2.0, -2.0, -4.0], [1.0, 1.0, 0.0]]))
    rows = fraction_rows(acts, 0.03)
    # image 1 is below tau, image 3 has orig == 0 (no fraction)
    np.testing.assert_array_equal(rows, [[0.5, 1.5, 1.0], [0.5, -0.5, -1.0]])


# ------------------------------------------------------------------ the planted network


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """Stage 4 on the planted network: channel 0 of "conv", concept 1 = red (0), concept 2 = blue (1)."""
    from conftest import planted_loaded, write_image_folder

    tmp_path = tmp_path_factory.mktemp("planted")
    planted_model = planted_loaded()
    planted_data = write_image_folder(str(tmp_path / "data"), n_train=8, n_val=4)
    A1 = class_arv(planted_model, "conv", 0, planted_data, 0)
    A2 = class_arv(planted_model, "conv", 0, planted_data, 1)
    model_dir = str(tmp_path / "models_disentangled")
    rec = make_record(model_dir, planted_model, "conv", 0, [[0], [1]], torch.stack([A1, A2]), best_rho=0.5,
                      class_names={"0": "red thing", "1": "blue thing"})
    out_dir = str(tmp_path / "out")
    cfg = Stage4Config(data_dir=planted_data, model_dir=model_dir, channel=0, concepts=[[0], [1]],
                       model="planted", weights="planted-v1", layer="conv", out_dir=out_dir, batch_size=3,
                       num_workers=0, device="cpu", progress=False)
    logs: list[str] = []
    out = run_stage4(cfg, loaded=planted_model, log=logs.append)
    return out, rec, out_dir, logs, (A1, A2)


def test_planted_channel_splits_into_its_two_concepts(planted_run):
    out, rec, out_dir, logs, (A1, A2) = planted_run
    # the ARVs see the planted structure: red inputs 0..3 for concept 1, blue inputs 4..7 for concept 2
    assert (A1[:4] > 0).all() and (A1[4:8].abs() < 1e-9).all()
    assert (A2[4:8] > 0).all() and (A2[:4].abs() < 1e-9).all()
    c1, c2 = out["concept1"], out["concept2"]
    assert c1["rows"] == 4 and c2["rows"] == 4  # every val image gives the channel > tau of its attribution
    d1, d2, res = c1["mean"]
    assert abs(d1 - 1) < 0.05 and abs(d2 - res) < 0.05 and abs(d2) < 0.05
    d1, d2, res = c2["mean"]
    assert abs(d2 - 1) < 0.05 and abs(d1 - res) < 0.05 and abs(d1) < 0.05
    rows = read_rows_csv(out["csv"][0])
    np.testing.assert_allclose(rows.mean(0), c1["mean"])
    np.testing.assert_allclose(rows[:, 0] + rows[:, 1] - rows[:, 2], 1.0, atol=1e-5)  # d1 + d2 - res = orig
    assert any("img/s" in line for line in logs)
    # blue inputs are exactly 0 on red images, so Disentangled 2 is constant there: said, not crashed
    assert any("Disentangled 2" in line and "no density" in line for line in logs)


def test_end_to_end_through_stages_1_and_3(tmp_path, planted_model, planted_data):
    """Stage 1 store -> stage 3 record (utils.disentangle, as disentangle_channel.py) -> stage 4."""
    from utils.stages import splitting as dis
    from utils.stages.relevance import Stage1Config, compute_relevance
    from utils.store.records import save_record

    store = str(tmp_path / "store")
    compute_relevance(Stage1Config(planted_data, store, model="planted", weights="planted-v1", layer="conv",
                                     batch_size=8, device="cpu", num_workers=0, progress=False), loaded=planted_model)
    rec, sw = dis.disentangle_channel(dis.Stage3Config(planted_data, store, 0, [[0], [1]], model="planted",
                                                       weights="planted-v1", layer="conv", batch_size=8,
                                                       device="cpu", num_workers=0, check_images=4, progress=False),
                                      loaded=planted_model)
    save_record(os.path.join(store, "models_disentangled", rec.name()), rec, sw)
    out = get_results.main(_namespace(data_dir=planted_data, model_dir=os.path.join(store, "models_disentangled"),
                                      model="planted", weights="planted-v1", layer_of_interest="last_conv",
                                      channel_of_interest=0, classes_for_concept1=[0], classes_for_concept2=[1],
                                      device="cpu", num_workers=0, out_dir=str(tmp_path / "o"), no_progress=True),
                           loaded=planted_model)
    assert out["rho"] == rec.best_rho and len(out["plots"]) == 3 and len(out["csv"]) == 2
    for k, own in ((1, 0), (2, 1)):
        mean = out[f"concept{k}"]["mean"]
        assert out[f"concept{k}"]["rows"] == 4 and abs(mean[own] - 1) < 0.05 and abs(mean[1 - own]) < 0.05


def test_concepts_in_any_class_order_name_one_folder_and_are_found(tmp_path, planted_model, planted_data):
    """Stage 3 given concept 1 = classes 2, 0 (unsorted) names its folder c1-0-2; stage 4 finds it given either
    order, and also finds a folder an older version named c1-2-0."""
    from utils.stages import splitting as dis
    from utils.stages.relevance import Stage1Config, compute_relevance
    from utils.store.records import save_record

    store = str(tmp_path / "store")
    compute_relevance(Stage1Config(planted_data, store, model="planted", weights="planted-v1", layer="conv",
                                     batch_size=8, device="cpu", num_workers=0, progress=False), loaded=planted_model)
    rec, sw = dis.disentangle_channel(dis.Stage3Config(planted_data, store, 0, [[2, 0], [1]], model="planted",
                                                       weights="planted-v1", layer="conv", batch_size=8, device="cpu",
                                                       num_workers=0, check_images=4, progress=False),
                                      loaded=planted_model)
    assert rec.concepts == [[0, 2], [1]] and rec.name() == "planted_channel0_c1-0-2_c2-1"
    model_dir = os.path.join(store, "models_disentangled")
    save_record(os.path.join(model_dir, rec.name()), rec, sw)
    args = dict(data_dir=planted_data, model_dir=model_dir, model="planted", weights="planted-v1",
                channel_of_interest=0, classes_for_concept2=[1], device="cpu", num_workers=0, get_quantitative=True,
                no_progress=True)
    for order in ([2, 0], [0, 2]):
        out = get_results.main(_namespace(**args, classes_for_concept1=order, out_dir=str(tmp_path / str(order[0]))),
                               loaded=planted_model)
        assert out["record"] == os.path.join(model_dir, "planted_channel0_c1-0-2_c2-1")
        assert out["concept1"]["images"] == 8  # the val images of both classes of concept 1
    os.rename(os.path.join(model_dir, rec.name()), os.path.join(model_dir, "planted_channel0_c1-2-0_c2-1"))
    out = get_results.main(_namespace(**args, classes_for_concept1=[0, 2], out_dir=str(tmp_path / "old")),
                           loaded=planted_model)
    assert out["record"].endswith("planted_channel0_c1-2-0_c2-1")
    with pytest.raises(UserError, match="no disentanglement of channel 0"):  # the concepts swapped are another split
        get_results.main(_namespace(**{**args, "classes_for_concept2": [0, 2]}, classes_for_concept1=[1],
                                    out_dir=str(tmp_path / "swap")), loaded=planted_model)


def test_planted_plots_are_pngs_and_pgfplots_data(planted_run):
    out, rec, out_dir, logs, _ = planted_run
    name = "planted_channel0_c1-0_c2-1"
    assert sorted(os.path.basename(p) for p in out["plots"]) == sorted(
        [f"{name}_concept1.png", f"{name}_concept2.png", f"{name}_pgfplots.tex"])
    for p in out["plots"]:
        assert os.path.dirname(p) == os.path.join(out_dir, "plots")
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(8) == PNG_SIGNATURE
            with Image.open(p) as im:
                im.verify()
    blocks = read_pgfplots(out["plots"][-1])
    assert sorted(blocks) == sorted(f"{name}_{s}_c{k}.dat" for s in ("original", "disentangled1", "disentangled2")
                                    for k in (1, 2))
    assert all(len(v) >= 2 for v in blocks.values())


def test_kde_curves_and_pgfplots_data_parse_back(tmp_path):
    rng = np.random.default_rng(0)
    series = {"orig": rng.normal(5, 2, 40), "d1": rng.normal(4, 1, 40), "d2": np.full(40, 0.25)}
    grid, curves = density_curves(series, points=64)
    assert [c.label for c in curves] == ["Original", "Disentangled 1", "Disentangled 2"]
    assert curves[2].y is None and curves[2].constant == 0.25  # zero variance: no density
    tex = str(tmp_path / "curves.tex")
    write_pgfplots(tex, pgfplots_blocks("m_channel3_c1-1_c2-2", {1: (grid, curves)}), "test")
    blocks = read_pgfplots(tex)
    for key, tag in (("orig", "original"), ("d1", "disentangled1")):
        xy = blocks[f"m_channel3_c1-1_c2-2_{tag}_c1.dat"]
        v = series[key]
        h = v.std(ddof=1) * len(v) ** (-1 / 5)  # Scott's factor for one dimension
        expected = np.exp(-0.5 * ((xy[:, 0, None] - v[None]) / h) ** 2).sum(1) / (len(v) * h * math.sqrt(2 * math.pi))
        np.testing.assert_allclose(xy[:, 0], grid, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(xy[:, 1], expected, rtol=1e-7, atol=1e-12)
    spike = blocks["m_channel3_c1-1_c2-2_disentangled2_c1.dat"]
    np.testing.assert_array_equal(spike[:, 0], [0.25, 0.25])
    png = str(tmp_path / "d.png")
    density_plot(png, grid, curves, "title")
    with Image.open(png) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("values", [[], [1.5], [2.0, 2.0, 2.0]])
def test_degenerate_series_have_no_density(values):
    assert fit_kde(np.array(values)) is None
    grid, curves = density_curves({"orig": np.array(values), "d1": np.array(values)})
    assert all(c.y is None for c in curves) and np.isfinite(grid).all()


# ------------------------------------------------------------------ summary


def _write_csv(path, rows):
    with open(path, "w") as f:
        f.write("disentangled1,disentangled2,residual\n")
        for r in rows:
            f.write(",".join(map(str, r)) + "\n")


def test_summary_of_two_pairs_equals_hand_computed_means(tmp_path, capsys):
    d = tmp_path / "results_quantitative"
    d.mkdir()
    _write_csv(d / "resnet50_channel1_c1-2_c2-3_concept1.csv", [(1.0, 0.0, 0.5), (0.5, 0.5, 0.0)])
    _write_csv(d / "resnet50_channel1_c1-2_c2-3_concept2.csv", [(0.25, 1.0, 0.0)])
    _write_csv(d / "resnet50_channel9_c1-4_c2-5_concept1.csv", [(0.75, -0.5, 1.0)])
    _write_csv(d / "resnet50_channel9_c1-4_c2-5_concept2.csv", [(0.0, 0.5, 0.25), (0.5, 1.5, 0.75)])
    _write_csv(d / "resnet50_channel9_c1-4_c2-5_rho0.5_concept1.csv", [(9.0, 9.0, 9.0)])  # another setting
    table = summarize(str(d))
    best = [e for e in table if e["setting"] == "best rho, tau 0.03"]
    assert [(e["concept"], e["pairs"], e["rows"]) for e in best] == [(1, 2, 3), (2, 2, 3)]
    np.testing.assert_allclose(best[0]["mean"], [(1.0 + 0.5 + 0.75) / 3, (0.0 + 0.5 - 0.5) / 3, (0.5 + 0.0 + 1.0) / 3])
    np.testing.assert_allclose(best[1]["mean"], [(0.25 + 0.0 + 0.5) / 3, (1.0 + 0.5 + 1.5) / 3, (0.0 + 0.25 + 0.75) / 3])
    other = [e for e in table if e["setting"] == "rho 0.5, tau 0.03"]
    assert other[0]["rows"] == 1 and other[0]["mean"] == [9.0, 9.0, 9.0] and other[1]["rows"] == 0

    get_results.main(_namespace(summarize=str(d)))  # the flag of get_results.py
    printed = capsys.readouterr().out
    assert "0.7500" in printed and "concept 2" in printed
    with open(d / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert float(summary[0]["disentangled1"]) == pytest.approx(0.75) and summary[0]["rows"] == "3"
    assert "| concept 1 | 2 | 3 | 0.7500 | 0.0000 | 0.5000 |" in (d / "summary.md").read_text()


def test_rows_csv_is_replaced_not_appended(tmp_path):
    p = str(tmp_path / "x_concept1.csv")
    write_rows_csv(p, np.array([[1.0, 2.0, 3.0]]))
    write_rows_csv(p, np.array([[0.1, 0.2, 0.3], [1 / 3, 2.0, -1.0]]))
    np.testing.assert_array_equal(read_rows_csv(p), [[0.1, 0.2, 0.3], [1 / 3, 2.0, -1.0]])
    assert os.listdir(tmp_path) == ["x_concept1.csv"]


# ------------------------------------------------------------------ shell scripts


@pytest.mark.parametrize("script,flag", [("disentanglement_calls.sh", "--channel_disentangle"),
                                         ("quantitative_evaluation_calls.sh", "--channel_of_interest")])
def test_shell_scripts_dry_run_the_paper_triples(script, flag, tmp_path):
    path = os.path.join(REPO, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "DATA_DIR": "/data/imagenet", "STORE_DIR": str(tmp_path / "st ore")}
    r = subprocess.run(["bash", path], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    triples = []
    for line in r.stdout.splitlines():
        if flag in line:
            w = line.split()
            triples.append((int(w[w.index(flag) + 1]), int(w[w.index("--classes_for_concept1") + 1]),
                            int(w[w.index("--classes_for_concept2") + 1])))
            assert "/data/imagenet" in w
    assert triples == PAPER_TRIPLES
    if script.startswith("quantitative"):
        assert "summarize_results.py" in r.stdout.splitlines()[-1]
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    # --dry-run flag with positional arguments, no environment
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "STORE_DIR", "DRY_RUN")}
    r = subprocess.run(["bash", path, "--dry-run", "/d", "/s"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count(flag) == 20 and "/s" in r.stdout
    r = subprocess.run(["bash", path], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "DATA_DIR" in r.stderr


# ------------------------------------------------------------------ CLI


def _cli(args, cwd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, "get_results.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300, **kw)


def test_cli_help():
    r = _cli(["--help"], REPO)
    assert r.returncode == 0 and "--get_qualitative" in r.stdout and "--summarize" in r.stdout


def test_cli_seed_command_and_quantitative_reruns(tmp_path, image_folder):
    from utils.model.loading import load_model

    data = image_folder(n_train=1, n_val=3, size=48)
    lm = load_model("resnet18", "none")
    g = torch.Generator().manual_seed(0)
    store = tmp_path / "store"
    make_record(str(store / "models_disentangled"), lm, None, 7, [[0], [1]],
                torch.randn(2, 512, generator=g, dtype=torch.float64), best_rho=0.35)
    common = ["--class_index", class_index_for(data), "--data_dir", data, "--model_dir",
              str(store / "models_disentangled") + "/", "--model", "resnet18",
              "--weights", "none", "--nr_channels_in_layer_of_interest", "512", "--classes_for_concept1", "0",
              "--classes_for_concept2", "1", "--channel_of_interest", "7", "--device", "cpu", "--num_workers", "0",
              "--batch_size", "4"]
    work = tmp_path / "work"
    work.mkdir()
    # the seed README's command (plus --get_quantitative): outputs under the current directory
    quant = ["--get_quantitative", "--proportion_attribution_required", "0.0", "--json", str(tmp_path / "r.json")]
    r = _cli(common + ["--layer_of_interest", "last_conv", "--get_qualitative"] + quant, str(work))
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    name = "resnet18_channel7_c1-0_c2-1"
    assert sorted(os.listdir(work / "plots")) == [f"{name}_concept1.png", f"{name}_concept2.png",
                                                  f"{name}_pgfplots.tex"]
    results = work / "results_quantitative"
    csvs = [f"{name}_tau0.0_concept1.csv", f"{name}_tau0.0_concept2.csv"]
    assert sorted(os.listdir(results)) == csvs
    before = [(results / c).read_text() for c in csvs]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["concept1"]["rows"] == 3 == len(before[0].strip().splitlines()) - 1  # tau 0: every val image
    assert len(res["concept1"]["mean"]) == 3 and len(res["plots"]) == 3 and len(res["csv"]) == 2
    # again, quantitative only (dotted layer name, --out_dir): the same CSVs, no duplicated rows
    r = _cli(common + ["--layer", "layer4.1.conv2", "--out_dir", str(work)] + quant, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(results)) == csvs and [(results / c).read_text() for c in csvs] == before
    assert json.loads((tmp_path / "r.json").read_text())["plots"] == []
    out = tmp_path / "out"
    # bad input: a channel that was never disentangled -> one line naming the folder, exit 2
    bad = list(common)
    bad[bad.index("--channel_of_interest") + 1] = "8"
    r = _cli(bad + ["--get_quantitative", "--out_dir", str(out)], str(work))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "resnet18_channel8_c1-0_c2-1" in r.stderr and "disentangle_channel.py" in r.stderr


# ------------------------------------------------------------------ bad input, in process


@pytest.fixture
def planted_setup(tmp_path, planted_model, planted_data):
    model_dir = str(tmp_path / "md")
    make_record(model_dir, planted_model, "conv", 0, [[0], [1]],
                torch.tensor([[1.0] * 4 + [0.0] * 6, [0.0] * 4 + [1.0] * 4 + [0.0] * 2], dtype=torch.float64))
    base = dict(data_dir=planted_data, model_dir=model_dir, model="planted", weights="planted-v1",
                channel_of_interest=0, classes_for_concept1=[0], classes_for_concept2=[1], device="cpu",
                num_workers=0, get_quantitative=True, out_dir=str(tmp_path / "o"), no_progress=True)
    return planted_model, base


@pytest.mark.parametrize("change,words", [
    ({"classes_for_concept2": [7]}, "class 7 of concept 2 is not one of the 3 classes of"),
    ({"classes_for_concept2": [0]}, "in both concepts"),
    ({"channel_of_interest": 2}, "disentangle_channel.py"),
    ({"nr_channels_in_layer_of_interest": 2048}, "does not match"),
    ({"f": 0.33}, "rho 0.33 is not one of"),
    ({"model_dir": "/nonexistent/md"}, "no folder /nonexistent/md"),
])
def test_bad_input_is_one_user_error(planted_setup, change, words):
    lm, base = planted_setup
    with pytest.raises(UserError, match=re.escape(words)):
        get_results.main(_namespace(**{**base, **change}), loaded=lm)


def test_record_of_other_weights_is_refused(planted_setup):
    lm, base = planted_setup
    other = LoadedModel(lm.model, lm.name, "planted-v2", lm.num_classes, lm.categories)
    with pytest.raises(UserError, match="weights 'planted-v1', this run uses 'planted-v2'"):
        get_results.main(_namespace(**base), loaded=other)


def test_f_picks_that_rho_and_names_the_files(planted_setup):
    lm, base = planted_setup
    out = get_results.main(_namespace(**base, f=0.25), loaded=lm)
    assert out["rho"] == 0.25 and out["csv"][0].endswith("planted_channel0_c1-0_c2-1_rho0.25_concept1.csv")


def test_val_folders_are_mapped_by_the_stores_class_index(planted_setup, tmp_path):
    """Class indices are logits: stage 4 maps val/ folders with the class map the stage-1 store recorded
    (here red and blue swapped); a val folder that map does not know is left out, and said so."""
    lm, base = planted_setup
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps({"classes": ["A_red", "B_blue"], "class_index": {"A_red": 1, "B_blue": 0},
                                                "class_counts": [8, 8, 0]}))
    path = os.path.join(base["model_dir"], "planted_channel0_c1-0_c2-1", "record.json")
    with open(path) as f:
        rec = json.load(f)
    rec["store"] = str(store)
    with open(path, "w") as f:
        json.dump(rec, f)
    out = get_results.main(_namespace(**base), loaded=lm)
    d1, d2, res = out["concept1"]["mean"]  # concept 1 is class 0: the blue folder, which D1 (red inputs) ignores
    assert out["concept1"]["rows"] == 4 and abs(d1) < 0.05 and abs(d2 - 1) < 0.05
    from utils.data import classes as st

    st._note_once.cache_clear()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        out = get_results.main(_namespace(**base, purity=4), loaded=lm)  # purity searches every val folder
    assert "(C_gray) have no training images in store" in err.getvalue() and "left out" in err.getvalue()
    assert out["purity"]["original"]["k"] == 4 and out["purity"]["original"]["other"] == 0.0  # no gray image


def test_no_rows_above_tau_give_an_empty_csv_and_null_means(planted_setup, tmp_path):
    lm, base = planted_setup
    out = get_results.main(_namespace(**base, proportion_attribution_required=1.5, json=str(tmp_path / "r.json")),
                           loaded=lm)
    assert out["concept1"]["rows"] == 0 and read_rows_csv(out["csv"][0]).shape == (0, 3)
    assert json.loads((tmp_path / "r.json").read_text())["concept1"]["mean"] == [None, None, None]
    table = summarize(os.path.dirname(out["csv"][0]))
    assert table[0]["pairs"] == 1 and table[0]["rows"] == 0 and all(math.isnan(v) for v in table[0]["mean"])


def test_purity_in_results_json(planted_setup, tmp_path):
    """--purity K (4 val images per class): D1's top-4 are all concept 1 (red), D2's all concept 2 (blue);
    the original's top-8 are the 4 red and the 4 blue images."""
    lm, base = planted_setup
    out_json = tmp_path / "r.json"
    out = get_results.main(_namespace(**base, purity=4, json=str(out_json)), loaded=lm)
    pur = json.load(open(out_json))["purity"]
    assert pur == out["purity"]
    assert pur["D1"]["concept1"] == 1.0 and pur["D2"]["concept2"] == 1.0
    pur8 = get_results.main(_namespace(**base, purity=8), loaded=lm)["purity"]
    assert pur8["original"]["concept1"] == 0.5 and pur8["original"]["concept2"] == 0.5


@pytest.mark.parametrize("k", [2, 3])
def test_shares_with_a_bias_sum_to_one(k):
    """Stage 4's rows d_j/orig count the shared part and the bias once per concept unit; the exclusive shares
    plus the shared share count them once and sum to 1 on every image (a layer with a bias)."""
    from utils.method.split import Split, split_filters
    from utils.report.tables import share_rows, share_summary
    from utils.stages.evaluation import sub_channel_sums

    g = torch.Generator().manual_seed(k)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.5, -2.0, 3.0, 1.0]))
    assign = torch.randint(0, k + 1, (6,), generator=g)
    D, Res = split_filters(conv.weight[2], assign, k)
    x = torch.rand(5, 6, 7, 7, generator=g)
    sub = sub_channel_sums(conv, x, Split(2, D, Res)).numpy()
    orig = conv(x)[:, 2].double().sum((1, 2)).detach().numpy()
    rows = sub / orig[:, None]
    assert np.allclose(share_rows(rows).sum(1), 1.0, atol=1e-6)
    assert not np.allclose(rows.sum(1), 1.0, atol=1e-3)  # the rows as the paper writes them do not
    # the exclusive share of concept j is what D_j adds beyond the shared part, independently computed
    only = sub_channel_sums(conv, x, Split(2, D - Res[None], torch.zeros_like(Res))).numpy()[:, :k] - conv.bias[2].item() * 49
    assert np.allclose(share_rows(rows)[:, :k], only / orig[:, None], atol=1e-6)
    s = share_summary(rows)
    assert np.isclose(sum(s["exclusive"]) + s["shared"], 1.0) and len(s["exclusive_median"]) == k
