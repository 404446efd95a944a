"""Stage 1 (get_importances_for_classes.py): relevance, input sums, the store, resume, errors.

The relevance is checked against the reference's way of computing it: a full forward pass with
the IMAGE requiring grad, back-propagated to the image, the gradient at the layer output read by
a tensor hook; in float64 on a copy of the model, so the float32 code is compared with a more
exact answer, not with itself.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils.data.images import ImageDataset, list_images
from utils.errors import UserError
from conftest import class_index_for
from utils.store import chunks
from utils.stages.relevance import Stage1Config, compute_relevance
from utils.model.loading import LoadedModel, get_layer, load_model
from utils.model.hooks import relevance_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "get_importances_for_classes.py")


# ---------------------------------------------------------------- the independent computation


def channels_first(t: torch.Tensor, linear: bool, positions: str = "all") -> torch.Tensor:
    """A layer output as B x C x positions (written here, not taken from utils.model.units): a conv map flattened; a
    Linear's (B, C), channels-last (B, H, W, C) or tokens (B, N, C) with the channel axis moved to 1
    (``cls``: token 0 alone)."""
    if not linear:
        return t.flatten(2)
    if t.dim() == 3 and positions == "cls":
        t = t[:, :1]
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def backprop_seen(m: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Back-propagate the label logits of ``m`` (float64) to the image, reading at ``layer`` its input ``x``, output
    ``a`` and the gradient ``g`` there (a tensor hook: as it was before any in-place op that follows, e.g. VGG's
    ReLU(inplace=True)). Returns ``seen`` (x, a, g) and the logits; the image gradient is checked to exist."""
    seen = {}

    def hook(_mod, inputs, out):
        seen["x"] = inputs[0].detach().clone()
        seen["a"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach().clone()))

    h = layer.register_forward_hook(hook)
    try:
        img = images.double().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = m(img)
            logits.gather(1, labels[:, None]).sum().backward()
    finally:
        h.remove()
    assert img.grad is not None and img.grad.abs().max() > 0  # it really went back to the image
    return seen, logits.detach()


def relevance_via_image(model: torch.nn.Module, layer_name: str, images: torch.Tensor, labels: torch.Tensor,
                        positions: str = "all"):
    """The reference's way, in float64: image requires grad, full graph, backward to the image.

    Returns ``R`` (B x C, float64), the predictions, and the layer's input (float64).
    """
    m = copy.deepcopy(model).double().eval()
    layer = m.get_submodule(layer_name)
    seen, logits = backprop_seen(m, layer, images, labels)
    linear = isinstance(layer, torch.nn.Linear)
    R = (channels_first(seen["a"], linear, positions) * channels_first(seen["g"], linear, positions)).sum(2)
    return R, logits.argmax(1), seen["x"]


def taps_by_shifting(x: torch.Tensor, pad: int) -> np.ndarray:
    """Tap sums of a 3x3, stride-1 conv with zero padding ``pad``, by shifting the padded input: for tap
    (i, j), the sum of the window that tap sees over all output positions (B x C_in x 3 x 3)."""
    xp = torch.nn.functional.pad(x.double(), (pad,) * 4)
    H, W = x.shape[-2] + 2 * pad - 2, x.shape[-1] + 2 * pad - 2
    return torch.stack([torch.stack([xp[:, :, i:i + H, j:j + W].sum((2, 3)) for j in range(3)], -1)
                        for i in range(3)], -2).numpy()


def assert_relevance_close(R: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-3) -> None:
    """Entries agree to ``rtol`` of the largest |R| of the image (float32 vs float64 through a deep net)."""
    scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    err = ((R.double() - ref).abs() / scale).max().item()
    assert err <= rtol, f"relative error {err:.2e}"
    assert ref.abs().max() > 0  # not a vacuous comparison of zeros


def check_model(lm: LoadedModel, layer: str | None, images: torch.Tensor, labels: torch.Tensor,
                positions: str = "all") -> None:
    name, conv = get_layer(lm.model, layer, positions)
    R, pred, _, x = relevance_batch(lm.model, conv, images, labels)
    ref, ref_pred, ref_x = relevance_via_image(lm.model, name, images, labels, positions)
    assert R.shape == (len(images), conv.out_channels)
    assert_relevance_close(R, ref)
    assert torch.equal(pred, ref_pred)
    assert torch.allclose(x.double(), ref_x, rtol=1e-4, atol=1e-4 * ref_x.abs().max().item())


# ---------------------------------------------------------------- relevance_batch


def test_relevance_matches_backprop_to_image_planted(planted_model):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    check_model(planted_model, "conv", images, torch.tensor([0, 1, 2, 0]))


def test_relevance_matches_backprop_to_image_resnet50():
    lm = load_model("resnet50", "none")
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 224, 224, generator=g)
    name, _ = get_layer(lm.model, None)
    assert name == "layer4.2.conv3"
    check_model(lm, None, images, torch.tensor([3, 997]))


@pytest.mark.parametrize("arch", ["vgg11", "mobilenet_v3_small",
                                  pytest.param("densenet121", marks=pytest.mark.slow),
                                  pytest.param("convnext_tiny", marks=pytest.mark.slow)])
def test_relevance_matches_backprop_to_image_other_architectures(arch):
    """Default layer of each; vgg11 has ReLU(inplace=True) right after its last conv."""
    lm = load_model(arch, "none")
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 48, 48, generator=g)
    check_model(lm, None, images, torch.tensor([5, 321]))


def test_relevance_leaves_the_model_unchanged(planted_model):
    """No hook stays behind, and the logits of a later plain forward pass are untouched."""
    images = torch.rand(2, 3, 8, 8)
    before = planted_model.model(images)
    relevance_batch(planted_model.model, planted_model.model.conv, images, torch.tensor([0, 1]))
    assert not planted_model.model.conv._forward_hooks
    assert torch.equal(planted_model.model(images), before)


# ---------------------------------------------------------------- the store, by function


def run_stage1(data_dir, store_dir, lm, **kw):
    cfg = Stage1Config(data_dir=data_dir, store_dir=str(store_dir), batch_size=kw.pop("batch_size", 2),
                       num_workers=0, progress=False, device="cpu", **kw)
    return compute_relevance(cfg, loaded=lm)


def load_store(path):
    return {k: np.load(os.path.join(path, f"{k}.npy"), allow_pickle=False)
            for k in ("relevance", "targets", "predictions", "tap_sums")}


def direct_images(data_dir):
    """Every train image through the evaluation transform, with its label, in list order."""
    imgs = list_images(data_dir, "train")
    ds = ImageDataset(imgs)
    return imgs, torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(imgs.targets)


def test_store_matches_direct_computation(planted_model, image_folder, tmp_path):
    data = image_folder(n_train={"A_red": 3, "B_blue": 5, "C_gray": 2}, n_val=1)
    s = run_stage1(data, tmp_path / "s", planted_model, chunk_images=3)
    got = load_store(s["store"])
    imgs, x_img, labels = direct_images(data)
    ref, pred, _ = relevance_via_image(planted_model.model, "conv", x_img, labels)
    assert got["relevance"].dtype == np.float32 and got["relevance"].shape == (10, 4)
    assert np.allclose(got["relevance"], ref.numpy(), rtol=2e-3, atol=1e-3 * np.abs(ref.numpy()).max())
    assert np.array_equal(got["targets"], labels.numpy())
    assert np.array_equal(got["predictions"], pred.numpy())
    # per-class sums of the layer input, directly: relu(stem(image)), summed per class in float64
    with torch.no_grad():
        m = planted_model.model
        x = m.relu(m.stem(x_img)).double()
    direct = torch.stack([x[labels == t].sum((0, 2, 3)) for t in range(3)]).numpy()[..., None, None]  # 1x1 conv
    assert got["tap_sums"].shape == (3, 10, 1, 1)
    assert np.allclose(got["tap_sums"], direct, rtol=1e-9, atol=1e-9)
    meta = json.load(open(os.path.join(s["store"], "meta.json")))
    assert meta["complete"] and meta["class_counts"] == [3, 5, 2] and meta["precision"] == "fp32"
    assert not os.path.exists(os.path.join(s["store"], "chunks"))
    # every array opens memory-mapped, without pickle
    for name in ("relevance", "targets", "predictions", "tap_sums", "layer_weight"):
        np.load(os.path.join(s["store"], f"{name}.npy"), mmap_mode="r", allow_pickle=False)


class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_arrays(planted_model, image_folder, tmp_path, monkeypatch):
    data = image_folder(n_train={"A_red": 4, "B_blue": 3, "C_gray": 4}, n_val=1)
    full = run_stage1(data, tmp_path / "full", planted_model, chunk_images=3)
    write_chunk = chunks.write_chunk

    def die_after_two(path, j, *results):  # the run is "killed" right after its second chunk is written
        write_chunk(path, j, *results)
        if j == 1:
            raise Killed

    monkeypatch.setattr(chunks, "write_chunk", die_after_two)
    with pytest.raises(Killed):
        run_stage1(data, tmp_path / "resumed", planted_model, chunk_images=3)
    monkeypatch.undo()
    path = full["store"].replace(str(tmp_path / "full"), str(tmp_path / "resumed"))
    assert sorted(os.listdir(os.path.join(path, "chunks"))) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not json.load(open(os.path.join(path, "meta.json")))["complete"]
    # a half-written chunk from the kill must not disturb the rerun
    open(os.path.join(path, "chunks", "chunk_000002.npz.tmp-99999.npz"), "wb").write(b"partial")
    s = run_stage1(data, tmp_path / "resumed", planted_model, chunk_images=3)
    assert s["processed"] == 11 - 6  # only the chunks that were missing
    a, b = load_store(full["store"]), load_store(path)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not os.path.exists(os.path.join(path, "chunks"))


def test_complete_store_is_not_recomputed(planted_model, planted_data, tmp_path):
    s = run_stage1(planted_data, tmp_path / "s", planted_model)
    stamp = {f: os.stat(os.path.join(s["store"], f)).st_mtime_ns for f in os.listdir(s["store"])}
    again = run_stage1(planted_data, tmp_path / "s", planted_model)
    assert again["already_complete"] and again["processed"] == 0
    assert stamp == {f: os.stat(os.path.join(s["store"], f)).st_mtime_ns for f in os.listdir(s["store"])}


def _edit_meta(path, **changes):
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    meta.update(changes)
    json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("change, words", [
    ("weights", "weights"), ("data", "image list"), ("max_images", "--max_images_per_class"),
    ("precision", "--precision"), ("meta_model", "model"), ("meta_layer", "layer")])
def test_mismatched_store_is_refused(planted_model, image_folder, tmp_path, change, words):
    data = image_folder(n_train=3, n_val=1)
    s = run_stage1(data, tmp_path / "s", planted_model, chunk_images=4)
    kw = {}
    lm = planted_model
    if change == "weights":
        lm = LoadedModel(planted_model.model, "planted", "planted-v2", 3, None)
    elif change == "data":
        os.remove(os.path.join(data, "train", "B_blue", "img_000.png"))
    elif change == "max_images":
        kw["max_images_per_class"] = 3  # the same images, but another setting
    elif change == "precision":
        kw["precision"] = "bf16"
    elif change == "meta_model":
        _edit_meta(s["store"], model="resnet50")
    elif change == "meta_layer":
        _edit_meta(s["store"], layer="stem")
    before = {f: open(os.path.join(s["store"], f), "rb").read() for f in os.listdir(s["store"])}
    with pytest.raises(UserError) as e:
        run_stage1(data, tmp_path / "s", lm, chunk_images=4, **kw)
    msg = str(e.value)
    assert "\n" not in msg and f"another {words}:" in msg, msg
    assert before == {f: open(os.path.join(s["store"], f), "rb").read() for f in os.listdir(s["store"])}


def test_other_layer_gets_its_own_store(planted_model, planted_data, tmp_path):
    a = run_stage1(planted_data, tmp_path / "s", planted_model)
    b = run_stage1(planted_data, tmp_path / "s", planted_model, layer="stem")
    assert a["store"] != b["store"] and b["channels"] == 10
    assert json.load(open(os.path.join(a["store"], "meta.json")))["layer"] == "conv"


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.005)])
def test_autocast_precision_is_recorded_and_close(planted_model, planted_data, tmp_path, precision, tolerance):
    a = run_stage1(planted_data, tmp_path / "fp32", planted_model)
    b = run_stage1(planted_data, tmp_path / precision, planted_model, precision=precision)
    assert json.load(open(os.path.join(b["store"], "meta.json")))["precision"] == precision
    ra, rb = load_store(a["store"])["relevance"], load_store(b["store"])["relevance"]
    err = np.abs(ra.astype(np.float64) - rb).max()
    assert 0 < err <= tolerance * np.abs(ra).max()  # it really ran in the lower precision, and stayed close


# ---------------------------------------------------------------- the command line


def cli(*args, env=None, timeout=180):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, env=e,
                          timeout=timeout)


def tree(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, fs in os.walk(path) for f in fs)


def assert_one_error_line(r, *words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for w in words:
        assert w in errors[0], errors[0]


def _bad_input(kind, data_dir, tmp_path):
    """Arguments and environment for one kind of bad input; returns (args, env, words in the message)."""
    base = ["--data_dir", data_dir, "--model", "resnet18", "--weights", "none", "--batch_size", "4", "--num_workers", "0"]
    if kind == "no_train":
        os.rename(os.path.join(data_dir, "train"), os.path.join(data_dir, "training"))
        return base, {}, ["train"]
    if kind == "empty_class":
        os.makedirs(os.path.join(data_dir, "train", "D_empty"))
        return base, {}, ["D_empty", "no images"]
    if kind == "unreadable_image":
        bad = os.path.join(data_dir, "train", "B_blue", "img_001.png")
        open(bad, "wb").write(os.urandom(300))
        return base, {}, [bad]
    if kind == "unknown_model":
        return base + ["--model", "resnet_imaginary"], {}, ["resnet_imaginary"]
    if kind == "not_a_conv":
        return base + ["--layer", "layer4.1.bn2"], {}, ["layer4.1.bn2", "BatchNorm2d", "not a Conv2d"]
    if kind == "checkpoint_does_not_fit":
        ckpt = str(tmp_path / "small.pt")
        torch.save({"fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}, ckpt)
        return base + ["--weights", ckpt], {}, [ckpt, "does not fit resnet18"]
    if kind == "weights_not_offline":
        home = tmp_path / "torch_home"
        home.mkdir()
        return base + ["--weights", "IMAGENET1K_V1"], {"TORCH_HOME": str(home)}, [
            "resnet18/IMAGENET1K_V1", "not on this machine", str(home)]
    if kind == "wrong_channel_count":
        return base + ["--nr_channels_in_layer_of_interest", "2048"], {}, ["2048", "512"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_train", "empty_class", "unreadable_image", "unknown_model", "not_a_conv",
                                  "checkpoint_does_not_fit", "weights_not_offline", "wrong_channel_count"])
def test_cli_bad_input_one_line_nothing_written(kind, image_folder, tmp_path):
    data = image_folder(n_train=3, n_val=1)
    store = tmp_path / "store"
    (store / "earlier_work").mkdir(parents=True)
    (store / "earlier_work" / "keep.npy").write_bytes(b"precious")
    before = tree(store)
    args, env, words = _bad_input(kind, data, tmp_path)
    if os.path.isdir(os.path.join(data, "train")):  # 3 folders, 1000 outputs: say which logits they are
        args += ["--class_index", class_index_for(data)]
    r = cli(*args, "--store_dir", str(store), env=env)
    assert_one_error_line(r, *words)
    assert tree(store) == before
    assert (store / "earlier_work" / "keep.npy").read_bytes() == b"precious"


def test_cli_seed_command_and_store_is_readable(image_folder, tmp_path):
    data = image_folder(n_train={"A_red": 3, "B_blue": 2, "C_gray": 2}, n_val=1)
    out = tmp_path / "out.json"
    r = cli("--data_dir", data, "--model", "resnet18", "--weights", "none", "--batch_size", "4",
            "--store_dir", str(tmp_path / "S"), "--json", str(out), "--class_index", class_index_for(data))
    assert r.returncode == 0, r.stderr
    assert "done: 7 images" in r.stdout and "img/s" in r.stdout
    summary = json.load(open(out))
    assert summary["images"] == 7 and summary["channels"] == 512
    path = summary["store"]
    assert os.path.basename(path) == "resnet18_channel_importances"
    rel = np.load(os.path.join(path, "relevance.npy"), mmap_mode="r", allow_pickle=False)
    assert isinstance(rel, np.memmap) and rel.shape == (7, 512) and rel.dtype == np.float32
    sums = np.load(os.path.join(path, "tap_sums.npy"), mmap_mode="r", allow_pickle=False)
    assert sums.shape == (1000, 512, 3, 3) and not sums[3:].any()  # classes 3..999 have no images
    assert np.array_equal(np.load(os.path.join(path, "targets.npy")), [0, 0, 0, 1, 1, 2, 2])
    # the numbers are the relevance of the same (seeded) random resnet18, computed independently
    _, x_img, labels = direct_images(data)
    ref, pred, ref_x = relevance_via_image(load_model("resnet18", "none").model, "layer4.1.conv2", x_img, labels)
    assert_relevance_close(torch.from_numpy(np.array(rel, dtype=np.float32)), ref, rtol=3e-3)
    assert np.array_equal(np.load(os.path.join(path, "predictions.npy")), pred.numpy())
    direct = np.stack([taps_by_shifting(ref_x[labels == t], 1).sum(0) for t in range(3)])
    assert np.allclose(sums[:3], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    # rerun: says so, does nothing
    stamp = tree(path)
    r2 = cli("--data_dir", data, "--model", "resnet18", "--weights", "none", "--batch_size", "4",
             "--store_dir", str(tmp_path / "S"), "--device", "cpu", "--class_index", class_index_for(data))
    assert r2.returncode == 0 and "already complete" in r2.stdout and "nothing to do" in r2.stdout
    assert tree(path) == stamp


def test_cli_help_and_device_flags(image_folder, tmp_path):
    r = cli("--help")
    assert r.returncode == 0 and "--data_dir" in r.stdout and "--precision" in r.stdout and "torchrun" in r.stdout
    if not torch.cuda.is_available():
        data = image_folder(n_train=1, n_val=1)
        r = cli("--data_dir", data, "--model", "resnet18", "--weights", "none", "--gpu", "0",
                "--store_dir", str(tmp_path / "S"))
        assert_one_error_line(r, "CUDA is not available")
        assert not os.path.exists(tmp_path / "S")
