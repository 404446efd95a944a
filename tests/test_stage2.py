"""Stage 2: exact ARVs from the stored input sums, candidate selection, pairs, the script."""
from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import arv_autograd, class_index_for, planted_loaded, taps_by_formula, write_image_folder, write_store
from utils.method import arv as arvs
from utils.store import arvs as store_arvs
from utils.method import candidates as sel
from utils.stages import candidates as stage2
from utils.errors import UserError
from utils.stages.relevance import Stage1Config, compute_relevance
from utils.model.hooks import layer_input
from utils.store.layout import Store, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "get_cosine_similarities.py")


# ---------------------------------------------------------------- closed-form ARVs


CONVS = {
    "1x1": dict(kernel_size=1),
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "3x3 stride 2": dict(kernel_size=3, stride=2, padding=1),
    "2x3 stride (2,1) no pad": dict(kernel_size=(2, 3), stride=(2, 1)),
    "3x3 bias": dict(kernel_size=3, padding=1, bias=True),
    "3x3 dilation 2": dict(kernel_size=3, padding=2, dilation=2),
    "3x3 reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "3x3 circular stride 2": dict(kernel_size=3, padding=1, stride=2, padding_mode="circular"),
    "5x5 same": dict(kernel_size=5, padding="same"),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_closed_form_arv_equals_autograd_definition(name, tmp_path):
    """ARVs from tap sums (format 2) and from input-map sums (format 1, converted when read) both equal the
    autograd definition, and each other."""
    torch.manual_seed(0)
    kw = {"bias": False, **CONVS[name]}
    conv = nn.Conv2d(6, 5, **kw).double()
    with torch.no_grad():
        conv.weight.copy_(conv.weight.float().double())  # the store keeps float32 weights
    x = torch.randn(4, 6, 9, 8, dtype=torch.float64).relu() + 0.1 * torch.randn(4, 6, 9, 8, dtype=torch.float64)
    taps = Store.open(write_store(str(tmp_path / "v2"), conv, taps_by_formula(conv, x).sum(0, keepdim=True), [4]))
    maps = Store.open(write_store(str(tmp_path / "v1"), conv, x.sum(0, keepdim=True).numpy(), [4], version=1))
    rebuilt = store_arvs.store_conv(taps)
    assert rebuilt.padding_mode == conv.padding_mode and rebuilt.stride == conv.stride
    # the production tap sums of a batch equal the definition
    torch.testing.assert_close(arvs.batch_tap_sums(x, arvs.tap_maps(conv, (9, 8))).view(4, 6, *conv.kernel_size),
                               taps_by_formula(conv, x), rtol=1e-12, atol=1e-12)
    for c in range(5):
        want = arv_autograd(conv, c, x)
        got, old = store_arvs.concept_arvs(taps, c, [[0]])[0], store_arvs.concept_arvs(maps, c, [[0]])[0]
        assert got.dtype == torch.float64 and got.shape == (6,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9 * want.abs().max().item())
        torch.testing.assert_close(got, old, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_candidate_arvs_match_autograd_per_class(tmp_path):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 3, padding=1, stride=2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(conv.weight.float().double())
    xs = {0: torch.randn(3, 4, 7, 7, dtype=torch.float64), 2: torch.randn(5, 4, 7, 7, dtype=torch.float64)}
    sums = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    for t, x in xs.items():
        sums[t] = taps_by_formula(conv, x).sum(0)
    store = Store.open(write_store(str(tmp_path / "s"), conv, sums.numpy(), [3, 0, 5]))
    got = store_arvs.candidate_arvs(store, {1: [0, 2]})
    for i, t in enumerate([0, 2]):
        torch.testing.assert_close(got[1][i], arv_autograd(conv, 1, xs[t]), rtol=1e-5, atol=1e-12)
    with pytest.raises(UserError, match="no training images"):
        store_arvs.candidate_arvs(store, {1: [0, 1]})


# ---------------------------------------------------------------- steps 1-4 on hand-built relevance


def test_important_threshold_cases():
    R = torch.tensor([
        [3.0, 1.0, -2.0, 0.5],       # positive total 4.5, tau*total = 1.125: only channel 0
        [3.0, 1.0, -2.0, 0.0],       # total 4, tau*total = 1.0: channel 1 exactly at the threshold counts
        [-1.0, -2.0, -0.5, -3.0],    # all negative: threshold 0, nothing reaches it
        [1024.0, 1024.0, 2.0 ** -14, -1.0],  # total 2048 + 2^-14; at tau 0.5 the 1024s fall short by 2^-15
    ], dtype=torch.float16)
    got = sel.important(R, 0.25)
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got[:3], want)
    assert not sel.important(R[3:], 0.5).any()  # a float32 total (2048) would call both 1024s important


def test_important_matches_exact_python_arithmetic():
    rng = np.random.default_rng(0)
    R = (rng.standard_normal((200, 37)) * rng.choice([1e-3, 1, 50], (200, 1))).astype(np.float16)
    R[:20, :5] = R[:20, 5:10]  # repeated values make ties with the threshold more likely
    for tau in (0.03, 0.05, 0.1, 1 / 37):
        got = sel.important(torch.from_numpy(R), tau).numpy()
        for i, row in enumerate(R.astype(float)):
            thr = tau * math.fsum(max(v, 0.0) for v in row)
            assert list(got[i]) == [v >= thr for v in row]


def _relevance(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float16)


def test_counts_relevance_and_candidates_with_known_answers():
    # 4 channels, 3 classes: class 0 has 4 images, class 1 has 2, class 2 has none.
    R = _relevance([
        [1, 1, 0, 0],      # class 0: c0, c1 important (tau 0.25: threshold 0.5)
        [1, 1, 0, 0],      # class 0: c0, c1
        [1, 0, 1, 0],      # class 0: c0, c2
        [-1, -1, -1, -1],  # class 0: all negative, nothing important
        [0, 1, 0, 1],      # class 1: c1, c3
        [1, 1, 0, 1],      # class 1: c0, c1, c3 (threshold 0.75)
    ])
    targets = np.array([0, 0, 0, 0, 1, 1])
    counts = stage2.count_important_all(R, targets, 3, 0.25)
    assert counts.tolist() == [[3, 2, 1, 0], [1, 2, 0, 2], [0, 0, 0, 0]]
    n = torch.tensor([4, 2, 0])
    rel = sel.relevant_classes(counts, n, 0.75)
    # class 0 needs 3 of 4 (exactly p * n_t): c0; class 1 needs 1.5: c1, c3; class 2 (no images): nothing
    assert rel.tolist() == [[True, False, False, False], [False, True, False, True], [False, False, False, False]]
    assert sel.candidate_channels(rel) == {}
    rel_half = sel.relevant_classes(counts, n, 0.5)  # class 0 needs 2: c0, c1; class 1 needs 1: c0, c1, c3
    assert sel.candidate_channels(rel_half) == {0: [0, 1], 1: [0, 1]}
    assert not sel.relevant_classes(counts, n, 0.0)[2].any()  # 0 >= 0 * 0, yet no images: relevant to nothing


def test_counts_do_not_depend_on_order_or_chunking(tmp_path):
    rng = np.random.default_rng(1)
    R = rng.standard_normal((301, 16)).astype(np.float16)
    targets = np.sort(rng.integers(0, 7, 301))
    want = np.zeros((7, 16), np.int64)
    for row, t in zip(R.astype(np.float64), targets):
        want[t] += row >= 0.1 * np.clip(row, 0, None).sum()
    path = str(tmp_path / "relevance.npy")
    np.save(path, R)
    assert stage2.count_important_all(R, targets, 7, 0.1).numpy().tolist() == want.tolist()
    for rows in (1, 7, 64, 1000):
        assert stage2.count_important_all(path, targets, 7, 0.1, rows=rows).numpy().tolist() == want.tolist()
    perm = rng.permutation(301)
    shuffled = stage2.count_important_all(R[perm], targets[perm], 7, 0.1, rows=50)
    assert shuffled.numpy().tolist() == want.tolist()


def test_pairs_cosines_bounds_and_order():
    arvs = {
        5: torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64),
        2: torch.tensor([[1.0, 2.0, 0, 0], [2.0, 1.0, 0, 0]], dtype=torch.float64),  # cos 0.8
        9: torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0]], dtype=torch.float64),  # zero ARV: undefined, skipped
    }
    cands = {5: [3, 7, 8], 2: [0, 4], 9: [1, 2]}
    # channel 5: (3,7) cos 0, (3,8) cos exactly 0.5, (7,8) cos 0.5
    got = sel.polysemantic_pairs(arvs, cands, 0.0, 0.5)
    assert got == [{"channel": 5, "class1": 3, "class2": 7, "cosine_similarity": 0.0}]  # 0.5 is excluded
    got = sel.polysemantic_pairs(arvs, cands, 0.0, 1.0)
    assert [(d["channel"], d["class1"], d["class2"]) for d in got] == [(2, 0, 4), (5, 3, 8), (5, 7, 8), (5, 3, 7)]
    assert got[0]["cosine_similarity"] == pytest.approx(0.8, abs=1e-15)
    assert got[1]["cosine_similarity"] == 0.5
    assert sel.polysemantic_pairs(arvs, cands, 0.1, 0.5) == []


def test_cosine_does_not_overflow_for_large_arvs():
    big = torch.tensor([[300.0, 400.0, 0.0], [400.0, 300.0, 1.0]], dtype=torch.float64)  # norms > 255
    (pair,) = sel.polysemantic_pairs({4: big}, {4: [2, 6]}, 0.0, 1.0)
    assert (pair["channel"], pair["class1"], pair["class2"]) == (4, 2, 6)
    assert pair["cosine_similarity"] == pytest.approx(240000 / (500 * math.sqrt(250001)), rel=1e-14)


def test_parameters_that_make_no_sense_are_refused():
    for args in ((-0.1, 0.75, 0.0, 0.5), (0.03, 1.5, 0.0, 0.5), (0.03, 0.75, 0.5, 0.5), (math.nan, 0.75, 0, 1)):
        with pytest.raises(UserError):
            sel.check_params(*args)


# ---------------------------------------------------------------- the planted network end to end


@pytest.fixture
def planted_store(tmp_path, planted_model, planted_data):
    cfg = Stage1Config(data_dir=planted_data, store_dir=str(tmp_path / "store"), model="planted",
                       weights="planted-v1", layer="conv", batch_size=5, num_workers=0, progress=False)
    out = compute_relevance(cfg, loaded=planted_model)
    return Store.open(out["store"])


def test_planted_channel0_is_polysemantic_channel1_is_not(planted_store, planted_model, planted_data):
    store = planted_store
    # independent counts straight from the stored relevance
    R = np.asarray(store.relevance, dtype=np.float64)
    targets = store.targets
    imp = R >= 0.03 * np.clip(R, 0, None).sum(1, keepdims=True)
    want = np.stack([imp[targets == t].sum(0) for t in range(3)])
    shutil.rmtree(planted_data)  # stage 2 reads no images
    res = stage2.find_pairs(store, tau=0.03, p=0.75, gamma_low=0.0, gamma_high=0.5)
    assert res.counts.numpy().tolist() == want.tolist()
    assert res.candidates[0] == [0, 1]  # channel 0: red and blue
    assert 1 in res.candidates and {0, 1} <= set(res.candidates[1])
    assert 2 not in res.candidates and 3 not in res.candidates
    listed = {(d["channel"], d["class1"], d["class2"]): d["cosine_similarity"] for d in res.pairs}
    assert (0, 0, 1) in listed and abs(listed[(0, 0, 1)]) < 0.1
    assert not any(c == 1 for c, _, _ in listed)  # same inputs for every class: cos close to 1
    everything = stage2.find_pairs(store, tau=0.03, p=0.75, gamma_low=-1.0, gamma_high=1.5)
    cos1 = [d["cosine_similarity"] for d in everything.pairs if d["channel"] == 1]
    assert cos1 and min(cos1) > 0.99
    # stage 3 recomputes the ARVs it needs with concept_arvs: the same vectors, the same s
    for d in everything.pairs:
        a1, a2 = store_arvs.concept_arvs(store, d["channel"], [[d["class1"]], [d["class2"]]])
        s = float(a1 @ a2 / (a1.norm() * a2.norm()))
        assert s == pytest.approx(d["cosine_similarity"], abs=1e-12)


def test_planted_concept_arv_equals_autograd_over_the_images(planted_store, planted_model, planted_data):
    from utils.data.images import list_images, make_loader

    images = list_images(planted_data, "train")
    x = torch.cat([layer_input(planted_model.model, planted_model.model.conv, b[0])
                   for b in make_loader(images, batch_size=8, num_workers=0)])
    t = torch.tensor(images.targets)
    conv = planted_model.model.conv
    for channel, classes in ((0, [0]), (0, [1]), (1, [0, 1]), (3, [0, 1, 2])):
        want = arv_autograd(conv, channel, x[torch.isin(t, torch.tensor(classes))])
        got = store_arvs.concept_arvs(planted_store, channel, [classes])[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# ---------------------------------------------------------------- the script


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("stage2_cli")
    data = write_image_folder(str(root / "data"), n_train=3, n_val=1, size=16)
    r = _run([os.path.join(ROOT, "get_importances_for_classes.py"), "--data_dir", data, "--model", "resnet18",
              "--weights", "none", "--store_dir", str(root / "store"), "--num_workers", "0", "--batch_size", "9",
              "--class_index", class_index_for(data)],
             cwd=str(root))
    assert r.returncode == 0, r.stderr
    shutil.rmtree(data)  # stage 2 must not need the images
    return root


@pytest.fixture(scope="module")
def planted_cli_store(tmp_path_factory):
    """Stage-1 stores of the planted network (layers ``conv`` and ``stem``) and, independently, the cosine
    similarity of channel 0's ARVs for red (class 0) and blue (class 1) by autograd over the images."""
    from utils.data.images import list_images, make_loader

    root = tmp_path_factory.mktemp("stage2_planted")
    data = write_image_folder(str(root / "data"), n_train=8, n_val=1)
    lm = planted_loaded()
    for layer in ("conv", "stem"):
        compute_relevance(Stage1Config(data, str(root / "store"), model="planted", weights="planted-v1", layer=layer,
                                         batch_size=8, num_workers=0, progress=False), loaded=lm)
    images = list_images(data, "train")
    x = torch.cat([layer_input(lm.model, lm.model.conv, b[0]) for b in make_loader(images, batch_size=8, num_workers=0)])
    t = torch.tensor(images.targets)
    red, blue = (arv_autograd(lm.model.conv, 0, x[t == c]) for c in (0, 1))
    shutil.rmtree(data)  # stage 2 must not need the images
    return root, float(red @ blue / (red.norm() * blue.norm()))


@pytest.mark.slow
def test_cli_prints_list_number_path_and_writes_txt(planted_cli_store):
    root, s = planted_cli_store
    out_json = os.path.join(str(root), "out.json")
    r = _run([SCRIPT, "--model", "planted", "--nr_channels_in_layer_of_interest", "4",
              "--proportion_attribution_required", "0.03", "--p", "0.75", "--cos_sim_high", "0.5",
              "--data_dir", "/nonexistent", "--batch_size", "7", "--no_progress", "--json", out_json], cwd=str(root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    txt = os.path.join("./store", "results_get_cosine_similarities", "planted_required0.03_p0.75_cossim0.0to0.5.txt")
    assert lines[-1] == f"written: {txt}"
    # the planted answer: channel 0 alone serves red and blue through different inputs (s near 0)
    assert ast.literal_eval(lines[-3]) == [{"channel": 0, "class1": 0, "class2": 1, "cosine_similarity": round(s, 4)}]
    assert lines[-2] == "1"
    with open(os.path.join(str(root), txt)) as f:
        rows = f.read().splitlines()
    assert rows[0] == "Channel,Class1,Class2,CosineSimilarity" and len(rows) == 2
    assert rows[1].startswith("0,0,1,") and float(rows[1].split(",")[3]) == pytest.approx(s, abs=1e-9)
    with open(out_json) as f:
        js = json.load(f)
    assert [(d["channel"], d["class1"], d["class2"]) for d in js["pairs"]] == [(0, 0, 1)]
    assert js["pairs"][0]["cosine_similarity"] == float(rows[1].split(",")[3])
    assert js["candidates"]["0"] == [0, 1] and "2" not in js["candidates"] and "3" not in js["candidates"]
    assert any(line.split()[:5] == ["0", "0", "red", "thing", "1"] for line in lines)  # the table with names


@pytest.mark.slow
def test_cli_names_the_results_file_of_another_layer(planted_cli_store):
    root, _ = planted_cli_store
    r = _run([SCRIPT, "--model", "planted", "--layer", "stem", "--proportion_attribution_required", "0.03",
              "--p", "0.5", "--cos_sim_low", "-1", "--cos_sim_high", "1.5", "--no_progress"], cwd=str(root))
    assert r.returncode == 0, r.stderr
    name = "planted_stem_required0.03_p0.5_cossim-1.0to1.5.txt"
    assert r.stdout.splitlines()[-1] == f"written: {os.path.join('./store', 'results_get_cosine_similarities', name)}"
    with open(os.path.join(str(root), "store", "results_get_cosine_similarities", name)) as f:
        rows = f.read().splitlines()
    assert len(rows) - 1 == int(r.stdout.splitlines()[-2])
    assert "store ./store/planted_stem_channel_importances: planted stem" in r.stdout


@pytest.mark.slow
def test_cli_lists_every_pair_with_names_when_all_channels_qualify(cli_store):
    root = str(cli_store)
    r = _run([SCRIPT, "--model", "resnet18", "--weights", "none", "--layer", "layer4.1.conv2",
              "--store_dir", "store", "--proportion_attribution_required", "0.03", "--p", "0", "--cos_sim_low", "-1",
              "--cos_sim_high", "1.5", "--no_progress"], cwd=root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert int(lines[-2]) == 512 * 3  # p = 0: every channel relevant to all 3 classes
    assert any(line.split()[1:3] == ["0", "A_red"] for line in lines if line[:1] == " ")  # names next to indices
    assert os.path.isfile(os.path.join(root, "store", "results_get_cosine_similarities",
                                       "resnet18_required0.03_p0.0_cossim-1.0to1.5.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("extra, words", [
    (["--nr_channels_in_layer_of_interest", "2048"], "does not match"),
    (["--store_dir", "elsewhere"], "no stage-1 store"),
])
def test_cli_refusals_are_one_line_exit_2(cli_store, extra, words):
    r = _run([SCRIPT, "--model", "resnet18", *extra], cwd=str(cli_store))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_store_lookup_checks_model_layer_and_weights_without_loading_them(cli_store):
    store_dir = os.path.join(str(cli_store), "store")
    assert open_store(store_dir, "resnet18").meta["layer"] == "layer4.1.conv2"
    assert open_store(store_dir, "resnet18", "last_conv", "none").path.endswith("resnet18_channel_importances")
    assert open_store(store_dir, "resnet18", "layer4.1.conv2", "/not/here.pth").meta["weights"] == "none"
    with pytest.raises(UserError, match="weights"):
        open_store(store_dir, "resnet18", None, "IMAGENET1K_V1")
    with pytest.raises(UserError, match="no stage-1 store"):
        open_store(store_dir, "resnet18", "layer3.0.conv1")
    with pytest.raises(UserError, match="no stage-1 store"):
        open_store(store_dir, "resnet50")
