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

from conftest import write_image_folder
from utils.importances import EXIT_AFTER_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "get_importances_for_classes.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARRAYS = ("relevance", "targets", "predictions", "input_sums")
COUNTS = {"A_red": 5, "B_blue": 4, "C_gray": 4}

pytestmark = pytest.mark.slow


def args(data, store):
    return ["--data_dir", data, "--model", "resnet18", "--weights", "none", "--batch_size", "2",
            "--chunk_images", "3", "--num_workers", "0", "--device", "cpu", "--store_dir", str(store)]


def single(data, store):
    r = subprocess.run([sys.executable, SCRIPT, *args(data, store)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return os.path.join(str(store), "resnet18_channel_importances")


def torchrun(data, store, env=None, nproc=2):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", EXIT_AFTER_ENV)}
    e.update(env or {})
    return subprocess.run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", SCRIPT, *args(data, store)],
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
    r = torchrun(data, tmp_path / "two", env={EXIT_AFTER_ENV: "1:1"})  # rank 1 dies after its first chunk
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
