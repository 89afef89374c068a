"""The example models exported to ONNX (opset 17, static shapes) and imported with from_onnx:
the reference interpreter matches onnxruntime (max |error| / max |reference| <= 1e-4) and
every imported graph prints and re-parses identically."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from compiler.frontends import from_onnx  # noqa: E402
from compiler.ir import interpret, parse  # noqa: E402
from examples.models import export_onnx  # noqa: E402

TOL = 1e-4


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


def check(path, feeds: dict[str, np.ndarray], n_outputs: int = 1) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    g = from_onnx(str(path))
    assert [v.name for v in g.inputs] == list(feeds)
    got = interpret(g, feeds)
    assert len(got) == len(want)
    for i in range(n_outputs):
        assert rel_error(got[i], want[i]) <= TOL, f"output {i}"
    text = str(g)
    assert str(parse(text)) == text


def test_gpt2_decoder_onnx(gpt2_model):
    model, ids = gpt2_model
    path = export_onnx(model, (ids,), opset=17, input_names=["input_ids"],
                       output_names=["logits"])
    check(path, {"input_ids": ids})


def test_mobilenet_v2_onnx(mobilenet_model):
    model, x = mobilenet_model
    path = export_onnx(model, (x,), opset=17, input_names=["image"], output_names=["logits"])
    check(path, {"image": x})


def test_minilm_onnx(minilm_model):
    model, _, inputs = minilm_model
    path = export_onnx(model, inputs, opset=17,
                       output_names=["last_hidden_state", "pooler_output"])
    check(path, inputs, n_outputs=2)
