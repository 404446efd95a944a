"""The layer command and k concepts per channel: concepts found by complete linkage, the k-concept rules,
one network with every split of a layer, faithfulness to stage 3 for two single-class concepts, a channel
planted for three concepts, the command line and the k-concept flags of the other scripts."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torchvision
from torch import nn

from conftest import planted_cli_setup, planted_rgb_source, run_script
from utils.method.linkage import complete_linkage, cosine_matrix
from utils.method.split import RHOS, Split, assign_inputs, split_filters, sweep
from utils.model.surgery import load_checkpoint, split_network

# A planted network whose channel 0 serves THREE concepts through different inputs: stem channels 0-2 see
# red, 3-5 green, 6-8 blue, 9 is constant; conv channel 0 reads 0-8, channel 1 the constant, channel 2 red
# only, channel 3 green only. Logits: red = a0 + a1 + a2, green = a0 + a1 + a3, blue = a0 + a1.
PLANTED3 = planted_rgb_source([([0, 1, 2, 3, 4, 5, 6, 7, 8], True), ([9], False), ([0, 1, 2], False),
                               ([3, 4, 5], False)],
                              [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]],
                              ["red thing", "green thing", "blue thing"])
RGB = {"A_red": (220, 30, 30), "B_green": (30, 220, 30), "C_blue": (30, 30, 220)}


# ------------------------------------------------------------------ concepts by complete linkage


def test_complete_linkage_rules():
    s = torch.tensor([[1.0, 0.9, 0.2, 0.1],
                      [0.9, 1.0, 0.6, 0.3],
                      [0.2, 0.6, 1.0, 0.7],
                      [0.1, 0.3, 0.7, 1.0]], dtype=torch.float64)
    # 0-1 link at 0.9 first, then 2-3 at 0.7; {0,1}-{2,3} link at min 0.1 < 0.5: two concepts
    assert complete_linkage([10, 11, 12, 13], s, 0.5) == [[10, 11], [12, 13]]
    assert complete_linkage([10, 11, 12, 13], s, 0.95) == [[10], [11], [12], [13]]
    assert complete_linkage([10, 11, 12, 13], s, 0.05) == [[10, 11, 12, 13]]
    # complete, not single, linkage: 1-2 at 0.6 >= 0.55 would chain {0,1} and {2,3}, but min is 0.1
    assert complete_linkage([10, 11, 12, 13], s, 0.55) == [[10, 11], [12, 13]]
    # ties: equal links, the pair whose smallest classes come first merges first
    tie = torch.tensor([[1, .8, 0, 0], [.8, 1, .8, 0], [0, .8, 1, .8], [0, 0, .8, 1]], dtype=torch.float64)
    assert complete_linkage([3, 5, 7, 9], tie, 0.5) == [[3, 5], [7, 9]]
    # an undefined similarity (a zero ARV) never links
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.9, 0.1]])
    S = cosine_matrix(A)
    assert math.isnan(float(S[0, 1])) and complete_linkage([1, 2, 3], S, 0.5) == [[1, 3], [2]]


# ------------------------------------------------------------------ the k-concept rules


def test_k_concept_index_sets_and_filters_on_hand_made_arvs():
    A = torch.tensor([[3.0, 1.0, -1.0, 1.0, 2.0, 0.0],
                      [1.0, 3.0, -1.5, 1.0, 2.0, 0.0],
                      [0.5, 0.5, -3.0, 2.9, 2.0, 0.0]], dtype=torch.float64)
    got = assign_inputs(A, 0.5).tolist()
    # input 0: 1.5 > max(1, .5) -> S1. input 1: S2 (1.5 > 1). input 2 (negative): rho*A1 = -.5 > max(-1.5, -3) and
    # rho*A2 = -.75 > max(-1, -3) both hold: the FIRST j wins -> S1. input 3: 1.45 > 1 -> S3. input 4: a tie,
    # rho*2 > 2 nowhere -> shared. input 5: all zero -> shared.
    assert got == [1, 2, 1, 3, 0, 0]
    assert assign_inputs(A, 1.0).tolist() == [1, 2, 1, 3, 0, 0]  # at rho 1 only exact ties are shared
    # for k = 2 the rule is the paper's: S1 = {rho A1 > A2}, S2 = {not S1, rho A2 > A1}
    two = A[:2]
    for rho in RHOS:
        s1 = rho * two[0] > two[1]
        s2 = ~s1 & (rho * two[1] > two[0])
        a = assign_inputs(two, rho)
        assert torch.equal(a == 1, s1) and torch.equal(a == 2, s2)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 3, 3, generator=g)
    D, Res = split_filters(W, torch.tensor(got), 3)
    assert torch.equal(D.double().sum(0) - 2 * Res.double(), W.double())  # sum_j D_j - (k - 1) Res = W[c], exactly
    assert torch.equal(D[0][[1, 3]], torch.zeros(2, 3, 3)) and torch.equal(D[2][[0, 1, 2]], torch.zeros(3, 3, 3))
    assert torch.equal(Res[[4, 5]], W[[4, 5]]) and not Res[:4].any()


def _random_splits(conv: nn.Conv2d, channels: dict[int, int], seed: int = 0) -> list[Split]:
    g = torch.Generator().manual_seed(seed)
    return [sweep(conv.weight[c].detach(), torch.randn(k, conv.in_channels, generator=g, dtype=torch.float64))
            .split(c, 7) for c, k in channels.items()]


def test_one_network_with_every_split_of_a_layer_computes_the_same_logits():
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    _, conv = model.layer4[2].conv3, model.layer4[2].conv3
    splits = _random_splits(conv, {5: 2, 242: 3, 1698: 3, 2047: 2})
    net = split_network(model, {"layer4.2.conv3": splits})
    assert net.layer4[2].conv3.expanded.out_channels == 2048 + 2 + 3 + 3 + 2
    with torch.no_grad():
        assert (net(x) - ref).abs().max() <= 1e-4 and ref.abs().max() > 1e-3
    # a 3x3 layer with a bias, stride 2 and reflect padding, several splits, k = 2 and 3
    torch.manual_seed(3)
    stem, mid = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2, padding=1, padding_mode="reflect")
    small = nn.Sequential(stem, nn.ReLU(), mid, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    with torch.no_grad():
        mid.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 17, 17)
    net = split_network(small, {"2": _random_splits(mid, {0: 3, 2: 2, 4: 3}, seed=4)})
    with torch.no_grad():
        assert (net(x) - small(x)).abs().max() <= 1e-5


# ------------------------------------------------------------------ the planted three-concept channel, end to end


@pytest.fixture(scope="module")
def planted3(tmp_path_factory):
    """The three-concept planted network as a file, its data, and its stage-1 store (made by the CLI)."""
    return planted_cli_setup(tmp_path_factory.mktemp("layer"), "planted3", PLANTED3, RGB, 4)


def test_planted_channel_comes_out_as_three_concept_channels(planted3):
    root, data, common = planted3
    out = str(root / "out.json")
    r = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--json", out, "--top_k", "4")
    assert r.returncode == 0, r.stderr
    js = json.load(open(out))
    assert set(js) >= {"channels", "baseline_purity", "max_abs_logit_diff", "export", "seconds"}
    ch = js["channels"]["0"]
    assert ch["concepts"] == [[0], [1], [2]] and js["max_abs_logit_diff"] <= 1e-5
    assert set(ch["sources"][f"{ch['best_rho']:.2f}"]) == {"concept1", "concept2", "concept3", "shared"}
    assert list(ch["scores"]) == [f"{r:.2f}" for r in RHOS]
    assert ch["purity"]["concepts"] == [1.0, 1.0, 1.0]  # each concept channel's top-4 images are its own colour
    # each concept channel responds to its own concept: activation sums on the training images
    from utils.data.images import list_images, make_loader
    from utils.model.loading import load_model
    from utils.store.records import load_record, load_split
    from utils.model.hooks import conv_with_filters, layer_input

    lm = load_model(f"{root / 'planted3.py'}:build")
    split = load_split(load_record(ch["record"]))
    images = list_images(data, "train")
    acts = {}
    for t in range(3):
        x = torch.cat([layer_input(lm.model, lm.model.conv, b[0]) for b in
                       make_loader(images, images.indices_of([t]), 8, 0)])
        acts[t] = conv_with_filters(lm.model.conv, x, split.D).sum((0, 2, 3))  # D_1, D_2, D_3 on class t
    for t in range(3):
        own, others = acts[t][t], [acts[t][j] for j in range(3) if j != t]
        assert own > 0 and all(o < 0.05 * own for o in others), (t, acts[t])
    # the whole network, loaded back into a plain module tree, computes the original logits
    net = load_checkpoint(js["export"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (net(x) - lm.model(x)).abs().max() <= 1e-5
    layer_dir = os.path.dirname(js["export"])
    assert sorted(os.listdir(layer_dir)) == ["arrays.npz", "disentangled.pt", "layer.json", "pictures", "plots", "report.html",
                                             "results_quantitative"]
    page = open(os.path.join(layer_dir, "report.html")).read()
    assert "Channel 0: 3 concepts" in page and "green thing" in page
    assert len(os.listdir(os.path.join(layer_dir, "plots"))) == 4  # three densities + pgfplots
    with open(os.path.join(layer_dir, "results_quantitative", os.listdir(os.path.join(layer_dir,
                                                                                      "results_quantitative"))[0])) as f:
        assert f.readline().strip() == "disentangled1,disentangled2,disentangled3,residual"


def test_layer_command_equals_stage_3_for_two_single_class_concepts(planted_model, planted_data, tmp_path):
    """For a channel whose concepts are two single classes: the same index sets, scores, best rho and filters."""
    from utils.stages import splitting as dis
    from utils.stages.relevance import Stage1Config, compute_relevance
    from utils.stages.layer import LayerConfig, disentangle_layer
    from utils.store.records import load_record, load_split

    store = str(tmp_path / "store")
    compute_relevance(Stage1Config(planted_data, store, layer="conv", batch_size=3, num_workers=0, progress=False,
                                     device="cpu"), loaded=planted_model)
    out = disentangle_layer(LayerConfig(planted_data, store, layer="conv", batch_size=3, num_workers=0, progress=False,
                                        device="cpu", top_k=4, split_rule="paper", orientation="none"),
                            loaded=planted_model, log=lambda *a: None)
    ch = out["channels"]["0"]
    assert ch["concepts"] == [[0], [1]]
    rec, sw = dis.disentangle_channel(dis.Stage3Config(planted_data, store, 0, [[0], [1]], layer="conv", batch_size=3,
                                                       num_workers=0, progress=False, device="cpu"),
                                      loaded=planted_model)
    assert ch["scores"] == rec.scores and ch["sources"] == rec.sources and ch["best_rho"] == rec.best_rho
    layered = load_split(load_record(ch["record"]))
    assert torch.equal(layered.D, sw.D[sw.rhos.tolist().index(rec.best_rho)]) and torch.equal(
        layered.Res, sw.Res[sw.rhos.tolist().index(rec.best_rho)])


# ------------------------------------------------------------------ the other scripts with k concepts


def test_stage_3_4_and_pictures_take_three_concepts(planted3, tmp_path):
    root, data, common = planted3
    store = str(root / "store")
    r = run_script("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", "0",
                   "--classes_for_concept1", "0", "--classes_for_concept2", "1", "--classes_for_concept3", "2",
                   "--json", str(tmp_path / "s3.json"))
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:5] == ["rho", "|S1|", "|S2|", "|S3|", "|S0|"] for line in r.stdout.splitlines())
    s3 = json.load(open(tmp_path / "s3.json"))
    assert s3["classes_for_concept3"] == [2] and set(s3["sources"]["0.50"]) == {"concept1", "concept2", "concept3"}
    same = run_script("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", "0",
                      "--concept", "0", "--concept", "1", "--concept", "2", "--json", str(tmp_path / "s3b.json"))
    assert same.returncode == 0 and json.load(open(tmp_path / "s3b.json"))["scores"] == s3["scores"]
    flags = [*common, "--model_dir", os.path.join(store, "models_disentangled"), "--channel", "0", "--concept", "0",
             "--concept", "1", "--concept", "2"]
    r = run_script("get_results.py", *flags, "--out_dir", str(tmp_path), "--json", str(tmp_path / "s4.json"))
    assert r.returncode == 0, r.stderr
    s4 = json.load(open(tmp_path / "s4.json"))
    assert len(s4["concept3"]["mean"]) == 4 and len(s4["csv"]) == 3 and len(s4["plots"]) == 4
    for j in range(3):  # on concept j's images, D_j carries the activation
        mean = s4[f"concept{j + 1}"]["mean"]
        assert abs(mean[j] - 1) < 0.05 and all(abs(mean[i]) < 0.05 for i in range(3) if i != j)
    r = run_script("summarize_results.py", "--results_dir", str(tmp_path / "results_quantitative"))
    assert r.returncode == 0 and "3 concepts" in r.stdout and "Disentangled 3" in r.stdout
    r = run_script("visualize_channel.py", *flags, "--store_dir", store, "--split", "val", "--top_k", "4", "--no_fv",
                   "--out_dir", str(tmp_path / "pics"), "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
    v = json.load(open(tmp_path / "v.json"))
    assert set(v["purity"]) == {"original", "D1", "D2", "D3"} and v["purity"]["D3"]["concept3"] == 1.0
    from PIL import Image
    with Image.open(os.path.join(v["out_dir"], "teaser.png")) as im:
        assert im.size == (4 * 400, 500)  # four panels: the original and three concept channels


def test_concept_flags_are_checked(planted3):
    root, data, common = planted3
    base = [*common, "--store_dir", str(root / "store"), "--channel_disentangle", "0"]
    for extra, words in ((["--classes_for_concept1", "0"], "two or more concepts"),
                         (["--classes_for_concept1", "0", "--classes_for_concept3", "1"], "--classes_for_concept2 is missing"),
                         (["--classes_for_concept1", "0", "--concept", "1"], "not both")):
        r = run_script("disentangle_channel.py", *base, *extra)
        assert r.returncode == 2 and words in r.stderr, r.stderr
