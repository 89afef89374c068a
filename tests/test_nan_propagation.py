"""NaN and inf in an input reach the outputs (issue 12, point 4): compiled kernels against
onnxruntime, op by op and on whole models, plus ``run(..., check_finite=True)``.

TVM lowers ``max(x, 0)`` to a compare-and-select that turns NaN into 0, so relu, clip,
max-pool and softmax's row max used to hide a NaN input behind finite, plausible outputs.

Semantics: elementwise ops, softmax and average pools match onnxruntime exactly (positions of
NaN, +inf and -inf, and the finite values). Max/min *reductions* (max-pool, global max-pool,
reduce_max/min, argmax/argmin) follow numpy and torch: any NaN in the window or row gives NaN
(argmax/argmin: the index of the first NaN). onnxruntime's are order-dependent there (in our
runs ReduceMax and ArgMax kept a NaN only when it came first in the row, ReduceMax of
[1, NaN, 2, 3] gave 2, MaxPool kept some NaN windows and GlobalMaxPool none); those ops are
checked against numpy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

SHAPE = [1, 3, 6, 6]
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"


def _input() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    flat = x.reshape(-1)
    flat[[0, 7, 20, 50, 77]] = np.nan
    flat[[3, 30, 61]] = np.inf
    flat[[5, 40, 90]] = -np.inf
    return x


def _model(node: onnx.NodeProto, out_type: int = T.FLOAT) -> onnx.ModelProto:
    inits = [h.make_tensor("lo", T.FLOAT, [], [-1.0]), h.make_tensor("hi", T.FLOAT, [], [1.0]),
             h.make_tensor("c", T.FLOAT, [], [0.5])]
    used = [i for i in inits if i.name in node.input]
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, SHAPE)],
                     [h.make_tensor_value_info("y", out_type, None)], used)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime's answer, at its default settings (graph optimisations on)."""
    return ort.InferenceSession(m.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _compiled(m, x: np.ndarray) -> np.ndarray:
    from compiler import compile as compile_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_model(m, "host", progress=False)(x)[0]


def assert_same_nonfinite(got: np.ndarray, want: np.ndarray, rtol=1e-4, atol=1e-5) -> None:
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        g, w = test(got), test(want)
        assert np.array_equal(g, w), (f"{what} at {np.argwhere(g != w)[:5].tolist()}: "
                                      f"got {got[g != w][:5]}, want {want[g != w][:5]}")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol)


N = h.make_node
ELEMENTWISE = {
    "Relu": N("Relu", ["x"], ["y"]),
    "Clip": N("Clip", ["x", "lo", "hi"], ["y"]),
    "LeakyRelu": N("LeakyRelu", ["x"], ["y"], alpha=0.1),
    "Sigmoid": N("Sigmoid", ["x"], ["y"]),
    "Tanh": N("Tanh", ["x"], ["y"]),
    "Exp": N("Exp", ["x"], ["y"]),
    "Erf": N("Erf", ["x"], ["y"]),
    "HardSigmoid": N("HardSigmoid", ["x"], ["y"]),
    "HardSwish": N("HardSwish", ["x"], ["y"]),
    "Softplus": N("Softplus", ["x"], ["y"]),
    "Max": N("Max", ["x", "c"], ["y"]),
    "Min": N("Min", ["x", "c"], ["y"]),
    "Softmax": N("Softmax", ["x"], ["y"], axis=-1),
    "LogSoftmax": N("LogSoftmax", ["x"], ["y"], axis=-1),
    "AveragePool": N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    "GlobalAveragePool": N("GlobalAveragePool", ["x"], ["y"]),
}


@pytest.mark.parametrize("op", list(ELEMENTWISE))
def test_like_onnxruntime(op):
    m = _model(ELEMENTWISE[op])
    x = _input()
    assert_same_nonfinite(_compiled(m, x), _ort(m, {"x": x})[0])


def _windows(x: np.ndarray, k: int, s: int, pad: int) -> np.ndarray:
    xp = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=-np.inf)
    w = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))
    return w[:, :, ::s, ::s]


REDUCTIONS = {
    "MaxPool2": (N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
                 lambda x: _windows(x, 2, 2, 0).max(axis=(-2, -1))),
    "MaxPool3pad": (N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                    lambda x: _windows(x, 3, 1, 1).max(axis=(-2, -1))),
    "GlobalMaxPool": (N("GlobalMaxPool", ["x"], ["y"]),
                      lambda x: x.max(axis=(2, 3), keepdims=True)),
    "ReduceMax": (N("ReduceMax", ["x"], ["y"], axes=[3], keepdims=1),
                  lambda x: x.max(axis=3, keepdims=True)),
    "ReduceMin": (N("ReduceMin", ["x"], ["y"], axes=[3], keepdims=1),
                  lambda x: x.min(axis=3, keepdims=True)),
}


@pytest.mark.parametrize("op", list(REDUCTIONS))
def test_max_reductions_like_numpy(op):
    node, ref = REDUCTIONS[op]
    x = _input()
    want = ref(x)
    assert np.isnan(want).any()
    assert_same_nonfinite(_compiled(_model(node), x), want)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_argmax_points_at_the_first_nan(op):
    x = _input()
    got = _compiled(_model(N(op, ["x"], ["y"], axis=3, keepdims=1), T.INT64), x)
    want = (np.argmax if op == "ArgMax" else np.argmin)(x, axis=3, keepdims=True)
    np.testing.assert_array_equal(got, want)


# -- whole models ------------------------------------------------------------------------------
def _poison(x: np.ndarray, value: float, where: tuple) -> np.ndarray:
    x = x.copy()
    x[where] = value
    return x


def _compare_model(m, onnx_model, x: np.ndarray, name: str) -> None:
    for value in (np.nan, np.inf, -np.inf):
        xp = _poison(x, value, (0, 0) + (x.shape[2] // 2, x.shape[3] // 2))
        want = _ort(onnx_model, {name: xp})[0]
        got = m(xp)[0]
        if np.isnan(value):   # (an inf pixel may be clamped away legitimately: relu6)
            assert np.isnan(want).all(), "onnxruntime's answer has numbers: a useless case"
        assert_same_nonfinite(got, want, rtol=1e-3, atol=1e-4)


def test_digits_cnn_like_onnxruntime():
    from compiler import compile as compile_model

    onnx_model = onnx.load(str(DIGITS))
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    m = compile_model(str(DIGITS), "host", progress=False)
    x = np.load(DIGITS.parent / "digit.npy").astype(np.float32)
    _compare_model(m, onnx_model, x, onnx_model.graph.input[0].name)


def test_mobilenet_v2_like_onnxruntime(tmp_path):
    import torch

    from compiler import compile as compile_model
    from examples.models import mobilenet_inputs, mobilenet_v2

    torch.set_num_threads(1)
    model = mobilenet_v2(width=0.35, resolution=64)
    x = mobilenet_inputs(64)
    torch.onnx.export(model, (torch.from_numpy(x),), str(tmp_path / "mb.onnx"),
                      input_names=["image"], output_names=["logits"], dynamo=False)
    onnx_model = onnx.load(str(tmp_path / "mb.onnx"))
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    m = compile_model(str(tmp_path / "mb.onnx"), "host", progress=False)
    np.testing.assert_allclose(m(x)[0], _ort(onnx_model, {"image": x})[0], rtol=1e-3,
                               atol=1e-3)
    _compare_model(m, onnx_model, x, "image")


# -- check_finite ------------------------------------------------------------------------------
def test_check_finite_names_the_input():
    from runtime import InputError

    m = _model(ELEMENTWISE["Relu"])
    from compiler import compile as compile_model

    c = compile_model(m, "host", progress=False)
    x = np.zeros(SHAPE, np.float32)
    assert c.run({"x": x}, check_finite=True)[0].shape == tuple(SHAPE)
    x[0, 1, 2, 3] = np.inf
    with pytest.raises(InputError, match=r"input 'x' has 1 non-finite value.*\[0, 1, 2, 3\]"):
        c.run({"x": x}, check_finite=True)
    assert np.isposinf(c.run({"x": x})[0][0, 1, 2, 3])   # by default it propagates
    with pytest.raises(InputError, match="input 'x'"):
        c.executor.run(_input(), check_finite=True)


def test_minilm_like_onnxruntime(tmp_path):
    """The trained MiniLM, entered at its token embeddings (token ids cannot carry a NaN)."""
    import torch

    from compiler import compile as compile_model
    from examples.models import minilm, minilm_inputs

    torch.set_num_threads(1)
    model, tokenizer = minilm()

    class FromEmbeddings(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs_embeds, attention_mask):
            return self.m(inputs_embeds=inputs_embeds,
                          attention_mask=attention_mask).last_hidden_state

    inputs = minilm_inputs(tokenizer, sentences=["A NaN must reach the output."], seq=16)
    with torch.no_grad():
        emb = model.embeddings.word_embeddings(torch.from_numpy(inputs["input_ids"])).numpy()
    mask = inputs["attention_mask"]
    path = tmp_path / "minilm_embeds.onnx"
    torch.onnx.export(FromEmbeddings(model).eval(), (torch.from_numpy(emb),
                      torch.from_numpy(mask)), str(path),
                      input_names=["inputs_embeds", "attention_mask"],
                      output_names=["hidden"], dynamo=False)
    onnx_model = onnx.load(str(path))
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    m = compile_model(str(path), "host", progress=False)
    feeds = {"inputs_embeds": emb, "attention_mask": mask}
    np.testing.assert_allclose(m(feeds)[0], _ort(onnx_model, feeds)[0], rtol=1e-3, atol=1e-3)
    for value in (np.nan, np.inf, -np.inf):
        e = emb.copy()
        e[0, 3, 5] = value
        f = {"inputs_embeds": e, "attention_mask": mask}
        want = _ort(onnx_model, f)[0]
        assert np.isnan(want).any()
        assert_same_nonfinite(m(f)[0], want, rtol=1e-3, atol=1e-3)
