"""Stage 1 under torchrun: 2 gloo processes on the CPU give the single-process store, resume, fail cleanly.

The data has 13 training images in 3 classes (5, 4, 4) and chunks of 3 images with batches of 2:
5 chunks, rank 0 takes chunks 0, 2, 4 and rank 1 takes 1, 3; the last chunk holds one image and
every chunk ends in a partial batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import class_index_for, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "get_importances_for_classes.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARRAYS = ("relevance", "targets", "predictions", "tap_sums")
COUNTS = {"A_red": 5, "B_blue": 4, "C_gray": 4}

pytestmark = pytest.mark.slow


def args(data, store):
    return ["--data_dir", data, "--model", "resnet18", "--weights", "none", "--batch_size", "2",
            "--class_index", class_index_for(data),
            "--chunk_images", "3", "--num_workers", "0", "--device", "cpu", "--store_dir", str(store)]


def single(data, store):
    r = subprocess.run([sys.executable, SCRIPT, *args(data, store)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return os.path.join(str(store), "resnet18_channel_importances")


def torchrun(data, store, nproc=2, script=(SCRIPT,)):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *script, *args(data, store)],
                          capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)


def arrays(path):
    return {k: np.load(os.path.join(path, f"{k}.npy"), allow_pickle=False) for k in ARRAYS}


def assert_same_store(a, b):
    x, y = arrays(a), arrays(b)
    for k in ARRAYS:
        assert x[k].shape == y[k].shape and np.array_equal(x[k], y[k]), k
    ma, mb = (json.load(open(os.path.join(p, "meta.json"))) for p in (a, b))
    for k in ("num_images", "class_counts", "data_fingerprint", "chunk_images", "complete"):
        assert ma[k] == mb[k], k


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    """The data and its single-process store, made once for the module (runs only read them)."""
    base = tmp_path_factory.mktemp("dist")
    data = write_image_folder(str(base / "data"), n_train=COUNTS, n_val=1)
    return data, single(data, base / "single")


def test_two_processes_give_the_single_process_store(data_and_reference, tmp_path):
    data, ref = data_and_reference
    r = torchrun(data, tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: 13 images") == 1  # rank 0 alone reports
    path = os.path.join(str(tmp_path / "two"), "resnet18_channel_importances")
    assert_same_store(ref, path)
    assert np.array_equal(arrays(path)["targets"], [0] * 5 + [1] * 4 + [2] * 4)
    assert not os.path.exists(os.path.join(path, "chunks"))


def test_killed_rank_then_restart_gives_the_same_store(data_and_reference, tmp_path):
    data, ref = data_and_reference
    killer = (os.path.join(ROOT, "tests", "kill_after_chunks.py"), "1", "1")  # rank 1 dies after its first chunk
    r = torchrun(data, tmp_path / "two", script=killer)
    assert r.returncode != 0
    path = os.path.join(str(tmp_path / "two"), "resnet18_channel_importances")
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert not meta["complete"] and not os.path.exists(os.path.join(path, "relevance.npy"))
    chunks = [f for f in os.listdir(os.path.join(path, "chunks")) if f.endswith(".npz") and ".tmp-" not in f]
    assert "chunk_000001.npz" in chunks and "chunk_000003.npz" not in chunks
    r = torchrun(data, tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(ref, path)
    # a third run finds it complete and leaves it alone
    r = torchrun(data, tmp_path / "two")
    assert r.returncode == 0 and r.stdout.count("already complete") == 1


def test_error_on_one_rank_stops_all_without_hanging(image_folder, tmp_path):
    data = image_folder(n_train=COUNTS, n_val=1)
    bad = os.path.join(data, "train", "B_blue", "img_000.png")  # image 5: chunk 1, rank 1's share
    open(bad, "wb").write(b"not a png")
    r = torchrun(data, tmp_path / "two")
    assert r.returncode != 0
    assert f"error: cannot read image {bad}" in r.stderr


# ------------------------------------------------------------------ stages 3 and 4 under torchrun

STAGE_COUNTS = {"A_red": 5, "B_blue": 5, "C_gray": 7}  # odd counts: batches of 4 split 2 + 3 between 2 ranks


def _launch(script, argv, nproc=1, ok=True):
    """``python script`` (nproc 1) or ``torchrun --nproc_per_node=nproc script`` from the repository root."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*cmd, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=ROOT, env=e,
                       timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def test_stages_3_and_4_under_torchrun_equal_a_single_process(tmp_path):
    import shutil

    data = write_image_folder(str(tmp_path / "data"), n_train=STAGE_COUNTS, n_val=5)
    common = ["--data_dir", data, "--model", "resnet18", "--weights", "none", "--num_workers", "0",
              "--class_index", class_index_for(data),
              "--device", "cpu", "--batch_size", "4"]
    _launch("get_importances_for_classes.py", [*common, "--store_dir", str(tmp_path / "s1")])
    shutil.copytree(tmp_path / "s1", tmp_path / "s2")
    # concept 1 = class 2 (last 7 images, rank 1's share), so some equivalence images come from rank 1
    pair = ["--channel_disentangle", "100", "--classes_for_concept1", "2", "--classes_for_concept2", "0", "1"]
    recs, outs = [], []
    for n, store in ((1, "s1"), (2, "s2")):
        out = str(tmp_path / f"stage3_{n}.json")
        r = _launch("disentangle_channel.py", [*common, *pair, "--check_images", "6", "--store_dir",
                                               str(tmp_path / store), "--json", out], nproc=n)
        assert r.stdout.count("best rho") == 1  # rank 0 alone prints
        outs.append(json.load(open(out)))
        folder = os.path.join(str(tmp_path / store), "models_disentangled", "resnet18_channel100_c1-2_c2-0-1")
        recs.append(json.load(open(os.path.join(folder, "record.json"))))
    (a, b), (ra, rb) = outs, recs
    assert a["best_rho"] == b["best_rho"] and a["sources"] == b["sources"]
    assert list(a["scores"]) == list(b["scores"])
    assert np.allclose(list(a["scores"].values()), list(b["scores"].values()), rtol=1e-10, atol=0)
    assert ra["train_images"] == rb["train_images"] == {"concept1": 7, "concept2": 10}
    assert ra["equivalence_images"] == rb["equivalence_images"] == 6
    assert rb["max_abs_logit_diff"] is not None and rb["max_abs_logit_diff"] <= 1e-4
    # stage 4 on the validation images (15, batches of 4: 2 + 2 between 2 ranks), from the 2-process record
    means, rows = [], []
    for n in (1, 2):
        out_dir = tmp_path / f"stage4_{n}"
        out_dir.mkdir()
        out = str(tmp_path / f"stage4_{n}.json")
        r = _launch("get_results.py", [*common, "--model_dir", str(tmp_path / "s2" / "models_disentangled"),
                                       "--channel_of_interest", "100", "--classes_for_concept1", "2",
                                       "--classes_for_concept2", "0", "1", "--get_quantitative", "--tau", "0.0",
                                       "--out_dir", str(out_dir), "--no_progress", "--json", out], nproc=n)
        assert r.stdout.count("validation images in") == 1
        j = json.load(open(out))
        assert j["images"] == 15
        means.append([j["concept1"]["mean"], j["concept2"]["mean"]])
        folder = out_dir / "results_quantitative"
        rows.append({f: (folder / f).read_text() for f in sorted(os.listdir(folder))})
    assert means[0] == means[1]
    assert list(rows[0]) == list(rows[1]) and len(rows[0]) == 2
    for f in rows[0]:
        assert rows[0][f] == rows[1][f], f  # the same rows, in the same order, to the last digit
        assert len(rows[0][f].splitlines()) > 1
    # an unreadable image in rank 1's share stops both ranks of each stage (no hang), with its name
    for split, argv in (("train", [*pair, "--store_dir", str(tmp_path / "s2")]),
                        ("val", ["--model_dir", str(tmp_path / "s2" / "models_disentangled"), "--channel", "100",
                                 "--classes_for_concept1", "2", "--classes_for_concept2", "0", "1",
                                 "--get_quantitative", "--out_dir", str(tmp_path)])):
        bad = os.path.join(data, split, "C_gray", "img_004.png")
        st = os.stat(bad)  # damaged in place: same size and time, so the store's fingerprint cannot tell
        open(bad, "wb").write(b"x" * st.st_size)
        os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
        script = "disentangle_channel.py" if split == "train" else "get_results.py"
        r = _launch(script, [*common, *argv], nproc=2, ok=False)
        assert f"error: cannot read image {bad}" in r.stderr and "other process(es) of this job failed" in r.stderr
