"""The layer command and the API with concepts from clusters: no labels, no store, headless models."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import COLOURS, PLANTED4, run_script, write_image_folder

RED, ORANGE, GREEN, BLUE = 0, 1, 2, 3
FLAGS = ["--concepts", "clusters", "--top_n", "24", "--min_images", "3", "--num_workers", "0", "--device", "cpu",
         "--batch_size", "4", "--no_progress", "--top_k", "3"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted four-colour network as a file (conftest: channel 0 reads red and blue, 1 red and green) and its
    images with class folders (6 per colour to train, 3 held out)."""
    root = tmp_path_factory.mktemp("clusters")
    (root / "planted4.py").write_text(PLANTED4)
    data = write_image_folder(str(root / "data"), n_train=6, n_val=3, colors=COLOURS, size=16)
    return root, data, str(root / "planted4.py") + ":build"


def flatten(src: str, dst: str) -> str:
    """``src``'s train/ and val/ with the class folders taken away (every image directly in the split's folder,
    named so that they sort as before)."""
    for split in ("train", "val"):
        os.makedirs(os.path.join(dst, split))
        for c in sorted(os.listdir(os.path.join(src, split))):
            for f in sorted(os.listdir(os.path.join(src, split, c))):
                shutil.copy(os.path.join(src, split, c, f), os.path.join(dst, split, f"{c}_{f}"))
    return dst


def test_the_layer_command_splits_a_layer_from_its_images_alone(planted):
    """``disentangle_layer.py --concepts clusters``: no store is read; channels 0 and 1 are split between the
    clusters of their top images, which the labels (read afterwards) say are {red, orange} | blue and
    {red, orange} | green; the one network's logits equal the original's; every concept unit tells its concept's
    held-out images from the others better than the original unit does; the files are written."""
    root, data, model = planted
    out = root / "out"
    r = run_script("disentangle_layer.py", "--data_dir", data, "--model", model, "--store_dir", str(root / "nostore"),
                   "--out_dir", str(out), "--json", str(root / "lf.json"), *FLAGS)
    assert r.returncode == 0, r.stderr
    assert not (root / "nostore").exists()  # no store: the images are read directly
    summary = json.loads((out / "layer.json").read_text())
    assert summary["concepts_from"] == "clusters" and summary["labelled"]
    assert sorted(summary["channels"]) == ["0", "1"]
    assert summary["max_abs_logit_diff"] <= 1e-5
    cert = summary["certification"]  # ablation on the model's output: each concept unit's entry, per cluster
    assert cert["measure"] == "features" and cert["concept_units"] == 4
    assert all(len(ch["effects"]) == 2 and ch["effects"][0]["own_original"] > 0 for ch in summary["channels"].values())
    train = sorted(os.listdir(os.path.join(data, "train")))
    for c, other in (("0", "D_blue"), ("1", "C_green")):
        ch = summary["channels"][c]
        classes = sorted(sorted({os.path.basename(os.path.dirname(p)) for p in paths}) for paths in ch["concept_images"])
        assert classes == [["A_red", "B_orange"], [other]]
        # the labels say which class each concept unit's top held-out images mostly hold: never the other concept's
        names = {ch["labels"][f"D{j}"]["name"] for j in (1, 2)}
        assert other in names and names & {"A_red", "B_orange"}
        alone = [j for j in (1, 2) if ch["labels"][f"D{j}"]["name"] == other][0] - 1  # the one-colour concept
        assert ch["labels"]["auc"]["concepts"][alone] == 1.0 > ch["labels"]["auc"]["original"][alone]
        for j in range(2):
            assert ch["auc"]["concepts"][j] > ch["auc"]["original"][j]
            assert ch["auc"]["concepts"][j] == pytest.approx(1.0) and ch["purity"]["concepts"][j] == 1.0
        for p in [ch["pictures"]["original"], *ch["pictures"]["clusters"], *ch["pictures"]["units"]]:
            assert os.path.getsize(p) > 100
    assert set(train) == set(COLOURS)
    for name in ("disentangled.pt", "report.html"):
        assert (out / name).is_file()
    page = (out / "report.html").read_text()
    assert "concepts from clusters" in page and "No label was used" in page
    assert "  unit  k cosine" in r.stdout and "report:" in r.stdout
    assert json.loads((root / "lf.json").read_text())["concepts_from"] == "clusters"
    import disentangle_channels as dc

    loaded = dc.load(str(out))  # the folder loads as a result, as the labelled command's does
    assert sorted(loaded.channels) == [0, 1] and loaded.channels[0].k == 2


def test_labels_never_change_which_units_or_concepts_are_found(planted, tmp_path):
    """The same images without class folders: the same units split between the same images, the same outputs;
    the report says there are no labels."""
    root, data, model = planted
    flat = flatten(data, str(tmp_path / "flat"))
    got = {}
    for name, d in (("labelled", data), ("flat", flat)):
        r = run_script("disentangle_layer.py", "--data_dir", d, "--model", model, "--out_dir", str(tmp_path / name),
                       *FLAGS)
        assert r.returncode == 0, r.stderr
        got[name] = json.loads((tmp_path / name / "layer.json").read_text())
    a, b = got["labelled"], got["flat"]
    assert sorted(a["channels"]) == sorted(b["channels"]) == ["0", "1"]
    for c in a["channels"]:
        assert a["channels"][c]["concepts"] == b["channels"][c]["concepts"]  # the same images, by position
        assert a["channels"][c]["sources"] == b["channels"][c]["sources"]
        assert a["channels"][c]["auc"] == b["channels"][c]["auc"]
    assert not b["labelled"] and b["channels"]["0"]["labels"] is None
    assert "none (a flat folder)" in (tmp_path / "flat" / "report.html").read_text()


def test_a_single_folder_of_images_is_split_in_two(planted, tmp_path):
    """DATA_DIR without train/: a fifth of its images (drawn with the seed) is held out to evaluate on."""
    root, data, model = planted
    folder = tmp_path / "images"
    flat = flatten(data, str(tmp_path / "flat"))
    shutil.copytree(os.path.join(flat, "train"), folder)
    r = run_script("disentangle_layer.py", "--data_dir", str(folder), "--model", model, "--out_dir",
                   str(tmp_path / "out"), *FLAGS)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "layer.json").read_text())
    assert s["training_images"] + s["validation_images"] == 24 and s["validation_images"] == 5
    assert "20% of" in s["held_out"]


@pytest.mark.parametrize("args, message", [
    (["--channels", "3"], "unit 3 of conv has 1 concept(s)"),
    (["--top_n", "4"], "--top_n (4) must be at least twice --min_images (3)"),
    (["--min_images", "20"], "--top_n (24) must be at least twice --min_images (20)"),
])
def test_bad_settings_are_one_line(planted, tmp_path, args, message):
    root, data, model = planted
    r = run_script("disentangle_layer.py", "--data_dir", data, "--model", model, "--out_dir", str(tmp_path / "o"),
                   *FLAGS, *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr
    assert not (tmp_path / "o").exists()


def test_the_api_splits_a_headless_model_from_a_dataset_of_images_alone(planted, tmp_path):
    """``dc.disentangle(model, images, concepts="clusters")``: the planted network without its head, a Dataset
    whose items are image tensors alone (no label), no val set. The result is a split network whose features
    equal the original's, with channels 0 and 1 split in two and their concept units read from ``units``."""
    import disentangle_channels as dc
    from utils.data.images import ImageDataset, list_images
    from utils.data.preprocess import Preprocess
    from utils.model.loading import load_model

    root, data, model_spec = planted
    model = load_model(model_spec).model
    model.fc = torch.nn.Identity()  # headless: the pooled features
    images = list_images(data, "train")
    pre = Preprocess(resize=16, crop=16)
    xs = torch.stack([ImageDataset(images, pre)[i][0] for i in range(len(images))])

    class Alone(torch.utils.data.Dataset):  # images only: nothing says which colour is which
        def __len__(self):
            return len(xs)

        def __getitem__(self, i):
            return xs[i]

    res = dc.disentangle(model, Alone(), layer="conv", concepts="clusters", top_n=19, min_images=3, progress=False, log=None,
                         store_dir=str(tmp_path / "store"))
    assert sorted(res.channels) == [0, 1] and all(s.k == 2 for s in res.channels.values())
    assert res.summary["concepts_from"] == "clusters" and not res.summary["labelled"]
    with torch.no_grad():
        assert float((res.network(xs) - model(xs)).abs().max()) <= 1e-5
    units = res.units(xs, pooled=True)
    assert set(units) == {0, 1} and units[0].shape == (len(xs), 2)
    saved = dc.load(res.save(str(tmp_path / "saved")), model)
    assert sorted(saved.channels) == [0, 1]
    with pytest.raises(dc.UserError, match="concepts must be"):
        dc.disentangle(model, Alone(), concepts="labels")


@pytest.mark.parametrize("kind", ["timm_vit", "torchvision_resnet"])
def test_headless_backbones_run_end_to_end_without_labels(tmp_path, kind):
    """``dc.disentangle(..., concepts="clusters")`` on a timm ViT with ``num_classes=0`` and a torchvision ResNet-18
    with ``fc = Identity()`` (random weights; a folder of images of six colours, no class folders): the whole run,
    from the images to the saved result, and the split network's features equal the original's within 1e-4 (on
    the held-out images, checked by the run, and here on every image)."""
    import numpy as np
    import timm
    import torchvision

    import disentangle_channels as dc
    from utils.data.images import ImageDataset, list_any_images
    from utils.data.preprocess import Preprocess

    torch.manual_seed(0)
    if kind == "timm_vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                  patch_size=8).eval()
        layer, gamma = "blocks.11.mlp.fc2", 0.5
    else:
        model = torchvision.models.resnet18(weights=None).eval()
        model.fc = torch.nn.Identity()
        layer, gamma = "layer4.1.conv2", 0.98  # ReLU features of one-colour images are all alike: a high bar
    colours = {f"c{i}": tuple(int(v) for v in np.random.RandomState(i).randint(0, 255, 3)) for i in range(6)}
    data = flatten(write_image_folder(str(tmp_path / "data"), n_train=8, n_val=2, colors=colours, size=32),
                   str(tmp_path / "flat"))
    res = dc.disentangle(model, data, layer=layer, concepts="clusters", top_n=24, min_images=3, gamma_high=gamma,
                         max_channels=2, input_size=32, resize=32, progress=False, log=None,
                         store_dir=str(tmp_path / "out"))
    assert 1 <= len(res.channels) <= 2 and not res.summary["labelled"]
    assert res.summary["max_abs_logit_diff"] <= 1e-4
    images = list_any_images(data, "val")
    x = torch.stack([ImageDataset(images, Preprocess(resize=32, crop=32))[i][0] for i in range(len(images))])
    with torch.no_grad():
        out = model(x)
        assert out.shape == (len(x), 192 if kind == "timm_vit" else 512)  # features, no class
        assert float((res.network(x) - out).abs().max()) <= 1e-4
    for c, s in res.channels.items():
        assert s.k >= 2 and len(res.summary["channels"][str(c)]["concept_images"]) == s.k
