"""What concept units do to the network's decisions: ablations and steering, batched, and certification."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import COLOURS, PLANTED4, write_image_folder

RED, ORANGE, GREEN, BLUE = 0, 1, 2, 3
CONCEPTS = [[RED, ORANGE], [BLUE]]  # channel 0's two concepts


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted four-colour network (conftest: channel 0 reads the red stem inputs 0-2 and the blue ones 6-8 and
    feeds the red, orange and blue logits) and its images."""
    from utils.data.images import list_images
    from utils.model.loading import load_model

    root = tmp_path_factory.mktemp("effects")
    (root / "planted4.py").write_text(PLANTED4)
    data = write_image_folder(str(root / "data"), n_train=6, n_val=4, colors=COLOURS, size=16)
    return load_model(f"{root / 'planted4.py'}:build").model, list_images(data, "train"), list_images(data, "val")


def split_of(model, assign: list[int]):
    from utils.method.split import Split, split_filters

    D, Res = split_filters(model.conv.weight[0].detach(), torch.tensor(assign), 2)
    return Split(0, D, Res)


GOOD = [1, 1, 1, 0, 0, 0, 2, 2, 2, 0]  # red inputs to concept 1, blue ones to concept 2
SHARED = [0] * 10  # a deliberately bad split: every input shared, so D_1 = D_2 = Res = the whole filter


def run(model, train, val, assign, mode="mean", steer=None, interventions=None, both=False):
    """The intervention pass on the planted network with channel 0 split by ``assign`` (``both``: channel 1 split
    too, red inputs against green ones, and its interventions after channel 0's)."""
    from utils.method.split import Split, split_filters
    from utils.model.surgery import appended_channels, split_network
    from utils.passes.image_pass import Runner
    from utils.passes.interventions import intervention_pass, reference_outputs, unit_interventions

    runner = Runner(device=torch.device("cpu"), batch_size=64, num_workers=0, progress=False)
    splits = [split_of(model, assign)]
    if both:
        D, Res = split_filters(model.conv.weight[1].detach(), torch.tensor([1, 1, 1, 2, 2, 2, 0, 0, 0, 0]), 2)
        splits.append(Split(1, D, Res))
    net = split_network(model, {"conv": splits})
    cols = appended_channels(4, splits)
    concepts = [CONCEPTS, [[RED, ORANGE], [GREEN]]]
    ivs = interventions or [iv for s, c, cs in zip(splits, cols, concepts)
                            for iv in unit_interventions(s.channel, c, 2, steer, cs)]
    ref = reference_outputs(runner, net, "conv", train, None, mode)
    effects, _ = intervention_pass(runner, net, "conv", val, ivs, ref, None)
    return net, ref, effects


@pytest.mark.parametrize("mode", ["absent", "mean", "zero"])
def test_a_good_split_is_certified_and_every_other_class_keeps_its_evidence(planted, mode):
    """Ablating the blue concept unit removes the blue images' blue evidence and no other class's; ablating the
    red-and-orange concept unit removes theirs and not blue's; both hurt their own classes at least as much as
    ablating the whole original unit does: certified."""
    from utils.method.effects import unit_effects

    model, train, val = planted
    _, ref, effects = run(model, train, val, GOOD, mode)
    got = unit_effects(effects, 0, CONCEPTS, 4, tol=0.1)
    if mode == "absent":  # the blue unit's reference: its mean where blue is absent, where it reads nothing
        blue_iv = [iv for iv in effects.interventions if iv.channel == 0 and iv.target == "D2" and iv.factor is None][0]
        assert blue_iv.absent == (BLUE,) and float(ref.of(blue_iv).abs().max()) < 1e-6
        assert got[1]["own_share"] == pytest.approx(1.0, abs=1e-6)  # all of channel 0's blue function is D2's
    for j, e in enumerate(got, 1):
        assert e["own"] > 0 and e["own"] >= 0.9 * e["own_original"], (j, e)
        assert e["collateral"] <= 0.1 * e["own_original"], (j, e)
        assert e["certified"], (j, e)
    # the blue unit's ablation leaves the red, orange and green images' own logits where they were (or higher)
    blue = [iv for iv in effects.interventions if iv.target == "D2"][0]
    per_class = effects.class_drop(blue, 4)
    assert per_class[BLUE] > 0 and all(per_class[t] <= 1e-4 for t in (RED, ORANGE, GREEN))


def test_a_split_with_every_input_shared_is_not_certified(planted):
    """All inputs shared: each concept unit is the whole filter, so ablating it takes the other concept's evidence
    away too (its collateral equals the original's effect there)."""
    from utils.method.effects import unit_effects

    model, train, val = planted
    _, _, effects = run(model, train, val, SHARED)
    got = unit_effects(effects, 0, CONCEPTS, 4, tol=0.1)
    assert not any(e["certified"] for e in got)
    assert got[0]["collateral_class"] == BLUE and got[1]["collateral_class"] in (RED, ORANGE)
    assert all(e["collateral"] > 0.1 * e["own_original"] for e in got)
    assert all(e["cross_share"] > 0.9 for e in got)  # ablating either takes (nearly) all of the other concept's


def test_ablations_in_one_pass_equal_one_at_a_time_and_the_original_ablation_is_the_original_networks(planted):
    """Every intervention of two split units in one stacked pass gives the numbers each gives alone; ablating all of
    a unit's columns in the split network equals setting the original network's channel to its reference (mean)
    map; steering concept unit 2 (blue) up raises the blue logit and leaves green's, which channel 0 does not
    feed."""
    from utils.passes.interventions import unit_interventions

    model, train, val = planted
    net, ref, together = run(model, train, val, GOOD, steer=2.0, both=True)
    assert {iv.channel for iv in together.interventions} == {0, 1} and len(together.interventions) == 10
    for iv in together.interventions:
        _, _, alone = run(model, train, val, GOOD, interventions=[iv], both=True)
        np.testing.assert_allclose(alone.logit[:, 1], together.logit[:, together.column(iv)], atol=1e-5)
        np.testing.assert_allclose(alone.logit[:, 0], together.logit[:, 0], atol=1e-5)
    # the original network with channel 0 set to its mean output map: D1 + D2 - Res at their means
    from utils.model.surgery import appended_channels

    cols = appended_channels(4, [split_of(model, GOOD)])[0]
    orig = [iv for iv in together.interventions if iv.target == "original"][0]
    r = ref.of(orig)  # D1, D2, Res at their means over the reference images
    mean_map = r[0] + r[1] - r[2]
    handle = model.conv.register_forward_hook(lambda m, i, o: torch.cat([mean_map.expand_as(o[:, :1]), o[:, 1:]], 1))
    try:
        from utils.data.images import ImageDataset

        x = torch.stack([ImageDataset(val)[i][0] for i in together.index])
        with torch.no_grad():
            z = model(x).gather(1, torch.as_tensor(together.labels)[:, None])[:, 0].numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(z, together.logit[:, together.column(orig)], atol=1e-4)
    assert together.copies == "layer"  # nothing after the planted layer reads from before it: copies start there
    up = [iv for iv in together.interventions if iv.target == "D2" and iv.factor == 2.0][0]
    a = together.interventions.index(up)
    assert together.dlogit[a, BLUE] > 0 and abs(together.dlogit[a, GREEN]) < 1e-5  # green reads no channel 0
    assert len(unit_interventions(0, cols, 2, 2.0)) == 5


class Quadrants(torch.nn.Module):
    """Stem channel 0 sees the top-left quadrant of the image only, channel 1 the bottom-right one; the layer
    ``conv``'s unit 0 reads both (weights 1, 1): a unit with two concepts in two places."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 2, 1)
        self.conv = torch.nn.Conv2d(2, 1, 1, bias=False)
        mask = torch.zeros(2, size, size)
        mask[0, : size // 2, : size // 2] = 1
        mask[1, size // 2:, size // 2:] = 1
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.stem.bias.zero_()
            self.conv.weight.fill_(1.0)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x)) * self.mask).mean((2, 3))


def test_a_concept_units_heatmap_lies_where_it_reads():
    """Split unit 0 of the quadrant network into a unit that keeps input 0 (top-left) and one that keeps input 1
    (bottom-right): each concept unit's heatmap on an image lies in its own quadrant, and the original's covers
    both."""
    from utils.method.split import split_filters
    from utils.passes.heatmaps import conditional_heatmaps

    model = Quadrants().eval()
    D, Res = split_filters(model.conv.weight[0].detach(), torch.tensor([1, 2]), 2)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    for j, (rows, cols) in enumerate([(slice(0, 8), slice(0, 8)), (slice(8, 16), slice(8, 16))]):
        h = conditional_heatmaps(model, model.conv, D[j], None, x).abs()
        inside = h[:, rows, cols].sum((1, 2)) / h.sum((1, 2))
        assert bool((inside > 0.999).all()), (j, inside)
    whole = conditional_heatmaps(model, model.conv, model.conv.weight[0], None, x).abs()
    assert bool((whole[:, :8, :8].sum((1, 2)) > 0.3 * whole.sum((1, 2))).all())
    assert bool((whole[:, 8:, 8:].sum((1, 2)) > 0.3 * whole.sum((1, 2))).all())
    # against autograd through the original network: the original unit's heatmap is the gradient of its summed output
    xx = x.clone().requires_grad_(True)
    model.conv(torch.relu(model.stem(xx)) * model.mask).sum().backward()
    assert torch.allclose(whole, (xx.grad * x).sum(1).abs(), atol=1e-5)


def test_the_layer_command_proves_each_split_and_gives_the_arrays(planted4, tmp_path):
    """The layer command on the planted network: one ablation pass; per split channel and concept the effects and
    whether the concept unit is certified, in layer.json, --json, the printed table, the report and the flags; the
    arrays behind them in arrays.npz, read by ``dc.load(...).arrays()``; ``--ablation none`` leaves them out."""
    import json
    import os

    import disentangle_channels as dc
    from conftest import run_script

    root, _, common = planted4
    out = tmp_path / "layer"
    r = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--out_dir", str(out),
                   "--json", str(tmp_path / "l.json"), "--baseline_channels", "0")
    assert r.returncode == 0, r.stderr
    js = json.loads((out / "layer.json").read_text())
    cert = js["certification"]
    assert cert["reference"] == "absent" and cert["tolerance"] == 0.25 and cert["images"] > 0
    units = [(c, j, e) for c, ch in js["channels"].items() for j, e in enumerate(ch["effects"], 1)]
    assert cert["concept_units"] == len(units) and cert["certified"] == sum(e["certified"] for _, _, e in units)
    for c, j, e in units:
        assert e["own_original"] > 0 and e["certified"] == (e["own_share"] >= 0.75 and e["cross_share"] <= 0.25
                                                            and e["elsewhere"] <= 0.25)
        flagged = "not certified by ablation" in js["channels"][c]["flags"][j - 1]
        assert flagged == (not e["certified"])
        assert e["steer"]["factor"] == 2.0
    assert json.loads((tmp_path / "l.json").read_text())["certification"] == cert
    assert "What each concept unit does" in (out / "report.html").read_text() and "certified:" in r.stdout
    res = dc.load(str(out))
    arrays = res.arrays()
    c1 = next(iter(res.channels))
    x = res.reference_images(c1, 1)  # the images the heatmaps are of, as the network takes them
    assert x.shape[0] == len(arrays[f"heatmap_{c1}_D1_index"]) and x.shape[1] == 3
    with pytest.raises(dc.UserError, match="j must be 1 to"):
        res.reference_images(c1, 9)
    n_iv = sum(1 + 2 * len(ch["concepts"]) for ch in js["channels"].values())
    assert arrays["effects_logit"].shape == (cert["images"], n_iv + 1) and len(arrays["effects_names"]) == n_iv
    c0 = next(iter(res.channels))
    assert res.channels[c0].certified == [e["certified"] for e in js["channels"][str(c0)]["effects"]]
    assert arrays[f"act_{c0}_D1"].shape == arrays["act_index"].shape
    h = arrays[f"heatmap_{c0}_D1"]
    assert h.ndim == 3 and h.shape[0] == len(arrays[f"heatmap_{c0}_D1_index"]) > 0
    for p in js["channels"][str(c0)]["pictures"]["heatmaps"]:
        assert os.path.getsize(p) > 100
    none = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--out_dir",
                      str(tmp_path / "none"), "--baseline_channels", "0", "--ablation", "none")
    assert none.returncode == 0, none.stderr
    js = json.loads((tmp_path / "none" / "layer.json").read_text())
    assert js["certification"] is None and all(ch["effects"] is None for ch in js["channels"].values())
    assert "effects_logit" not in dc.load(str(tmp_path / "none")).arrays()


class WithResidual(torch.nn.Module):
    """The planted network with a residual connection around its layer: what follows ``conv`` also reads the stem's
    output, a tensor from before the layer."""

    def __init__(self, planted):
        super().__init__()
        self.stem, self.conv, self.fc = planted.stem, planted.conv, planted.fc

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.fc(torch.relu(self.conv(h) + h[:, :4]).mean((2, 3)))


def test_a_network_that_reads_past_the_layer_copies_the_input_and_gets_the_same_numbers(planted):
    """With a residual connection around the layer, copies made at the layer would not fit what follows: the pass
    notices on its first batch and feeds every copy the whole network; each intervention's logits equal a plain
    forward of the split network with that intervention's columns set by hand."""
    from utils.model.surgery import appended_channels, split_network
    from utils.passes.image_pass import Runner
    from utils.passes.interventions import intervention_pass, reference_outputs, unit_interventions

    model, train, val = planted
    model = WithResidual(model).eval()
    split = split_of(model, GOOD)
    net = split_network(model, {"conv": [split]})
    cols = appended_channels(4, [split])[0]
    runner = Runner(device=torch.device("cpu"), batch_size=64, num_workers=0, progress=False)
    ivs = unit_interventions(0, cols, 2, 2.0, CONCEPTS)
    ref = reference_outputs(runner, net, "conv", train, None, "zero")
    effects, _ = intervention_pass(runner, net, "conv", val, ivs, ref, None)
    assert effects.copies == "input"
    from utils.data.images import ImageDataset

    x = torch.stack([ImageDataset(val)[i][0] for i in effects.index])
    labels = torch.as_tensor(effects.labels)[:, None]
    for iv in ivs:
        def by_hand(_m, _i, out, iv=iv):
            out = out.clone()
            out[:, list(iv.columns)] = 0.0 if iv.factor is None else out[:, list(iv.columns)] * iv.factor
            return out

        handle = net.conv.expanded.register_forward_hook(by_hand)
        try:
            with torch.no_grad():
                z = net(x).gather(1, labels)[:, 0].numpy()
        finally:
            handle.remove()
        np.testing.assert_allclose(effects.logit[:, effects.column(iv)], z, atol=1e-5)
