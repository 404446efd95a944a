"""The layer command end to end on a network planted for it: classes merged into one concept by linkage,
two split channels that share classes, the purity baseline drawn from non-candidates only, its flags and
error paths, its records beside stage 3's, and torchrun with two processes equal to one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _layer(planted4, tmp_path, *extra):
    root, _, common = planted4
    os.makedirs(tmp_path, exist_ok=True)
    out = tmp_path / "layer.json"
    r = run_script("disentangle_layer.py", *common, "--store_dir", str(root / "store"), "--out_dir",
                   str(tmp_path / "out"), "--top_k", "4", "--json", str(out), *extra)
    return r, (json.load(open(out)) if r.returncode == 0 else None)


def test_merged_concepts_shared_classes_and_the_baseline(planted4, tmp_path):
    r, js = _layer(planted4, tmp_path, "--baseline_channels", "3")
    assert r.returncode == 0, r.stderr
    ch = js["channels"]
    assert sorted(ch) == ["0", "1"]  # channel 2 has one concept: not split
    assert ch["0"]["concepts"] == [[0, 1], [3]]  # red and orange merged by linkage; blue
    assert ch["1"]["concepts"] == [[0, 1], [2]]  # the same merged concept in another channel; green
    for c in ("0", "1"):  # each concept channel's top-4 validation images are all in its concept
        assert ch[c]["purity"]["concepts"] == [1.0, 1.0], ch[c]["purity"]
    b = js["baseline_purity"]
    assert b["channels"] == [3]  # the only channel that is no candidate (3 asked for, 1 there)
    # channel 3 fires on green alone: its top-4 are green, so its share in its own 1 or 2 top classes is 1
    assert b["by_classes"] == {"1": 1.0, "2": 1.0} and b["mean"] == 1.0
    assert js["max_abs_logit_diff"] <= 1e-5
    # the records say which command made them, under a name of their own
    for c in ("0", "1"):
        rec = json.load(open(os.path.join(ch[c]["record"], "record.json")))
        assert rec["command"] == "disentangle_layer.py" and ch[c]["record"].endswith("_layer")


def test_no_baseline_with_zero_baseline_channels(planted4, tmp_path):
    r, js = _layer(planted4, tmp_path, "--baseline_channels", "0", "--channels", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(js["channels"]) == ["1"]
    assert js["baseline_purity"]["channels"] == [] and js["baseline_purity"]["mean"] is None


@pytest.mark.parametrize("extra, words", [
    (["--min_concepts", "1"], "--min_concepts must be at least 2"),
    (["--channels", "4"], "channel 4 is outside"),
    (["--channels", "-1"], "channel -1 is outside"),
    (["--cos_sim_high", "1.5"], "--cos_sim_high must be in (0, 1]"),
    (["--cos_sim_high", "0"], "--cos_sim_high must be in (0, 1]"),
    (["--p", "2"], "--p must be between 0 and 1"),
    (["--channels", "3"], "channel 3 has 0 concept(s)"),
])
def test_layer_flags_are_one_line(planted4, tmp_path, extra, words):
    r, _ = _layer(planted4, tmp_path, *extra)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "out" / "layer.json")


def test_a_concept_without_validation_images_is_one_line(planted4, tmp_path):
    import shutil

    root, data, common = planted4
    data2 = str(tmp_path / "data")
    shutil.copytree(data, data2)
    shutil.rmtree(os.path.join(data2, "val", "D_blue"))  # blue, a concept of channel 0, has no validation images
    r = run_script("disentangle_layer.py", *common, "--data_dir", data2, "--store_dir", str(root / "store"),
                   "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "concept 2 of channel 0 (classes [3]) has no validation images" in r.stderr
    assert not os.path.exists(tmp_path / "out" / "layer.json")


def test_layer_records_never_replace_a_stage_3_record(planted4, tmp_path):
    root, _, common = planted4
    store = str(tmp_path / "store")
    import shutil

    shutil.copytree(root / "store", store, ignore=shutil.ignore_patterns("models_disentangled", "layer_disentangled"))
    r = run_script("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", "0",
                   "--concept", "0", "1", "--concept", "3")
    assert r.returncode == 0, r.stderr
    folder = os.path.join(store, "models_disentangled")
    (stage3,) = os.listdir(folder)
    before = open(os.path.join(folder, stage3, "record.json")).read()
    r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--top_k", "4", "--split_rule", "paper",
                   "--orientation", "none")
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(folder, stage3, "record.json")).read() == before
    assert json.loads(before)["command"] == "disentangle_channel.py"
    assert sorted(os.listdir(folder)) == sorted([stage3, stage3 + "_layer", stage3.replace("channel0_c1-0-1_c2-3",
                                                                                           "channel1_c1-0-1_c2-2")
                                                 + "_layer"])
    # stage 4 finds stage 3's record first, and the layer command's when it is the only one
    for channel, concepts in (("0", ["0", "1", "3"]), ("1", ["0", "1", "2"])):
        r = run_script("get_results.py", *common, "--model_dir", folder, "--channel_of_interest", channel,
                       "--classes_for_concept1", concepts[0], concepts[1], "--classes_for_concept2", concepts[2],
                       "--out_dir", str(tmp_path / "s4"), "--json", str(tmp_path / f"s4_{channel}.json"))
        assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "s4_0.json"))["record"].endswith(stage3)
    assert json.load(open(tmp_path / "s4_1.json"))["record"].endswith("_layer")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(planted4, tmp_path):
    root, _, common = planted4
    one, js1 = _layer(planted4, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "two.json"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "disentangle_layer.py", *common,
                        "--store_dir", str(root / "store"), "--out_dir", str(tmp_path / "two"), "--top_k", "4",
                        "--batch_size", "2", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("report:") == 1  # rank 0 alone prints
    js2 = json.load(open(out))
    one2, js1b = _layer(planted4, tmp_path / "one_b2", "--batch_size", "2")
    assert one2.returncode == 0, one2.stderr
    for key in ("concepts", "best_rho", "sources", "purity"):
        assert {c: v[key] for c, v in js2["channels"].items()} == {c: v[key] for c, v in js1b["channels"].items()}
    for c, v in js2["channels"].items():
        for rho, s in v["scores"].items():
            assert abs(s - js1b["channels"][c]["scores"][rho]) <= 1e-6 * abs(s)
        for a, b in zip(v["csv"], js1b["channels"][c]["csv"]):  # torchrun runs one thread per process
            x, y = np.loadtxt(a, delimiter=",", skiprows=1, ndmin=2), np.loadtxt(b, delimiter=",", skiprows=1, ndmin=2)
            assert x.shape == y.shape and np.allclose(x, y, rtol=1e-6, atol=1e-6)
    assert js2["baseline_purity"] == js1b["baseline_purity"]
    assert js2["max_abs_logit_diff"] <= 1e-5
    # one output folder, written once
    assert sorted(os.listdir(tmp_path / "two")) == ["arrays.npz", "disentangled.pt", "layer.json", "pictures", "plots",
                                                     "report.html", "results_quantitative"]
    assert {c: v["best_rho"] for c, v in js1["channels"].items()} == {c: v["best_rho"] for c, v in js2["channels"].items()}


def test_every_pass_of_the_layer_command_feeds_images_through_the_models_transform(planted4, tmp_path, monkeypatch):
    """The scoring pass and the validation pass both get the transform the model declares (not the paper's; its
    store is made with it too: a store made with another transform is refused, see test_input_size)."""
    import dataclasses

    from utils.passes import image_pass
    from utils.stages.relevance import Stage1Config, compute_relevance
    from utils.stages.layer import LayerConfig, disentangle_layer
    from utils.model.loading import load_model

    root, data, common = planted4
    lm = load_model(common[common.index("--model") + 1])
    lm = dataclasses.replace(lm, preprocess=dataclasses.replace(lm.preprocess, resize=20, crop=16))
    store = str(tmp_path / "store")
    compute_relevance(Stage1Config(data_dir=data, store_dir=store, model=lm.name, layer="conv", batch_size=4,
                                     num_workers=0, progress=False, device="cpu"), loaded=lm)
    seen = []
    real = image_pass.Runner.image_pass

    def spy(self, images, batches, transform, desc, shard=True):
        seen.append((desc, transform))
        return real(self, images, batches, transform, desc, shard)

    monkeypatch.setattr(image_pass.Runner, "image_pass", spy)
    disentangle_layer(LayerConfig(data, store, model=common[common.index("--model") + 1], layer="conv",
                                  batch_size=4, num_workers=0, progress=False, device="cpu", top_k=4,
                                  out_dir=str(tmp_path / "out")), loaded=lm, log=lambda *a: None)
    passes = [d for d, _ in seen]
    assert "contributions" in passes and "validation" in passes  # the default: the searched rule
    assert all(t is lm.preprocess for d, t in seen if d in ("contributions", "validation")), seen
    seen.clear()
    disentangle_layer(LayerConfig(data, store, model=common[common.index("--model") + 1], layer="conv",
                                  batch_size=4, num_workers=0, progress=False, device="cpu", top_k=4,
                                  split_rule="paper", out_dir=str(tmp_path / "out2")), loaded=lm, log=lambda *a: None)
    assert "scoring" in [d for d, _ in seen]
    assert all(t is lm.preprocess for d, t in seen if d in ("contributions", "scoring", "validation")), seen


def test_positive_rule_names_its_records_and_report_and_keeps_the_logits(planted4, tmp_path):
    r, js = _layer(planted4, tmp_path, "--split_rule", "positive", "--orientation", "none", "--baseline_channels", "0")
    assert r.returncode == 0, r.stderr
    assert js["split_rule"] == "positive" and js["max_abs_logit_diff"] <= 1e-5
    for c, ch in js["channels"].items():
        rec = json.load(open(os.path.join(ch["record"], "record.json")))
        assert rec["split_rule"] == "positive" and ch["record"].endswith("_positive_layer")
        best = ch["sources"][f"{ch['best_rho']:.2f}"]
        assert sorted(sum(best.values(), [])) == list(range(10))  # a partition of the inputs
    page = open(tmp_path / "out" / "report.html").read()
    assert "only inputs with A_j &gt; 0 can be exclusive to concept j" in page
    r2, paper = _layer(planted4, tmp_path / "paper", "--baseline_channels", "0", "--split_rule", "paper",
                       "--orientation", "none")
    assert r2.returncode == 0 and paper["split_rule"] == "paper"
    for c, ch in paper["channels"].items():  # the paper's records keep their names and keys
        rec = json.load(open(os.path.join(ch["record"], "record.json")))
        assert "split_rule" not in rec and ch["record"].endswith(f"channel{c}_" + ch["record"].split(f"channel{c}_")[1])
        assert not ch["record"].endswith("_positive_layer")


def test_auc_of_every_validation_image_in_layer_json(planted4, tmp_path):
    from conftest import COLOURS

    r, js = _layer(planted4, tmp_path, "--baseline_channels", "0")
    assert r.returncode == 0, r.stderr
    for c, ch in js["channels"].items():
        auc = ch["auc"]
        assert auc["images"] == 5 * len(COLOURS) and auc["images_in_concept"] == [5 * len(cs) for cs in ch["concepts"]]
        # each concept channel fires on its own colours alone: every image of its concept above every other one
        assert auc["concepts"] == [1.0, 1.0], (c, auc)
        # the original channel fires on both concepts: for either, the other concept's images outrank some
        assert all(a < 1.0 for a in auc["original"]), (c, auc)


def test_flags_of_concept_units():
    import numpy as np

    from utils.method.failures import concept_flags, topk_ties

    scores = np.array([3.0, 2.0, 2.0, 1.0, 0.5])
    assert topk_ties(scores, [3.0, 2.0]) and not topk_ties(scores, [3.0, 2.0, 2.0]) and not topk_ties(scores, [3.0])
    src = {"concept1": [], "concept2": [4], "shared": [0, 1]}
    assert concept_flags(1, src, np.full(9, -96.6), [-96.6, -96.6], -0.2, 0.5, 0.83) == [
        "no exclusive input", "constant output", "own-concept share <= 0", "ties at the k-th activation"]
    assert concept_flags(2, src, scores, [3.0, 2.0, 2.0], 0.7, 0.5, 0.83) == []
    assert concept_flags(2, src, scores, [3.0, 2.0, 2.0], None, 0.9, 0.83) == ["purer original"]
    # a concept unit whose top images are mostly of other classes is flagged even where the original was no purer
    assert concept_flags(2, src, scores, [3.0, 2.0, 2.0], None, 0.0, 0.25) == ["top-k mostly outside its concept"]
    assert concept_flags(2, src, scores, [3.0, 2.0, 2.0], None, 0.0, 0.5) == []


def test_layer_json_flags_and_gain_per_concept(planted4, tmp_path):
    from conftest import COLOURS

    r, js = _layer(planted4, tmp_path, "--baseline_channels", "0")
    assert r.returncode == 0, r.stderr
    for c, ch in js["channels"].items():  # the planted split is clean: nothing to flag
        assert ch["flags"] == [[], []], (c, ch["flags"])
        assert ch["purity_gain_per_concept"] == [a - b for a, b in zip(ch["purity"]["concepts"], ch["purity"]["original"])]
        why = ch["why"]  # why it is a candidate, and where each concept unit fires outside its concept
        assert sorted(why["candidate"]["classes"]) == sorted(t for cs in ch["concepts"] for t in cs)
        assert all(0 < s <= 1 for s in why["candidate"]["shares"])
        assert [len(o) for o in why["outside"]] == [min(3, len(COLOURS) - len(cs)) for cs in ch["concepts"]]
        assert all(t not in cs for o, cs in zip(why["outside"], ch["concepts"]) for t, _ in o)
