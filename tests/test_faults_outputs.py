"""Faults in the commands that write tensors, records and folders of outputs: a full disk is one line and
damages nothing, killed writes leave nothing stale, a rerun leaves only what it describes, outputs never
overwrite inputs, class names are text."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import full_device, run_script, small_fs


def _copy_store(planted4, tmp_path) -> str:
    root = planted4[0]
    store = str(tmp_path / "store")
    shutil.copytree(root / "store", store, ignore=shutil.ignore_patterns("models_disentangled", "layer_disentangled"))
    return store


def _stage3(common, store, *extra):
    return run_script("disentangle_channel.py", *common, "--store_dir", store, "--channel_disentangle", "0",
                      "--concept", "0", "1", "--concept", "3", *extra)


def _snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_full_disk_while_stage_3_writes_its_filters_is_one_line_and_damages_nothing(planted4, tmp_path):
    _, _, common = planted4
    store = _copy_store(planted4, tmp_path)
    assert _stage3(common, store).returncode == 0
    records = os.path.join(store, "models_disentangled")
    before = _snapshot(records)
    with full_device(records) as hits:
        r = _stage3(common, store)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no space left on the device of" in r.stderr and "filters.pt" in r.stderr and ".tmp-" not in r.stderr
    assert any(h.startswith("filters.pt.tmp-") for h in hits)  # the fault met the tensor file
    assert _snapshot(records) == before  # the earlier record as it was, no temporary left
    assert _stage3(common, store).returncode == 0  # the same command, once there is space


def test_a_really_full_disk_while_stage_3_writes_its_filters(planted4, tmp_path):
    """The same on a real small file system, filled up before the run: torch's own zip writer used to
    fail there with a RuntimeError traceback."""
    _, _, common = planted4
    with small_fs(str(tmp_path / "fs"), "3m", instead="test_full_disk_while_stage_3_writes_its_filters_is_one_line_"
                                                      "and_damages_nothing") as fs:
        store = _copy_store(planted4, tmp_path / "fs")
        with open(os.path.join(fs, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        r = _stage3(common, store)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "no space left on the device of" in r.stderr, r.stderr
        assert not [f for f in _snapshot(fs) if ".tmp-" in f]
        os.remove(os.path.join(fs, "filler"))
        assert _stage3(common, store).returncode == 0


@pytest.mark.parametrize("where", ["records", "layer folder", "export"])
def test_full_disk_while_the_layer_command_or_export_writes_tensors(planted4, tmp_path, where):
    _, _, common = planted4
    store = _copy_store(planted4, tmp_path)
    out = str(tmp_path / "out")
    if where == "export":
        os.makedirs(tmp_path / "exports")
        with full_device(str(tmp_path / "exports")):
            r = _stage3(common, store, "--export", str(tmp_path / "exports" / "net.pt"))
        assert r.returncode == 2 and "no space left on the device of" in r.stderr and "net.pt" in r.stderr, r.stderr
        assert os.listdir(tmp_path / "exports") == []
        return
    folder = os.path.join(store, "models_disentangled") if where == "records" else out
    os.makedirs(folder, exist_ok=True)
    with full_device(folder):
        r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--out_dir", out, "--top_k", "4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no space left on the device of" in r.stderr, r.stderr
    assert not [f for f in _snapshot(str(tmp_path)) if ".tmp-" in f]
    r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--out_dir", out, "--top_k", "4")
    assert r.returncode == 0, r.stderr


def test_a_killed_writers_temporary_file_is_removed_by_the_next_run(planted4, tmp_path):
    from utils.files import temp_name

    _, _, common = planted4
    store = _copy_store(planted4, tmp_path)
    out = str(tmp_path / "out")
    os.makedirs(out)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a process id that no live process has
    stale = temp_name(os.path.join(out, "disentangled.pt"), dead)
    live = temp_name(os.path.join(out, "disentangled.pt"), os.getppid())  # a live writer's: left alone
    for p in (stale, live):
        open(p, "wb").write(b"half a checkpoint")
    r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--out_dir", out, "--top_k", "4")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(stale) and os.path.exists(live)
    assert torch.load(os.path.join(out, "disentangled.pt"), weights_only=True)["splits"]


def test_a_rerun_with_other_channels_leaves_only_what_layer_json_describes(planted4, tmp_path):
    _, _, common = planted4
    store = _copy_store(planted4, tmp_path)
    out = str(tmp_path / "out")
    r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--out_dir", out, "--top_k", "4")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(os.path.join(out, "results_quantitative"))) == 4  # channels 0 and 1, two concepts each
    r = run_script("disentangle_layer.py", *common, "--store_dir", store, "--out_dir", out, "--top_k", "4",
                   "--channels", "1")
    assert r.returncode == 0, r.stderr
    layer = json.load(open(os.path.join(out, "layer.json")))
    assert sorted(layer["channels"]) == ["1"]
    described = {os.path.abspath(layer["arrays"]), os.path.abspath(layer["effects_figure"])}  # the layer's own
    for ch in layer["channels"].values():
        described |= {os.path.abspath(p) for p in ch["csv"] + ch["plots"]}
        described |= {os.path.abspath(os.path.join(d, f)) for d, _, fs in os.walk(ch["pictures"]["out_dir"]) for f in fs}
    on_disk = {os.path.abspath(os.path.join(out, f)) for f in _snapshot(out)}
    kept = {os.path.join(out, n) for n in ("layer.json", "disentangled.pt", "report.html")}
    assert on_disk - {os.path.abspath(k) for k in kept} == described
    r = run_script("summarize_results.py", "--results_dir", os.path.join(out, "results_quantitative"))
    assert r.returncode == 0 and " 1 " in r.stdout.splitlines()[2], r.stdout  # one pair, not two


def test_outputs_never_overwrite_inputs(planted4, tmp_path):
    root, data, common = planted4
    store = _copy_store(planted4, tmp_path)
    folder = os.path.join(store, os.listdir(store)[0])  # the stage-1 store itself
    before = _snapshot(folder)
    model = common[common.index("--model") + 1]
    for script, extra in (("get_cosine_similarities.py", ["--model", model, "--json", os.path.join(folder, "meta.json")]),
                          ("disentangle_channel.py", [*common, "--channel_disentangle", "0", "--concept", "0", "1",
                                                      "--concept", "3", "--export",
                                                      os.path.join(folder, "relevance.npy")]),
                          ("disentangle_layer.py", [*common, "--json", model.split(":")[0]])):
        r = run_script(script, *extra, "--store_dir", store)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "inside the stage-1 store" in r.stderr or "is an input of this command" in r.stderr, r.stderr
    assert _snapshot(folder) == before and "def build" in open(model.split(":")[0]).read()


@pytest.mark.parametrize("content, words", [
    (b"PK\x03\x04" + b"\0" * 200, "truncated or not a .npy file"),  # a broken zip
    ("zip", "not a .npy array"),  # a real zip archive (an .npz or a torch file)
    (b"just some text\n", "truncated or not a .npy file"),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f2', 'fortran_order': False, 'sh", "truncated or not a .npy file"),
])
def test_a_damaged_array_is_named_whatever_it_holds(planted4, tmp_path, content, words):
    _, _, common = planted4
    store = _copy_store(planted4, tmp_path)
    folder = os.path.join(store, os.listdir(store)[0])
    path = os.path.join(folder, "relevance.npy")
    if content == "zip":
        torch.save({"x": torch.zeros(2)}, path)
    else:
        open(path, "wb").write(content)
    model = common[common.index("--model") + 1]
    r = run_script("get_cosine_similarities.py", "--model", model, "--store_dir", store)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "relevance.npy" in r.stderr and words in r.stderr, r.stderr


def test_class_names_are_text_not_markup(tmp_path):
    """A class folder named like mathtext (``a$\\foo$b``) is drawn literally in every plot and figure."""
    from conftest import COLOURS, PLANTED4_CONV, PLANTED4_FC, planted_rgb_source, write_image_folder

    odd = "D_a$\\foo$b"
    (tmp_path / "net.py").write_text(planted_rgb_source(PLANTED4_CONV, PLANTED4_FC, None))  # names: the folders
    data = write_image_folder(str(tmp_path / "data"), n_train=6, n_val=5, size=16,
                              colors={**{k: v for k, v in COLOURS.items() if k != "D_blue"}, odd: COLOURS["D_blue"]})
    common = ["--data_dir", data, "--model", f"{tmp_path / 'net.py'}:build", "--num_workers", "0", "--device", "cpu",
              "--batch_size", "4", "--no_progress"]
    store = ["--store_dir", str(tmp_path / "store")]
    assert run_script("get_importances_for_classes.py", *common, *store).returncode == 0
    r = run_script("disentangle_layer.py", *common, *store, "--top_k", "4", "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "D_a$\\foo$b" in r.stdout and "D_a$\\foo$b" in open(tmp_path / "out" / "report.html").read()
    records = str(tmp_path / "store" / "models_disentangled")
    chosen = ["--model_dir", records, "--channel_of_interest", "0", "--concept", "0", "1", "--concept", "3"]
    r = run_script("get_results.py", *common, *chosen, "--out_dir", str(tmp_path / "s4"))
    assert r.returncode == 0, r.stderr
    r = run_script("visualize_channel.py", *common, *store, *chosen, "--no_fv", "--top_k", "4", "--out_dir",
                   str(tmp_path / "pics"))
    assert r.returncode == 0, r.stderr


OWN = "import sys\nimport torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n" \
      "        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3)\n        self.fc = nn.Linear(4 * 30 * 30, 3)\n\n" \
      "    def forward(self, x):\n        return self.fc(self.conv(x).flatten(1))\n\n\n"


@pytest.mark.parametrize("body, words", [
    ("def build():\n    return (Net(),)\n", "returned a tuple of 1 (Net); it must return an nn.Module, (nn.Module, class names) or"),
    ("def build():\n    return Net(), ['a', 'b', 'c'], torch.zeros(1)\n", "returned a tuple of 3"),
    ("def build():\n    return Net(), 5\n", "returned a tuple of 2 (Net, int)"),
    ("def build():\n    return 'net'\n", "returned a str; it must return an nn.Module"),
    ("def build():\n    return Net()\n", "fails on one 3 x 224 x 224 image, the input size its transform makes"),  # built for 32 px
    ("class D(nn.Module):\n    def forward(self, x):\n        return {'logits': x.mean((2, 3))}\n\n\n"
     "def build():\n    return D()\n", "returns dict for one image; it must return its logits"),
    ("def build():\n    return Net().no_such_thing\n", "build failed: AttributeError"),
    ("def other():\n    return Net()\n", "has no function build"),
    ("sys.exit(3)\n", "called sys.exit(3) while it was imported"),
    ("def build():\n    sys.exit(0)\n", "called sys.exit(0); it must return"),
])
def test_own_model_files_that_do_not_fit_are_one_line(tmp_path, body, words):
    (tmp_path / "own.py").write_text(OWN + body)
    data = tmp_path / "data"
    from conftest import write_image_folder

    write_image_folder(str(data), n_train=2, n_val=1, size=16)
    r = run_script("get_importances_for_classes.py", "--data_dir", str(data), "--model", f"{tmp_path / 'own.py'}:build",
                   "--store_dir", str(tmp_path / "store"), "--num_workers", "0", "--device", "cpu", "--no_progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "store")


def test_a_class_with_validation_images_only_is_left_out_in_every_command(planted4, tmp_path):
    """val/ has a folder that train/ (and so the store) does not: every command leaves it out and says so,
    or, with --class_index, takes it as one more class of the model."""
    _, data, common = planted4
    store = _copy_store(planted4, tmp_path)
    data2 = str(tmp_path / "data")
    shutil.copytree(data, data2)
    shutil.copytree(os.path.join(data2, "val", "A_red"), os.path.join(data2, "val", "E_extra"))
    run = ["--data_dir", data2, *common[2:]]
    r = run_script("disentangle_layer.py", *run, "--store_dir", store, "--out_dir", str(tmp_path / "out"),
                   "--top_k", "4", "--json", str(tmp_path / "l.json"))
    assert r.returncode == 0, r.stderr
    assert "E_extra" in r.stderr and "left out" in r.stderr
    assert json.load(open(tmp_path / "l.json"))["channels"]["0"]["concepts"] == [[0, 1], [3]]
    records = os.path.join(store, "models_disentangled")
    chosen = ["--model_dir", records, "--channel_of_interest", "0", "--concept", "0", "1", "--concept", "3"]
    from utils.data import classes as st

    st._note_once.cache_clear()  # said once per process: these commands share this one
    r = run_script("get_results.py", *run, *chosen, "--purity", "4", "--out_dir", str(tmp_path / "s4"))
    assert r.returncode == 0 and "left out" in r.stderr, r.stderr
    r = run_script("visualize_channel.py", *run, *chosen, "--store_dir", store, "--split", "val", "--no_fv",
                   "--top_k", "4", "--out_dir", str(tmp_path / "pics"))
    assert r.returncode == 0, r.stderr
    index = tmp_path / "index.json"  # the extra folder as a class of the model: no note, no dead end
    index.write_text(json.dumps({"A_red": 0, "B_orange": 1, "C_green": 2, "D_blue": 3, "E_extra": 2}))
    r = run_script("get_results.py", *run, *chosen, "--purity", "4", "--out_dir", str(tmp_path / "s4b"),
                   "--class_index", str(index), "--json", str(tmp_path / "s4b.json"))
    assert r.returncode == 2 and "another folder's" in r.stderr, r.stderr  # class 2 is C_green's
    from utils.model.loading import load_model
    from utils.data.classes import data_class_map

    index.write_text(json.dumps({"E_extra": 3}))
    lm = load_model(common[common.index("--model") + 1])
    with pytest.raises(Exception, match="another folder's"):
        data_class_map(data2, "val", lm.num_classes, str(index),
                       os.path.join(store, next(f for f in os.listdir(store) if f.endswith("_channel_importances"))))


def test_a_class_index_with_a_folder_given_twice_is_refused(planted4, tmp_path):
    _, data, common = planted4
    index = tmp_path / "index.json"
    index.write_text('{"A_red": 0, "B_orange": 1, "C_green": 2, "D_blue": 3, "A_red": 2}')
    r = run_script("get_importances_for_classes.py", *common, "--store_dir", str(tmp_path / "store"),
                   "--class_index", str(index))
    assert r.returncode == 2 and "'A_red' is given twice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "store")


def test_an_image_over_pillows_size_limit_says_so(planted4, tmp_path, monkeypatch):
    from PIL import Image

    _, data, common = planted4
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # the 16 x 16 images are over the limit (a warning)
    r = run_script("get_importances_for_classes.py", *common, "--store_dir", str(tmp_path / "store"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot read image" in r.stderr and "larger than Pillow's limit of 200 pixels" in r.stderr, r.stderr


def test_stage_2_on_a_folder_of_other_stores_names_them(planted4, tmp_path):
    root, _, common = planted4
    model = common[common.index("--model") + 1]
    r = run_script("get_cosine_similarities.py", "--store_dir", str(root / "store"))  # --model left at resnet50
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"holds 1 store(s), read with: --model {model} --layer conv" in r.stderr, r.stderr
    r = run_script("get_cosine_similarities.py", "--store_dir", str(tmp_path))
    assert r.returncode == 2 and "run get_importances_for_classes.py first" in r.stderr


def test_each_help_says_why_its_defaults_differ_from_the_papers():
    for script, words in (("get_cosine_similarities.py", ["0.05, the authors' code's default", "every pair"]),
                          ("disentangle_layer.py", ["default: 0.03; the paper uses 0.03", "(default: 0.5)"]),
                          ("demo.py", ["0.01 for the digits demo", "0.03, the paper's, with --data_dir"])):
        r = run_script(script, "--help")
        text = " ".join(r.stdout.split())
        assert r.returncode == 0 and all(w in text for w in words), (script, text[-1500:])
