"""The functional split rule (--split_rule function): index sets chosen for what each concept unit does to the
network's decisions, checked against autograd, against every assignment tried by hand, and end to end where the
searched rule's shared inputs carry both concepts' function."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import planted_cli_setup, run_script, write_image_folder

# Stem channels 0-1 see red, 2-3 blue, 4-7 red or blue (not green), 8 green. Conv channel 0 reads 0-7 and feeds the
# red and the blue logit; channel 1 reads green. The four shared inputs carry about a third of channel 0's
# activation on red images and on blue ones.
SHARED_NET = '''import torch
from torch import nn


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 9, 1)
        self.conv = nn.Conv2d(9, 2, 1, bias=False)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.stem.bias.zero_()
            for c, w in enumerate([[1, -0.6, -0.6]] * 2 + [[-0.6, -0.6, 1]] * 2 + [[1, -1.5, 1]] * 4
                                  + [[-0.6, 1, -0.6]]):
                self.stem.weight[c, :, 0, 0] = torch.tensor(w)
            self.conv.weight.zero_()
            self.conv.weight[0, :4] = 1.0
            self.conv.weight[0, 4:8] = 0.34
            self.conv.weight[1, 8] = 1.0
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def build():
    return Shared(), ["red thing", "blue thing", "green thing"]
'''
COLOURS = {"A_red": (220, 30, 30), "B_blue": (30, 30, 220), "C_green": (30, 220, 30)}


class Tiny(nn.Module):
    """A 3x3, stride-2, padded layer with a bias between a stem and a head that is not linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.layer = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.relu(self.stem(x)))).mean((2, 3)))


def test_functional_rows_are_each_inputs_share_of_the_logits_gradient_times_the_unit(tmp_path):
    """F[i, k] = sum over output positions of the class logit's gradient at the unit times what input k adds to the
    unit there (the layer applied to input k alone, without the bias), and the per-class input sums are the inputs
    as each tap sees them, summed: both against autograd and a plain convolution, per image."""
    from utils.data.images import list_images, load_image
    from utils.method.arv import tap_view
    from utils.passes.contributions import UnitRequest, contribution_pass
    from utils.passes.image_pass import Runner

    model = Tiny().eval()
    data = write_image_folder(str(tmp_path / "data"), n_train=3, n_val=1, colors=COLOURS, size=12)
    images = list_images(data, "train")
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    rows = {i: 1 + (t == 1) if t < 2 else 0 for i, t in enumerate(images.targets)}
    found, _ = contribution_pass(runner, model, model.layer, images, [UnitRequest(2, [[0], [1]], rows)], None, True,
                                 functional=True)
    got = found[0]
    assert got.F.shape == (len(rows), 5) and got.classes.tolist() == [images.targets[i] for i in got.index.tolist()]
    x = torch.stack([load_image(images, int(i)) for i in got.index])
    xin = torch.relu(model.stem(x)).requires_grad_(False)
    a = model.layer(xin).requires_grad_(True)
    z = model.head(torch.tanh(a).mean((2, 3)))
    (g,) = torch.autograd.grad(z.gather(1, got.classes[:, None]).sum(), a)
    for k in range(5):
        only = torch.zeros_like(xin)
        only[:, k] = xin[:, k]
        part = nn.functional.conv2d(only, model.layer.weight[2:3], None, stride=2, padding=1)[:, 0]
        assert torch.allclose(got.F[:, k], (g[:, 2] * part).sum((1, 2)).double(), rtol=1e-4, atol=1e-5), k
    assert torch.allclose(got.g, g[:, 2].flatten(1).double(), rtol=1e-5, atol=1e-7)
    every = torch.stack([load_image(images, i) for i in range(len(images))])
    view = tap_view(torch.relu(model.stem(every)), model.layer)
    for t in range(3):
        mine = torch.tensor(images.targets) == t
        assert got.inputs.counts[t] == int(mine.sum())
        assert torch.allclose(got.inputs.sums[t], view[mine].sum(0).double(), rtol=1e-4, atol=1e-4)


def _random_model(seed: int, C: int = 6, k: int = 2, R: int = 2):
    from utils.method.function import EffectModel

    rng = np.random.default_rng(seed)
    own = rng.gamma(1.0, 1.0, (k, k, C)) * np.where(rng.random((1, k, C)) < 0.5, 1.0, 0.2)
    other = rng.normal(0, 0.1, (k, R, C))
    return EffectModel(own, own.sum(-1).diagonal().copy() * rng.uniform(0.8, 1.2, k), other,
                       rng.normal(0, 0.1, R), list(range(10, 10 + R)))


@pytest.mark.parametrize("seed", range(6))
def test_the_program_finds_the_least_worst_assignment_of_every_one_tried(seed):
    """Over every one of the 3^6 assignments of six inputs, none has a smaller worst value (1 - own, cross,
    elsewhere) than the rule's, up to its slack; and the rule never returns worse than where it started."""
    from utils.method.function import SLACK, functional_assignment

    model = _random_model(seed)
    best = min(max(model.shares(np.array(a))["worst"], 0.0) for a in itertools.product(range(3), repeat=6))
    start = torch.zeros(6, dtype=torch.long)
    assign, how = functional_assignment(model, start)
    worst = model.shares(assign.numpy())["worst"]
    assert worst <= model.shares(start.numpy())["worst"] + 1e-12
    if how["moved"]:
        assert max(worst, 0.0) <= best + SLACK + 1e-9, (worst, best)
        assert how["worst"][1] == pytest.approx(worst)


def test_inputs_that_carry_no_function_stay_where_the_search_put_them():
    """Of equally good assignments the rule keeps the most of its start: inputs with no effect on any logit are
    never moved, and a start that is already best comes back unchanged."""
    from utils.method.function import EffectModel, functional_assignment

    own = np.zeros((2, 2, 6))
    own[:, 0, 0] = own[:, 1, 1] = 1.0  # input 0 carries concept 1, input 1 concept 2, inputs 2-5 nothing
    model = EffectModel(own, np.array([1.0, 1.0]), np.zeros((2, 0, 6)), np.zeros(0), [])
    start = torch.tensor([2, 1, 0, 1, 2, 0])  # inputs 0 and 1 swapped: worst 1 (own 0, cross 1)
    assign, how = functional_assignment(model, start)
    assert assign.tolist() == [1, 2, 0, 1, 2, 0] and how["moved"] == 2 and how["worst"] == [1.0, 0.0]
    same, how = functional_assignment(model, assign)
    assert same.tolist() == assign.tolist() and how["moved"] == 0
    unusable = EffectModel(own, np.array([1.0, -0.5]), np.zeros((2, 0, 6)), np.zeros(0), [])
    kept, how = functional_assignment(unusable, start)
    assert kept.tolist() == start.tolist() and "does not lower" in how["status"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return planted_cli_setup(tmp_path_factory.mktemp("shared"), "shared", SHARED_NET, COLOURS, 4)


def _layer(shared, rule: str, tmp_path) -> dict:
    root, _, common = shared
    out = tmp_path / f"{rule}.json"
    r = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--split_rule", rule,
                   "--ablation", "zero", "--out_dir", str(tmp_path / rule), "--top_k", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    return json.load(open(out))


def test_the_functional_rule_certifies_where_the_shared_inputs_of_the_searched_rule_carry_both_concepts(shared,
                                                                                                         tmp_path):
    """Channel 0's red and blue concepts share four inputs. The searched rule keeps them shared (its concept units
    tell red from blue perfectly), so each concept unit, ablated, takes a third of the other concept's evidence:
    not certified. The functional rule gives two of them to each concept: every concept unit takes its own
    concept's evidence and at most a fifth of the other's (ablated to zero, the network being linear where it
    matters, measured exactly as predicted)."""
    searched = _layer(shared, "search", tmp_path)["channels"]["0"]
    assert {4, 5, 6, 7} <= set(searched["search"]["start"]["shared"]) and "function" not in searched["search"]
    assert all(not e["certified"] and e["cross_share"] > 0.3 for e in searched["effects"])
    js = _layer(shared, "function", tmp_path)
    ch = js["channels"]["0"]
    assert js["split_rule"] == "function"
    sets = ch["sources"][f"{ch['best_rho']:.2f}"]
    assert set(sets["shared"]) <= {8} and len(set(sets["concept1"]) & {4, 5, 6, 7}) == 2, sets  # 8: weight 0
    assert {0, 1} <= set(sets["concept1"]) and {2, 3} <= set(sets["concept2"])
    assert ch["search"]["function"]["moved"] == 4
    predicted = ch["search"]["function"]["predicted"]
    for j, e in enumerate(ch["effects"]):
        assert e["certified"] and e["cross_share"] < 0.25 and e["own_share"] > 0.75, e
        assert e["own_share"] == pytest.approx(predicted["own"][j], abs=0.02)
        assert e["cross_share"] == pytest.approx(predicted["cross"][j][1 - j], abs=0.02)
    assert ch["purity"]["concepts"] == [1.0, 1.0]


def test_without_an_integer_point_in_time_the_rounded_relaxation_is_taken(monkeypatch):
    """Where HiGHS returns no integer point within its time (thousands of inputs), the linear relaxation's solution,
    rounded, is taken: better than the start, never better than the exact program's, and said not to be proven
    optimal."""
    import scipy.optimize

    from utils.method.function import functional_assignment

    model = _random_model(3)
    start = torch.zeros(6, dtype=torch.long)
    exact, how = functional_assignment(model, start)
    real = scipy.optimize.milp

    def no_integer_point(c, *, integrality=None, **kw):
        res = real(c, integrality=integrality, **kw)
        if integrality is not None and np.any(integrality):
            res.x = None  # as HiGHS answers when its time runs out before any integer point
        return res

    monkeypatch.setattr(scipy.optimize, "milp", no_integer_point)
    relaxed, how_relaxed = functional_assignment(model, start)
    assert how["status"] == "optimal" and how_relaxed["status"].startswith("best found")
    assert model.shares(relaxed.numpy())["worst"] < model.shares(start.numpy())["worst"]
    assert how_relaxed["worst"][1] >= how["worst"][1] - 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_a_target_moves_fewer_inputs_and_keeps_a_start_that_meets_it(seed):
    """With a worst share that is good enough (``target``), the rule moves no more inputs than without one, stays
    within the target (or the least it can do, if that is more), and keeps a start already within it."""
    from utils.method.function import SLACK, functional_assignment

    model = _random_model(seed)
    start = torch.zeros(6, dtype=torch.long)
    least = min(max(model.shares(np.array(a))["worst"], 0.0) for a in itertools.product(range(3), repeat=6))
    target = least + 0.2
    free, how_free = functional_assignment(model, start)
    aimed, how = functional_assignment(model, start, target=target)
    assert how["moved"] <= how_free["moved"]
    assert model.shares(aimed.numpy())["worst"] <= max(least + SLACK, target) + 1e-9
    kept, how_kept = functional_assignment(model, aimed, target=model.shares(aimed.numpy())["worst"])
    assert kept.tolist() == aimed.tolist() and how_kept["moved"] == 0 and "meet the target" in how_kept["status"]


class Residual(nn.Module):
    """A 3x3 layer with a residual connection around it: copies made at the layer would be wrong."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.layer = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
            p.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.tanh(h + self.layer(h)).mean((2, 3)))


@pytest.mark.parametrize("net,at", [(Tiny, 0.5), (Tiny, 1.0), (Residual, 0.5)])
def test_the_path_gradients_are_autograds_where_each_ablation_takes_the_unit(tmp_path, net, at):
    """For every endpoint (a set of inputs moved to a reference input), the gradient of each image's class logit at
    the unit, with the unit's output moved as that ablation moves it (all the way, or half way), equals autograd's on the network with that
    output (copies at the layer where the network allows it, of the input where a residual connection does not),
    and F there is that gradient times what each input adds."""
    from utils.data.images import list_images, load_image
    from utils.method.arv import tap_view
    from utils.passes.contributions import PathRequest, path_pass
    from utils.passes.image_pass import Runner

    model = net().eval()
    data = write_image_folder(str(tmp_path / "data"), n_train=3, n_val=1, colors=COLOURS, size=12)
    images = list_images(data, "train")
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    rows = [0, 2, 4, 5, 7]
    x = torch.stack([load_image(images, i) for i in rows])
    labels = torch.tensor([images.targets[i] for i in rows])
    xin = torch.relu(model.stem(x))
    U = tap_view(xin, model.layer).double()
    gen = torch.Generator().manual_seed(2)
    keeps = torch.stack([torch.ones(5), torch.tensor([1.0, 0, 1, 0, 0])]).double()
    refs = torch.rand((2, *U.shape[1:]), generator=gen, dtype=torch.float64)
    c = 1
    request = PathRequest(c, rows, keeps, refs, torch.tensor([at, at], dtype=torch.float64))
    [(F, g)], _ = path_pass(runner, model, model.layer, images, [request], None)
    W = model.layer.weight[c].flatten(1).double()
    for e in range(2):
        moved = keeps[e][:, None] * W
        shift = at * (torch.einsum("kt,ktq->q", moved, refs[e])[None] - torch.einsum("kt,bktq->bq", moved, U))
        a = model.layer(xin).detach().clone()
        a[:, c] += shift.view(len(rows), *a.shape[2:]).float()
        a.requires_grad_(True)
        h = xin if net is Residual else None
        z = model.head(torch.tanh((h + a) if h is not None else a).mean((2, 3)))
        (ga,) = torch.autograd.grad(z.gather(1, labels[:, None]).sum(), a)
        assert torch.allclose(g[e], ga[:, c].flatten(1).double(), rtol=1e-4, atol=1e-6), e
        want = torch.einsum("nq,nktq->nkt", ga[:, c].flatten(1).double(), U).mul(W).sum(-1)
        assert torch.allclose(F[e], want, rtol=1e-4, atol=1e-5), e


def test_the_references_are_the_ablation_pass_s():
    """Absent: the mean input over the classes outside the concepts (every concept's for the original, concept j's
    for D_j), weighted by images, and every class where no image lies outside, as the ablation pass falls back;
    mean: every class; zero: zeros."""
    from utils.method.function import ClassInputs, references

    sums = {t: torch.full((2, 1, 3), float(t + 1)) * n for t, n in ((0, 2), (1, 1), (2, 3))}
    inputs = ClassInputs(sums, {0: 2, 1: 1, 2: 3})
    ref0, (r1, r2) = references(inputs, [[0], [1]], "absent")
    assert torch.allclose(ref0, torch.full_like(ref0, 3.0))  # class 2 alone
    assert torch.allclose(r1, torch.full_like(r1, (2 * 1 + 3 * 3) / 4))  # classes 1 and 2
    assert torch.allclose(r2, torch.full_like(r2, (1 * 2 + 3 * 3) / 5))  # classes 0 and 2
    every, _ = references(inputs, [[0, 1, 2], [1]], "absent")
    assert torch.allclose(every, torch.full_like(every, (1 * 2 + 2 * 1 + 3 * 3) / 6))
    mean, _ = references(inputs, [[0], [1]], "mean")
    assert torch.allclose(mean, every)
    zero, zs = references(inputs, [[0], [1]], "zero")
    assert not zero.any() and not any(z.any() for z in zs)


def test_a_first_batch_of_one_image_does_not_decide_where_the_ablations_copies_are_made(tmp_path):
    """Around a residual connection one image's copies made at the layer agree with copies of the input (its one
    residual serves every copy), so a first batch of one image must not decide: the pass then makes copies of the
    input for every batch and gives what it gives when its first batch holds several images."""
    from utils.data.images import list_images
    from utils.method.split import Split, split_filters
    from utils.model.surgery import appended_channels, split_network
    from utils.passes.image_pass import Runner
    from utils.passes.interventions import intervention_pass, reference_outputs, unit_interventions

    model = Residual().eval()
    data = write_image_folder(str(tmp_path / "data"), n_train=3, n_val={"A_red": 1, "B_blue": 3, "C_green": 3},
                              colors=COLOURS, size=12)
    train, val = list_images(data, "train"), list_images(data, "val")
    D, Res = split_filters(model.layer.weight[1].detach(), torch.tensor([1, 1, 2, 2, 0]), 2)
    net = split_network(model, {"layer": [Split(1, D, Res)]})
    runner = Runner(device=torch.device("cpu"), batch_size=64, num_workers=0, progress=False)
    ivs = unit_interventions(1, appended_channels(5, [Split(1, D, Res)])[0], 2, None, [[0], [1]])
    ref = reference_outputs(runner, net, "layer", train, None, "absent")
    one_first, _ = intervention_pass(runner, net, "layer", val, ivs, ref, None)  # class 0 has one image
    several_first, _ = intervention_pass(runner, net, "layer", val, ivs, ref, None,
                                         indices=list(range(1, len(val))) + [0])
    assert one_first.copies == several_first.copies == "input"
    order = np.argsort(several_first.index)
    assert np.allclose(one_first.logit, several_first.logit[order], atol=1e-5)
