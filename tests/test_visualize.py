"""visualize_channel.py and utils.passes.topk / featvis / teaser: top-k, crops, feature visualisation, purity, figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import arv_autograd, class_index_for, make_record
from utils.data.images import list_images, make_loader
from utils.errors import UserError
from utils.passes.featvis import FVConfig, activation, magnitude_spectrum, visualize
from utils.model.loading import get_layer, load_model
from utils.model.receptive import receptive_field
from utils.store.records import load_split
from utils.model.hooks import layer_input
from utils.method.split import Split, filter_bank
from utils.report.teaser import Panel, teaser_figure
from utils.passes.image_pass import Runner
from utils.method.selectivity import purity
from utils.passes.topk import stream_topk


def runner(batch_size: int) -> Runner:
    """One process on the CPU, no loader workers, no progress bars."""
    return Runner(torch.device("cpu"), batch_size, num_workers=0, progress=False)

from visualize_channel import get_args_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)


class RedNet(nn.Module):
    """Layer of interest ``conv`` (3x3, stride 2) after a 3x3 stride-2 red detector: fires where the image is red."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.weight[0, 0], self.stem.weight[0, 1:] = 1.0, -1.0  # red minus green and blue
            self.stem.weight[1].fill_(0.1)
            self.stem.bias.zero_()
            self.stem.bias[0] = 6.0  # gray is mildly on, so optimisation from a gray image has a gradient
            self.conv.weight.fill_(0.0)
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
            self.conv.bias.zero_()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x))).mean((2, 3))


def _brute_force(model, conv, weight, bias, folder_images):
    """Activation (S x N) of every filter on every image, one image at a time with the full forward."""
    acts = []
    for x, _, _ in make_loader(folder_images, batch_size=1, num_workers=0):
        captured = {}
        h = conv.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
        model(x)
        h.remove()
        acts.append(torch.nn.functional.conv2d(captured["x"], weight, bias, conv.stride, conv.padding).sum((2, 3))[0])
    return torch.stack(acts, 1)


def test_streaming_topk_equals_brute_force(planted_model, image_folder):
    data = image_folder(n_train=5, n_val=1)
    images = list_images(data, "train")
    _, conv = get_layer(planted_model.model, "conv")
    conv = conv.module  # the Conv2d itself
    g = torch.Generator().manual_seed(3)
    splits = [Split(c, torch.randn(2, 10, 1, 1, generator=g), torch.randn(10, 1, 1, generator=g)) for c in (0, 2)]
    bank = filter_bank(conv, splits, ("original", "D1", "D2", "Res"))
    assert len(bank.keys) == 8 and torch.equal(bank.weight[bank.index(2, "original")], conv.weight[2])
    top = stream_topk(runner(4), planted_model.model, conv, bank, images, k=6)
    acts = _brute_force(planted_model.model, conv, bank.weight, bank.bias, images)  # S x 15
    want = torch.sort(acts, dim=1, descending=True, stable=True)
    assert torch.allclose(top.values, want.values[:, :6], atol=1e-4)
    for s in range(len(bank.keys)):  # same images, up to ties in value
        assert torch.allclose(acts[s, top.indices[s]], want.values[s, :6], atol=1e-4)
    assert torch.equal(top.labels, torch.tensor(images.targets)[top.indices])
    # the original channel equals the layer's own output a[c]
    a = conv(layer_input(planted_model.model, conv, next(iter(make_loader(images, batch_size=15, num_workers=0)))[0]))
    assert torch.allclose(a[:, 2].sum((1, 2)).sort(descending=True).values[:6], top.get(2, "original")["values"], atol=1e-4)


def test_receptive_field_and_crop_land_on_planted_red_square(tmp_path):
    net = RedNet().eval()
    rf = receptive_field(net, net.conv)
    assert rf.out_hw == (56, 56) and rf.stride == (4.0, 4.0)
    assert rf.full == 7  # 3x3 stride 2 after 3x3: 1 + 2 + 2*2
    root = tmp_path / "data" / "train"
    rng = np.random.default_rng(0)
    squares = {}
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(3):  # 256 px: eval_transform's centre crop removes 16 px on each side
            img = np.full((256, 256, 3), 128, np.uint8)
            top, left = (int(v) for v in rng.integers(20, 220, 2))
            img[top:top + 12, left:left + 12] = (230, 20, 20)
            Image.fromarray(img).save(root / cls / f"{i}.png")
            squares[str(root / cls / f"{i}.png")] = (top - 16 + 5.5, left - 16 + 5.5)  # centre in the 224 crop
    images = list_images(str(tmp_path / "data"), "train")
    bank = filter_bank(net.conv, [Split(0, net.conv.weight[0].expand(2, -1, -1, -1), net.conv.weight[0])], ("original",))
    top = stream_topk(runner(4), net, net.conv, bank, images, k=6)
    for r in range(6):
        i, j = (int(v) for v in top.positions[0, r])
        cy, cx = squares[images.paths[int(top.indices[0, r])]]
        t, l_, b, rr = rf.box(i, j, 24)
        assert t <= cy <= b and l_ <= cx <= rr
        assert abs((t + b) / 2 - cy) <= 4 and abs((l_ + rr) / 2 - cx) <= 4  # within one stride of the peak


@pytest.mark.parametrize("method", ["maco", "fourier"])
def test_feature_visualisation_raises_activation_and_is_deterministic(method, planted_data):
    net = RedNet().eval()
    w, b = net.conv.weight[0], net.conv.bias[0]
    cfg = FVConfig(method=method, steps=40, size=64, input_size=64, views=2, seed=1)
    mag = magnitude_spectrum(list_images(planted_data, "train"), 64, n=12) if method == "maco" else None
    img, hist = visualize(net, net.conv, w, b, cfg, mag)
    img2, _ = visualize(net, net.conv, w, b, cfg, mag)
    assert img.shape == (3, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert torch.equal(img, img2)
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = activation(net, net.conv, w, b, noise).mean()
    final = activation(net, net.conv, w, b, img[None])[0]
    assert final > 2 * base and hist[-1] > 2 * hist[0]
    assert img[0].mean() > img[1:].mean() + 0.03  # it drew red


def test_purity_on_planted_network(planted_model, planted_data, tmp_path):
    lm = planted_model
    _, conv = get_layer(lm.model, "conv")
    conv = conv.module  # the Conv2d itself
    images = list_images(planted_data, "train")
    x = layer_input(lm.model, conv, next(iter(make_loader(images, batch_size=64, num_workers=0)))[0])
    t = torch.tensor(images.targets)
    A = torch.stack([arv_autograd(conv, 0, x[t == c]) for c in (0, 1)])
    split = load_split(make_record(str(tmp_path / "md"), lm, "conv", 0, [[0], [1]], A))
    top = stream_topk(runner(5), lm.model, conv, filter_bank(conv, [split]), images, k=8)
    assert purity(top.get(0, "D1")["labels"], [[0], [1]]) == {"concept1": 1.0, "concept2": 0.0, "other": 0.0, "k": 8}
    assert purity(top.get(0, "D2")["labels"], [[0], [1]])["concept2"] == 1.0
    top16 = stream_topk(runner(5), lm.model, conv, filter_bank(conv, [split]), images, k=16)
    p = purity(top16.get(0, "original")["labels"], [[0], [1]])
    assert p == {"concept1": 0.5, "concept2": 0.5, "other": 0.0, "k": 16}  # the original serves both
    assert purity([0, 2, 1, 2], [[0], [1]]) == {"concept1": 0.25, "concept2": 0.25, "other": 0.5, "k": 4}
    assert purity([0, 2, 1, 2], [[0], [1], [2]]) == {"concept1": 0.25, "concept2": 0.25, "concept3": 0.5, "other": 0.0,
                                                     "k": 4}


def test_teaser_is_png_of_expected_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    panels = [Panel(name, torch.rand(3, 64, 64, generator=g), [torch.rand(3, 20, 20, generator=g) for _ in range(9)],
                    [f"{i % 3} class" for i in range(9)], [i % 3 for i in range(9)],
                    purity([i % 3 for i in range(9)], [[1], [2]])) for name in ("Original", "Disentangled 1", "Disentangled 2")]
    paths = (str(tmp_path / "t.png"), str(tmp_path / "t.pdf"))
    teaser_figure(panels, "title", ("1 red", "2 blue"), paths, panel_inches=3.0, dpi=80)
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size == (3 * 3 * 80, 4 * 80)
    assert open(paths[1], "rb").read(4) == b"%PDF"


def _run(*args: str):
    return subprocess.run([sys.executable, os.path.join(REPO, "visualize_channel.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_cli_resnet18(image_folder, tmp_path):
    assert _run("--help").returncode == 0
    data = image_folder(n_train=3, n_val=1, size=48)
    lm = load_model("resnet18", "none")
    g = torch.Generator().manual_seed(1)
    make_record(str(tmp_path / "store" / "models_disentangled"), lm, None, 7, [[0], [1]],
                torch.randn(2, 512, generator=g, dtype=torch.float64))
    common = ["--data_dir", data, "--store_dir", str(tmp_path / "store"), "--model", "resnet18", "--weights", "none",
              "--class_index", class_index_for(data),
              "--classes_for_concept1", "0", "--classes_for_concept2", "1", "--num_workers", "0",
              "--out_dir", str(tmp_path / "out"), "--top_k", "4"]
    r = _run(*common, "--channel_disentangle", "7", "--fv_steps", "2", "--fv_size", "32", "--fv_views", "1",
             "--residual", "--heatmap", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["purity"]) == {"original", "D1", "D2", "Res"}
    for f in s["files"]:
        assert os.path.isfile(f)
    assert os.path.isfile(os.path.join(s["out_dir"], "teaser.pdf")) and os.path.isfile(os.path.join(s["out_dir"], "fv_D2.png"))
    assert json.loads(open(os.path.join(s["out_dir"], "purity.json")).read())["purity"] == s["purity"]
    r = _run(*common, "--channel_of_interest", "9999", "--no_fv")  # out of range
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    args = get_args_parser().parse_args([*common, "--channel_of_interest", "8", "--no_fv"])  # no such record
    with pytest.raises(UserError, match="no disentanglement of channel 8"):
        main(args)
