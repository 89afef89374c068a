"""The nn / linalg / shape / reduce op families: layouts agree with each other, references
agree with plain numpy, and type inference refuses bad operands naming what is accepted.

(ONNX-facing numerics are checked against onnxruntime in test_onnx_import.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import OpError
from compiler.ir import Graph, TensorType, get_op, interpret, parse, verify


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run(op, arrays, **attrs):
    """One node over constant operands, through make_node, verify, print/parse, interpret."""
    g = Graph("t")
    ins = [g.add_input(f"x{i}", TensorType.of(a)) for i, a in enumerate(arrays)]
    node = g.make_node(op, ins, attrs)
    g.outputs = list(node.outputs)
    verify(g)
    assert str(parse(str(g))) == str(g)
    out = interpret(g, {f"x{i}": a for i, a in enumerate(arrays)})
    return out if len(out) > 1 else out[0]


def infer(op, types, **attrs):
    opdef = get_op(op)
    return opdef.infer(types, opdef.normalize_attrs(attrs))


T = TensorType


def test_conv2d_layouts_agree():
    x, w, b = rnd(2, 6, 9, 8), rnd(4, 3, 3, 3, seed=1), rnd(4, seed=2)
    attrs = dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2], groups=2,
                 activation="relu")
    ref = run("conv2d", [x, w, b], **attrs)
    assert ref.min() >= 0
    nhwc = run("conv2d", [x.transpose(0, 2, 3, 1).copy(), w.transpose(0, 2, 3, 1).copy(), b],
               layout="NHWC", kernel_layout="OHWI", **attrs)
    np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
    hwio = run("conv2d", [x, w.transpose(2, 3, 1, 0).copy(), b], kernel_layout="HWIO",
               **attrs)
    np.testing.assert_allclose(hwio, ref, rtol=1e-5, atol=1e-5)


def test_conv2d_matches_direct_sum():
    x, w = rnd(1, 2, 5, 5), rnd(3, 2, 3, 3, seed=1)
    got = run("conv2d", [x, w], pads=[1, 1, 1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((1, 3, 5, 5), np.float64)
    for i in range(5):
        for j in range(5):
            want[0, :, i, j] = np.einsum("chw,ochw->o", xp[0, :, i:i + 3, j:j + 3], w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pools_nhwc_agree_with_nchw():
    x = rnd(1, 3, 7, 6)
    xh = x.transpose(0, 2, 3, 1).copy()
    for op, extra in (("max_pool2d", {}), ("avg_pool2d", {"count_include_pad": True})):
        attrs = dict(kernel=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=True, **extra)
        a = run(op, [x], **attrs)
        b = run(op, [xh], layout="NHWC", **attrs)
        np.testing.assert_allclose(b.transpose(0, 3, 1, 2), a, rtol=1e-6)
    np.testing.assert_allclose(run("global_avg_pool", [xh], layout="NHWC"),
                               x.mean(axis=(2, 3)).reshape(1, 1, 1, 3), rtol=1e-6)


def test_dense_activations():
    x, w, b = rnd(2, 3, 5), rnd(4, 5, seed=1), rnd(4, seed=2)
    y = x @ w.T + b
    np.testing.assert_allclose(run("dense", [x, w, b]), y, rtol=1e-5)
    np.testing.assert_allclose(run("dense", [x, w, b], activation="clip", clip_min=-0.5,
                                   clip_max=0.5), np.clip(y, -0.5, 0.5), rtol=1e-5)
    np.testing.assert_allclose(run("dense", [x, w], activation="relu6"),
                               np.clip(x @ w.T, 0, 6), rtol=1e-5)


def test_shape_ops_reference():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(run("slice", [x], starts=[-1], ends=[-5], axes=[2],
                                      steps=[-2]), x[:, :, ::-2])
    parts = run("split", [x], axis=2, sizes=[1, 3])
    np.testing.assert_array_equal(parts[1], x[:, :, 1:])
    np.testing.assert_array_equal(run("cumsum", [x], axis=1, exclusive=True),
                                  np.cumsum(x, axis=1) - x)
    np.testing.assert_array_equal(run("shape", [x], start=1), np.array([3, 4]))
    vals, idx = run("topk", [np.array([[1, 3, 3, 2]], np.float32)], k=2)
    np.testing.assert_array_equal(idx, [[1, 2]])


@pytest.mark.parametrize("op,types,attrs,message", [
    ("conv2d", [T((1, 3, 8, 8), "f32"), T((4, 2, 3, 3), "f32")], {}, "expects 2 input channels"),
    ("conv2d", [T((1, 4, 8, 8), "f32"), T((4, 2, 3, 3), "f32")], {"groups": 3},
     "groups=3 must divide"),
    ("conv2d", [T((1, 3, 2, 2), "f32"), T((4, 3, 3, 3), "f32")], {}, "does not fit"),
    ("conv2d", [T((1, 3, 8, 8), "f32"), T((4, 3, 3, 3), "f32")], {"layout": "NCWH"},
     "is not one of 'NCHW', 'NHWC'"),
    ("matmul", [T((2, 3), "f32"), T((4, 5), "f32")], {}, "inner dimensions differ"),
    ("dense", [T((2, 3), "f32"), T((4, 5), "f32")], {}, "w is \\[N, K\\]"),
    ("reshape", [T((2, 3), "f32")], {"shape": [4, 2]}, "6 elements"),
    ("transpose", [T((2, 3), "f32")], {"perm": [0, 0]}, "not a permutation"),
    ("concat", [T((2, 3), "f32"), T((3, 3), "f32")], {"axis": 1}, "must agree"),
    ("split", [T((2, 5), "f32")], {"axis": 1, "sizes": [2, 2]}, "sum to axis 1"),
    ("gather", [T((5, 2), "f32"), T((3,), "f32")], {}, "i32 or i64"),
    ("batch_norm", [T((1, 3, 4, 4), "f32")] + [T((4,), "f32")] * 4, {}, "must be \\[3\\]"),
    ("layer_norm", [T((2, 8), "f32"), T((7,), "f32")], {}, "must broadcast"),
    ("softmax", [T((2, 8), "i32")], {}, "float tensor"),
    ("pad", [T((2, 3), "f32")], {"pads": [1, 1]}, "needs 4"),
    ("max_pool2d", [T((1, 1, 4, 4), "f32")], {"kernel": [2, 2], "pads": [2, 0, 0, 0]},
     "smaller than the"),
    ("reduce_sum", [T((2, 3), "f32")], {"axes": [1, -1]}, "repeat an axis"),
    ("topk", [T((2, 3), "f32")], {"k": 4}, "k=4 must be in 0..3"),
    ("resize", [T((1, 1, 4, 4), "f32")], {"scales": [1.0, 2.0]}, "has rank 4"),
])
def test_type_inference_errors(op, types, attrs, message):
    with pytest.raises(OpError, match=message):
        infer(op, types, **attrs)
