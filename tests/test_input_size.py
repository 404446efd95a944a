"""An own model built for 32 px through every command with --input_size 32; without it, one line naming the
flag; a store or record made at one input size refused at another; the accuracy stage 1 prints and stores."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import COLOURS, PLANTED4, run_script, write_image_folder

# The planted network behind a pixel-mixing Linear over 32 x 32 positions (the identity): it runs on 32 px
# images only, as a classifier with a flatten-and-Linear head does ("mat1 and mat2 shapes cannot be multiplied").
FOR32 = PLANTED4 + '''

class For32(PlantedRGB):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(32 * 32, 32 * 32, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(32 * 32))

    def forward(self, x):
        return super().forward(self.mix(x.flatten(2)).view(x.shape))


def build32():
    return For32(), NAMES


def build32_with_transform():
    return For32(), NAMES, {"input_size": 32}
'''


@pytest.fixture(scope="module")
def for32(tmp_path_factory):
    root = tmp_path_factory.mktemp("for32")
    (root / "for32.py").write_text(FOR32)
    data = write_image_folder(str(root / "data"), n_train=6, n_val=5, colors=COLOURS, size=40)
    common = ["--data_dir", data, "--model", f"{root / 'for32.py'}:build32", "--num_workers", "0", "--device", "cpu",
              "--batch_size", "4", "--no_progress", "--layer", "conv"]
    return root, common


def _one_line(r, *words):
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_a_32_px_model_runs_through_every_command_with_input_size_32(for32):
    root, common = for32
    store, size = str(root / "store"), ["--input_size", "32"]
    concepts = ["--channel_disentangle", "0", "--classes_for_concept1", "0", "1", "--classes_for_concept2", "3"]
    r = run_script("get_importances_for_classes.py", *common, *size, "--store_dir", store, "--json", str(root / "s1.json"))
    assert r.returncode == 0, r.stderr
    assert "the model's accuracy on these training images, as fed to it: 75.0%" in r.stdout
    s1 = json.load(open(root / "s1.json"))
    assert s1["accuracy"] == 0.75 and s1["provenance"]["transform"]["crop"] == 32
    meta = json.load(open(os.path.join(s1["store"], "meta.json")))
    assert meta["train_accuracy"] == 0.75 and meta["preprocess"] == {**meta["preprocess"], "resize": 32, "crop": 32}
    model = common[common.index("--model") + 1]
    r = run_script("get_cosine_similarities.py", "--model", model, "--store_dir", store, "--layer", "conv", "--no_progress")
    assert r.returncode == 0, r.stderr
    r = run_script("disentangle_channel.py", *common, *size, "--store_dir", store, *concepts)
    assert r.returncode == 0, r.stderr
    models = os.path.join(store, "models_disentangled")
    rec = ["--model_dir", models, "--channel", "0", *concepts[2:]]
    r = run_script("get_results.py", *common, *size, *rec, "--out_dir", str(root / "results"), "--json",
                   str(root / "s4.json"))
    assert r.returncode == 0, r.stderr
    assert json.load(open(root / "s4.json"))["provenance"]["transform"]["crop"] == 32
    r = run_script("visualize_channel.py", *common, *size, *rec, "--out_dir", str(root / "pictures"), "--no_fv",
                   "--top_k", "3")
    assert r.returncode == 0, r.stderr
    r = run_script("disentangle_layer.py", *common, *size, "--store_dir", store, "--top_k", "3", "--json",
                   str(root / "layer.json"))
    assert r.returncode == 0, r.stderr
    layer = json.load(open(root / "layer.json"))
    assert sorted(layer["channels"]) == ["0", "1"] and layer["provenance"]["transform"]["crop"] == 32
    # the layer command's folder loads as a result from anywhere: the own file by its absolute path, the transform
    from utils.stages.result import load

    res = load(os.path.dirname(layer["report"]))
    assert res.transform.crop == 32 and sorted(res.channels) == [0, 1]
    assert res.units(torch.zeros(2, 3, 32, 32))[0].shape == (2, 2, 32, 32)
    for script, extra in (("get_importances_for_classes.py", ["--store_dir", str(root / "other")]),
                          ("disentangle_channel.py", ["--store_dir", store, *concepts]),
                          ("get_results.py", [*rec, "--out_dir", str(root / "r2")]),
                          ("visualize_channel.py", [*rec, "--out_dir", str(root / "p2")]),
                          ("disentangle_layer.py", ["--store_dir", store])):
        _one_line(run_script(script, *common, *extra), "fails on one 3 x 224 x 224 image", "--input_size")
    assert not os.path.exists(root / "other")
    # at another input size (the model runs on 32 px only, so: another normalisation) the store and the
    # record are refused, not silently reused
    other = ["--input_size", "32", "--mean", "0.5", "--std", "0.5"]
    _one_line(run_script("disentangle_layer.py", *common, *other, "--store_dir", store), "input transform")
    _one_line(run_script("get_results.py", *common, *other, *rec, "--out_dir", str(root / "r3")), "--input_size")
    _one_line(run_script("get_importances_for_classes.py", *common, *other, "--store_dir", store), "input transform")


def test_an_own_build_function_may_return_the_transform(for32, tmp_path):
    root, common = for32
    common = [a.replace(":build32", ":build32_with_transform") for a in common]
    r = run_script("get_importances_for_classes.py", *common, "--store_dir", str(tmp_path / "store"))
    assert r.returncode == 0 and "as fed to it: 75.0%" in r.stdout, r.stderr  # red reads as orange


def test_near_chance_accuracy_gets_a_note(for32, tmp_path):
    """With --std 1000 every pixel is about 0: the model sees no colour at all, and stage 1 says so."""
    root, common = for32
    r = run_script("get_importances_for_classes.py", *common, "--input_size", "32", "--std", "1000",
                   "--store_dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert "near chance (1/4 = 25.0%)" in r.stdout and "--input_size, --resize, --mean, --std" in r.stdout


def test_transform_flags_in_words(for32, tmp_path):
    root, common = for32
    for extra, words in ((["--std", "0.5", "-0.5", "1"], "--std must be positive"),
                         (["--mean", "0.5", "0.5"], "--mean takes 1 or 3 numbers"),
                         (["--resize", "16"], "--resize 16 must be at least --input_size 32")):
        r = run_script("get_importances_for_classes.py", *common, "--input_size", "32", *extra,
                       "--store_dir", str(tmp_path / "s"))
        _one_line(r, words)
        assert not os.path.exists(tmp_path / "s")
