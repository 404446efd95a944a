"""The one-command demo on a smaller setting: real digits, a briefly trained CNN, stages 1-4, pictures, report."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from utils.pipeline import DemoConfig, pick_pairs, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pick_pairs_lowest_similarity_one_per_channel():
    pairs = [{"channel": 5, "class1": 0, "class2": 1, "cosine_similarity": 0.4},
             {"channel": 5, "class1": 0, "class2": 2, "cosine_similarity": 0.1},
             {"channel": 7, "class1": 1, "class2": 2, "cosine_similarity": 0.3},
             {"channel": 9, "class1": 1, "class2": 3, "cosine_similarity": 0.2}]
    got = pick_pairs(pairs, 2)
    assert [(q["channel"], q["cosine_similarity"]) for q in got] == [(5, 0.1), (9, 0.2)]
    assert len(pick_pairs(pairs, 10)) == 3


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path):
    cfg = DemoConfig(demo_root=str(tmp_path / "demo_data"), out_dir=str(tmp_path / "out"), epochs=1, max_train=400,
                     max_images_per_class=30, top_k=1, p=0.5, cos_sim_high=1.0, pictures_k=4, fv_steps=4,
                     batch_size=32, num_workers=0, progress=False)
    out = run_demo(cfg)
    report = out["report"]
    assert os.path.isfile(report) and len(out["disentangled"]) == 1 and out["disentangled"][0]["best_rho"] > 0
    page = open(report).read()
    # the digits dataset in ImageFolder form, 10 classes, train and val
    for split in ("train", "val"):
        assert len(os.listdir(tmp_path / "demo_data" / "digits" / split)) == 10
    # the report's pieces: settings, timings, the pairs table, one disentangled channel with its sweep,
    # equivalence figure, two density plots, the quantitative table and the teaser figure with purity
    for piece in ("<h2>Settings</h2>", "<h2>Timings</h2>", "Gamma-polysemantic pairs", "rho sweep",
                  "largest |logit difference|", "D1 / orig", "What the channels respond to", "Purity"):
        assert piece in page, piece
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3  # two density plots + the teaser
    diff = float(re.search(r'class="ok">([0-9.e+-]+)</b>', page).group(1))
    assert diff <= 1e-3
    # the same results as the stage files on disk
    store = tmp_path / "out" / "store" / "mobilenet_v3_small_channel_importances"
    meta = json.load(open(store / "meta.json"))
    assert meta["complete"] and meta["num_images"] == 300
    assert np.load(store / "relevance.npy", mmap_mode="r").shape == (300, 576)
    records = os.listdir(tmp_path / "out" / "store" / "models_disentangled")
    assert len(records) == 1
    assert len(os.listdir(tmp_path / "out" / "results_quantitative")) == 2
    # the trained model is cached for the next run
    assert any(f.endswith(".pt") for f in os.listdir(tmp_path / "demo_data"))


def test_demo_help():
    out = subprocess.run([sys.executable, "demo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--top_k" in out.stdout and "--data_dir" in out.stdout


def test_demo_bad_input_one_line(tmp_path):
    out = subprocess.run([sys.executable, "demo.py", "--data_dir", str(tmp_path / "nothing"), "--model", "resnet18",
                          "--weights", "none", "--out_dir", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1
