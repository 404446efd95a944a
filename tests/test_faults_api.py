"""Faults a notebook user meets through the Python API: the package's names after first use, refusals as one
line in the caller's words (never the commands' flags, never the package's frames), a saved result that outlives
its temporary store, a model near chance said at the top of every output, and the hostile input a notebook
gives (wrong types, shapes, devices, numbers; a second call into the same folders; a full disk)."""
from __future__ import annotations

import errno
import importlib
import json
import os
import pkgutil
import types

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import utils
import utils.api as api
from test_api import FAST, NAMES, planted4, tensors
from utils.errors import UserError

DATA = dict(layer="conv", classes=NAMES, top_k=4, log=None, **FAST)


def package_frames(e: BaseException) -> list[str]:
    """The files of the package's own frames in ``e``'s traceback."""
    tb, out = e.__traceback__, []
    root = os.path.dirname(utils.__file__)
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            out.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return out


def one_line(excinfo) -> str:
    """The refusal's line: one line, no command-line flag in it, at most the API's own frame behind it."""
    line = str(excinfo.value)
    assert type(excinfo.value) is UserError and "\n" not in line and "--" not in line, line
    assert len(package_frames(excinfo.value)) <= 1, package_frames(excinfo.value)
    return line


def test_the_package_entry_points_work_again_after_every_submodule_is_imported():
    train, val = tensors(6, seed=0), tensors(5, seed=1)
    first = utils.disentangle(planted4(), train, val, **DATA)
    for m in pkgutil.walk_packages(utils.__path__, "utils."):
        importlib.import_module(m.name)  # what the pipeline and a user's imports do
    for name in utils.__all__:
        assert not isinstance(getattr(utils, name), types.ModuleType), name
    second = utils.disentangle(planted4(), train, val, **DATA)  # the notebook cell run again
    assert sorted(second.channels) == sorted(first.channels) == [0, 1]
    store = utils.importances(utils.prepare(planted4(), train, val, classes=NAMES), "conv", **FAST)
    assert store.accuracy == pytest.approx(first.accuracy)


def test_no_split_is_one_line_in_the_api_words_with_the_number_of_candidates():
    with pytest.raises(UserError) as e:
        api.disentangle(planted4(), tensors(6, 0), tensors(5, 1), p=1.0, gamma_high=0.01, min_concepts=4, **DATA)
    line = one_line(e)
    assert "p=" in line and "gamma_high=" in line and "candidate channels" in line, line


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_workers=-1), "num_workers"), (dict(batch_size=0), "batch_size"), (dict(max_channels=0), "max_channels"),
    (dict(device="gpu"), "device"), (dict(layer=3), "layer"), (dict(log="yes"), "log"),
])
def test_bad_settings_are_one_line_naming_the_argument(kwargs, word):
    with pytest.raises(UserError) as e:
        api.disentangle(planted4(), tensors(2, 0), tensors(2, 1), **{**DATA, **kwargs})
    assert word in one_line(e)


def test_the_stages_refuse_objects_of_the_wrong_type():
    with pytest.raises(UserError) as e:
        api.importances(planted4(), "conv", **FAST)  # the model instead of prepare()'s result
    assert "prepare()" in one_line(e)
    with pytest.raises(UserError) as e:
        api.polysemantic_pairs("store")
    assert "importances()" in one_line(e)
    with pytest.raises(UserError) as e:
        api.prepare("not a model", tensors(2, 0), tensors(2, 1))
    assert "nn.Module" in one_line(e)


def test_a_held_store_names_wait_true_not_a_flag(tmp_path):
    from utils.store.lock import writer_lock

    d = api.prepare(planted4(), tensors(3, 0), tensors(2, 1), classes=NAMES, store_dir=str(tmp_path))
    store = api.importances(d, "conv", **FAST)
    with writer_lock(store.path):
        with pytest.raises(UserError) as e:
            api.importances(d, "conv", **FAST)
    assert "wait=True" in one_line(e)


def test_tensors_off_the_cpu_are_refused_naming_train():
    class OnMeta(Dataset):  # stands in for CUDA tensors: any device but the host's
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.empty(3, 16, 16, device="meta"), i % 4

    with pytest.raises(UserError) as e:
        api.prepare(planted4(), OnMeta(), tensors(2, 1))
    line = one_line(e)
    assert "train" in line and "meta" in line, line


def test_prepare_is_shown_without_the_whole_model():
    d = api.prepare(planted4(), tensors(2, 0), tensors(2, 1))
    assert "Conv2d" not in repr(d) and "PlantedRGB" in repr(d) and len(repr(d)) < 300, repr(d)


def test_units_pool_by_summing_and_refuse_a_wrong_batch():
    res = api.disentangle(planted4(), tensors(6, 0), tensors(5, 1), **DATA)
    x = tensors(5, 1).tensors[0]
    maps, pooled = res.units(x), res.units(x, pooled=True)
    for c in res.channels:
        assert torch.allclose(pooled[c], maps[c].sum((2, 3)))  # the toolkit sums over positions everywhere
    with pytest.raises(UserError) as e:
        res.units(x[0])  # one image without its batch dimension
    assert "B x C x H x W" in one_line(e)
    with pytest.raises(UserError) as e:
        res.units(torch.zeros(2, 5, 16, 16))  # five colour channels
    assert "x of shape (2, 5, 16, 16)" in one_line(e)


def test_a_saved_result_is_self_contained_after_its_temporary_store_is_gone(tmp_path):
    res = api.disentangle(planted4(), tensors(6, 0), tensors(5, 1), **DATA)
    store = res._keep.name
    res.save(tmp_path / "saved")
    x = tensors(5, 1).tensors[0]
    want = res.units(x)
    del res
    import gc

    gc.collect()
    assert not os.path.exists(store)  # the temporary store went with its result
    text = (tmp_path / "saved" / "result.json").read_text()
    assert store not in text and "/tmp" not in text, "a saved result points outside itself"
    back = api.load(str(tmp_path / "saved"), planted4())
    for c, ch in back.summary["channels"].items():
        for p in [ch["record"], *ch["plots"], *ch["csv"], ch["pictures"]["teaser"]]:
            assert os.path.exists(p) and p.startswith(str(tmp_path / "saved")), p
        assert os.path.isfile(os.path.join(ch["record"], "record.json"))
    assert os.path.isfile(back.summary["export"]) and os.path.isfile(back.summary["report"])
    for c, v in back.units(x).items():
        assert torch.equal(v, want[c])


def test_a_model_near_chance_is_said_at_the_top_of_every_output(tmp_path, capsys):
    from utils.cli.disentangle_layer import print_layer

    train, val = tensors(6, 0), tensors(5, 1)
    wrong = TensorDataset(train.tensors[0], (train.tensors[1] + 1) % 4)  # every label another class: 0% accuracy
    with torch.no_grad():
        acc = (planted4()(wrong.tensors[0]).argmax(1) == wrong.tensors[1]).double().mean().item()
    assert acc < 0.5  # below twice chance (1/4), computed here, independently of the tool
    res = api.disentangle(planted4(), wrong, val, out_dir=str(tmp_path / "out"), **DATA)
    assert res.warnings and "near chance" in res.warnings[0] and f"{acc:.1%}" in res.warnings[0]
    assert repr(res).startswith("WARNING: ")
    assert json.loads((tmp_path / "out" / "layer.json").read_text())["warnings"] == res.warnings
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.index("near chance") < page.index("<h2>Settings</h2>")
    print_layer({**res.summary, "seconds": 1.0}, 4)
    assert capsys.readouterr().out.startswith("WARNING: the model is near chance")
    good = api.disentangle(planted4(), train, val, **DATA)
    assert good.warnings == [] and not repr(good).startswith("WARNING")


def test_evaluate_channel_takes_the_tau_the_pairs_were_found_with(tmp_path):
    d = api.prepare(planted4(), tensors(6, 0), tensors(5, 1), classes=NAMES, store_dir=str(tmp_path))
    store = api.importances(d, "conv", **FAST)
    pairs = api.polysemantic_pairs(store, tau=0.01)
    c = pairs.pairs[0]
    concepts = [[c["class1"]], [c["class2"]]]
    api.split_channel(d, c["channel"], concepts, "conv", **FAST)
    out = api.evaluate_channel(d, c["channel"], concepts, "conv", tau=0.01, **FAST)
    assert out["tau"] == 0.01


def test_a_full_disk_while_writing_the_network_is_one_line_and_a_rerun_finishes(tmp_path, monkeypatch):
    import utils.model.surgery as surgery

    train, val = tensors(6, 0), tensors(5, 1)
    real = surgery.save_torch

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(surgery, "save_torch", full)
    with pytest.raises(UserError) as e:
        api.disentangle(planted4(), train, val, store_dir=str(tmp_path), **DATA)
    assert "no space left" in one_line(e)
    records = sorted(os.listdir(tmp_path / "models_disentangled"))
    assert len(records) == 2  # the splits written before the fault are kept
    monkeypatch.setattr(surgery, "save_torch", real)
    res = api.disentangle(planted4(), train, val, store_dir=str(tmp_path), **DATA)  # the same folders again
    assert sorted(res.channels) == [0, 1] and sorted(os.listdir(tmp_path / "models_disentangled")) == records
    x = val.tensors[0]
    with torch.no_grad():
        assert (res.network(x) - planted4()(x)).abs().max() <= 1e-5


def test_a_fault_after_the_work_keeps_the_temporary_store_and_says_where(monkeypatch):
    import shutil

    import utils.stages.result as result

    def broken(path, model=None):
        raise RuntimeError("Error(s) in loading state_dict: Missing key(s) in state_dict: \"0.gain\"\nmore")

    monkeypatch.setattr(result, "load_checkpoint", broken)  # as Result.from_summary reads the split network
    with pytest.raises(UserError) as e:
        api.disentangle(planted4(), tensors(6, 0), tensors(5, 1), **DATA)
    line = one_line(e)
    kept = line.rsplit("the store in ", 1)[1]
    try:
        assert "0.gain" in line and os.path.isdir(os.path.join(kept, "models_disentangled"))
        out = line.split("every output is kept in ", 1)[1].split(" and the store", 1)[0]
        assert os.path.isfile(os.path.join(out, "report.html"))
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_the_precision_named_in_refusals_is_an_argument_of_the_api(tmp_path):
    d = api.prepare(planted4(), tensors(3, 0), tensors(2, 1), classes=NAMES, store_dir=str(tmp_path))
    with pytest.raises(UserError) as e:
        api.importances(d, "conv", precision="fp8", **FAST)
    assert "precision=" in one_line(e)
    assert api.importances(d, "conv", precision="bf16", **FAST).meta["precision"] == "bf16"


def test_a_validation_label_beyond_the_outputs_is_refused_before_any_pass(tmp_path):
    bad_val = TensorDataset(torch.zeros(2, 3, 16, 16), torch.tensor([0, 4]))  # planted4 has 4 outputs
    with pytest.raises(UserError) as e:
        api.prepare(planted4(), tensors(2, 0), bad_val, store_dir=str(tmp_path / "s"))
    assert "the val data of TensorDataset has label 4 but the model has 4 outputs" in one_line(e)
    assert not (tmp_path / "s").exists()
