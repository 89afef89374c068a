"""The nine 'light' models shipped with onnx: import, verify, round-trip the text, and
compare the reference interpreter with onnxruntime.

The light models are opset 9 (npucc imports 13..21), so they are converted to opset 13
with onnx's version converter first. Their weights are ConstantOfShape placeholders (one
value everywhere), which makes most outputs degenerate (a uniform softmax); each model is
therefore checked twice: as shipped, and with every placeholder replaced by a random
initializer (He-scaled, fixed seed) so that the comparison means something.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, version_converter

from compiler.frontends import from_onnx
from compiler.ir import interpret, parse, verify

LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
TOLERANCE = 1e-4


@functools.cache
def light_model(name: str) -> onnx.ModelProto:
    model = onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))
    return version_converter.convert_version(model, 13)


def randomised(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy whose ConstantOfShape placeholder weights are random initializers."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            if len(shape) >= 2:
                # He-scaled normal values; a block of 10007 (prime) values tiled over big
                # tensors keeps generating 100M-parameter layers cheap.
                fan_in = math.prod(shape[1:])
                block = rng.standard_normal(min(math.prod(shape), 10007), np.float32)
                arr = np.resize(block * np.float32(math.sqrt(2.0 / fan_in)), shape)
            else:  # biases and batch-norm parameters: positive, near one
                arr = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            m.graph.initializer.append(
                numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, 13)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    # the unoptimised graph is the plainer oracle, and builds 3x faster on 100M weights
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    return float(np.abs(got.astype(np.float64) - want).max()
                 / max(float(np.abs(want).max()), 1e-30))


def check_model(model: onnx.ModelProto) -> None:
    g = from_onnx(model)
    verify(g)
    text = str(g)
    assert str(parse(text)) == text
    ops = g.op_counts()
    assert "identity" not in ops
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in g.inputs}
    got = interpret(g, feeds)
    want = run_ort(model, feeds)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= TOLERANCE


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_as_shipped(name):
    model = light_model(name)
    g = from_onnx(model)
    # the placeholders stay fill nodes; nothing of Dropout/Identity survives
    assert g.op_counts().get("fill", 0) > 0
    check_model(model)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19"
                                  else n for n in LIGHT])
def test_light_model_random_weights(name):
    """vgg19 is slow here (~25 s): 140M random weights through onnxruntime."""
    model = randomised(light_model(name))
    g = from_onnx(model)
    assert "fill" not in g.op_counts()
    onnx_names = {t.name for t in model.graph.initializer}
    onnx_names |= {o for n in model.graph.node for o in n.output}
    assert set(g.weights) <= onnx_names  # weights keep their ONNX names
    check_model(model)


def test_light_outputs_are_not_degenerate():
    model = randomised(light_model("squeezenet"))
    g = from_onnx(model)
    x = np.random.default_rng(1).standard_normal(g.inputs[0].shape).astype(np.float32)
    (y,) = interpret(g, [x])
    assert float(y.std()) > 1e-6



