"""Faults a reliability tester injects: concurrent runs on one store, a full disk, a damaged store,
unwritable outputs, odd images and flags, a failing process under torchrun. Every fault is injected from
here (a wrapper, a monkeypatch, a small file system, a killed process); production code has no switch."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FullDevice, small_fs, run_script, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY_NET = '''import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Conv2d(8, 64, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
'''


def run(script, *args, env=None, timeout=300):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT, env=e,
                          timeout=timeout)


def one_error_line(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("stage ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def store_arrays(store):
    return {f: np.load(os.path.join(store, f)) for f in ("relevance.npy", "targets.npy", "predictions.npy",
                                                         "tap_sums.npy")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny own model (fast to run), 24 training images, and the store of one plain run of it."""
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny_net.py").write_text(TINY_NET)
    data = write_image_folder(str(root / "data"), n_train=8, n_val=2, size=16)
    args = ["--data_dir", data, "--model", f"{root / 'tiny_net.py'}:build", "--batch_size", "4", "--num_workers", "0",
            "--device", "cpu", "--no_progress"]
    r = run("get_importances_for_classes.py", *args, "--chunk_images", "4", "--store_dir", str(root / "reference"))
    assert r.returncode == 0, r.stderr
    return args, os.path.join(str(root / "reference"), "tiny_net.py-build_channel_importances")


def stage1(args):
    """The stage-1 flags of the tiny setting: its common flags and chunks of 4 images (6 chunks)."""
    return [*args, "--chunk_images", "4"]


def assert_same_store(a, b):
    x, y = store_arrays(a), store_arrays(b)
    for k in x:
        assert np.array_equal(x[k], y[k]), k
    assert files_under(a) == files_under(b)  # nothing stray: no temporaries, chunks, lock or stop files


# ------------------------------------------------------------------ concurrent runs on one store


@pytest.mark.slow
def test_two_concurrent_runs_never_crash_and_end_with_the_single_run_store(tiny, tmp_path):
    args, reference = tiny
    for trial in range(6):
        store_dir = str(tmp_path / f"s{trial}")
        procs = [subprocess.Popen([PY, os.path.join(ROOT, "get_importances_for_classes.py"), *stage1(args),
                                   "--store_dir", store_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
        outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        for code, out, err in outs:
            assert code in (0, 2) and "Traceback" not in err, err[-2000:]
            if code == 2:
                one_error_line(subprocess.CompletedProcess([], code, out, err), "is in use by process")
        assert any(code == 0 for code, _, _ in outs)
        assert_same_store(reference, os.path.join(store_dir, os.path.basename(reference)))
        assert files_under(store_dir) == [os.path.join(os.path.basename(reference), f) for f in files_under(reference)]
    # with --wait the second job waits for the first and then finds the store complete
    procs = [subprocess.Popen([PY, os.path.join(ROOT, "get_importances_for_classes.py"), *stage1(args), "--store_dir",
                               str(tmp_path / "w"), "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert_same_store(reference, os.path.join(str(tmp_path / "w"), os.path.basename(reference)))


@contextmanager
def holder(store: str):
    """Another process holding the store's write lock until it is killed (SIGKILL: no clean-up at all)."""
    os.makedirs(store, exist_ok=True)
    p = subprocess.Popen([PY, "-c", "import fcntl, os, sys, time\n"
                          "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                          "open(os.path.join(sys.argv[1], '.writer'), 'w').write('process 4242 on elsewhere')\n"
                          "print('locked', flush=True); time.sleep(300)", store], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_store_in_use_is_refused_and_a_dead_holder_never_blocks(tiny, tmp_path):
    args, reference = tiny
    store = os.path.join(str(tmp_path / "s"), os.path.basename(reference))
    with holder(store) as p:
        one_error_line(run("get_importances_for_classes.py", *stage1(args), "--store_dir", str(tmp_path / "s")),
                       "is in use by process 4242 on elsewhere", "--wait")
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = run("get_importances_for_classes.py", *stage1(args), "--store_dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert_same_store(reference, store)  # the dead holder's .writer is gone too


def test_readers_never_read_a_store_being_written(tiny, tmp_path):
    import shutil

    _, reference = tiny
    copy = str(tmp_path / "s" / os.path.basename(reference))
    shutil.copytree(reference, copy)
    with holder(copy):
        one_error_line(run("get_cosine_similarities.py", "--model", f"{os.path.dirname(os.path.dirname(reference))}"
                           "/tiny_net.py:build", "--store_dir", str(tmp_path / "s"), "--no_progress"),
                       "is being written by process 4242")
    r = run("get_cosine_similarities.py", "--model", f"{os.path.dirname(os.path.dirname(reference))}/tiny_net.py:build",
            "--store_dir", str(tmp_path / "s"), "--no_progress")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ a full disk


def _in_process(argv) -> tuple[int, str]:
    """Run stage 1's command line in this process (so faults can be patched in); exit code and stderr. It runs on
    one thread, as the reference store's process (OMP_NUM_THREADS=1): float32 relevance is compared bit for bit,
    and sums split over threads round differently."""
    import io
    from contextlib import redirect_stderr

    import get_importances_for_classes as stage1
    from utils.errors import run_cli

    err = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with redirect_stderr(err):
        try:
            run_cli(lambda: stage1.main(stage1.get_args_parser().parse_args(argv)))
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
    return code, err.getvalue()


def test_full_disk_while_writing_chunks_is_one_line_and_resumable(tiny, tmp_path, monkeypatch):
    from utils.store import chunks

    args, reference = tiny
    store = os.path.join(str(tmp_path / "s"), os.path.basename(reference))
    written = []
    real = chunks.save_npz

    def full_after_two(path, **arrays):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, **arrays)
        written.append(path)

    monkeypatch.setattr(chunks, "save_npz", full_after_two)
    code, err = _in_process([*stage1(args), "--store_dir", str(tmp_path / "s")])
    assert code == 2 and err.count("\n") == 1 and "no space left on the device of" in err
    assert err.strip().endswith("(finished work is kept)") and "chunk_000002.npz" in err
    assert files_under(store) == ["chunks/chunk_000000.npz", "chunks/chunk_000001.npz", "layer_bias.npy",
                                  "layer_weight.npy", "meta.json"]
    monkeypatch.undo()
    code, err = _in_process([*stage1(args), "--store_dir", str(tmp_path / "s")])
    assert code == 0, err
    assert_same_store(reference, store)


def test_too_little_space_to_assemble_is_said_before_writing(tiny, tmp_path, monkeypatch):
    from utils.store import chunks

    args, reference = tiny
    store = os.path.join(str(tmp_path / "s"), os.path.basename(reference))
    monkeypatch.setattr(chunks.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 100, free=100))
    code, err = _in_process([*stage1(args), "--store_dir", str(tmp_path / "s")])
    assert code == 2 and err.count("\n") == 1 and "not enough space in" in err and "GB are free" in err
    assert sorted(f for f in files_under(store) if f.startswith("chunks/")) == [f"chunks/chunk_00000{j}.npz" for j in range(6)]
    assert not any(f.endswith(".npy") and not f.startswith("layer_") or ".tmp-" in f for f in files_under(store))
    monkeypatch.undo()
    assert _in_process([*stage1(args), "--store_dir", str(tmp_path / "s")])[0] == 0
    assert_same_store(reference, store)


def test_a_really_full_disk_during_assembly_no_sigbus_and_resumable(tiny, tmp_path, monkeypatch):
    """On a real small file system, filled up right before the assembly (whose space check is told a lie):
    the assembly itself meets ENOSPC while streaming relevance.npy (a memory map died with SIGBUS here)."""
    from utils.store import chunks
    from utils.stages import relevance as importances

    args, reference = tiny
    with small_fs(str(tmp_path / "fs"), "4m",
                  instead="test_an_injected_full_disk_during_assembly_is_one_line_and_resumable") as fs:
        real_assemble = importances.assemble

        def fill_then_assemble(path, meta, plan):
            with open(os.path.join(fs, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            real_assemble(path, meta, plan)

        monkeypatch.setattr(chunks, "assembled_bytes", lambda meta: 0)
        monkeypatch.setattr(importances, "assemble", fill_then_assemble)
        code, err = _in_process([*stage1(args), "--store_dir", fs])
        assert code == 2 and err.count("\n") == 1 and "no space left on the device of" in err, err
        store = os.path.join(fs, os.path.basename(reference))
        assert not [f for f in files_under(store) if ".tmp-" in f]  # no half-written array left
        assert len([f for f in files_under(store) if f.startswith("chunks/")]) == 6
        os.remove(os.path.join(fs, "filler"))
        monkeypatch.undo()
        assert _in_process([*stage1(args), "--store_dir", fs])[0] == 0
        assert_same_store(reference, store)


def test_an_injected_full_disk_during_assembly_is_one_line_and_resumable(tiny, tmp_path, monkeypatch):
    """The test above without a real file system (it runs everywhere, also where mount is not allowed):
    from the moment the assembly starts, every file opened for writing under the store folder is on a
    device with 1000 bytes left (its space check is told a lie), so streaming relevance.npy (128-byte header
    + 24 x 64 float32) meets ENOSPC mid-stream. One line naming the file, nothing half-written, the chunks
    kept; the same command then finishes with the store of an uninterrupted run."""
    import builtins

    from utils.store import chunks

    from utils.stages import relevance as importances

    args, reference = tiny
    fs = str(tmp_path / "fs")
    real_open, real_assemble = builtins.open, importances.assemble
    hits = []

    def full_device_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        writing = any(m in mode for m in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(fs + os.sep):
            hits.append(os.path.basename(file))
            return FullDevice(f, free)
        return f

    def fill_then_assemble(path, meta, plan):
        free[0] = 1000
        monkeypatch.setattr(builtins, "open", full_device_open)
        try:
            real_assemble(path, meta, plan)
        finally:
            monkeypatch.setattr(builtins, "open", real_open)

    free = [0]
    monkeypatch.setattr(chunks, "assembled_bytes", lambda meta: 0)
    monkeypatch.setattr(importances, "assemble", fill_then_assemble)
    code, err = _in_process([*stage1(args), "--store_dir", fs])
    assert code == 2 and err.count("\n") == 1 and "no space left on the device of" in err, err
    store = os.path.join(fs, os.path.basename(reference))
    assert os.path.join(store, "relevance.npy") in err, err  # the file the user knows, not its temporary
    assert hits and hits[0].startswith("relevance.npy.tmp-"), hits  # the fault met the stream, as intended
    assert not [f for f in files_under(store) if ".tmp-" in f]  # no half-written array left
    assert not os.path.exists(os.path.join(store, "relevance.npy"))
    assert len([f for f in files_under(store) if f.startswith("chunks/")]) == 6
    monkeypatch.undo()
    assert builtins.open is real_open
    assert _in_process([*stage1(args), "--store_dir", fs])[0] == 0
    assert_same_store(reference, store)


# ------------------------------------------------------------------ a damaged store


@pytest.mark.parametrize("damage, words", [
    ("truncate relevance.npy", "relevance.npy is truncated"),
    ("empty relevance.npy", "relevance.npy is empty"),
    ("remove targets.npy", "targets.npy is missing"),
    ("truncate tap_sums.npy", "tap_sums.npy is truncated"),
    ("truncate layer_weight.npy", "layer_weight.npy is truncated"),
    ("meta num_images", "relevance.npy holds float32 (24, 64), meta.json implies float32 (25, 64)"),
    ("meta garbage", "meta.json cannot be read"),
])
def test_a_damaged_store_is_one_line_naming_the_file(tiny, tmp_path, damage, words):
    import shutil

    args, reference = tiny
    store = os.path.join(str(tmp_path / "s"), os.path.basename(reference))
    shutil.copytree(reference, store)
    what, name = damage.split(" ", 1)
    path = os.path.join(store, name)
    if what == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 8)
    elif what == "empty":
        open(path, "w").close()
    elif what == "remove":
        os.remove(path)
    elif name == "num_images":
        meta = json.load(open(os.path.join(store, "meta.json")))
        meta["num_images"] += 1
        json.dump(meta, open(os.path.join(store, "meta.json"), "w"))
    else:
        open(os.path.join(store, "meta.json"), "w").write("{not json")
    model = args[args.index("--model") + 1]
    for r in (run_script("get_cosine_similarities.py", "--model", model, "--store_dir", str(tmp_path / "s"), "--no_progress"),
              run_script("disentangle_channel.py", *args, "--store_dir", str(tmp_path / "s"), "--channel_disentangle", "1",
                  "--classes_for_concept1", "0", "--classes_for_concept2", "1")):
        one_error_line(r, "is damaged", words, "fresh --store_dir")
    one_error_line(run_script("get_importances_for_classes.py", *stage1(args), "--store_dir", str(tmp_path / "s")), words)


# ------------------------------------------------------------------ unwritable outputs


def test_unwritable_outputs_are_refused_before_any_pass(tiny, tmp_path):
    import shutil

    args, reference = tiny
    store_dir = str(tmp_path / "s")
    shutil.copytree(os.path.dirname(reference), store_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = args[args.index("--model") + 1]
    r = run_script("disentangle_channel.py", *args, "--store_dir", store_dir, "--channel_disentangle", "1",
            "--classes_for_concept1", "0", "--classes_for_concept2", "1", "--json", str(blocker / "out.json"))
    one_error_line(r, "--json", "a_file")
    rec = ["--channel_of_interest", "1", "--classes_for_concept1", "0", "--classes_for_concept2", "1"]
    assert run_script("disentangle_channel.py", *args, "--store_dir", store_dir, "--channel_disentangle", "1",
               *rec[2:]).returncode == 0
    r = run_script("get_results.py", *args, "--model_dir", os.path.join(store_dir, "models_disentangled"), *rec,
            "--out_dir", str(blocker / "out"))
    one_error_line(r, "cannot write into", "a_file is not a folder")
    assert "validation images" not in r.stdout  # refused before the pass
    r = run_script("get_cosine_similarities.py", "--model", model, "--store_dir", store_dir, "--json", str(blocker / "x.json"))
    one_error_line(r, "--json")


def test_read_only_folders_are_refused_before_any_pass(tiny, tmp_path):
    import shutil

    args, reference = tiny
    with small_fs(str(tmp_path / "ro"), "4m") as fs:
        shutil.copytree(os.path.dirname(reference), os.path.join(fs, "store"))
        subprocess.run(["mount", "-o", "remount,ro", fs], check=True)
        model = args[args.index("--model") + 1]
        store_dir = os.path.join(fs, "store")
        for script, extra in (("get_importances_for_classes.py", ["--max_images_per_class", "2", "--chunk_images", "4"]),
                              ("disentangle_channel.py", ["--channel_disentangle", "1", "--classes_for_concept1", "0",
                                                          "--classes_for_concept2", "1"])):
            r = run(script, *args, "--store_dir", store_dir, *extra)
            one_error_line(r, "cannot write into", fs)
            assert "img/s" not in r.stdout
        r = run_script("get_cosine_similarities.py", "--model", model, "--store_dir", store_dir, "--no_progress")
        one_error_line(r, "cannot write into", "results_get_cosine_similarities")
        r = run_script("get_results.py", *args, "--model_dir", str(tmp_path), "--channel", "1", "--classes_for_concept1",
                "0", "--classes_for_concept2", "1", "--out_dir", fs)
        one_error_line(r, "cannot write into", "Read-only")


# ------------------------------------------------------------------ odd images and flags


def test_a_16_bit_png_gives_the_relevance_of_its_8_bit_original(planted_model, tmp_path):
    from utils.data.images import load_image, list_images
    from utils.model.hooks import relevance_batch

    root = tmp_path / "data" / "train"
    for cls, level in (("A_red", 180), ("B_blue", 60), ("C_gray", 120)):
        os.makedirs(root / cls)
        g = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.uint8) // 2 + level // 2
        Image.fromarray(g, "L").save(root / cls / "a_8bit.png")
        Image.fromarray(g.astype(np.uint16) * 257).save(root / cls / "b_16bit.png")  # the same picture, 16 bit
    images = list_images(str(tmp_path / "data"), "train")
    with Image.open(images.paths[1]) as im:
        assert im.mode.startswith("I")  # really 16-bit
    x = torch.stack([load_image(images, i) for i in range(len(images))])
    assert torch.equal(x[0], x[1]) and x[0].std() > 0  # not clipped to 0/255
    R, _, _, _ = relevance_batch(planted_model.model, planted_model.model.conv, x, torch.tensor(images.targets))
    torch.testing.assert_close(R[1::2], R[0::2])


@pytest.mark.parametrize("flags, words", [
    (["--max_images_per_class", "0"], "--max_images_per_class: '0' is not a whole number of at least 1"),
    (["--max_images_per_class", "-118"], "--max_images_per_class: '-118'"),
    (["--num_workers", "-1"], "--num_workers: '-1' is not a whole number of at least 0"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--batch_size", "0"], "--batch_size"),
])
def test_odd_flags_are_one_line(tiny, tmp_path, flags, words):
    args, _ = tiny
    one_error_line(run_script("get_importances_for_classes.py", *stage1(args), "--store_dir", str(tmp_path / "s"), *flags), words)
    assert not os.path.exists(tmp_path / "s")


def test_stage4_refuses_a_tau_that_is_not_a_number(tmp_path):
    for tau in ("nan", "-0.1", "inf"):
        r = run_script("get_results.py", "--tau", tau, "--data_dir", str(tmp_path), "--channel", "1",
                "--classes_for_concept1", "0", "--classes_for_concept2", "1")
        one_error_line(r, f"'{tau}' is not a finite number of at least 0")


# ------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_a_failing_process_stops_the_others_within_one_chunk(image_folder, tmp_path):
    data = image_folder(n_train={"A_red": 12, "B_blue": 12, "C_gray": 12}, n_val=1, size=16)
    bad = os.path.join(data, "train", "A_red", "img_002.png")  # image 2: chunk 1, the first chunk of rank 1
    open(bad, "wb").write(b"not a png")
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "get_importances_for_classes.py"),
                        "--data_dir", data, "--model", "resnet18", "--weights", "none", "--class_index",
                        json_index(data), "--batch_size", "2", "--chunk_images", "2", "--num_workers", "0",
                        "--device", "cpu", "--store_dir", str(tmp_path / "s")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert [e for e in errors if e.startswith(f"error: cannot read image {bad}: ")], errors  # and why
    store = os.path.join(str(tmp_path / "s"), "resnet18_channel_importances")
    done = sorted(f for f in os.listdir(os.path.join(store, "chunks")) if f.endswith(".npz")) if os.path.isdir(store) else []
    assert len(done) <= 2, done  # rank 0 had 9 chunks to do; it stopped within one chunk of rank 1's failure
    assert not os.path.exists(os.path.join(store, ".stop"))


def json_index(data: str) -> str:
    from conftest import class_index_for

    return class_index_for(data)
