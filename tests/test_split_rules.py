"""The split rules (paper, positive) on hand-made ARVs, their identity, and the selectivity AUC against
independent computations."""
import itertools

import numpy as np
import pytest
import torch

from utils.method.selectivity import concept_aucs, roc_auc
from utils.method.split import assign_inputs, sweep


def assign_by_hand(A: list[list[float]], rho: float, positive: bool) -> list[int]:
    """The rule written as plain loops: input i goes to the first j with rho*A[j][i] > max of the others
    (and, for the positive rule, A[j][i] > 0); else 0 (shared)."""
    out = []
    for i in range(len(A[0])):
        got = 0
        for j in range(len(A)):
            others = max(A[l][i] for l in range(len(A)) if l != j)
            if rho * A[j][i] > others and (A[j][i] > 0 or not positive):
                got = j + 1
                break
        out.append(got)
    return out


def test_positive_rule_shares_every_input_that_inhibits_on_average():
    A = torch.tensor([[2.0, -1.0, -3.0, 0.0, 1.0, -0.5],
                      [1.0, -4.0, -1.0, 0.0, 1.0, 0.5]], dtype=torch.float64)
    # paper: input 1 (both negative, concept 1 less so) goes to concept 1, input 2 to concept 2
    assert assign_inputs(A, 1.0).tolist() == [1, 1, 2, 0, 0, 2]
    # positive: negative averages are never exclusive; ties (input 4) and zeros (input 3) stay shared
    assert assign_inputs(A, 1.0, "positive").tolist() == [1, 0, 0, 0, 0, 2]
    assert assign_inputs(A, 0.4, "positive").tolist() == [0, 0, 0, 0, 0, 2]  # rho*2 = 0.8 < 1: input 0 shared


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("rule", ["paper", "positive"])
def test_rules_match_plain_loops_and_keep_the_identity(k, rule):
    g = torch.Generator().manual_seed(k)
    A = torch.randn(k, 40, generator=g, dtype=torch.float64)
    A[:, :5] = A[0, :5]  # ties across all concepts
    A[1, 5:10] = -A[1, 5:10].abs()
    w = torch.randn(40, 3, 3, generator=g)
    sw = sweep(w, A, rule=rule)
    for i, rho in enumerate(sw.rhos.tolist()):
        assert sw.assign[i].tolist() == assign_by_hand(A.tolist(), rho, rule == "positive")
        total = sw.D[i].double().sum(0) - (k - 1) * sw.Res[i].double()
        assert torch.equal(total, w.double())  # sum_j D_j - (k - 1) Res = W[c], exactly
    if rule == "positive":
        assert bool(((A.gather(0, (sw.assign.clamp_min(1) - 1)) > 0) | (sw.assign == 0)).all())


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="split rule"):
        assign_inputs(torch.ones(2, 3), 0.5, "negative")


def auc_by_pairs(scores, inside) -> float:
    """Every (inside, outside) pair: 1 when the inside image scores higher, 1/2 on a tie."""
    pos = [s for s, m in zip(scores, inside) if m]
    neg = [s for s, m in zip(scores, inside) if not m]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_equals_pair_count_and_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 80).astype(float)  # many ties
    inside = rng.random(80) < 0.3
    got = roc_auc(scores, inside)
    assert got == pytest.approx(auc_by_pairs(scores, inside), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(inside, scores), abs=1e-12)
    assert roc_auc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert roc_auc(np.arange(10.0), np.arange(10) < 5) == 0.0
    assert roc_auc(np.ones(10), np.arange(10) < 5) == 0.5  # a constant unit tells nothing
    assert roc_auc(np.arange(3.0), np.ones(3, bool)) is None


def test_concept_aucs_count_the_images_behind_each():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    scores = np.array([5.0, 4.0, 1.0, 0.0, 3.0, 6.0, 2.0])
    out = concept_aucs(scores, labels, [[0], [1, 2]])
    assert out["images"] == 7 and out["inside"] == [2, 4]
    assert out["concept1"] == pytest.approx(auc_by_pairs(scores, labels == 0))
    assert out["concept2"] == pytest.approx(auc_by_pairs(scores, np.isin(labels, [1, 2])))
