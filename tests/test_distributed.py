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


# ------------------------------------------------------------------ the torchrun lines of README.md and docs/

DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(folder, f) for folder, _, files in os.walk(os.path.join(ROOT, "docs"))
    for f in files if f.endswith(".md"))
CONSOLE = {"dc-importances": "get_importances_for_classes", "dc-similarities": "get_cosine_similarities",
           "dc-channel": "disentangle_channel", "dc-results": "get_results", "dc-summarize": "summarize_results",
           "dc-visualize": "visualize_channel", "dc-layer": "disentangle_layer", "dc-demo": "demo"}


def doc_torchrun_lines() -> list[tuple[str, list[str]]]:
    """Every torchrun command line of README.md and docs/**.md, code blocks and inline code, as ``(file, argv)``
    (backslash continuations joined; ``$(which dc-x)`` read as the console script dc-x)."""
    import re
    import shlex

    found = []
    for path in DOCS:
        text = open(path).read()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip().startswith("torchrun")]
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        commands += [c for c in re.findall(r"`([^`]+)`", inline) if c.strip().startswith("torchrun ")]
        for c in commands:
            c = re.sub(r"\$\(which (dc-\w+)\)", r"\1", " ".join(c.split()))
            found.append((os.path.basename(path), shlex.split(c.split("#")[0])))
    return found


def test_every_torchrun_line_of_the_docs_parses():
    """torchrun reads any abbreviation of its own options even after the script (``--p`` could be its
    ``--print-completion``): each documented line goes through the installed torchrun's parser to the script it
    names, and the script's own parser takes its flags."""
    import contextlib
    import importlib
    import io

    from torch.distributed.run import parse_args

    lines = doc_torchrun_lines()
    assert len(lines) >= 8 and any("--p" in argv for _, argv in lines)
    for where, argv in lines:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                a = parse_args(argv[1:])
        except SystemExit:
            raise AssertionError(f"{where}: torchrun refuses {' '.join(argv)}: {err.getvalue().splitlines()[-1]}")
        script = os.path.basename(a.training_script)
        name = CONSOLE.get(script, script[:-3])
        assert os.path.isfile(os.path.join(ROOT, f"{name}.py")), (where, argv)
        if "..." in a.training_script_args:
            continue
        command = importlib.import_module(f"utils.cli.{name}")
        try:
            with contextlib.redirect_stderr(err):
                command.get_args_parser().parse_args(a.training_script_args)
        except SystemExit:
            raise AssertionError(f"{where}: {script} refuses {' '.join(argv)}: {err.getvalue().splitlines()[-1]}")


def test_the_docs_layer_line_runs_as_written(planted4, tmp_path):
    """The docs' torchrun line of the layer command (docs/scale.md), with its ``--p 0.75``, run with the installed
    torchrun: only its folders and model are this test's (and 2 processes on a free port instead of 8)."""
    import shutil

    root, data, common = planted4
    shutil.copytree(root / "store", tmp_path / "store")
    (_, argv), = [x for x in doc_torchrun_lines() if "disentangle_layer.py" in x[1] and "--p" in x[1]]
    values = {"--data_dir": data, "--store_dir": str(tmp_path / "store"), "--model": f"{root / 'planted4.py'}:build"}
    argv = [values.get(prev, a) for prev, a in zip([None, *argv], argv)]
    argv = [TORCHRUN, "--standalone"] + [("--nproc_per_node=2" if a.startswith("--nproc_per_node") else a)
                                         for a in argv[1:]]
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "layer.json"
    r = subprocess.run([*argv, "--num_workers", "0", "--device", "cpu", "--batch_size", "4", "--no_progress",
                        "--top_k", "4", "--out_dir", str(tmp_path / "out"), "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=e, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out))["channels"]
    js = json.load(open(tmp_path / "out" / "layer.json"))
    assert (js["tau"], js["p"], js["gamma_high"]) == (0.03, 0.75, 0.5)
    assert r.stdout.count("report:") == 1  # rank 0 alone prints


# ------------------------------------------------------------------ ranks that see different folders


def torchrun_in_own_folders(data, base, store="store"):
    """Stage 1 under torchrun, process RANK started in ``base/rank<RANK>`` (as on machines that are each
    started in their own folder) with the relative ``--store_dir store``."""
    for r in (0, 1):
        os.makedirs(os.path.join(base, f"rank{r}"), exist_ok=True)
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = 'cd "$0/rank$RANK" && exec "$@"'
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", "--", "bash", "-c", start,
                           str(base), sys.executable, SCRIPT, *args(data, store)],
                          capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)


def test_ranks_that_see_different_store_folders_stop_before_any_work(data_and_reference, tmp_path):
    """Process 0 started in rank0/ (where a store was begun and its process 1 killed), process 1 in rank1/, with
    the relative ``--store_dir store``: both stop before any work, one line each and no traceback of theirs, the
    store as it was; started in one folder, the same command completes it."""
    data, ref = data_and_reference
    killer = (os.path.join(ROOT, "tests", "kill_after_chunks.py"), "1", "1")
    assert torchrun(data, tmp_path / "rank0" / "store", script=killer).returncode != 0
    path = tmp_path / "rank0" / "store" / "resnet18_channel_importances"
    before = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert "chunks/chunk_000001.npz" in before and "relevance.npy" not in before
    r = torchrun_in_own_folders(data, tmp_path)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    mine, other = (str(tmp_path / f"rank{k}" / "store") for k in (1, 0))
    assert errors.count("error: stage 1 stopped: 1 other process(es) of this job failed (see their error)") == 1
    assert [ln for ln in errors if ln.startswith("error: process 1 does not see the folder of process 0 as "
                                                 f"--store_dir store: it is {mine} here and {other} for process 0")]
    assert len(errors) == 2, errors  # one line on each process
    assert "gloo" not in r.stderr and "[rank" not in r.stderr  # no process's traceback (torchrun's own may follow)
    assert {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert os.listdir(tmp_path / "rank0") == ["store"] and os.listdir(tmp_path / "rank1") == []  # nothing else
    os.rmdir(tmp_path / "rank1")
    os.symlink("rank0", tmp_path / "rank1")  # now both start in one folder
    r = torchrun_in_own_folders(data, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(ref, str(path))


# ------------------------------------------------------------------ the pictures under torchrun


def test_visualize_channel_shares_the_search_and_draws_once(planted4, tmp_path):
    """visualize_channel.py under torchrun: the top-k search is shared by 2 processes and gives one process's
    top-k; process 0 alone draws, writes and prints."""
    import shutil

    from conftest import run_script

    root, data, common = planted4
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    concepts = ["--classes_for_concept1", "0", "1", "--classes_for_concept2", "3"]
    r = run_script("disentangle_channel.py", *common, "--store_dir", str(store), "--channel_disentangle", "0", *concepts)
    assert r.returncode == 0, r.stderr
    flags = [*common, "--store_dir", str(store), "--channel_of_interest", "0", *concepts, "--top_k", "5", "--fv_method", "fourier", "--fv_steps",
             "2", "--fv_size", "32"]
    r = run_script("visualize_channel.py", *flags, "--out_dir", str(tmp_path / "one"), "--json", str(tmp_path / "1.json"))
    assert r.returncode == 0, r.stderr
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--", "visualize_channel.py", *flags,
                        "--batch_size", "3", "--out_dir", str(tmp_path / "two"), "--json", str(tmp_path / "2.json")],
                       capture_output=True, text=True, cwd=ROOT, env=e, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("figure: ") == 1 and r.stdout.count("channel 0 of ") == 1  # rank 0 alone prints
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in (1, 2))
    assert two["images_searched"] == one["images_searched"] == 24
    assert two["purity"] == one["purity"]
    for name, sub in one["subchannels"].items():
        a, b = sub["topk"], two["subchannels"][name]["topk"]
        assert [t["index"] for t in a] == [t["index"] for t in b] and len(a) == 5
        assert np.allclose([t["activation"] for t in a], [t["activation"] for t in b], rtol=1e-6)
        assert b[0]["path"] == a[0]["path"] and two["subchannels"][name]["feature_visualisation"] is not None
    folder, = os.listdir(tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two" / folder)) == sorted(os.listdir(tmp_path / "one" / folder))
