"""Stage 3: index sets, filters, the disentangled network, rho scoring, records and the CLI."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from conftest import arv_autograd, class_index_for, make_record
from utils.stages import splitting as dis
from utils.model import surgery
from utils.store.arvs import concept_arvs
from utils.data.classes import check_concepts
from utils.data.images import list_images, make_loader
from utils.errors import UserError, run_cli
from utils.stages.relevance import Stage1Config, compute_relevance
from utils.model.loading import get_layer, load_model
from utils.store.records import load_record, load_split, record_keys, save_record
from utils.model.hooks import layer_input
from utils.model.units import as_unit
from utils.method.scoring import batch_ratio_sums, best_index, score_filters, scores_from_sums
from utils.method.split import RHOS, Sweep, sweep
from utils.model.surgery import load_checkpoint, make_split_layer
from utils.store.records import disentangle_model, export_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _random_sweep(conv: nn.Conv2d, channel: int, seed: int = 0) -> Sweep:
    g = torch.Generator().manual_seed(seed)
    return sweep(conv.weight[channel], torch.randn(2, conv.in_channels, generator=g, dtype=torch.float64))


def sweep_scores(model, conv, channel, sw, batches):
    """score per rho over ``batches`` of (images, concept 1..k), as stage 3 computes it, plus the counts."""
    bank = score_filters(sw)
    bias = None if conv.bias is None else conv.bias.detach()[channel].expand(len(bank))
    parts, counts = [], [0] * sw.k
    with torch.no_grad():
        for images, concept in batches:
            parts.append(batch_ratio_sums(as_unit(conv), layer_input(model, conv, images), bank, bias, sw.k, concept))
            counts = [n + int((concept == j + 1).sum()) for j, n in enumerate(counts)]
    return scores_from_sums(sw, parts, counts), counts


def _swap(model: nn.Module, layer: str, splits) -> nn.Module:
    from utils.model.loading import set_module
    net = copy.deepcopy(model)
    _, conv = get_layer(net, layer)
    conv = conv.module  # the Conv2d itself
    set_module(net, layer, make_split_layer(conv, splits))
    return net.eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class BiasNet(nn.Module):
    """A tiny CNN whose layer of interest ``mid`` has a bias, stride 2, 3x3 kernel and reflect padding."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mid = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True, padding_mode="reflect")
        self.head = nn.Linear(5, 4)
        with torch.no_grad():
            self.mid.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        a = self.mid(torch.relu(self.stem(x)))
        return self.head(torch.relu(a).mean((2, 3)))


# ------------------------------------------------------------------ index sets and filters


def test_index_sets_follow_the_signed_rule_with_ties():
    A1 = torch.tensor([3.0, 1.0, -1.0, -2.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    A2 = torch.tensor([1.0, 3.0, -2.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    sw = sweep(torch.ones(7, 1, 1), torch.stack([A1, A2]))
    i05, i10 = RHOS.index(0.5), RHOS.index(1.0)
    # rho = 0.5: 1.5 > 1 -> S1; 0.5*3 > 1 -> S2; -0.5 > -2 -> S1 (negative weights: |A2| > rho|A1|);
    # -1 > -1 no, -0.5 > -2 -> S2; 0.25 vs 0.5 both ways no -> S0; 1 vs 2 no -> S0; 0 > 0 no -> S0
    assert sw.sources(i05) == {"concept1": [0, 2], "concept2": [1, 3], "shared": [4, 5, 6]}
    # rho = 1.0: only exact ties (A1[k] == A2[k]) are shared
    assert sw.sources(i10) == {"concept1": [0, 2], "concept2": [1, 3], "shared": [4, 5, 6]}
    # rho = 0.05: -0.05 > -2 and -0.1 > -1: every negative-weight input lands in S1; 0.15 > 1 fails
    assert sw.sources(RHOS.index(0.05)) == {"concept1": [2, 3], "concept2": [], "shared": [0, 1, 4, 5, 6]}
    # D1 drops S2, D2 drops S1, Res keeps S0 only
    assert sw.D[i05, 0].flatten().tolist() == [1, 0, 1, 0, 1, 1, 1]
    assert sw.D[i05, 1].flatten().tolist() == [0, 1, 0, 1, 1, 1, 1]
    assert sw.Res[i05].flatten().tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_filters_add_up_to_the_original_exactly():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 3, 3, generator=g)
    sw = sweep(W, torch.randn(2, 64, generator=g, dtype=torch.float64))
    assert sw.D.shape == (20, 2, 64, 3, 3) and torch.allclose(sw.rhos, torch.tensor(RHOS, dtype=torch.float64))
    for i in range(20):
        assert torch.equal(sw.D[i, 0] + sw.D[i, 1] - sw.Res[i], W)
        src = sw.sources(i)
        assert sorted(src["concept1"] + src["concept2"] + src["shared"]) == list(range(64))


# ------------------------------------------------------------------ the disentangled network


def _random_model_and_image(name: str, seed: int):
    """torchvision ``name`` with random weights, one 224 x 224 image and its logits."""
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    return model, x, _logits(model, x)


@pytest.fixture(scope="module")
def resnet18():
    return _random_model_and_image("resnet18", 1)


@pytest.mark.parametrize("arch, layer, channel, kernel", [("resnet50", "layer4.2.conv3", 1660, (1, 1)),
                                                          ("resnet18", "layer3.1.conv2", 77, (3, 3))])
def test_disentangled_logits_equal_original(arch, layer, channel, kernel):
    model, x, ref = _random_model_and_image(arch, 0)
    _, conv = get_layer(model, layer)
    conv = conv.module  # the Conv2d itself
    assert conv.kernel_size == kernel
    net = _swap(model, layer, [_random_sweep(conv, channel, seed=3).split(channel, RHOS.index(0.5))])
    assert (_logits(net, x) - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 1e-3  # the comparison is not trivially zero


def test_conv_with_bias_stride_and_reflect_padding():
    model = BiasNet().eval()
    x = torch.randn(3, 3, 17, 17, generator=torch.Generator().manual_seed(2))
    sw = _random_sweep(model.mid, 2)
    split = sw.split(2, 4)
    net = _swap(model, "mid", [split])
    assert (_logits(net, x) - _logits(model, x)).abs().max() <= 1e-5
    # each sub-channel is its filter plus the full bias b[c]: D1 + D2 - Res = the original channel
    h = torch.relu(model.stem(x))
    out = net.mid.expanded(h)
    C, b = 5, model.mid.bias[2]
    pad = nn.functional.pad(h, (1, 1, 1, 1), mode="reflect")
    for j, filt in ((2, split.D[0]), (C, split.D[1]), (C + 1, split.Res)):
        direct = nn.functional.conv2d(pad, filt[None], b[None], stride=2)
        assert torch.allclose(out[:, j:j + 1], direct, atol=1e-5)
    assert torch.allclose(net.mid(h), model.mid(h), atol=1e-5)


def test_several_splits_and_checkpoint_round_trip(tmp_path, resnet18):
    from utils.model.loading import LoadedModel

    model, x, ref = resnet18
    lm = LoadedModel(model, "resnet18", "none", 1000, None)
    records = []
    for j, (layer, channel) in enumerate((("layer4.1.conv2", 5), ("layer4.1.conv2", 300), ("layer3.0.conv1", 9))):
        _, conv = get_layer(model, layer)
        conv = conv.module  # the Conv2d itself
        A = torch.randn(2, conv.in_channels, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
        records.append(make_record(str(tmp_path / f"r{j}"), lm, layer, channel, [[0], [1]], A, [0.3, 0.6, 1.0][j]))
    net = disentangle_model(model, records)
    assert isinstance(net.layer4[1].conv2, nn.Sequential) and net.layer4[1].conv2.expanded.out_channels == 512 + 4
    assert net.layer3[0].conv1.expanded.stride == (2, 2)
    assert torch.equal(net.layer4[1].conv2.expanded.weight[300], load_split(records[1]).D[0])
    out = _logits(net, x)
    assert (out - ref).abs().max() <= 1e-4
    assert isinstance(model.layer4[1].conv2, nn.Conv2d)  # the original is untouched
    path = str(tmp_path / "net.pt")
    export_checkpoint(model, "resnet18", records, path)
    back = load_checkpoint(path)
    assert type(back.layer4[1].conv2.merge) is nn.Conv2d
    assert (_logits(back, x) - out).abs().max() <= 1e-6


# ------------------------------------------------------------------ scoring


def _slow_scores(model, layer, channel, sw, images, concept) -> torch.Tensor:
    """The definition: per rho, the whole disentangled network, sub-channels read at ``expanded``."""
    _, conv = get_layer(model, layer)
    conv = conv.module  # the Conv2d itself
    C = conv.out_channels
    scores = []
    for i in range(len(sw.rhos)):
        net = _swap(model, layer, [sw.split(channel, i)])
        seen = {}
        handle = net.get_submodule(layer).expanded.register_forward_hook(lambda m, a, o: seen.update(y=o))
        with torch.no_grad():
            net(images)
        handle.remove()
        p1 = seen["y"][:, channel].double().clamp_min(0).sum((1, 2))
        p2 = seen["y"][:, C].double().clamp_min(0).sum((1, 2))
        r1 = [float(p1[b] / (p2[b] + 1e-5)) for b in range(len(images)) if concept[b] == 1]
        r2 = [float(p2[b] / (p1[b] + 1e-5)) for b in range(len(images)) if concept[b] == 2]
        scores.append(sum(r1) / len(r1) + sum(r2) / len(r2))
    return torch.tensor(scores, dtype=torch.float64)


def test_scores_equal_slow_direct_computation():
    model = BiasNet(seed=4).eval()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(7, 3, 15, 15, generator=g)
    concept = torch.tensor([1, 2, 1, 1, 2, 2, 1])
    A1, A2 = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1
    sw = sweep(model.mid.weight[3], torch.stack([A1, A2]))
    assert len(sw.distinct()[0]) > 2  # the sweep really changes the split
    batches = [(images[:3], concept[:3]), (images[3:], concept[3:])]
    fast, counts = sweep_scores(model, model.mid, 3, sw, batches)
    assert counts == [4, 3]
    slow = _slow_scores(model, "mid", 3, sw, images, concept)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=0)


def test_best_rho_is_the_first_maximal_score():
    assert best_index(torch.tensor([1.0, 3.0, 2.0, 3.0])) == 1
    assert best_index(torch.full((20,), 7.0, dtype=torch.float64)) == 0
    # the same index sets at every rho give exactly the same score: the first rho wins
    model = BiasNet(seed=6).eval()
    A1 = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    sw = sweep(model.mid.weight[1], torch.stack([A1, 1.0 - A1]))
    images = torch.randn(4, 3, 15, 15, generator=torch.Generator().manual_seed(7))
    scores, _ = sweep_scores(model, model.mid, 1, sw, [(images, torch.tensor([1, 2, 1, 2]))])
    assert torch.equal(scores, torch.full_like(scores, scores[0]))
    assert best_index(scores) == 0


def test_concept_checks():
    check_concepts([[0, 1], [2]], range(3), "the data", {0: 3, 1: 3, 2: 3})
    for concepts, counts, words in (([[0], [0]], [3, 3], "both concepts"), ([[5], [0]], [3, 3], "not one of the 2"),
                                    ([[0], [-1]], [3, 3], "not one of"), ([[0], [1]], [3, 0], "no training images"),
                                    ([[0, 0], [1]], [3, 3], "twice"), ([[0]], [3, 3], "at least two"),
                                    ([[0], []], [3, 3], "no classes")):
        with pytest.raises(UserError, match=words):
            check_concepts(concepts, range(len(counts)), "the data", dict(enumerate(counts)))


# ------------------------------------------------------------------ the planted network, end to end


@pytest.fixture
def planted_store(tmp_path, planted_model, planted_data):
    cfg = Stage1Config(data_dir=planted_data, store_dir=str(tmp_path / "store"), layer="conv", num_workers=0,
                       progress=False, device="cpu")
    compute_relevance(cfg, loaded=planted_model)
    return str(tmp_path / "store")


def _layer_inputs(model, conv, data_dir, classes):
    images = list_images(data_dir, "train")
    xs = [layer_input(model, conv, x) for x, _, _ in make_loader(images, images.indices_of(classes), 16, 0)]
    return torch.cat(xs)


def test_planted_channel_splits_into_red_and_blue(planted_model, planted_data, planted_store, tmp_path):
    cfg = dis.Stage3Config(planted_data, planted_store, channel=0, concepts=[[0], [1]], layer="conv", num_workers=0,
                           progress=False, device="cpu")
    rec, sw = dis.disentangle_channel(cfg, loaded=planted_model)
    assert set(rec.to_json()) == record_keys(2)
    assert rec.train_images == {"concept1": 8, "concept2": 8} and rec.max_abs_logit_diff <= 1e-5
    best = rec.sources[f"{rec.best_rho:.2f}"]
    assert best == {"concept1": [0, 1, 2, 3], "concept2": [4, 5, 6, 7], "shared": [8, 9]}
    assert rec.best_rho == 0.05  # every rho gives that split, so the first one wins
    model, conv = planted_model.model, planted_model.model.conv
    i = RHOS.index(rec.best_rho)
    act = {}
    for t in (0, 1):
        x = _layer_inputs(model, conv, planted_data, [t])
        act[t] = {name: nn.functional.conv2d(x, w).sum().item() for name, w in
                  (("orig", conv.weight[:1]), ("D1", sw.D[i, 0:1]), ("D2", sw.D[i, 1:2]))}
    assert act[0]["D1"] > 0.95 * act[0]["orig"] and act[0]["D2"] < 0.05 * act[0]["D1"]  # red: D1 only
    assert act[1]["D2"] > 0.95 * act[1]["orig"] and act[1]["D1"] < 0.05 * act[1]["D2"]  # blue: D2 only
    # the record on disk rebuilds the same network
    folder = os.path.join(planted_store, "models_disentangled", rec.name())
    assert folder.endswith(os.path.join("models_disentangled", "planted_channel0_c1-0_c2-1"))
    save_record(folder, rec, sw)
    loaded = load_record(folder)
    assert loaded == rec  # every field survives the round trip through record.json
    f = torch.load(os.path.join(folder, "filters.pt"), weights_only=True)
    assert f["D1"].shape == (20, 10, 1, 1) and torch.equal(load_split(loaded).D[1], sw.D[i, 1])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_logits(disentangle_model(model, [loaded]), x), _logits(model, x), atol=1e-5)


def test_concept_arv_of_several_classes_is_the_mean_over_their_images(planted_model, planted_data, planted_store):
    from utils.store.layout import Store
    store = Store.open(os.path.join(planted_store, "planted_channel_importances"))
    conv = planted_model.model.conv
    got = concept_arvs(store, 0, [[0, 2], [1]])[0]
    x = _layer_inputs(planted_model.model, conv, planted_data, [0, 2])
    assert len(x) == 16
    assert torch.allclose(got, arv_autograd(conv, 0, x), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A resnet18 (--weights none) stage-1 store of a tiny three-class folder, made with the stage-1 CLI."""
    from conftest import write_image_folder
    root = tmp_path_factory.mktemp("stage3_cli")
    data = write_image_folder(str(root / "data"), n_train=2, n_val=1, size=16)
    store = str(root / "store")
    subprocess.run([PY, "get_importances_for_classes.py", "--data_dir", data, "--model", "resnet18", "--weights",
                    "none", "--store_dir", store, "--num_workers", "0", "--batch_size", "6", "--device", "cpu",
                    "--class_index", class_index_for(data)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return data, store, root


def _argv(data, store, channel="100", c1=("0",), c2=("1",), *extra):
    return ["--data_dir", data, "--model", "resnet18", "--weights", "none", "--nr_channels_in_layer_of_interest",
            "512", "--channel_disentangle", channel, "--classes_for_concept1", *c1, "--classes_for_concept2", *c2,
            "--store_dir", store, "--num_workers", "0", "--device", "cpu", *extra]


def test_cli_seed_command(cli_store):
    data, store, root = cli_store
    out_json, ck = str(root / "out.json"), str(root / "net.pt")
    p = subprocess.run([PY, "disentangle_channel.py", *_argv(data, store), "--json", out_json, "--export", ck],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(line.split()[:4] == ["rho", "|S1|", "|S2|", "|S0|"] for line in lines)
    rows = [line for line in lines if line.strip()[:4] in {f"{r:.2f}" for r in RHOS}]
    assert len(rows) == 20 and sum("<- best" in r for r in rows) == 1
    assert "max |logit difference|" in p.stdout and "img/s" in p.stdout
    folder = os.path.join(store, "models_disentangled", "resnet18_channel100_c1-0_c2-1")
    rec = json.load(open(os.path.join(folder, "record.json")))
    assert set(rec) == record_keys(2)
    assert rec["layer"] == "layer4.1.conv2" and rec["default_layer"] and rec["weights"] == "none"
    assert rec["class_names"] == {"0": "A_red", "1": "B_blue"} and rec["train_images"] == {"concept1": 2, "concept2": 2}
    assert rec["max_abs_logit_diff"] <= 1e-4 and rec["equivalence_images"] == 4
    assert list(rec["scores"]) == [f"{r:.2f}" for r in RHOS] and rec["rhos"] == list(RHOS)
    best = max(rec["scores"].values())
    assert rec["best_rho"] == next(float(k) for k, v in rec["scores"].items() if v == best)
    for src in rec["sources"].values():
        assert sorted(src["concept1"] + src["concept2"] + src["shared"]) == list(range(512))
    f = torch.load(os.path.join(folder, "filters.pt"), weights_only=True)
    assert f["D1"].shape == f["D2"].shape == f["Res"].shape == (20, 512, 3, 3)
    js = json.load(open(out_json))
    assert set(js) == {"channel", "classes_for_concept1", "classes_for_concept2", "scores", "best_rho", "sources",
                       "max_abs_logit_diff", "files", "provenance"}
    assert js["scores"] == rec["scores"] and set(js["sources"]["0.50"]) == {"concept1", "concept2"}
    assert ck in js["files"] and all(os.path.isfile(p) for p in js["files"])
    original = load_model("resnet18", "none").model
    x = torch.randn(1, 3, 64, 64)
    assert (_logits(load_checkpoint(ck), x) - _logits(original, x)).abs().max() <= 1e-4


def test_cli_several_classes_per_concept(cli_store, capsys):
    from disentangle_channel import get_args_parser, main
    data, store, _ = cli_store
    main(get_args_parser().parse_args(_argv(data, store, "7", ("0", "2"), ("1",))))
    rec = json.load(open(os.path.join(store, "models_disentangled", "resnet18_channel7_c1-0-2_c2-1", "record.json")))
    assert rec["classes_for_concept1"] == [0, 2] and rec["train_images"] == {"concept1": 4, "concept2": 2}
    assert "0 A_red, 2 C_gray" in capsys.readouterr().out


def _cli_error(argv, capsys) -> str:
    from disentangle_channel import get_args_parser, main
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(get_args_parser().parse_args(argv)))
    assert e.value.code == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("stage 3:")]  # minus the progress bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_cli_refuses_bad_input_with_one_line(cli_store, tmp_path, capsys, monkeypatch):
    data, store, _ = cli_store
    before = {d: sorted(os.listdir(os.path.join(store, "models_disentangled", d)))
              for d in os.listdir(os.path.join(store, "models_disentangled"))} \
        if os.path.isdir(os.path.join(store, "models_disentangled")) else {}
    assert "outside layer" in _cli_error(_argv(data, store, "512"), capsys)
    assert "not one of the 3 classes of the data" in _cli_error(_argv(data, store, "5", ("3",)), capsys)
    assert "both concepts" in _cli_error(_argv(data, store, "5", ("1",), ("2", "1")), capsys)
    assert "no stage-1 store" in _cli_error(_argv(data, str(tmp_path / "nothing")), capsys)
    other = os.path.join(str(tmp_path), "other")
    shutil.copytree(data, other)
    os.remove(os.path.join(other, "train", "A_red", "img_000.png"))
    assert "not those of store" in _cli_error(_argv(other, store), capsys)
    # a concept whose classes have no training images (a store whose count for class 2 is zero)
    empty = str(tmp_path / "empty")
    shutil.copytree(os.path.join(store, "resnet18_channel_importances"), os.path.join(empty, "resnet18_channel_importances"))
    meta_path = os.path.join(empty, "resnet18_channel_importances", "meta.json")
    meta = json.load(open(meta_path))
    meta["class_counts"][2] = 0
    json.dump(meta, open(meta_path, "w"))
    assert "no training images" in _cli_error(_argv(data, empty, "5", ("0",), ("2",)), capsys)
    assert not os.path.exists(os.path.join(empty, "models_disentangled"))
    # a run that fails its equivalence check leaves an earlier record as it was
    argv = _argv(data, store, "9")
    from disentangle_channel import get_args_parser, main
    main(get_args_parser().parse_args(argv))
    folder = os.path.join(store, "models_disentangled", "resnet18_channel9_c1-0_c2-1")
    saved = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    monkeypatch.setattr(surgery, "logit_tolerance", lambda scale: -1.0)
    assert "nothing written" in _cli_error(argv, capsys)
    assert {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == saved
    after = {d: sorted(os.listdir(os.path.join(store, "models_disentangled", d)))
             for d in os.listdir(os.path.join(store, "models_disentangled"))}
    assert {d: v for d, v in after.items() if d != "resnet18_channel9_c1-0_c2-1"} == before


def test_cli_exit_code_and_help(cli_store):
    data, store, _ = cli_store
    p = subprocess.run([PY, "disentangle_channel.py", *_argv(data, store, "-1")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: channel -1") and "Traceback" not in p.stderr
    h = subprocess.run([PY, "disentangle_channel.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--channel_disentangle" in h.stdout and "--export" in h.stdout
