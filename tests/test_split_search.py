"""The searched split rule's arithmetic (utils/method/search.py): its AUCs against an independent count, every
assignment it leaves exact, its objective never lowered, and on planted units the sets that separate."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from utils.method.search import holdout_mask, objective, search_assignment
from utils.method.selectivity import auc_rows, pair_auc, roc_auc
from utils.method.split import assign_inputs, split_filters


def _pairs_auc(scores, first, second) -> float:
    """By definition: over every (first, second) pair, 1 where the first scores higher, 1/2 on a tie."""
    a, b = scores[first].tolist(), scores[second].tolist()
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a, b)) / (len(a) * len(b))


def test_auc_rows_and_pair_auc_count_pairs():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (5, 40), generator=g).double()  # many ties
    labels = torch.randint(0, 3, (40,), generator=g)
    got = auc_rows(scores, labels == 1)
    for r in range(5):
        assert got[r].item() == pytest.approx(_pairs_auc(scores[r], labels == 1, labels != 1), abs=1e-12)
        assert got[r].item() == pytest.approx(roc_auc(scores[r].numpy(), (labels == 1).numpy()), abs=1e-12)
        assert pair_auc(scores[r], labels == 1, labels == 2) == pytest.approx(
            _pairs_auc(scores[r], labels == 1, labels == 2), abs=1e-12)
    assert torch.isnan(auc_rows(scores, torch.zeros(40, dtype=torch.bool))).all()


def planted(n_per: int = 40, noise: float = 0.3, seed: int = 0, sign2: float = 1.0):
    """A unit of 8 inputs: 0-1 carry concept 1, 2-3 concept 2 (raised, or lowered with ``sign2 = -1``), 4-7 fire
    on every image. Labels: 1, 2, and 0 for other images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1] * n_per + [2] * n_per + [0] * 2 * n_per)
    V = torch.randn(len(labels), 8, generator=g, dtype=torch.float64) * noise
    V[:, 4:] += 1.0
    V[labels == 1, :2] += 2.0
    V[labels == 2, 2:4] += 2.0 * sign2
    return V, labels


@pytest.mark.parametrize("k", [2, 3])
def test_every_searched_assignment_splits_exactly_and_never_lowers_its_objective(k):
    g = torch.Generator().manual_seed(k)
    C_in = 24
    V = torch.randn(300, C_in, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k + 1, (300,), generator=g)
    V[labels == 1, : C_in // 3] += 0.7  # something to find
    start = assign_inputs(torch.randn(k, C_in, generator=g), 0.5)
    held = holdout_mask(labels, 0.3, seed=1)
    res = search_assignment(V, labels, start, held=held, budget=60, patience=60)
    assert res.moves, "the planted signal leaves moves that raise the objective"
    assert all(b > a for a, b in zip(res.fit, res.fit[1:]))  # each move raised the fitting objective
    assert res.held[res.best] >= res.held[0]  # the returned sets are at least as good on the held-out images
    assert res.assign.dtype == torch.int64 and int(res.assign.min()) >= 0 and int(res.assign.max()) <= k
    # the recorded objective is the objective of the sets it names
    replay = start.clone()
    for i, u, t in res.moves:
        assert int(replay[i]) == u
        replay[i] = t
    assert res.fit[-1] == pytest.approx(objective(V[~held], labels[~held], replay, torch.ones(k)), abs=1e-12)
    W = torch.randn(C_in, 3, 3, generator=g)
    for a in (res.assign, replay):
        D, Res = split_filters(W, a, k)
        assert torch.equal(D.double().sum(0) - (k - 1) * Res.double(), W.double())


def test_the_search_separates_what_everything_shared_mixes():
    V, labels = planted()
    start = torch.zeros(8, dtype=torch.int64)  # every input shared: both concept units are the original unit
    held = holdout_mask(labels, 0.25)
    before = objective(V[held], labels[held], start, torch.ones(2))
    res = search_assignment(V, labels, start, held=held)
    after = objective(V[held], labels[held], res.assign, torch.ones(2))
    assert before < 0.85 and after > 0.97, (before, after)
    # the other concept's inputs leave each concept unit: 2-3 are not in D_1, 0-1 not in D_2
    assert set(res.assign[2:4].tolist()) <= {2} and set(res.assign[:2].tolist()) <= {1}


def test_a_concept_that_lowers_the_unit_is_read_downward():
    """Concept 2 lowers inputs 2-3. Oriented (s_2 = -1) its concept unit ranks concept 2's images at the top of
    -activation; unoriented, the search cannot make its AUC high."""
    V, labels = planted(sign2=-1.0)
    held = holdout_mask(labels, 0.25)
    start = torch.zeros(8, dtype=torch.int64)
    signs = torch.tensor([1.0, -1.0])
    res = search_assignment(V, labels, start, signs=signs, held=held)
    act = V[held] @ ((res.assign[:, None] == 0) | (res.assign[:, None] == 2)).double()
    auc2 = auc_rows(-act.T, labels[held] == 2)[0].item()
    assert auc2 > 0.97
    plain = search_assignment(V, labels, start, held=held)
    assert objective(V[held], labels[held], res.assign, signs) > objective(V[held], labels[held], plain.assign,
                                                                          torch.ones(2)) + 0.1


def test_the_stopping_rule_holds_out_part_of_every_label():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    held = holdout_mask(labels, 0.25, seed=3)
    assert int(held[:10].sum()) in (2, 3) and int(held[10:14].sum()) == 1 and not bool(held[14])
    assert torch.equal(held, holdout_mask(labels, 0.25, seed=3))
    with pytest.raises(ValueError, match="two concepts"):
        search_assignment(torch.zeros(4, 3), torch.tensor([0, 1, 1, 0]), torch.zeros(3, dtype=torch.int64))


def test_without_images_of_a_concept_it_keeps_the_start():
    V, labels = planted()
    labels[labels == 2] = 0
    start = torch.tensor([1, 1, 2, 2, 0, 0, 0, 0])
    res = search_assignment(V, labels, start, signs=torch.ones(2))
    assert torch.equal(res.assign, start) and not res.moves
    assert np.isnan(res.fit[0]) or res.fit[0] >= 0


@pytest.mark.parametrize("screen", [None, 3])
def test_a_search_that_stops_for_want_of_gain_leaves_no_single_move_that_raises_its_objective(screen):
    """Screened or not, the search only stops for want of gain when no move of one input raises the fitting
    objective (checked by brute force over every input and target)."""
    g = torch.Generator().manual_seed(5)
    k, C_in = 2, 12
    V = torch.randn(240, C_in, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k + 1, (240,), generator=g)
    V[labels == 1, :4] += 0.8
    V[labels == 2, 4:8] += 0.8
    held = torch.zeros(240, dtype=torch.bool)
    held[::4] = True
    res = search_assignment(V, labels, torch.zeros(C_in, dtype=torch.int64), held=held, budget=500, patience=500,
                            screen=screen)
    assert len(res.moves) < 500 and res.moves
    last = start = torch.zeros(C_in, dtype=torch.int64)
    for i, u, t in res.moves:
        last = last.clone()
        last[i] = t
    best = objective(V[~held], labels[~held], last, torch.ones(k))
    for i in range(C_in):
        for t in range(k + 1):
            if t != int(last[i]):
                moved = last.clone()
                moved[i] = t
                assert objective(V[~held], labels[~held], moved, torch.ones(k)) <= best + 1e-12
    assert best > objective(V[~held], labels[~held], start, torch.ones(k))
