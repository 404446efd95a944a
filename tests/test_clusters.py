"""Concepts without labels: a unit's strongest images clustered by how they reach it (utils.method.clusters)."""
from __future__ import annotations

import os

import pytest
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


def test_images_that_reach_the_unit_by_no_input_belong_to_no_concept():
    V, truth = contributions([([0, 1, 2], 40)])
    V = torch.cat([V, torch.zeros(30, V.shape[1], dtype=V.dtype)])  # 30 images on which nothing reaches it
    c = cluster_concepts(V, k0=4, min_images=5)
    assert c.k == 1 and c.members == [list(range(40))]


def planted4(tmp_path):
    """The planted four-colour network (conftest: channel 0 reads red and blue, 1 red and green, 2 a constant,
    3 green), built from its file by the project's own loader, and its images (6 per colour)."""
    from conftest import COLOURS, PLANTED4, write_image_folder
    from utils.model.loading import load_model

    (tmp_path / "planted4.py").write_text(PLANTED4)
    return (load_model(f"{tmp_path / 'planted4.py'}:build").model,
            write_image_folder(str(tmp_path / "data"), n_train=6, n_val=2, colors=COLOURS, size=16))


def test_a_planted_layers_candidates_come_from_the_images_alone(tmp_path):
    """The planted four-colour network (conftest): channel 0 reads the red and the blue inputs, channel 1 the red
    and the green, channel 2 a constant, channel 3 green alone. From the images alone, channels 0 and 1 come out
    as candidates whose two concepts are, by the labels read afterwards, {red, orange} and blue, and {red, orange}
    and green; channels 2 and 3 are no candidates."""
    from utils.data.images import list_images
    from utils.passes.image_pass import Runner
    from utils.stages.clusters import agreement, label_free_concepts

    model, data = planted4(tmp_path)
    images = list_images(data, "train")
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    found = label_free_concepts(runner, model, model.conv, images, top_n=24, k0=4, min_images=3, gamma=0.5)
    assert sorted(found.candidates) == [0, 1]
    red, orange, green, blue = 0, 1, 2, 3
    groups = {c: sorted(sorted({images.targets[i] for i in rows}) for rows in found.units[c].concept_images())
              for c in (0, 1)}
    assert groups == {0: [[red, orange], [blue]], 1: [[red, orange], [green]]}
    for c in (0, 1):
        agree = agreement(found.units[c], images.targets)
        assert [a["images"] for a in agree] == [len(m) for m in found.units[c].clusters.members]
    assert found.units[3].clusters.k == 1  # green (and orange's green part); images it does not fire on are out
    assert set(images.indices_of([green])) <= set(found.units[3].index)
    assert not set(images.indices_of([red, blue])) & set(found.units[3].index)
    assert set(found.seconds) == {"top-images pass", "contributions pass", "clustering"}


def test_a_flat_folder_of_images_without_labels_gives_the_same_concepts(tmp_path):
    """The planted four-colour images with their class folders taken away (every image directly in train/):
    the label-free search reads no label, so it finds the same candidates and concepts, image for image."""
    import shutil

    from utils.data.images import list_any_images, list_images
    from utils.errors import UserError
    from utils.passes.image_pass import Runner
    from utils.stages.clusters import label_free_concepts

    model, data = planted4(tmp_path)
    labelled = list_images(data, "train")
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for p in labelled.paths:  # class-prefixed names keep the same sorted order as the labelled listing
        shutil.copy(p, flat / (os.path.basename(os.path.dirname(p)) + "_" + os.path.basename(p)))
    images = list_any_images(str(tmp_path / "flat"), "train")
    assert len(images) == len(labelled) and set(images.targets) == {0} and images.classes == ["."]
    assert list_any_images(data, "train").targets == labelled.targets  # class folders: labels kept
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    kw = dict(top_n=24, k0=4, min_images=3, gamma=0.5)
    a = label_free_concepts(runner, model, model.conv, labelled, **kw)
    b = label_free_concepts(runner, model, model.conv, images, **kw)
    assert a.candidates == b.candidates == sorted(a.candidates, key=lambda c: (a.units[c].clusters.closest, c))
    for c in a.candidates:  # labels never change which units or concepts are found
        assert a.units[c].concept_images() == b.units[c].concept_images()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        list_any_images(str(tmp_path / "empty"), "train")


def test_a_headless_networks_label_free_splits_are_exact_and_separate_their_clusters(tmp_path):
    """The planted network without its head (its output: the pooled features): each label-free candidate split by
    its clusters (the searched rule on cluster membership) gives one network whose outputs equal the original's,
    and each concept unit fires more on its own cluster's images than on the other's."""
    from utils.data.images import ImageDataset, list_any_images
    from utils.model.hooks import layer_input
    from utils.model.surgery import split_network
    from utils.passes.image_pass import Runner
    from utils.stages.clusters import label_free_concepts, split_unit

    model, data = planted4(tmp_path)
    model.fc = torch.nn.Identity()  # headless: a feature vector per image, no class
    images = list_any_images(data, "train")
    runner = Runner(device=torch.device("cpu"), batch_size=4, num_workers=0, progress=False)
    found = label_free_concepts(runner, model, model.conv, images, top_n=24, k0=4, min_images=3, gamma=0.5)
    assert sorted(found.candidates) == [0, 1]
    splits = [split_unit(found.units[c], model.conv.weight[c]).split() for c in found.candidates]
    net = split_network(model, {"conv": splits})
    x = torch.stack([ImageDataset(images)[i][0] for i in range(len(images))])
    with torch.no_grad():
        assert float((net(x) - model(x)).abs().max()) <= 1e-5
        xl = layer_input(model, model.conv, x)
        for s in splits:
            u = found.units[s.channel]
            acts = torch.nn.functional.conv2d(xl, s.D).sum((2, 3))  # B x k: each concept unit, summed
            for j, rows in enumerate(u.concept_images()):
                mine = acts[rows, j].mean()
                others = torch.cat([acts[r, j] for l, r in enumerate(u.concept_images()) if l != j]).mean()
                assert mine > others, (s.channel, j)


def test_held_out_images_go_to_their_concept_and_a_clean_split_tells_the_clusters_apart():
    from utils.method.clusters import cluster_aucs, nearest_concept

    V, truth = contributions([([0, 1, 2], 40), ([8, 9], 30)], seed=1)
    c = cluster_concepts(V, k0=4, min_images=5, gamma=0.5)
    held, held_truth = contributions([([0, 1, 2], 10), ([8, 9], 10)], seed=2)  # new images of the same groups
    held = torch.cat([held, torch.zeros(3, held.shape[1], dtype=held.dtype)])  # and three that reach it by nothing
    got = nearest_concept(held, c.arvs)
    concept_of_group = {int(truth[m[0]]): j for j, m in enumerate(c.members, 1)}
    assert got[:-3].tolist() == [concept_of_group[int(t)] for t in held_truth] and got[-3:].tolist() == [0, 0, 0]
    # the split that gives each concept the inputs its group uses: each concept unit tells its cluster apart
    assign = torch.zeros(16, dtype=torch.int64)
    for group, inputs in ((0, [0, 1, 2]), (1, [8, 9])):
        assign[inputs] = concept_of_group[group]
    assert cluster_aucs(held, got, assign, 2) == [1.0, 1.0]
    everything = cluster_aucs(held, got, torch.zeros(16, dtype=torch.int64), 2)  # all shared: the original unit
    assert max(everything) < 1.0
