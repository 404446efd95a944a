"""Users' settings: class folders mapped to logits (ImageNet subsets, --class_index), timm and own models,
the evaluation transform the weights declare, per-class data checks, devices."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_image_folder
from test_stage1 import check_model, direct_images, relevance_via_image
from utils.data.classes import class_map, imagenet_wnids
from utils.passes.device import model_on, resolve_device
from utils.errors import UserError
from utils.model.loading import get_layer, load_model, model_tag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
SUBSET = {"n01440764": (200, 60, 60), "n01443537": (60, 200, 60), "n02123045": (60, 60, 200)}  # ImageNet 0, 1, 281


def run(script, *args, env=None, cwd=ROOT):
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([PY, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=cwd, env=e,
                          timeout=600)


def one_error_line(r, *words):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ------------------------------------------------------------------ class folders and logits


def test_class_map_rules(tmp_path):
    assert imagenet_wnids()[:2] == ("n01440764", "n01443537") and imagenet_wnids()[281] == "n02123045"
    assert class_map(["a", "b", "c"], 3).index == {"a": 0, "b": 1, "c": 2}  # one folder per output
    m = class_map(list(SUBSET), 1000)
    assert m.index == {"n01440764": 0, "n01443537": 1, "n02123045": 281} and m.num_classes == 1000
    with pytest.raises(UserError, match="3 class folders but the model has 1000 outputs.*--class_index"):
        class_map(["a", "b", "c"], 1000)
    path = tmp_path / "ci.json"
    path.write_text(json.dumps({"a": 7, "b": 3, "c": 999}))
    assert class_map(["a", "b", "c"], 1000, str(path)).index == {"a": 7, "b": 3, "c": 999}
    for bad, words in (({"a": 7, "b": 3}, "class folder c"), ({"a": 1, "b": 1, "c": 2}, "two folders"),
                       ({"a": 1, "b": 2, "c": 1000}, "outside the model's 1000 outputs"), ([1, 2], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=words):
            class_map(["a", "b", "c"], 1000, str(path))


@pytest.fixture(scope="module")
def wnid_subset(tmp_path_factory):
    """A 3-class ImageNet subset (wnid folders) and the stage-1 store of a random 1000-class resnet18."""
    root = tmp_path_factory.mktemp("subset")
    data = write_image_folder(str(root / "data"), n_train=3, n_val=2, colors=SUBSET, size=32)
    r = run("get_importances_for_classes.py", "--data_dir", data, "--model", "resnet18", "--weights", "none",
            "--store_dir", str(root / "store"), "--num_workers", "0", "--batch_size", "9", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return data, str(root / "store")


@pytest.mark.slow
def test_imagenet_subset_targets_are_logits_and_relevance_comes_from_them(wnid_subset):
    data, store = wnid_subset
    path = os.path.join(store, "resnet18_channel_importances")
    meta = json.load(open(os.path.join(path, "meta.json")))
    targets = np.load(os.path.join(path, "targets.npy"))
    assert targets.tolist() == [0] * 3 + [1] * 3 + [281] * 3
    assert meta["class_index"] == {"n01440764": 0, "n01443537": 1, "n02123045": 281} and meta["num_classes"] == 1000
    assert len(meta["class_counts"]) == 1000 and meta["class_counts"][281] == 3 and sum(meta["class_counts"]) == 9
    # relevance back-propagated from logits 0, 1 and 281, computed independently from the image
    _, x_img, _ = direct_images(data)
    ref, _, _ = relevance_via_image(load_model("resnet18", "none").model, "layer4.1.conv2", x_img,
                                    torch.from_numpy(targets))
    rel = np.load(os.path.join(path, "relevance.npy")).astype(np.float64)
    scale = ref.abs().amax(1, keepdim=True).numpy()
    assert np.abs(rel - ref.numpy()).max() <= 3e-3 * scale.max()
    tap = np.load(os.path.join(path, "tap_sums.npy"), mmap_mode="r")
    assert tap.shape == (1000, 512, 3, 3) and tap[281].any() and not tap[2].any()


@pytest.mark.slow
def test_imagenet_subset_stages_2_to_4_take_logit_indices(wnid_subset, tmp_path):
    data, store = wnid_subset
    r = run("get_cosine_similarities.py", "--model", "resnet18", "--store_dir", store, "--p", "0",
            "--cos_sim_low", "-1", "--cos_sim_high", "1.5", "--no_progress", "--json", str(tmp_path / "s2.json"))
    assert r.returncode == 0, r.stderr
    pairs = json.load(open(tmp_path / "s2.json"))["pairs"]
    assert {(p["class1"], p["class2"]) for p in pairs} == {(0, 1), (0, 281), (1, 281)}
    assert "281 n02123045" in r.stdout  # class names: the folder (random weights declare no categories)
    common = ["--data_dir", data, "--model", "resnet18", "--weights", "none", "--num_workers", "0", "--device", "cpu"]
    r = run("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", "5",
            "--classes_for_concept1", "281", "--classes_for_concept2", "0", "1")
    assert r.returncode == 0, r.stderr
    assert "281 n02123045 (3 training images)" in r.stdout
    r = run("get_results.py", *common, "--model_dir", os.path.join(store, "models_disentangled"),
            "--channel_of_interest", "5", "--classes_for_concept1", "281", "--classes_for_concept2", "0", "1",
            "--get_quantitative", "--tau", "0", "--out_dir", str(tmp_path), "--json", str(tmp_path / "s4.json"))
    assert r.returncode == 0, r.stderr
    s4 = json.load(open(tmp_path / "s4.json"))
    assert s4["concept1"]["images"] == 2 and s4["concept2"]["images"] == 4
    r = run("get_results.py", *common, "--model_dir", os.path.join(store, "models_disentangled"),
            "--channel_of_interest", "5", "--classes_for_concept1", "2", "--classes_for_concept2", "0", "1",
            "--out_dir", str(tmp_path))
    one_error_line(r, "class 2 of concept 1 is not one of the 3 classes")  # folder position 2 is not a logit here


def test_folder_count_unlike_the_outputs_is_one_line_and_writes_nothing(image_folder, tmp_path):
    data = image_folder(n_train=1, n_val=1)
    r = run("get_importances_for_classes.py", "--data_dir", data, "--model", "resnet18", "--weights", "none",
            "--store_dir", str(tmp_path / "s"))
    one_error_line(r, "3 class folders", "1000 outputs", "--class_index")
    assert not os.path.exists(tmp_path / "s")


# ------------------------------------------------------------------ the data, checked per class


def test_stage3_lists_and_checks_only_its_concepts_classes(planted_model, image_folder, tmp_path):
    from utils.stages import splitting as dis
    from utils.stages.relevance import Stage1Config, compute_relevance

    data = image_folder(n_train=4, n_val=1)
    compute_relevance(Stage1Config(data, str(tmp_path / "s"), layer="conv", batch_size=4, num_workers=0,
                                     progress=False, device="cpu"), loaded=planted_model)
    cfg = dis.Stage3Config(data, str(tmp_path / "s"), 0, [[0], [1]], layer="conv", num_workers=0, progress=False,
                           device="cpu", check_images=2)
    shutil.rmtree(os.path.join(data, "train", "C_gray"))  # a class no concept uses: not even listed
    assert dis.disentangle_channel(cfg, loaded=planted_model)[0].train_images == {"concept1": 4, "concept2": 4}
    img = os.path.join(data, "train", "B_blue", "img_001.png")
    with open(img, "ab") as f:  # the same name, other content: noticed
        f.write(b"\0")
    with pytest.raises(UserError, match="class folder .*B_blue changed since stage 1"):  # names the folder
        dis.disentangle_channel(cfg, loaded=planted_model)


# ------------------------------------------------------------------ models beyond torchvision


@pytest.mark.parametrize("arch", ["resnet50", "convnext_tiny", "efficientnet_b0"])
def test_timm_relevance_and_split_equivalence(arch):
    from utils.model.surgery import split_network
    from utils.method.split import Split

    lm = load_model(f"timm/{arch}", "none")
    assert lm.num_classes == 1000 and lm.tag == f"timm-{arch}" and lm.weights == "none"
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # timm starts residual branches at zero (last norm's scale 0): wake them up
        for m in lm.model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) or type(m).__name__.startswith("BatchNormAct"):
                m.weight.uniform_(0.5, 1.5, generator=g)
            if hasattr(m, "gamma") and isinstance(m.gamma, torch.Tensor):  # ConvNeXt's layer scale
                m.gamma.uniform_(0.5, 1.5, generator=g)
    images = torch.randn(2, 3, 64, 64, generator=g)
    check_model(lm, None, images, torch.tensor([3, 998]))
    layer, conv = get_layer(lm.model, None)
    D = conv.weight[1] * (torch.rand(2, conv.in_channels, 1, 1, generator=g) > 0.5)
    net = split_network(lm.model, {layer: [Split(1, D, D.sum(0) - conv.weight[1])]})  # D1 + D2 - Res = W[c]
    with torch.no_grad():
        ref, got = lm.model(images), net(images)
    assert ref.abs().max() > 0 and (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # timm's heads start small


def _fake_hf_cache(root, arch: str) -> str:
    """timm's pretrained weights of ``arch`` (random values) in a Hugging Face cache layout at ``root``."""
    import timm
    from safetensors.torch import save_file

    snap = os.path.join(root, f"models--timm--{arch}", "snapshots", "0" * 40)
    os.makedirs(snap)
    os.makedirs(os.path.join(root, f"models--timm--{arch}", "refs"))
    open(os.path.join(root, f"models--timm--{arch}", "refs", "main"), "w").write("0" * 40)
    save_file({k: v.contiguous() for k, v in timm.create_model(arch.split(".")[0]).state_dict().items()},
              os.path.join(snap, "model.safetensors"))
    return snap


@pytest.mark.slow
def test_timm_pretrained_weights_come_from_the_local_cache_only(image_folder, tmp_path):
    data = image_folder(n_train=1, n_val=1, colors={"n01440764": (200, 0, 0), "n01443537": (0, 0, 200)})
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["--data_dir", data, "--model", "timm/resnet18.a1_in1k", "--store_dir", str(tmp_path / "s"),
            "--num_workers", "0", "--device", "cpu"]
    one_error_line(run("get_importances_for_classes.py", *args, env=env), "models--timm--resnet18.a1_in1k",
                   "not on this machine")
    _fake_hf_cache(str(tmp_path / "hf"), "resnet18.a1_in1k")
    r = run("get_importances_for_classes.py", *args, "--json", str(tmp_path / "s1.json"), env=env)
    assert r.returncode == 0, r.stderr
    store = json.load(open(tmp_path / "s1.json"))["store"]
    assert os.path.basename(store) == "timm-resnet18.a1_in1k_channel_importances"
    meta = json.load(open(os.path.join(store, "meta.json")))
    assert meta["model"] == "timm/resnet18.a1_in1k" and meta["weights"] == "timm:resnet18.a1_in1k"
    assert meta["preprocess"] == {"resize": 235, "crop": 224, "interpolation": "bicubic",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["class_names"][0] == "tench" and meta["class_index"] == {"n01440764": 0, "n01443537": 1}


def test_own_model_file(image_folder, tmp_path):
    code = tmp_path / "my_net.py"
    code.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2),\n"
        "                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))\n"
        "    return net, ['red', 'blue', 'gray']\n\n\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n")
    data = image_folder(n_train=2, n_val=1)
    args = ["--data_dir", data, "--store_dir", str(tmp_path / "s"), "--num_workers", "0", "--device", "cpu"]
    r = run("get_importances_for_classes.py", *args, "--model", f"{code}:build", "--json", str(tmp_path / "s1.json"))
    assert r.returncode == 0, r.stderr
    store = json.load(open(tmp_path / "s1.json"))["store"]
    assert os.path.basename(store) == "my_net.py-build_channel_importances" == f"{model_tag(f'{code}:build')}_channel_importances"
    meta = json.load(open(os.path.join(store, "meta.json")))
    assert meta["layer"] == "2" and meta["class_names"] == ["red", "blue", "gray"]
    assert meta["weights"].startswith("module:") and meta["preprocess"]["crop"] == 224
    one_error_line(run("get_importances_for_classes.py", *args, "--model", f"{code}:broken"),
                   "broken failed: RuntimeError: no GPU here")
    one_error_line(run("get_importances_for_classes.py", *args, "--model", f"{code}:missing"), "has no function missing")
    lm = load_model(f"{code}:build")
    assert lm.weights == meta["weights"]  # its parameters and buffers identify it
    ck = tmp_path / "w.pt"
    torch.save({k: v + 1 for k, v in lm.model.state_dict().items()}, ck)
    again = load_model(f"{code}:build", str(ck))
    assert torch.equal(again.model[0].weight, lm.model[0].weight + 1) and again.weights.startswith("file:")


def test_checkpoint_that_is_not_a_state_dict_is_one_line(tmp_path):
    full = tmp_path / "full_model.pt"
    torch.save(nn.Linear(2, 2), full)  # a pickled module: never unpickled here
    with pytest.raises(UserError) as e:
        load_model("resnet18", str(full))
    msg = str(e.value)
    assert "not a plain state dict" in msg and "state_dict()" in msg and "weights_only=False" not in msg
    assert "\n" not in msg and "\x1b" not in msg


# ------------------------------------------------------------------ the transform the weights declare


@pytest.mark.slow
def test_torchvision_weights_declare_their_transform_and_names(tmp_path, monkeypatch):
    import torchvision

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), ckpt / "mobilenet_v2-7ebf99e0.pth")  # a stand-in
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lm = load_model("mobilenet_v2", "IMAGENET1K_V2")
    assert (lm.preprocess.resize, lm.preprocess.crop, lm.preprocess.interpolation) == (232, 224, "bilinear")
    assert lm.categories[0] == "tench" and lm.weights == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert load_model("mobilenet_v2", "none").preprocess.resize == 256  # no declared transform: the paper's


# ------------------------------------------------------------------ devices


def test_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    for device, gpu, words in (("tpu", None, "unknown --device"), ("cpu", 1, "disagree"), ("auto", -1, "GPU index")):
        with pytest.raises(UserError, match=words):
            resolve_device(device, gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", 1) == torch.device("cuda:1")  # --device cuda --gpu 1 runs on GPU 1
    assert resolve_device("auto", 1) == torch.device("cuda:1") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="shows 2 GPU"):
        resolve_device("cuda:2")


def test_the_callers_model_is_left_as_it_was(planted_model):
    m = planted_model.model
    assert model_on(m, torch.device("cpu")) is m  # nothing to change: no copy
    moved = model_on(m, torch.device("meta"))
    assert moved is not m and m.conv.weight.device.type == "cpu" and moved.conv.weight.device.type == "meta"


def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py's checks, on the CPU with a small 1000-class network (the same code as on a GPU)."""
    net = tmp_path / "small_net.py"
    net.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Conv2d(8, 32, 3, stride=2),\n"
                   "                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1000))\n")
    r = run("benchmarks/gpu_check.py", "--device", "cpu", "--model", f"{net}:build", "--tiny")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.index("check "):].splitlines()
    rows = [line for line in table[1:] if line.strip() and "checks passed" not in line]
    assert len(rows) == 14 and all(" yes " in line for line in rows), rows
    assert "14 of 14 checks passed" in r.stdout
    for name in ("stage 2", "stage 3", "stage 4", "pictures", "layer command", "demo"):
        assert f"{name}: cpu vs cpu" in r.stdout, name
    assert "stage 1 cpu vs cpu" in r.stdout and "torchrun, 2 processes vs 1" in r.stdout and "bf16" in r.stdout
