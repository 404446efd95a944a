"""The one-command demo on a smaller setting: real digits, a briefly trained CNN, stages 1-4, pictures, report."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from utils.stages.demo import DemoConfig, run_demo
from utils.method.split import RHOS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path):
    cfg = DemoConfig(demo_root=str(tmp_path / "demo_data"), out_dir=str(tmp_path / "out"), epochs=1, max_train=400,
                     max_images_per_class=30, max_channels=2, p=0.5, cos_sim_high=0.5, pictures_k=4, fv_steps=2,
                     batch_size=32, num_workers=0, progress=False)
    out = run_demo(cfg)
    report = out["report"]
    assert os.path.isfile(report) and out["disentangled"]
    page = open(report).read()
    # the digits dataset in ImageFolder form, 10 classes, train and val
    for split in ("train", "val"):
        assert len(os.listdir(tmp_path / "demo_data" / "digits" / split)) == 10
    # the layer report: settings, the table of split channels, per channel its sweep, pictures and plots
    for piece in ("<h2>Settings</h2>", "Split channels, by purity gain", "rho sweep", "max |logit difference|",
                  "D1 / orig", "What the channels respond to", "Purity of the top images", "demo model"):
        assert piece in page, piece
    layer = json.load(open(tmp_path / "out" / "layer.json"))
    diff = layer["max_abs_logit_diff"]
    assert 0 <= diff <= 1e-4 and f"{diff:.2e}" in page  # fp32: ~1e-6; the page shows the same number
    for d in out["disentangled"]:  # best rho: the first maximal score of the record's sweep, shown on the page
        ch = layer["channels"][str(d["channel"])]
        scores = [ch["scores"][f"{r:.2f}"] for r in RHOS]
        assert d["best_rho"] == RHOS[scores.index(max(scores))] == ch["best_rho"]
        assert f'href="#c{d["channel"]}">{d["channel"]}</a>' in page and f"<b>{d['best_rho']:.2f}</b>" in page
    images = re.findall(r'<img class="[a-z]*" alt="[^"]*" src="([^"]+)"', page)
    # the layer's effects figure; per channel its teaser, per concept a strip, a heatmap strip and a plot
    pictures = 1 + sum(1 + 3 * len(d["concepts"]) for d in out["disentangled"])
    assert len(images) == pictures and all(os.path.isfile(os.path.join(tmp_path / "out", p)) for p in images)
    n = len(out["disentangled"])
    # the same results as the files on disk
    store = tmp_path / "out" / "store" / "mobilenet_v3_small_channel_importances"
    meta = json.load(open(store / "meta.json"))
    assert meta["complete"] and meta["num_images"] == 300
    assert np.load(store / "relevance.npy", mmap_mode="r").shape == (300, 576)
    assert len(os.listdir(tmp_path / "out" / "store" / "models_disentangled")) == n
    assert len(os.listdir(tmp_path / "out" / "results_quantitative")) == 2 * n
    assert sorted(layer["channels"]) == sorted(str(d["channel"]) for d in out["disentangled"])
    # the trained model is cached for the next run
    assert any(f.endswith(".pt") for f in os.listdir(tmp_path / "demo_data"))


def test_demo_help():
    out = subprocess.run([sys.executable, "demo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--max_channels N, --top_k N" in out.stdout and "--data_dir" in out.stdout


def test_demo_bad_input_one_line(tmp_path):
    out = subprocess.run([sys.executable, "demo.py", "--data_dir", str(tmp_path / "nothing"), "--model", "resnet18",
                          "--weights", "none", "--out_dir", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_vit_small(tmp_path):
    """``demo.py --model vit`` on a smaller setting: the digits ViT trained, split at its last MLP (class token)."""
    import torch

    from utils.data.images import list_images, load_image
    from utils.model.demo_models import digits_vit_spec
    from utils.model.loading import load_model
    from utils.model.surgery import load_checkpoint

    spec = digits_vit_spec()
    cfg = DemoConfig(model=spec, demo_root=str(tmp_path / "demo_data"), out_dir=str(tmp_path / "out"), epochs=3,
                     max_train=400, max_images_per_class=20, max_channels=2, pictures_k=4, fv_steps=2,
                     batch_size=32, num_workers=0, progress=False)
    out = run_demo(cfg)
    assert os.path.isfile(out["report"]) and out["disentangled"]
    layer = json.load(open(tmp_path / "out" / "layer.json"))
    assert (layer["layer"], layer["unit"], layer["positions"]) == ("blocks.3.mlp.fc2", "Linear", "cls")
    meta = json.load(open(os.path.join(out["store"], "meta.json")))
    assert meta["complete"] and meta["positions"] == "cls" and meta["layer"] == "blocks.3.mlp.fc2"
    assert 0 <= layer["max_abs_logit_diff"] <= 1e-4
    # the trained ViT is cached under a file name without the path's slashes, and the exported network
    # (the split layer) gives the trained model's logits
    ckpts = [f for f in os.listdir(tmp_path / "demo_data") if f.endswith(".pt")]
    assert len(ckpts) == 1 and ckpts[0].startswith("demo_models.py-digits_vit-") and "_e3_s0_n400" in ckpts[0]
    original = load_model(spec, str(tmp_path / "demo_data" / ckpts[0]))
    val = list_images(str(tmp_path / "demo_data" / "digits"), "val", max_images_per_class=1)
    x = torch.stack([load_image(val, i, original.preprocess) for i in range(len(val))])
    net = load_checkpoint(layer["export"])
    assert isinstance(net.get_submodule("blocks.3.mlp.fc2"), torch.nn.Sequential)  # the split layer: widened, merge
    with torch.no_grad():
        assert float((net(x) - original.model(x)).abs().max()) <= 1e-4


def test_demo_vit_flag(tmp_path):
    """``--model vit`` (the exact word) is the digits ViT's own-file spec by absolute path; other names pass on;
    with --data_dir it is one line; --help names the models' default epochs."""
    import demo

    spec = demo.demo_model("vit", None)
    assert os.path.isabs(spec.rsplit(":", 1)[0]) and spec.endswith("demo_models.py:digits_vit")
    assert demo.demo_model("vit_b_16", None) == "vit_b_16" and demo.demo_model(None, None) is None
    help_text = " ".join(demo.get_args_parser().format_help().split())
    assert "2 for mobilenet_v3_small" in help_text and "for vit)" in help_text
    out = subprocess.run([sys.executable, "demo.py", "--model", "vit", "--data_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: --model vit") and len(out.stderr.splitlines()) == 1


def test_the_digits_vit_names_the_classes_as_the_digits_folders_do():
    """utils/model/demo_models.py is loaded by path as an own model file, so it keeps its own copy of the names."""
    from utils.data.digits import DIGIT_NAMES
    from utils.model.demo_models import digits_vit

    assert digits_vit()[1] == DIGIT_NAMES and len(DIGIT_NAMES) == 10
