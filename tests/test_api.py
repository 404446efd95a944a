"""The Python API: the layer pipeline on tensors in memory (no folders at all), on an ImageFolder path and on
PIL images, the concept units' activations against the split filters applied by hand, a result saved and
loaded from another working directory, the stages one by one, and what it refuses."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

import utils.api as dc
from conftest import COLOURS, PLANTED4, write_image_folder
from utils.errors import UserError

NAMES = ["red thing", "orange thing", "green thing", "blue thing"]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
FAST = dict(device="cpu", num_workers=0, progress=False, batch_size=4)


def planted4():
    """The planted network of the layer command's tests (channel 0: {red, orange} | {blue}; 1: {red, orange} |
    {green}), built from its model file's text."""
    space: dict = {}
    exec(compile(PLANTED4, "planted4.py", "exec"), space)
    return space["build"]()[0].eval()


def colour_pictures(n: int, size: int = 16, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``n`` noisy solid-colour pictures (uint8 H x W x 3) per class of COLOURS, with their labels."""
    rng = np.random.default_rng(seed)
    return [(np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8), t)
            for t, rgb in enumerate(COLOURS.values()) for _ in range(n)]


def tensors(n: int, seed: int) -> TensorDataset:
    """The pictures as the network takes them: [0, 1], ImageNet-normalised tensors."""
    pics = colour_pictures(n, seed=seed)
    x = torch.stack([(torch.from_numpy(p).permute(2, 0, 1).float() / 255 - MEAN) / STD for p, _ in pics])
    return TensorDataset(x, torch.tensor([t for _, t in pics]))


class Pictures(Dataset):
    """The same pictures as PIL images (the tool's transform makes them tensors)."""

    def __init__(self, n: int, seed: int):
        self.items = colour_pictures(n, seed=seed)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        p, t = self.items[i]
        return Image.fromarray(p), t


@pytest.fixture(scope="module")
def result():
    train, val = tensors(6, seed=0), tensors(5, seed=1)
    return dc.disentangle(planted4(), train, DataLoader(val, batch_size=7), layer="conv", classes=NAMES, top_k=4,
                          log=None, **FAST), val


def test_the_api_on_tensor_datasets_finds_the_planted_concepts_and_keeps_the_logits(result):
    res, val = result
    assert sorted(res.channels) == [0, 1]
    assert res.channels[0].concepts == [[0, 1], [3]] and res.channels[1].concepts == [[0, 1], [2]]
    assert res.channels[0].class_names == [["red thing", "orange thing"], ["blue thing"]]
    for c in (0, 1):
        assert res.channels[c].purity["concepts"] == [1.0, 1.0]
        assert set(res.channels[c].scores) == {round(0.05 * i, 2) for i in range(1, 21)}
    x = val.tensors[0]
    with torch.no_grad():
        assert (res.network(x) - planted4()(x)).abs().max() <= 1e-5
    assert res.transform.crop == 16  # tensors are fed as they are: their own size
    train = tensors(6, seed=0)  # the accuracy as fed, against the model run here
    with torch.no_grad():
        want = (planted4()(train.tensors[0]).argmax(1) == train.tensors[1]).double().mean().item()
    assert res.accuracy == pytest.approx(want) and 0 < want < 1
    assert "data:image/png;base64," in res.html() and "<table>" in res._repr_html_()
    prov = res.summary["provenance"]  # what the user called, not the stages it runs
    assert prov["command"] == "disentangle_channels.disentangle" and prov["seed"] == 0 and prov["transform"]["crop"] == 16


def test_concept_units_are_the_split_filters_applied_to_the_layer_input(result):
    """units(x) against an independent computation: concept j's unit is the channel's weights on the inputs
    of concept j (its index set at the best rho) applied to the layer's input, taken by a hook on the
    original network."""
    res, val = result
    model, x = planted4(), val.tensors[0][::3]
    seen = {}
    model.conv.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    model(x)
    w = model.conv.weight[:, :, 0, 0]
    units = res.units(x)
    for c, s in res.channels.items():
        assert units[c].shape == (len(x), 2, 16, 16)
        for j, inputs in enumerate(s.inputs):
            mask = torch.zeros(w.shape[1])
            mask[inputs] = 1
            want = torch.einsum("i,bihw->bhw", w[c] * mask, seen["x"])
            assert torch.allclose(units[c][:, j], want, atol=1e-5)
    pooled = res.units(x, pooled=True)
    assert pooled[0].shape == (len(x), 2) and torch.allclose(pooled[0], units[0].sum((2, 3)))


def test_a_saved_result_loads_from_another_folder_with_the_same_activations(result, tmp_path, monkeypatch):
    res, val = result
    x = val.tensors[0][:6]
    saved = res.save(str(tmp_path / "saved"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    back = dc.load(os.path.relpath(saved), planted4())
    assert back.transform == res.transform and back.layer == "conv" and sorted(back.channels) == [0, 1]
    got, want = back.units(x), res.units(x)
    assert all(torch.equal(got[c], want[c]) for c in want)
    page = back.report(str(tmp_path / "report"))
    assert os.path.isfile(page) and os.path.isdir(tmp_path / "report" / "pictures")
    with pytest.raises(UserError, match="pass the original network"):
        dc.load(os.path.relpath(saved))  # a network made in memory cannot be rebuilt by name


def test_an_imagefolder_path_and_pil_images_give_the_same_concepts(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), n_train=6, n_val=5, colors=COLOURS, size=16)
    a = dc.disentangle(planted4(), data, layer="conv", input_size=16, top_k=4, log=None, **FAST)
    b = dc.disentangle(planted4(), Pictures(6, 0), Pictures(5, 1), layer="conv", input_size=16, top_k=4, log=None,
                       **FAST)
    for r in (a, b):
        assert {c: s.concepts for c, s in r.channels.items()} == {0: [[0, 1], [3]], 1: [[0, 1], [2]]}
        assert r.transform.crop == 16 and r.transform.resize == 16


def test_the_stages_one_by_one(tmp_path):
    d = dc.prepare(planted4(), tensors(6, 0), tensors(5, 1), classes=NAMES, store_dir=str(tmp_path / "store"))
    store = dc.importances(d, "conv", **FAST)
    assert store.accuracy == 0.75 and store.meta["provenance"]["transform"]["crop"] == 16  # red reads as orange
    pairs = dc.polysemantic_pairs(store, tau=0.03, p=0.75, gamma_high=0.5)
    assert {(d["channel"], d["class1"], d["class2"]) for d in pairs.pairs} >= {(0, 0, 3), (0, 1, 3)}
    rec = dc.split_channel(d, 0, [[0, 1], [3]], "conv", **FAST)
    assert rec.max_abs_logit_diff <= 1e-5 and os.path.isfile(os.path.join(rec.dir, "record.json"))
    prov = rec.provenance
    assert prov["command"] == "disentangle_channels.split_channel" and prov["torch"] == torch.__version__
    assert prov["transform"]["crop"] == 16 and prov["version"]
    out = dc.evaluate_channel(d, 0, [[0, 1], [3]], "conv", out_dir=str(tmp_path / "results"), **FAST)
    assert out["concept1"]["images"] == 10 and out["concept2"]["images"] == 5 and out["csv"]


def test_what_the_api_refuses(tmp_path):
    from torch import nn

    class For32(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 30 * 30, 4)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(UserError, match=r"fails on one 3 x 224 x 224 image.*input_size="):
        dc.prepare(For32(), Pictures(2, 0), Pictures(2, 1))
    assert dc.prepare(For32(), Pictures(2, 0), Pictures(2, 1), input_size=32).transform.crop == 32
    with pytest.raises(UserError, match="must be an nn.Module"):
        dc.prepare("resnet50", Pictures(2, 0))
    with pytest.raises(UserError, match="label 4 but the model has 4 outputs"):
        bad = TensorDataset(torch.zeros(2, 3, 16, 16), torch.tensor([0, 4]))
        dc.importances(dc.prepare(planted4(), bad, store_dir=str(tmp_path / "s")), "conv", **FAST)
    with pytest.raises(UserError, match="yield \\(image, label\\)"):
        dc.importances(dc.prepare(planted4(), [torch.zeros(3, 16, 16)] * 2, store_dir=str(tmp_path / "t")), "conv",
                       **FAST)
