"""Pruned models compiled for host: they match the reference interpreter on their own lowered
graph, the package stores the pruned weights sparse and round-trips them exactly, the report
and stats say what was pruned."""

from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from compiler import compile
from compiler.ir.interpreter import interpret

TOL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got.astype(np.float64) - want).max()) / (float(np.abs(want).max())
                                                                 or 1.0)


@pytest.fixture(scope="module")
def digits():
    import torch

    from compiler.frontends import from_torch
    from examples.digits_cnn import make_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model().eval()
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    calib = [{"input": np.random.default_rng(s).random((1, 1, 8, 8)).astype(np.float32)}
             for s in range(1, 3)]
    return from_torch(model, (torch.from_numpy(x),)), x, calib


def _check(m, feeds) -> list[np.ndarray]:
    got = m.run(feeds)
    want = interpret(m.graph, feeds)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= TOL
    return got


@pytest.fixture(scope="module")
def compiled(digits):
    g, x, calib = digits
    out = {}
    for key, prune in (("channel", {"method": "channel", "sparsity": 0.5}),
                       ("2:4", {"method": "2:4"}),
                       ("magnitude", {"method": "magnitude", "sparsity": 0.7,
                                      "scope": "global"})):
        out[key] = compile(g, "host", prune=prune, calibration=calib, progress=False)
    return out


@pytest.mark.parametrize("key", ["channel", "2:4", "magnitude"])
def test_pruned_model_matches_reference(compiled, digits, key):
    _, x, _ = digits
    _check(compiled[key], {"input": x})


def test_channel_pruning_shrinks_compiled_model(compiled):
    m = compiled["channel"]
    convs = [n for n in m.graph.nodes if n.op == "conv2d"]
    assert [n.outputs[0].shape[-1] for n in convs] == [8, 16]          # NHWC after layout
    s = m.stats()
    assert s["weight_bytes"] < 0.5 * 154664          # the unpruned CNN's f32 weights
    rep = m.prune_report(show=False)
    assert rep["params_after"] < 0.5 * rep["params_before"]
    assert rep["output_error"]["cosine"] <= 1.0 and rep["samples"] == 2


def test_sparse_package_round_trip_exact(compiled, digits, tmp_path):
    _, x, _ = digits
    m = compiled["magnitude"]
    s = m.stats()
    assert s["weight_bytes_stored"] < 0.7 * s["weight_bytes"]
    path = m.save(tmp_path / "m.npkg")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["weight_encoding"]
    assert (path / "weights.safetensors").stat().st_size < 0.7 * s["weight_bytes"]
    before = m.package.weights()
    after = runtime.package.Package.load(path).weights()
    assert set(before) == set(after)
    for k in before:
        a, b = np.asarray(before[k]), np.asarray(after[k])
        assert a.reshape(-1).tobytes() == b.reshape(-1).tobytes(), k
    ex = runtime.load(path)
    for a, b in zip(m.run({"input": x}), ex.run({"input": x}), strict=True):
        assert np.array_equal(a, b)
    # tampering with the sparse weights is refused like any other file
    f = path / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(runtime.errors.IntegrityError):
        runtime.load(path)


def test_unpruned_package_stays_dense(digits, tmp_path):
    g, x, _ = digits
    m = compile(g, "host", progress=False)
    path = m.save(tmp_path / "d.npkg")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "weight_encoding" not in manifest
    assert m.stats()["weight_bytes_stored"] == m.stats()["weight_bytes"]


def test_two_four_holds_in_package(compiled):
    from passes.pruning.magnitude import check_nm

    m = compiled["2:4"]
    plan = m.prune_plan
    for name, e in plan["layers"].items():
        if "skipped" not in e:
            assert check_nm(np.where(e["mask"], 1.0, 0.0), e["op"]), name
    dense = [n for n in m.graph.nodes if n.op == "dense"]
    for n in dense:
        assert check_nm(m.graph.const_value(n.inputs[1]), "dense")


@pytest.mark.slow
def test_gpt2_heads_and_two_four_compiled():
    import torch

    from examples.models import gpt2_decoder, gpt2_inputs

    # seq 32: softmax rows of 16 do not compile today (targets/kernels softmax schedule)
    cfg = dict(vocab=128, n_layer=2, n_head=4, d_model=32, seq=32)
    model, ids = gpt2_decoder(**cfg), gpt2_inputs(**cfg)
    for prune in ({"method": "head", "sparsity": 0.5}, {"method": "2:4"}):
        m = compile(model, "host", example_inputs=(torch.from_numpy(ids),), prune=prune,
                    calibration=[{"input_ids": ids}], progress=False)
        _check(m, {"input_ids": ids})
