"""Concepts without labels: a unit's strongest images clustered by how they reach it (utils.method.clusters)."""
from __future__ import annotations

import torch

from utils.method.clusters import cluster_concepts, unit_rows


def contributions(groups: list[tuple[list[int], int]], C_in: int = 16, noise: float = 0.05, seed: int = 0):
    """Contribution vectors of images that reach a unit through planted input groups: per group (its inputs,
    its number of images), rows that are large on those inputs; a little noise everywhere. Returns V and the
    planted group of each row."""
    g = torch.Generator().manual_seed(seed)
    rows, truth = [], []
    for gi, (inputs, n) in enumerate(groups):
        V = torch.rand(n, C_in, generator=g, dtype=torch.float64) * noise
        V[:, inputs] += 0.5 + torch.rand(n, len(inputs), generator=g, dtype=torch.float64)
        rows.append(V)
        truth += [gi] * n
    perm = torch.randperm(len(truth), generator=g)  # the images come in no particular order
    return torch.cat(rows)[perm], torch.tensor(truth)[perm]


def test_two_planted_input_groups_are_two_concepts():
    V, truth = contributions([([0, 1, 2], 40), ([8, 9], 30)])
    c = cluster_concepts(V, k0=4, min_images=5, gamma=0.5)
    assert c.k == 2
    found = [set(truth[m].tolist()) for m in c.members]
    assert sorted(map(sorted, found)) == [[0], [1]]  # each concept is exactly one planted group
    assert sorted(len(m) for m in c.members) == [30, 40]
    # the concepts' ARVs are their images' mean contributions, and they point at the planted inputs
    for m, a in zip(c.members, c.arvs):
        assert torch.allclose(a, V[m].mean(0))
        assert set(a.topk(2).indices.tolist()) <= ({0, 1, 2} if truth[m[0]] == 0 else {8, 9})
    assert c.closest < 0.5
    labels = c.labels(len(V))
    assert set(labels.tolist()) == {1, 2} and all(len(set(truth[labels == j].tolist())) == 1 for j in (1, 2))


def test_one_input_group_is_no_candidate():
    V, _ = contributions([([0, 1, 2], 60)])
    c = cluster_concepts(V, k0=4, min_images=5, gamma=0.5)
    assert c.k == 1 and c.closest == 1.0  # k-means still cuts it in pieces; linkage merges them back


def test_three_groups_two_of_them_alike_merge_by_complete_linkage():
    # groups 0 and 1 share most of their inputs (cosine well above gamma); group 2 reaches the unit elsewhere
    V, truth = contributions([([0, 1, 2, 3], 30), ([0, 1, 2, 4], 30), ([10, 11], 30)])
    c = cluster_concepts(V, k0=6, min_images=5, gamma=0.5)
    assert c.k == 2
    assert sorted(sorted(set(truth[m].tolist())) for m in c.members) == [[0, 1], [2]]
    # at 0.9 the two alike groups (cosine 0.77) stay apart, while k-means' pieces of one group still merge
    higher = cluster_concepts(V, k0=6, min_images=5, gamma=0.9)
    assert sorted(sorted(set(truth[m].tolist())) for m in higher.members) == [[0], [1], [2]]


def test_small_clusters_belong_to_no_concept_and_too_few_images_cluster_nothing():
    V, truth = contributions([([0, 1, 2], 40), ([8, 9], 30), ([13], 2)])
    c = cluster_concepts(V, k0=4, min_images=5, gamma=0.5)
    assert c.k == 2 and sum(len(m) for m in c.members) <= 70
    assert all(truth[m].tolist().count(2) == 0 for m in c.members)  # the 2-image group is in no concept
    few = cluster_concepts(V[:6], k0=4, min_images=5)
    assert few.k == 1 and few.members == [list(range(6))]


def test_the_clustering_reads_directions_not_sizes():
    V, truth = contributions([([0, 1, 2], 40)])
    big = torch.cat([V, 10 * V])  # the same images, ten times as strong: one direction, one concept
    assert cluster_concepts(big, k0=4, min_images=5).k == 1
    r = unit_rows(big)
    assert abs(float((r ** 2).sum(1).max()) - 1) < 1e-12
