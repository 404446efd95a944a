"""An independent, brute-force check of the k-concept split (ALGORITHM.md stage 3 and "Extension").

The expected values come from slow, obvious Python written straight from ALGORITHM.md (loops over input
channels, positions and images, in float64): nothing of ``utils.method.split`` or ``utils.method.scoring`` is used to
compute them. The production code is then compared with them:

- the index sets S_1 .. S_k, S_0 of every rho (signed values, ties, first j in concept order) against
  ``utils.method.split.sweep`` / ``assign_inputs`` / ``Sweep.sources``;
- the filters D_j, Res and the identity sum_j D_j - (k - 1) Res = W[c];
- the score of every rho and the best rho (first maximal), k = 3 (and a k = 2 channel in the same pass),
  on a tiny random CNN and tiny PNG images, through ``utils.stages.splitting.score_channels``;
- the split layer of ``utils.model.surgery`` for k = 3: +1 per D_j and -(k - 1) for Res, same logits.
"""
from __future__ import annotations

import os
from decimal import Decimal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import arv_autograd

EPS = 1e-5  # ALGORITHM.md: "pos(D2) + 1e-5"
# ALGORITHM.md: "For each rho in 0.05, 0.10, ..., 1.00 (20 values)", written as decimals
DOC_RHOS = [float(Decimal(i) * Decimal("0.05")) for i in range(1, 21)]


# ---------------------------------------------------------------- the rule, by hand


def doc_sets(A: list[list[float]], rho: float) -> list[list[int]]:
    """``[S_0, S_1, .., S_k]``: input i goes to S_j for the FIRST j (concept order) with
    rho * A_j[i] > max over l != j of A_l[i]; inputs in no S_j form S_0 (signed values)."""
    k, n = len(A), len(A[0])
    sets: list[list[int]] = [[] for _ in range(k + 1)]
    for i in range(n):
        for j in range(k):
            others = max(A[l][i] for l in range(k) if l != j)
            if rho * A[j][i] > others:
                sets[j + 1].append(i)
                break
        else:
            sets[0].append(i)
    return sets


def doc_filters(w: np.ndarray, sets: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """D_j = W[c] with the inputs of every S_l (l != j) set to zero; Res = W[c] on S_0 only."""
    k = len(sets) - 1
    D = []
    for j in range(1, k + 1):
        d = w.copy()
        for l in range(1, k + 1):
            if l != j:
                for i in sets[l]:
                    d[i] = 0.0
        D.append(d)
    res = np.zeros_like(w)
    for i in sets[0]:
        res[i] = w[i]
    return D, res


def conv_by_loops(x: np.ndarray, w: np.ndarray, bias: float, stride: int, pad: int) -> np.ndarray:
    """One output map of a zero-padded convolution (cross-correlation) by plain loops: x C_in x H x W,
    w C_in x kh x kw."""
    C, H, W = x.shape
    _, kh, kw = w.shape
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    out = np.zeros((Ho, Wo))
    for ho in range(Ho):
        for wo in range(Wo):
            s = bias
            for i in range(C):
                for a in range(kh):
                    for b in range(kw):
                        h, v = ho * stride + a - pad, wo * stride + b - pad
                        if 0 <= h < H and 0 <= v < W:
                            s += w[i, a, b] * x[i, h, v]
            out[ho, wo] = s
    return out


def pos(y: np.ndarray) -> float:
    """pos(y) = sum over (h, w) of max(y[h, w], 0)."""
    return sum(max(float(v), 0.0) for v in y.flat)


def doc_score(xs_by_concept: list[list[np.ndarray]], D: list[np.ndarray], bias: float, stride: int, pad: int) -> float:
    """score = sum over j of mean over concept-j images of pos(D_j) / (sum over l != j of pos(D_l) + 1e-5);
    a bias goes to every D_j."""
    k = len(D)
    total = 0.0
    for j in range(k):
        ratios = []
        for x in xs_by_concept[j]:
            p = [pos(conv_by_loops(x, D[l], bias, stride, pad)) for l in range(k)]
            ratios.append(p[j] / (sum(p[l] for l in range(k) if l != j) + EPS))
        total += sum(ratios) / len(ratios)
    return total


def first_max(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def as_lists(A: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in A]


# ---------------------------------------------------------------- index sets and filters


# hand-made ARVs (rows = concepts, columns = input channels) with the corner cases of the rule
CASES = {
    # k = 3: a clear winner each; exact ties; all zero; negatives (an input with negative weights goes to
    # S_j when |A_l| > rho |A_j|); two concepts that both pass at a small rho (first j wins); ties at rho=1
    "k3": [[3.0, 0.0, 1.0, 1.0, 0.0, -1.0, -2.0, -4.0, 2.0, 0.5, -0.1, 5.0],
           [0.5, 2.0, 1.0, 1.0, 0.0, -3.0, -1.5, -4.0, 2.0, 0.5, -0.1, 5.0],
           [0.1, 0.1, 1.0, 0.2, 0.0, -2.5, -3.0, -4.0, 1.0, 0.5, -0.2, 4.999]],
    # k = 4 with negatives where a later concept passes first at small rho
    "k4": [[-5.0, 1.0, -1.0, 0.0, 2.0, 0.25],
           [-1.0, 1.0, -0.5, 0.0, 2.0, 0.5],
           [-3.0, 3.0, -0.6, -1.0, 1.0, 0.75],
           [-4.0, 0.0, -2.0, 1.0, 2.0, 1.0]],
    # k = 2: the paper's rule S1 = {rho A1 > A2}, S2 = {not S1, rho A2 > A1}
    "k2": [[1.0, 0.0, -1.0, -3.0, 2.0, 0.3, 0.6],
           [0.5, 1.0, -3.0, -1.0, 2.0, 0.6, 0.3]],
}


def test_the_rho_grid_is_the_documented_one():
    from utils.method.split import RHOS

    assert list(RHOS) == DOC_RHOS  # exactly the same float64 values, in this order


def test_first_j_wins_and_signed_values_on_a_hand_checked_input():
    """A case worked out on paper: rho = 0.5, A = (-2, -1.5, -3): rho*A1 = -1 > max(-1.5, -3) and
    rho*A2 = -0.75 > max(-2, -3): both pass, S_1 (first j) gets it. At rho = 1 only A2 passes (-1.5 > -2).
    The input (1, 1, 0) is a tie of A1 and A2: in no S_j at any rho <= 1, so S_0."""
    from utils.method.split import assign_inputs

    A = [[-2.0, 1.0], [-1.5, 1.0], [-3.0, 0.0]]
    assert doc_sets(A, 0.5) == [[1], [0], [], []]
    assert doc_sets(A, 1.0) == [[1], [], [0], []]  # rho A1 = -2 > -1.5 fails; rho A2 = -1.5 > -2 passes
    assert assign_inputs(torch.tensor(A, dtype=torch.float64), 0.5).tolist() == [1, 0]
    assert assign_inputs(torch.tensor(A, dtype=torch.float64), 1.0).tolist() == [2, 0]


def _random_arvs(seed: int, k: int, n: int) -> torch.Tensor:
    """Random signed ARVs with many exact ties and equal magnitudes (values on a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-6, 7, (k, n), generator=g).double() / 4
    A[:, : n // 4] = A[0, : n // 4]  # some columns: every concept equal
    return A


@pytest.mark.parametrize("name", [*CASES, "random3", "random4", "random5"])
def test_index_sets_and_filters_of_every_rho_match_the_rule(name):
    from utils.method.split import assign_inputs, split_filters, sweep

    if name in CASES:
        A = torch.tensor(CASES[name], dtype=torch.float64)
    else:
        A = _random_arvs(int(name[-1]), int(name[-1]), 40)
    k, n = A.shape
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(n, 3, 3, generator=g)  # a float32 filter W[c], as a float32 model has
    sw = sweep(w32, A)
    assert sw.k == k and sw.rhos.tolist() == DOC_RHOS
    w = w32.double().numpy()
    seen = set()
    for r, rho in enumerate(DOC_RHOS):
        sets = doc_sets(as_lists(A), rho)
        seen.add(tuple(map(tuple, sets)))
        expected = {f"concept{j}": sets[j] for j in range(1, k + 1)} | {"shared": sets[0]}
        assert sw.sources(r) == expected, (name, rho)
        assign = [0] * n
        for j in range(1, k + 1):
            for i in sets[j]:
                assign[i] = j
        assert sw.assign[r].tolist() == assign == assign_inputs(A, rho).tolist(), (name, rho)
        D, res = doc_filters(w, sets)
        assert sw.D.dtype == w32.dtype and sw.Res.dtype == w32.dtype
        for j in range(k):
            assert np.array_equal(sw.D[r, j].double().numpy(), D[j]), (name, rho, j)
        assert np.array_equal(sw.Res[r].double().numpy(), res), (name, rho)
        D2, res2 = split_filters(w32, torch.tensor(assign), k)
        assert torch.equal(D2, sw.D[r]) and torch.equal(res2, sw.Res[r])
        # sum_j D_j - (k - 1) Res = W[c], entry by entry (exact: float32 values summed in float64)
        for i in range(n):
            for a in range(3):
                for b in range(3):
                    total = sum(float(D[j][i, a, b]) for j in range(k)) - (k - 1) * float(res[i, a, b])
                    assert total == float(w[i, a, b])
    assert len(seen) > 1 or name == "k2"  # the sweep really changes the sets


def test_sweep_accepts_float64_weights_for_three_concepts():
    """float64 filters round in sum_j D_j - (k-1) Res (w + w + w - 2w): the sweep's own check allows that."""
    from utils.method.split import sweep

    w = torch.tensor([1 + 2 ** -52, 0.7, 0.3], dtype=torch.float64)[:, None, None]
    A = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.2, 0.1]], dtype=torch.float64)  # input 0 shared
    sw = sweep(w, A)
    assert sw.sources(19)["shared"] == [0]  # rho = 1: input 0 ties between concepts 1 and 2
    assert torch.allclose(sw.D.sum(1) - 2 * sw.Res, w.expand_as(sw.Res), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- the score, on a tiny CNN and tiny PNGs


SIZE = 8
COUNTS = {"c0": 3, "c1": 2, "c2": 4, "c3": 3, "c4": 2}  # c4: in no concept (must not count)
CH3, CONCEPTS3 = 2, [[0], [1, 3], [2]]  # channel 2: three concepts, the second of two classes
CH2, CONCEPTS2 = 5, [[3], [0]]  # channel 5: two concepts, concept 1 = class 3 (also in channel 2's concept 2)
STRIDE, PAD = 2, 1


def tiny_cnn(dtype) -> nn.Sequential:
    """stem (3 -> 8, 3x3) + ReLU, the layer of interest L = model[2] (8 -> 6, 3x3, stride 2, pad 1, bias),
    then ReLU, pooling and a linear head over 5 classes. Seeded random weights, eval mode."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=STRIDE, padding=PAD),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with torch.no_grad():
        m[2].bias.mul_(0.3)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(dtype).eval()


class ToTensorAs:
    """PIL RGB -> C x H x W in [0, 1] (ToTensor) as ``dtype``; no resize, no normalisation."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, im):
        return torch.from_numpy(np.asarray(im, dtype=np.float64).transpose(2, 0, 1) / 255.0).to(self.dtype)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    """``root/train/c*/i.png`` (random 8x8 RGB, seeded; class c tinted so the concepts differ) and the
    uint8 arrays written, per class."""
    root = tmp_path_factory.mktemp("brute")
    rng = np.random.default_rng(0)
    arrays = {}
    for t, (name, n) in enumerate(COUNTS.items()):
        d = root / "train" / name
        os.makedirs(d)
        arrays[t] = []
        for i in range(n):
            a = rng.integers(0, 256, (SIZE, SIZE, 3))
            a[..., t % 3] = np.minimum(255, a[..., t % 3] + 60 * (t + 1))
            a = a.astype(np.uint8)
            Image.fromarray(a, "RGB").save(d / f"{i}.png")
            arrays[t].append(a)
    return str(root), arrays


def _layer_inputs(model, arrays, dtype):
    """Per class, the layer input x of each image (C_in x H x W, float64 numpy), by running the sub-network
    before L (stem + ReLU) on the image as written."""
    out = {}
    with torch.no_grad():
        for t, ims in arrays.items():
            img = torch.stack([torch.from_numpy(a.astype(np.float64).transpose(2, 0, 1) / 255.0) for a in ims])
            out[t] = [x.double().numpy() for x in model[:2](img.to(dtype))]
    return out


def _expected(model, xs, channel, concepts):
    """ARVs (by autograd, from the definition), then per rho: sets, filters and the score, by hand."""
    conv = model[2]
    by_concept = [[x for t in cs for x in xs[t]] for cs in concepts]
    A = torch.stack([arv_autograd(conv, channel, torch.from_numpy(np.stack(xc))) for xc in by_concept])
    w = conv.weight[channel].double().numpy()
    bias = float(conv.bias[channel])
    sets = [doc_sets(as_lists(A), rho) for rho in DOC_RHOS]
    cache = {}
    scores = []
    for s in sets:
        key = tuple(map(tuple, s))
        if key not in cache:
            cache[key] = doc_score(by_concept, doc_filters(w, s)[0], bias, STRIDE, PAD)
        scores.append(cache[key])
    return A, sets, scores, [len(x) for x in by_concept]


def _own_sweep(weight_c: torch.Tensor, sets_per_rho):
    """A :class:`utils.method.split.Sweep` holding the index sets and filters computed here (not by utils.method.split)."""
    from utils.method.split import Sweep

    k = len(sets_per_rho[0]) - 1
    assign, Ds, Rs = [], [], []
    w = weight_c.detach().double().numpy()
    for sets in sets_per_rho:
        a = [0] * w.shape[0]
        for j in range(1, k + 1):
            for i in sets[j]:
                a[i] = j
        D, res = doc_filters(w, sets)
        assign.append(a)
        Ds.append(np.stack(D))
        Rs.append(res)
    to = dict(dtype=weight_c.dtype)
    return Sweep(torch.tensor(DOC_RHOS, dtype=torch.float64), torch.tensor(assign),
                 torch.from_numpy(np.stack(Ds)).to(**to), torch.from_numpy(np.stack(Rs)).to(**to))


def _score(model, root, sweeps, dtype):
    """``utils.stages.splitting.score_channels`` on the training images: batches of 2 (classes of 2 to 4 images,
    so several batches and a short last one per class), no workers, CPU."""
    
    from utils.data.images import list_images
    from utils.stages.splitting import score_channels

    images = list_images(root, "train")
    assert images.classes == list(COUNTS)
    from utils.passes.image_pass import Runner

    runner = Runner(torch.device("cpu"), batch_size=2, num_workers=0, progress=False)
    out, _, _ = score_channels(runner, model, model[2], images, sweeps, ToTensorAs(dtype))
    return out


def test_scores_of_every_rho_float64(tiny_images):
    """A float64 model: the production scores (one pass, two channels, k = 3 and k = 2) equal the
    hand-computed ones to 1e-9 relative; the best rho is the first maximal score."""
    from utils.method.scoring import best_index

    root, arrays = tiny_images
    model = tiny_cnn(torch.float64)
    xs = _layer_inputs(model, arrays, torch.float64)
    exp3 = _expected(model, xs, CH3, CONCEPTS3)
    exp2 = _expected(model, xs, CH2, CONCEPTS2)
    assert len(set(exp3[2])) >= 3 and len(set(exp2[2])) >= 2  # the sweep really changes the score
    # the sweep holds the sets and filters computed here; the sets themselves are compared with utils.method.split above
    sweeps = [(CH3, CONCEPTS3, _own_sweep(model[2].weight[CH3], exp3[1])),
              (CH2, CONCEPTS2, _own_sweep(model[2].weight[CH2], exp2[1]))]
    got = _score(model, root, sweeps, torch.float64)
    for (scores, counts), (_, _, expected, n) in zip(got, (exp3, exp2)):
        assert counts == n
        assert scores.dtype == torch.float64 and len(scores) == 20
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9, atol=0)
        assert best_index(scores) == first_max(expected)
        top = sorted(set(expected), reverse=True)
        assert top[0] - top[1] > 1e-6 * abs(top[0])  # the best is not decided by rounding


def test_scores_of_every_rho_float32_with_the_production_sweep(tiny_images):
    """A float32 model (the usual case), with the sweep ``utils.method.split.sweep`` builds from hand-computed ARVs:
    its sets are the rule's, and its scores equal the float64 hand computation to float32 precision
    (the production convolves in the model's dtype and sums pos(.) in float64)."""
    from utils.method.scoring import best_index
    from utils.method.split import sweep

    root, arrays = tiny_images
    model = tiny_cnn(torch.float32)
    xs = _layer_inputs(model, arrays, torch.float32)
    sweeps, expects = [], []
    for ch, cs in ((CH3, CONCEPTS3), (CH2, CONCEPTS2)):
        A, sets, scores, n = _expected(model, xs, ch, cs)
        sw = sweep(model[2].weight[ch], A)
        for r in range(20):
            assert sw.sources(r) == {f"concept{j}": sets[r][j] for j in range(1, len(cs) + 1)} | {"shared": sets[r][0]}
        sweeps.append((ch, cs, sw))
        expects.append((scores, n))
    got = _score(model, root, sweeps, torch.float32)
    for (scores, counts), (expected, n) in zip(got, expects):
        assert counts == n
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=0)
        top = sorted(set(expected), reverse=True)
        if top[0] - top[1] > 1e-3 * abs(top[0]):
            assert best_index(scores) == first_max(expected)


def test_best_rho_is_the_first_maximal_score():
    from utils.method.scoring import best_index

    for values in ([1.0, 3.0, 3.0, 2.0], [5.0] * 20, [0.0, 0.5, 0.25, 0.5, 0.5]):
        assert best_index(torch.tensor(values, dtype=torch.float64)) == first_max(values)


def test_split_layer_for_three_concepts_adds_up_and_keeps_the_logits(tiny_images):
    """utils.model.surgery with the hand-made filters of a k = 3 split: filter c = D_1, then D_2, D_3, Res appended;
    the merge has +1 for each D_j and -(k - 1) = -2 for Res in row c; the logits are unchanged."""
    from utils.method.split import Split
    from utils.model.surgery import split_network

    _, arrays = tiny_images
    model = tiny_cnn(torch.float64)
    xs = _layer_inputs(model, arrays, torch.float64)
    _, sets, scores, _ = _expected(model, xs, CH3, CONCEPTS3)
    sets = sets[first_max(scores)]
    assert sets[0]  # a non-empty S_0, so Res matters
    w = model[2].weight[CH3].double().numpy()
    D, res = doc_filters(w, sets)
    net = split_network(model, {"2": [Split(CH3, torch.from_numpy(np.stack(D)), torch.from_numpy(res))]})
    expanded, merge = net[2].expanded, net[2].merge
    C = 6
    assert expanded.out_channels == C + 3 and merge.in_channels == C + 3 and merge.out_channels == C
    for j, ch in enumerate([CH3, C, C + 1]):
        assert np.array_equal(expanded.weight[ch].numpy(), D[j])
        assert float(expanded.bias[ch]) == float(model[2].bias[CH3])
    assert np.array_equal(expanded.weight[C + 2].numpy(), res)
    assert float(expanded.bias[C + 2]) == float(model[2].bias[CH3])
    M = merge.weight[:, :, 0, 0]
    for o in range(C):
        for i in range(C + 3):
            want = 1.0 if i == o else 0.0
            if o == CH3 and i in (C, C + 1):
                want = 1.0
            if o == CH3 and i == C + 2:
                want = -2.0
            assert float(M[o, i]) == want, (o, i)
    imgs = torch.stack([torch.from_numpy(a.astype(np.float64).transpose(2, 0, 1) / 255.0)
                        for ims in arrays.values() for a in ims])
    with torch.no_grad():
        assert float((net(imgs) - model(imgs)).abs().max()) < 1e-12
