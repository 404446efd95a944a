"""Faults a notebook user meets with the model itself (issue 28, items 2, 6 and 7): a store of other weights taken
for this model, relevance and logits beyond float16, a half-precision model, a NaN image. Every fault is made
here (crafted models, weights and images, a stub); the numbers are checked against computations made here
(the unscaled network, a float32 pass, plain forwards, hashes)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import utils.api as dc
from conftest import write_image_folder
from test_api import FAST, NAMES, planted4, tensors
from utils.store import layout as st
from utils.errors import UserError
from utils.stages.relevance import Stage1Config, compute_relevance
from utils.model.loading import load_model

# ------------------------------------------------------------------ item 2: which model made a store

OWN_NET = '''import os

import torch
from torch import nn


def build():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    here = os.path.dirname(os.path.abspath(__file__))
    net.load_state_dict(torch.load(os.path.join(here, "weights.pt"), weights_only=True))
    return net
'''


def state_id(state: dict) -> str:
    """The id of a model by its parameters and buffers, computed here: sha256 over each name and its bytes."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return "module:" + h.hexdigest()[:16]


def own_weights(seed: int, layer_shift: float = 0.0, head_shift: float = 0.0) -> dict:
    """Weights for OWN_NET (drawn from ``seed``): ``layer_shift`` added to the layer of interest ``2``, ``head_shift``
    to the classifier."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["2.weight"] += layer_shift
    state["6.weight"] += head_shift
    return state


@pytest.fixture
def own(tmp_path):
    """An own model file whose function reads its weights from weights.pt beside it, its data and stage 1's
    store of it; returns a namespace of paths and a ``stage1()`` that runs stage 1 again on the same store."""
    (tmp_path / "net.py").write_text(OWN_NET)
    torch.save(own_weights(0), tmp_path / "weights.pt")
    data = write_image_folder(str(tmp_path / "data"), n_train=3, n_val=1, size=16)
    store_dir = str(tmp_path / "store")
    model = f"{tmp_path / 'net.py'}:build"

    def stage1():
        return compute_relevance(Stage1Config(data_dir=data, store_dir=store_dir, model=model, layer="2",
                                                **{**FAST, "batch_size": 3}))

    first = stage1()
    return type("Own", (), {"dir": tmp_path, "model": model, "store_dir": store_dir, "store": first["store"],
                            "stage1": staticmethod(stage1)})


def store_bytes(path: str) -> dict:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def refusal(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    line = str(e.value)
    assert "\n" not in line, line
    return line


def set_meta(store: str, **changes) -> None:
    path = os.path.join(store, "meta.json")
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


def test_an_own_model_file_is_identified_by_its_parameters_not_by_its_py_file(own):
    """New weights read by an unchanged .py file are refused, naming what differs; an edited .py file with the same
    weights keeps its store; the store records the parameters' id (computed here)."""
    meta = json.load(open(os.path.join(own.store, "meta.json")))
    assert meta["weights"] == state_id(own_weights(0))
    kept = store_bytes(own.store)
    torch.save(own_weights(0, head_shift=0.5), own.dir / "weights.pt")  # the head retrained, the layer the same
    line = refusal(own.stage1)
    assert "another weights:" in line and state_id(own_weights(0, head_shift=0.5)) in line
    assert "layer 2's filters are the same, other parameters or buffers differ" in line
    torch.save(own_weights(0, layer_shift=0.5), own.dir / "weights.pt")
    assert "layer 2's filters differ" in refusal(own.stage1)
    lm = load_model(own.model)
    assert "another weights:" in refusal(lambda: st.model_store(own.store_dir, lm, "2"))  # stages 3, 4, the layer
    assert store_bytes(own.store) == kept
    torch.save(own_weights(0), own.dir / "weights.pt")
    with open(own.dir / "net.py", "a") as f:
        f.write("\n# an edit that changes no parameter\n")
    again = own.stage1()
    assert again["already_complete"] and store_bytes(own.store) == kept
    st.model_store(own.store_dir, load_model(own.model), "2")


def test_a_store_of_an_earlier_version_resumes_where_the_model_is_the_same(own):
    """An earlier version recorded the sha256 of the .py file alone ("as-built:..."): such a store is taken while
    that file and the layer's filters are unchanged, refused when the weights it reads changed, and the line for
    an edited .py file says how to keep the store."""
    py_hash = "as-built:" + hashlib.sha256(open(own.dir / "net.py", "rb").read()).hexdigest()[:16]
    set_meta(own.store, weights=py_hash)
    assert own.stage1()["already_complete"]
    torch.save(own_weights(0, layer_shift=0.25), own.dir / "weights.pt")
    line = refusal(own.stage1)
    assert py_hash in line and "earlier version" in line and "weights it loads changed" in line
    torch.save(own_weights(0), own.dir / "weights.pt")
    with open(own.dir / "net.py", "a") as f:
        f.write("\n# edited\n")
    line = refusal(own.stage1)
    want = state_id(own_weights(0))
    assert f"set \"weights\" to {want!r} in {os.path.join(own.store, 'meta.json')}" in line
    set_meta(own.store, weights=want)  # what the line says
    assert own.stage1()["already_complete"]


# ------------------------------------------------------------------ item 6: precision


def scaled_planted4(factor: float) -> nn.Module:
    m = planted4()
    with torch.no_grad():
        m.fc.weight *= factor
    return m


def stage1_of(model: nn.Module, store_dir, precision: str = "fp32", train=None, **kw):
    d = dc.prepare(model, train or tensors(6, 0), tensors(5, 1), classes=NAMES, store_dir=str(store_dir))
    s = compute_relevance(Stage1Config(model=d.loaded.name, weights=d.loaded.weights, layer="conv", data_dir=d.data,
                                         store_dir=d.store_dir, precision=precision, **FAST, **kw), loaded=d.loaded)
    return st.Store.open(s["store"])


def test_large_logits_keep_finite_relevance_and_stage_2_finds_what_it_finds_unscaled(tmp_path):
    """Logits 1e4 times larger (the classifier scaled): relevance scales with them (no inf), and stage 2, whose
    importance is scale-free, counts and pairs exactly as for the unscaled network."""
    plain = stage1_of(planted4(), tmp_path / "plain")
    big = stage1_of(scaled_planted4(1e4), tmp_path / "big")
    r1, r2 = np.asarray(plain.relevance, np.float64), np.asarray(big.relevance, np.float64)
    assert np.isfinite(r2).all() and np.abs(r2).max() > 65504  # beyond float16
    np.testing.assert_allclose(r2, 1e4 * r1, rtol=1e-5, atol=1e-5 * np.abs(r2).max())
    a, b = dc.polysemantic_pairs(plain), dc.polysemantic_pairs(big)
    assert torch.equal(a.counts, b.counts) and a.pairs == b.pairs and len(a.pairs) > 0


def test_fp16_pass_is_loss_scaled_and_an_overflow_is_refused(tmp_path):
    """Tiny gradients (the classifier scaled by 1e-5) lose nothing in a float16 pass (loss scaling): its relevance is
    within 1% of each image's largest |R| of the float32 pass's. Logits beyond float16 are one line, no store."""
    model = scaled_planted4(1e-5)
    r32 = np.asarray(stage1_of(model, tmp_path / "fp32").relevance, np.float64)
    r16 = np.asarray(stage1_of(model, tmp_path / "fp16", "fp16").relevance, np.float64)
    assert np.abs(r32).max() > 0 and np.count_nonzero(r16) == np.count_nonzero(r32)
    assert (np.abs(r16 - r32).max(1) <= 0.01 * np.abs(r32).max(1)).all()
    line = refusal(lambda: stage1_of(scaled_planted4(1e5), tmp_path / "over", "fp16"))
    assert "overflow in float16" in line and "--precision bf16" in line and "train[" in line
    assert os.listdir(tmp_path / "over") == []  # nothing half made


class Killed(Exception):
    pass


def test_an_unfinished_store_of_an_earlier_version_is_finished_in_its_float16(tmp_path, monkeypatch):
    """A run of an earlier version (format 2: float16 relevance) killed after two chunks: this version finishes it
    in float16, with the rows of an uninterrupted run rounded to float16, and the store opens."""
    from utils.store import chunks

    full = np.asarray(stage1_of(planted4(), tmp_path / "full", chunk_images=4).relevance)
    write_chunk = chunks.write_chunk

    def die_after_two(path, j, *results):
        write_chunk(path, j, *results)
        if j == 1:
            raise Killed

    monkeypatch.setattr(chunks, "write_chunk", die_after_two)
    with pytest.raises(Killed):
        stage1_of(planted4(), tmp_path / "old", chunk_images=4)
    monkeypatch.undo()
    store = os.path.join(tmp_path / "old", os.listdir(tmp_path / "old")[0])
    set_meta(store, format_version=2, relevance_dtype="float16")  # what an earlier version wrote
    for name in os.listdir(os.path.join(store, "chunks")):
        path = os.path.join(store, "chunks", name)
        with np.load(path) as z:
            arrays = {k: z[k].astype(np.float16) if k == "relevance" else z[k] for k in z.files}
        np.savez(path, **arrays)
    resumed = stage1_of(planted4(), tmp_path / "old", chunk_images=4)
    rel = np.load(os.path.join(store, "relevance.npy"))
    assert rel.dtype == np.float16 and np.array_equal(rel, full.astype(np.float16))
    assert resumed.format_version == 2 and np.array_equal(np.asarray(resumed.relevance), rel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_as_such(dtype):
    line = refusal(lambda: dc.prepare(planted4().to(dtype), tensors(2, 0), tensors(2, 1)))
    assert str(dtype).replace("torch.", "") in line and "model.float()" in line and "--input_size" not in line


def tiny_cnn(head: float) -> nn.Module:
    """Random 3x3 convolutions (the split network rounds differently from the original) and a classifier scaled by
    ``head`` (logits ~1e4 for 1e6)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    with torch.no_grad():
        net[-1].weight *= head
    return net.eval()


def test_large_logits_pass_the_logit_check_relative_to_their_size(tmp_path):
    """Stage 3 of a network with logits ~1e5: rounding alone moves them by more than 1e-3, which an absolute
    tolerance refused; the split is kept, and its logit difference (recomputed here) is within 1e-5 of the largest
    |logit|."""
    from utils.store.records import disentangle_model

    model = tiny_cnn(1e6)
    d = dc.prepare(model, tensors(6, 0), tensors(5, 1), classes=NAMES, store_dir=str(tmp_path))
    dc.importances(d, "2", **FAST)
    rec = dc.split_channel(d, 0, [[0, 1], [3]], "2", **FAST)
    x = tensors(6, 0).tensors[0]
    with torch.no_grad():
        o, n = model(x), disentangle_model(model, [rec])(x)
    diff, scale = float((o - n).abs().max()), float(o.abs().max())
    assert 1e-3 < rec.max_abs_logit_diff <= diff <= 1e-5 * scale


def test_the_layer_command_checks_logits_relative_to_their_size(tmp_path, monkeypatch):
    """The layer command's one network, logits ~1e5: kept (its difference > 1e-3, < 1e-5 of the largest |logit|
    of the validation images, computed here); the outputs after the check are stubbed out (speed)."""
    from utils.stages import layer as pipeline
    from utils.stages.layer import LayerConfig, disentangle_layer

    model = tiny_cnn(1e6)
    val = tensors(5, 1)
    d = dc.prepare(model, tensors(6, 0), val, classes=NAMES, store_dir=str(tmp_path))
    dc.importances(d, "2", **FAST)
    seen = {}
    monkeypatch.setattr(pipeline, "write_layer", lambda cfg, lm, m, layer, store, ev, *a, **k: seen.update(ev=ev))
    disentangle_layer(LayerConfig(d.data, d.store_dir, layer="2", p=0.5, gamma_high=0.9, max_channels=3, top_k=1,
                                  **FAST), loaded=d.loaded, log=lambda *a: None)
    with torch.no_grad():
        scale = float(model(val.tensors[0]).abs().max())
    ev = seen["ev"]
    assert 1e-3 < ev.logit_diff <= 1e-5 * scale and ev.logit_tolerance == pytest.approx(1e-5 * scale, rel=1e-6)


# ------------------------------------------------------------------ item 7: NaN images


def test_a_nan_image_is_refused_with_its_index_and_finished_chunks_stay(tmp_path):
    """A NaN in training image 14 (the third of class 2): stage 1 names it; the chunks of the images before it
    (classes 0 and 1, 12 images in chunks of 4) stay on disk, nothing NaN is stored; the whole pipeline says the
    same instead of failing later (an IndexError in best_index)."""
    train = tensors(6, 0)
    x, y = train.tensors[0].clone(), train.tensors[1]
    assert y[14] == 2 and (y[:12] < 2).all()
    x[14, 1, 3, 3] = float("nan")
    bad = TensorDataset(x, y)
    line = refusal(lambda: stage1_of(planted4(), tmp_path / "s", train=bad, chunk_images=4))
    assert "train[14]" in line and "NaN" in line
    store = os.path.join(tmp_path / "s", os.listdir(tmp_path / "s")[0])
    chunks = sorted(os.listdir(os.path.join(store, "chunks")))
    assert chunks == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    for c in chunks:
        with np.load(os.path.join(store, "chunks", c)) as z:
            assert np.isfinite(z["relevance"]).all()
    line = refusal(lambda: dc.disentangle(planted4(), bad, tensors(5, 1), layer="conv", classes=NAMES, log=None,
                                          store_dir=str(tmp_path / "all"), **FAST))
    assert "train[14]" in line and "NaN" in line


def test_a_nan_validation_image_is_refused_with_its_index(tmp_path):
    """A NaN in validation image 2: the layer command's validation pass names it (it was taken silently: the
    logit check's maximum skipped the NaN, purity and AUC counted it); nothing is written."""
    val = tensors(5, 1)
    x = val.tensors[0].clone()
    x[2, 0, 1, 1] = float("nan")
    line = refusal(lambda: dc.disentangle(planted4(), tensors(6, 0), TensorDataset(x, val.tensors[1]), layer="conv",
                                          classes=NAMES, top_k=2, log=None, store_dir=str(tmp_path), **FAST))
    assert "validation image" in line and "val[2]" in line and "NaN" in line
    assert not os.path.exists(tmp_path / "layer_disentangled")


def test_best_index_refuses_scores_that_are_not_numbers():
    from utils.method.scoring import best_index

    assert best_index(torch.tensor([0.5, 2.0, 2.0, 1.0])) == 1
    assert "NaN" in refusal(lambda: best_index(torch.tensor([0.5, float("nan"), 1.0])))
