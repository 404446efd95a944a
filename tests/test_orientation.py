"""Units read in their concepts' directions: a planted unit that serves one concept by going DOWN.

Stem channels 0-2 see red, 3-5 green, 6-8 blue, 9 is a constant 1 (as the other planted networks). Conv channel 0
reads the red inputs with +1 and the blue inputs with -1; channel 1 reads green. The logits read the conv
channels' spatial means directly: red = a0, green = a1, blue = -a0. So channel 0 serves red by rising and blue
by FALLING: blue's orientation is -1. Read unoriented, the paper's rule finds no input exclusive to blue
(its ARV is negative everywhere it is not zero) and blue's concept unit is the shared part alone; read in
blue's direction, the blue inputs are blue's, and its concept unit's top images (of -activation) are blue.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import planted_cli_setup, run_script
from utils.data.images import ImageDataset, list_images
from utils.method.split import Split, oriented_bank
from utils.passes.contributions import UnitRequest, contribution_pass, pick_rows
from utils.passes.image_pass import Runner
from utils.passes.topk import TopKSearch
from utils.model.hooks import layer_input
from utils.model.loading import load_model

SOURCE = '''import torch
from torch import nn


class Downward(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 1)
        self.conv = nn.Conv2d(10, 2, 1, bias=False)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.bias.zero_()
            for c, rgb in ((0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)):
                self.stem.weight[c, rgb] = 1.0 + 0.1 * c
                self.stem.weight[c, [k for k in range(3) if k != rgb]] = -0.6
            self.stem.bias[9] = 1.0
            self.conv.weight.zero_()
            self.conv.weight[0, [0, 1, 2], 0, 0] = 1.0
            self.conv.weight[0, [6, 7, 8], 0, 0] = -1.0
            self.conv.weight[1, [3, 4, 5], 0, 0] = 1.0
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.stem(x))).mean((2, 3)))


def build():
    return Downward(), ["red thing", "green thing", "blue thing"]
'''
COLOURS = {"A_red": (220, 30, 30), "B_green": (30, 220, 30), "C_blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def downward(tmp_path_factory):
    """The model file, its data and its stage-1 store (made by the CLI)."""
    return planted_cli_setup(tmp_path_factory.mktemp("downward"), "downward", SOURCE, COLOURS, 5)


def _build(root):
    return load_model(f"{root / 'downward.py'}:build").model


def test_the_pass_finds_the_downward_concept_and_its_contributions_add_up(downward):
    root, data, _ = downward
    model = _build(root)
    images = list_images(data, "train")
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    rows = pick_rows(images, [[0], [2]], 100, 100)
    (got,), _ = contribution_pass(runner, model, model.conv, images, [UnitRequest(0, [[0], [2]], rows)], None, True)
    assert got.signs() == [1, -1] and got.counts == [6, 6]  # blue's logit falls as channel 0 rises
    # every kept image, with its label; the contributions add up to the unit's activation (summed over positions)
    assert sorted(got.index.tolist()) == sorted(rows) and got.labels.tolist() == [rows[int(i)] for i in got.index]
    x = torch.stack([ImageDataset(images)[int(i)][0] for i in got.index])
    act = model.conv(layer_input(model, model.conv, x)).sum((2, 3))[:, 0].double()
    assert torch.allclose(got.V.sum(1), act, rtol=1e-6, atol=1e-6)
    # what each input adds, independently: the layer input's channel k' summed, times its weight
    xin = layer_input(model, model.conv, x).double().sum((2, 3))
    assert torch.allclose(got.V, xin * model.conv.weight[0, :, 0, 0].double(), atol=1e-6)
    # the summed gradient of the label logit at channel 0 is (positions) x (+1 red, -1 blue) per image
    hw = x.shape[-1] * x.shape[-2]
    assert torch.allclose(got.grad, torch.tensor([6.0, -6.0], dtype=torch.float64) / hw * hw, atol=1e-5)


def test_oriented_reading_ranks_the_downward_concepts_images_first(downward):
    root, data, _ = downward
    model = _build(root)
    images = list_images(data, "val")
    w = model.conv.weight.detach()[0]
    D = torch.stack([w * torch.tensor([1.0 if k in (0, 1, 2) else 0.0 for k in range(10)]).view(10, 1, 1),
                     w * torch.tensor([1.0 if k in (6, 7, 8) else 0.0 for k in range(10)]).view(10, 1, 1)])
    split = Split(0, D, torch.zeros_like(w))
    x = torch.stack([ImageDataset(images)[i][0] for i in range(len(images))])
    labels = torch.tensor(images.targets)

    def top(bank):
        s = TopKSearch(bank, 5, model.conv)
        s.add(layer_input(model, model.conv, x), torch.arange(len(images)), labels)
        return s.result(Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False))

    oriented = top(oriented_bank(model.conv, split, [1, -1]))
    assert sorted(oriented.get(0, "D2")["labels"].tolist()) == [2] * 5  # -D2: the blue images first
    assert sorted(oriented.get(0, "-original")["labels"].tolist()) == [2] * 5
    assert sorted(oriented.get(0, "D1")["labels"].tolist()) == [0] * 5
    raw = top(oriented_bank(model.conv, split, [1, 1]))
    assert 2 not in raw.get(0, "D2")["labels"].tolist()  # read upward, blue comes last
    assert [k for _, k in raw.keys] == ["original", "D1", "D2"]  # no negated original without a -1


def _layer(downward, tmp_path, *extra):
    root, _, common = downward
    os.makedirs(tmp_path, exist_ok=True)
    out = tmp_path / "layer.json"
    r = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--out_dir",
                   str(tmp_path / "out"), "--top_k", "4", "--json", str(out), "--baseline_channels", "0", *extra)
    assert r.returncode == 0, r.stderr
    return r, json.load(open(out))


@pytest.mark.parametrize("rule", ["paper", "search"])
def test_layer_command_reads_the_downward_concept_in_its_direction(downward, tmp_path, rule):
    _, raw = _layer(downward, tmp_path / "raw", "--split_rule", rule, "--orientation", "none")
    r, js = _layer(downward, tmp_path / "oriented", "--split_rule", rule, "--orientation", "gradient")
    raw0, ch = raw["channels"]["0"], js["channels"]["0"]
    assert raw0["concepts"] == ch["concepts"] == [[0], [2]]
    assert raw0["orientation"] is None and ch["orientation"] == [1, -1] and js["orientation"] == "gradient"
    assert ch["purity"]["concepts"] == [1.0, 1.0] and ch["auc"]["concepts"] == [1.0, 1.0]
    assert ch["pair_auc"]["concepts"] == [1.0, 1.0]
    assert ch["flags"] == [[], []], ch["flags"]
    assert js["max_abs_logit_diff"] <= 1e-5
    assert "blue thing (-)" in r.stdout  # the table marks the downward concept
    for ref, cs, strip in zip(ch["by_relevance"], ch["concepts"], ch["pictures"]["relevance"]):  # references
        assert len(ref["indices"]) == 4 and set(ref["labels"]) <= set(cs) and os.path.isfile(strip)
        assert ref["relevance"] == sorted(ref["relevance"], reverse=True) and ref["relevance"][0] > 0
    rec = json.load(open(os.path.join(ch["record"], "record.json")))
    assert rec["orientation"] == [1, -1] and ch["record"].endswith("_oriented_layer")
    # stage 4 on the oriented record reads its concept units in their directions too (the record asks for it)
    root, _, common = downward
    only = tmp_path / "only" / os.path.basename(ch["record"])  # a folder with the oriented record alone
    shutil.copytree(ch["record"], only)
    r4 = run_script("get_results.py", *common, "--model_dir", str(only.parent), "--channel_of_interest",
                    "0", "--classes_for_concept1", "0", "--classes_for_concept2", "2", "--purity", "4",
                    "--out_dir", str(tmp_path / "s4"), "--json", str(tmp_path / "s4.json"))
    assert r4.returncode == 0, r4.stderr
    s4 = json.load(open(tmp_path / "s4.json"))
    assert s4["record"] == str(only)
    assert s4["purity"]["D2"]["concept2"] == 1.0 and s4["auc"]["D2"]["concept2"] == 1.0
    if rule == "paper":  # read upward, the paper's rule leaves blue no input of its own
        assert raw0["sources"][f"{raw0['best_rho']:.2f}"]["concept2"] == []
        assert raw0["purity"]["concepts"][1] < 1.0 and raw0["flags"][1], raw0
        assert ch["sources"][f"{ch['best_rho']:.2f}"]["concept2"] == [6, 7, 8]
    else:
        assert rec["split_rule"] == "search" and ch["search"]["held_objective"][1] >= ch["search"]["held_objective"][0]


def test_ablation_to_the_concept_absent_mean_certifies_the_planted_split(downward, tmp_path):
    """The planted unit reads red upward and blue downward, and its split gives each concept unit exactly one
    colour's inputs: ablated to their mean where their concept is absent (the default), both concept units are
    certified, each with all of its concept's function and none of the other's; ablated to their mean over all
    images, the mean carries each concept's evidence into the other's images and neither is."""
    _, js = _layer(downward, tmp_path / "absent")
    effects = js["channels"]["0"]["effects"]
    assert js["certification"]["reference"] == "absent" and [e["certified"] for e in effects] == [True, True]
    assert all(e["own_share"] == pytest.approx(1.0, abs=1e-4) and e["cross_share"] <= 1e-4 for e in effects)
    _, js = _layer(downward, tmp_path / "mean", "--ablation", "mean")
    assert [e["certified"] for e in js["channels"]["0"]["effects"]] == [False, False]
