"""ONNX importer: per-op checks against onnxruntime on small hand-built models, import-time
folding, naming, and the errors a malformed or unsupported model gets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import ImportError_, NpuccError, UnsupportedOpsError
from compiler.frontends import from_onnx
from compiler.frontends.onnx import SUPPORTED_OPS
from compiler.ir import interpret, parse, verify

F = TensorProto.FLOAT
TOL = 1e-5


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: (name, elem_type, shape) triples; inits: name -> array."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run_ort(model: onnx.ModelProto, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model: onnx.ModelProto, feeds, tol: float = TOL):
    """Import, verify, round-trip the text, and compare with onnxruntime."""
    g = from_onnx(model)
    verify(g)
    text = str(g)
    assert str(parse(text)) == text
    got = interpret(g, feeds)
    want = run_ort(model, feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if b.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            scale = max(float(np.abs(b).max()), 1e-30) if b.size else 1.0
            assert float(np.abs(a.astype(np.float64) - b).max(initial=0)) / scale <= tol
    return g


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def unary_model(op, shape, out_shape=None, inits=(), extra_inputs=(), opset=17, **attrs):
    """x -> op(x, *extra_inputs) -> y."""
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], name=f"{op.lower()}_0", **attrs)
    return make_model([node], [("x", F, shape)], [("y", F, out_shape)], inits, opset)


# -- per-op numerics ---------------------------------------------------------------------
CASES = {
    "conv_group_pad_stride_dil": lambda: unary_model(
        "Conv", [1, 4, 11, 9], None, {"w": rnd(6, 2, 3, 3, seed=1), "b": rnd(6, seed=2)},
        ["w", "b"], group=2, pads=[1, 2, 0, 1], strides=[2, 1], dilations=[1, 2]),
    "conv_same_upper": lambda: unary_model(
        "Conv", [2, 3, 7, 8], None, {"w": rnd(5, 3, 3, 3, seed=1)}, ["w"],
        auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_depthwise": lambda: unary_model(
        "Conv", [1, 8, 6, 6], None, {"w": rnd(8, 1, 3, 3, seed=1)}, ["w"], group=8,
        pads=[1, 1, 1, 1]),
    "conv_1d": lambda: unary_model(
        "Conv", [1, 3, 10], None, {"w": rnd(4, 3, 3, seed=1)}, ["w"], pads=[1, 1]),
    "conv_transpose": lambda: unary_model(
        "ConvTranspose", [1, 4, 5, 6], None, {"w": rnd(4, 3, 3, 3, seed=1),
                                              "b": rnd(3, seed=2)},
        ["w", "b"], strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 0]),
    "conv_transpose_group": lambda: unary_model(
        "ConvTranspose", [1, 4, 4, 4], None, {"w": rnd(4, 2, 2, 2, seed=1)}, ["w"],
        group=2, strides=[2, 2]),
    "max_pool_ceil": lambda: unary_model(
        "MaxPool", [1, 2, 9, 10], None, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "max_pool_pads": lambda: unary_model(
        "MaxPool", [1, 2, 8, 8], None, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avg_pool_pads_exclude": lambda: unary_model(
        "AveragePool", [1, 2, 7, 7], None, kernel_shape=[3, 3], strides=[2, 2],
        pads=[1, 1, 1, 1]),
    "avg_pool_pads_include": lambda: unary_model(
        "AveragePool", [1, 2, 7, 7], None, kernel_shape=[3, 3], strides=[2, 2],
        pads=[1, 1, 1, 1], count_include_pad=1),
    "avg_pool_1d": lambda: unary_model("AveragePool", [1, 2, 9], None, kernel_shape=[3]),
    "global_avg_pool": lambda: unary_model("GlobalAveragePool", [2, 3, 5, 4], None),
    "global_max_pool": lambda: unary_model("GlobalMaxPool", [2, 3, 5, 4], None),
    "batch_norm": lambda: unary_model(
        "BatchNormalization", [2, 3, 4, 4], None,
        {"s": rnd(3, seed=1), "b": rnd(3, seed=2), "m": rnd(3, seed=3),
         "v": np.abs(rnd(3, seed=4)) + 0.5}, ["s", "b", "m", "v"], epsilon=1e-3),
    "instance_norm": lambda: unary_model(
        "InstanceNormalization", [2, 3, 4, 5], None, {"s": rnd(3, seed=1), "b": rnd(3, seed=2)},
        ["s", "b"]),
    "layer_norm": lambda: unary_model(
        "LayerNormalization", [2, 5, 8], None, {"s": rnd(8, seed=1), "b": rnd(8, seed=2)},
        ["s", "b"]),
    "layer_norm_axis1": lambda: unary_model(
        "LayerNormalization", [2, 3, 4], None, {"s": rnd(3, 4, seed=1)}, ["s"], axis=1),
    "lrn": lambda: unary_model("LRN", [1, 6, 3, 3], None, size=3, alpha=1e-2, beta=0.5),
    "softmax_axis1": lambda: unary_model("Softmax", [2, 5, 3], None, axis=1),
    "log_softmax": lambda: unary_model("LogSoftmax", [2, 7], None),
    "prelu": lambda: unary_model("PRelu", [1, 3, 4, 4], None, {"s": rnd(3, 1, 1, seed=1)},
                                 ["s"]),
    "leaky_relu": lambda: unary_model("LeakyRelu", [3, 4], None, alpha=0.2),
    "elu": lambda: unary_model("Elu", [3, 4], None, alpha=0.7),
    "hard_sigmoid": lambda: unary_model("HardSigmoid", [3, 4], None),
    "gelu_tanh": lambda: unary_model("Gelu", [3, 4], None, opset=20, approximate="tanh"),
    "erf": lambda: unary_model("Erf", [3, 4], None),
    "tanh": lambda: unary_model("Tanh", [3, 4], None),
    "clip_const_bounds": lambda: unary_model(
        "Clip", [3, 4], None, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}, ["lo", "hi"]),
    "clip_max_only": lambda: unary_model(
        "Clip", [3, 4], None, {"hi": np.float32(0.2)}, ["", "hi"]),
    "matmul_batched": lambda: unary_model("MatMul", [2, 3, 4, 5], None, {"w": rnd(5, 6)},
                                          ["w"]),
    "gemm_trans": lambda: unary_model(
        "Gemm", [3, 5], None, {"w": rnd(4, 5, seed=1), "c": rnd(4, seed=2)}, ["w", "c"],
        transB=1, alpha=0.5, beta=2.0),
    "pow_sqrt_div": lambda: make_model(
        [helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("Sqrt", ["p"], ["s"]),
         helper.make_node("Div", ["x", "s"], ["y"])],
        [("x", F, [3, 4])], [("y", F, None)], {"two": np.float32(2.0)}),
    "reshape_zero_minus_one": lambda: unary_model(
        "Reshape", [2, 3, 4], None, {"shape": np.array([0, -1], np.int64)}, ["shape"]),
    "flatten": lambda: unary_model("Flatten", [2, 3, 4, 5], None, axis=2),
    "squeeze_unsqueeze": lambda: make_model(
        [helper.make_node("Squeeze", ["x", "a"], ["s"]),
         helper.make_node("Unsqueeze", ["s", "b"], ["y"])],
        [("x", F, [1, 3, 1, 4])], [("y", F, None)],
        {"a": np.array([0, 2], np.int64), "b": np.array([-1], np.int64)}),
    "transpose": lambda: unary_model("Transpose", [2, 3, 4], None, perm=[1, 2, 0]),
    "slice_negative_step": lambda: unary_model(
        "Slice", [5, 6], None,
        {"st": np.array([-1, 1], np.int64), "en": np.array([-10**18, 5], np.int64),
         "ax": np.array([0, 1], np.int64), "sp": np.array([-2, 2], np.int64)},
        ["st", "en", "ax", "sp"]),
    "split_input_sizes": lambda: make_model(
        [helper.make_node("Split", ["x", "sz"], ["a", "b"], axis=1)],
        [("x", F, [2, 5])], [("a", F, None), ("b", F, None)], {"sz": np.array([2, 3])}),
    "split_num_outputs": lambda: make_model(
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)],
        [("x", F, [2, 7])], [("a", F, None), ("b", F, None), ("c", F, None)], opset=18),
    "concat": lambda: make_model(
        [helper.make_node("Concat", ["x", "k"], ["y"], axis=-1)],
        [("x", F, [2, 3])], [("y", F, None)], {"k": rnd(2, 2)}),
    "gather_negative": lambda: unary_model(
        "Gather", [5, 4], None, {"i": np.array([[0, -1], [2, 3]], np.int64)}, ["i"], axis=0),
    "gather_embedding": lambda: make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["y"])],
        [("ids", TensorProto.INT64, [2, 3])], [("y", F, None)], {"emb": rnd(10, 4)}),
    "expand": lambda: unary_model("Expand", [3, 1], None, {"s": np.array([2, 3, 4])}, ["s"]),
    "tile": lambda: unary_model("Tile", [2, 3], None, {"r": np.array([2, 1])}, ["r"]),
    "pad_reflect": lambda: unary_model("Pad", [1, 2, 4, 4], None,
                                       {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1])}, ["p"],
                                       mode="reflect"),
    "pad_constant_axes": lambda: unary_model(
        "Pad", [2, 3], None, {"p": np.array([1, 2]), "v": np.float32(1.5),
                              "a": np.array([1])}, ["p", "v", "a"], opset=18),
    "resize_linear": lambda: unary_model(
        "Resize", [1, 2, 4, 5], None, {"sc": np.array([1, 1, 2, 1.5], np.float32)},
        ["", "sc"], mode="linear"),
    "resize_nearest_sizes": lambda: unary_model(
        "Resize", [1, 2, 4, 5], None, {"sz": np.array([1, 2, 7, 3])}, ["", "", "sz"],
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "resize_cubic_align": lambda: unary_model(
        "Resize", [1, 1, 4, 4], None, {"sc": np.array([1, 1, 2, 2], np.float32)},
        ["", "sc"], mode="cubic", coordinate_transformation_mode="align_corners"),
    "resize_linear_antialias": lambda: unary_model(
        "Resize", [1, 2, 8, 9], None, {"sc": np.array([1, 1, 0.5, 0.4], np.float32)},
        ["", "sc"], opset=18, mode="linear", antialias=1),
    "resize_cubic_antialias": lambda: unary_model(
        "Resize", [1, 1, 9, 8], None, {"sz": np.array([1, 1, 4, 3])}, ["", "", "sz"],
        opset=18, mode="cubic", antialias=1),
    "resize_tf_crop_and_resize": lambda: unary_model(
        "Resize", [1, 1, 6, 6], None,
        {"roi": np.array([0, 0, 0.2, 0.4, 1, 1, 0.9, 1.3], np.float32),
         "sz": np.array([1, 1, 4, 5])}, ["roi", "", "sz"], mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-1.0),
    "reduce_mean_attr_axes": lambda: unary_model("ReduceMean", [2, 3, 4], None, axes=[-1]),
    "reduce_sum_input_axes": lambda: unary_model(
        "ReduceSum", [2, 3, 4], None, {"a": np.array([0, 2])}, ["a"], keepdims=0),
    "reduce_max_opset18": lambda: unary_model(
        "ReduceMax", [2, 3, 4], None, {"a": np.array([1])}, ["a"], opset=18),
    "reduce_l2": lambda: unary_model("ReduceL2", [2, 3, 4], None, axes=[1]),
    "reduce_log_sum_exp": lambda: unary_model("ReduceLogSumExp", [2, 3], None, axes=[1]),
    "cumsum_reverse_exclusive": lambda: unary_model(
        "CumSum", [3, 4], None, {"a": np.array(1)}, ["a"], exclusive=1, reverse=1),
    "trilu_lower": lambda: unary_model("Trilu", [2, 4, 5], None, {"k": np.array(1)}, ["k"],
                                       upper=0),
    "depth_to_space_dcr": lambda: unary_model("DepthToSpace", [1, 8, 2, 3], None,
                                              blocksize=2),
    "depth_to_space_crd": lambda: unary_model("DepthToSpace", [1, 8, 2, 3], None,
                                              blocksize=2, mode="CRD"),
    "space_to_depth": lambda: unary_model("SpaceToDepth", [1, 2, 4, 6], None, blocksize=2),
    "group_norm_opset21": lambda: unary_model(
        "GroupNormalization", [2, 6, 3, 3], None, {"s": rnd(6, seed=1), "b": rnd(6, seed=2)},
        ["s", "b"], opset=21, num_groups=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    model = CASES[case]()
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[vi.name] = np.random.default_rng(0).integers(0, 10, shape).astype(np.int64)
        else:
            feeds[vi.name] = rnd(*shape, seed=5)
    check(model, feeds)


def test_where_equal_cast_argmax_range():
    x = ("x", F, [2, 5])
    nodes = [
        helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
        helper.make_node("Range", ["zero", "five", "one"], ["r"]),
        helper.make_node("Unsqueeze", ["am", "ax"], ["am2"]),
        helper.make_node("Equal", ["r", "am2"], ["eq"]),
        helper.make_node("Cast", ["eq"], ["eqf"], to=F),
        helper.make_node("Where", ["eq", "x", "zf"], ["y"]),
        helper.make_node("Add", ["y", "eqf"], ["out"]),
    ]
    model = make_model(nodes, [x], [("out", F, None)],
                       {"zero": np.array(0), "five": np.array(5), "one": np.array(1),
                        "ax": np.array([1]), "zf": np.float32(0)})
    check(model, {"x": rnd(2, 5)})


def test_isnan_isinf():
    nodes = [helper.make_node("IsNaN", ["x"], ["n"]),
             helper.make_node("IsInf", ["x"], ["i"]),
             helper.make_node("IsInf", ["x"], ["p"], detect_negative=0)]
    b = TensorProto.BOOL
    model = make_model(nodes, [("x", F, [6])], [("n", b, None), ("i", b, None),
                                                ("p", b, None)], opset=20)
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0, -2.0], np.float32)
    check(model, {"x": x})


def test_attention_shape_subgraph_folds():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape folds to a static reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]),
        helper.make_node("Unsqueeze", ["t", "ax"], ["t1"]),
        helper.make_node("Concat", ["b1", "t1", "heads", "hd"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["r"], name="split_heads"),
        helper.make_node("Transpose", ["r"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "qt"], ["att"]),
        helper.make_node("Trilu", ["att"], ["masked"], upper=0),
        helper.make_node("Softmax", ["masked"], ["y"]),
    ]
    inits = {"i0": np.array(0), "i1": np.array(1), "ax": np.array([0]),
             "heads": np.array([2]), "hd": np.array([4])}
    model = make_model(nodes, [("x", F, [1, 6, 8])], [("y", F, None)], inits)
    g = check(model, {"x": rnd(1, 6, 8)})
    ops = g.op_counts()
    assert "shape" not in ops and "gather" not in ops and "concat" not in ops
    (reshape,) = g.find("reshape")
    assert reshape.attrs["shape"] == [1, 6, 2, 4]
    assert reshape.name == "split_heads"
    assert reshape.output.name == "r"


# -- structure: vanishing ops, names, folding, placeholders ------------------------------------
def test_dropout_and_identity_vanish_and_names_are_kept():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu_1"),
             helper.make_node("Dropout", ["a"], ["b"], name="drop"),
             helper.make_node("Identity", ["b"], ["c"], name="ident"),
             helper.make_node("Sigmoid", ["c"], ["y"], name="sig")]
    model = make_model(nodes, [("x", F, [2, 3])], [("y", F, None)])
    g = check(model, {"x": rnd(2, 3)})
    assert [n.op for n in g.nodes] == ["relu", "sigmoid"]
    assert [n.name for n in g.nodes] == ["relu_1", "sig"]
    assert [v.name for v in g.values()] == ["x", "a", "y"]


def test_identity_kept_where_outputs_alias():
    nodes = [helper.make_node("Identity", ["x"], ["y"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Identity", ["r"], ["r2"])]
    model = make_model(nodes, [("x", F, [2])], [("y", F, None), ("r", F, None),
                                                  ("r2", F, None)])
    g = check(model, {"x": rnd(2)})
    assert g.op_counts() == {"relu": 1, "identity": 2}
    assert len({id(v) for v in g.outputs}) == 3


def test_initializers_are_named_weights_and_big_constant_of_shape_is_fill():
    cos = helper.make_node("ConstantOfShape", ["shape"], ["w"],
                           value=numpy_helper.from_array(np.array([0.5], np.float32)))
    small = helper.make_node("ConstantOfShape", ["s2"], ["k"],
                             value=numpy_helper.from_array(np.array([2.0], np.float32)))
    nodes = [cos, small, helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "bias.0"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["y"])]
    model = make_model(nodes, [("x", F, [2, 100])], [("y", F, None)],
                       {"shape": np.array([100, 64]), "s2": np.array([64]),
                        "bias.0": rnd(64)})
    g = check(model, {"x": rnd(2, 100)})
    assert g.op_counts()["fill"] == 1
    assert "bias.0" in g.weights
    assert "shape" not in g.weights and "s2" not in g.weights


def test_supported_ops_cover_the_models():
    needed = {"Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "Sum",
              "Reshape", "Gemm", "Softmax", "LRN", "Dropout", "Concat", "ConstantOfShape",
              "Unsqueeze", "Mul", "Add", "GlobalAveragePool", "Transpose", "Flatten", "Shape",
              "Constant", "LayerNormalization", "Gather", "Erf", "Gelu", "Where", "MatMul",
              "Pow", "ReduceMean", "Sqrt", "Div", "Cast", "Expand", "Equal", "Trilu", "Slice",
              "Split", "Tanh", "Sub", "Range", "Identity", "Squeeze", "Resize", "Pad", "Clip"}
    assert needed <= SUPPORTED_OPS
    assert isinstance(SUPPORTED_OPS, frozenset)


# -- errors ----------------------------------------------------------------------------------
def test_two_unsupported_ops_one_error_naming_both():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("NonMaxSuppression", ["a", "a"], ["b"], name="nms_here"),
             helper.make_node("Loop", ["", ""], ["c"], name="the_loop"),
             helper.make_node("Add", ["b", "c"], ["y"])]
    model = make_model(nodes, [("x", F, [1, 2, 4])], [("y", F, None)])
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(model)
    assert [n[:2] for n in e.value.nodes] == [("nms_here", "NonMaxSuppression"),
                                             ("the_loop", "Loop")]
    assert "nms_here" in str(e.value) and "the_loop" in str(e.value)


def test_unknown_ops_and_dynamic_operands_in_one_error():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "ids"], ["a"], name="dyn_reshape"),
             helper.make_node("Custom", ["a"], ["b"], name="custom_op", domain="com.vendor"),
             helper.make_node("Relu", ["b"], ["y"], name="after_custom")]
    model = make_model(nodes, [("x", F, [2, 3]), ("ids", TensorProto.INT64, [2])],
                       [("y", F, None)])
    model.opset_import.append(helper.make_opsetid("com.vendor", 1))
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(model)
    assert [n[:2] for n in e.value.nodes] == [("dyn_reshape", "Reshape"),
                                             ("custom_op", "com.vendor.Custom")]


def test_dynamic_static_operands_are_listed_together():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"], name="dyn_reshape"),
             helper.make_node("Clip", ["a", "lo"], ["y"], name="dyn_clip")]
    model = make_model(nodes, [("x", F, [2, 3]), ("s", TensorProto.INT64, [2]),
                               ("lo", F, [])], [("y", F, None)])
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(model)
    assert [n[0] for n in e.value.nodes] == ["dyn_reshape"]  # dyn_clip depends on it
    assert "computed at run time" in str(e.value)


def test_symbolic_dim_refused_naming_input_and_dim():
    model = make_model([helper.make_node("Relu", ["tokens"], ["y"])],
                       [("tokens", F, ["batch", 8])], [("y", F, None)])
    with pytest.raises(ImportError_, match=r"'tokens'.*dimension 0.*'batch'.*input_shapes"):
        from_onnx(model)
    g = from_onnx(model, input_shapes={"tokens": [3, 8]})
    assert g.inputs[0].shape == (3, 8) and g.outputs[0].shape == (3, 8)
    with pytest.raises(ImportError_, match="unknown input"):
        from_onnx(model, input_shapes={"nope": [1]})
    with pytest.raises(ImportError_, match="fixes it at 8"):
        from_onnx(model, input_shapes={"tokens": [3, 9]})


@pytest.mark.parametrize("opset", [6, 22])
def test_opset_out_of_range_refused(opset):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])],
                       [("y", F, None)], opset=opset)
    with pytest.raises(ImportError_, match=rf"opset {opset}.*13 to 21.*version_converter"):
        from_onnx(model)


def test_old_opset_is_upgraded_by_the_version_converter():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])],
                       [("y", F, None)], opset=11)
    g = from_onnx(model)
    assert [n.op for n in g.nodes] == ["relu"]


def _relu_conv_model():
    return unary_model("Conv", [1, 3, 8, 8], None, {"w": rnd(4, 3, 3, 3)}, ["w"])


def test_truncated_bytes_and_missing_file(tmp_path):
    data = _relu_conv_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportError_):
        from_onnx(path)
    with pytest.raises(ImportError_, match="no ONNX file"):
        from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ImportError_):
        from_onnx(b"\x08\x07garbage")
    path.write_bytes(data)
    assert from_onnx(str(path)).op_counts()["conv2d"] == 1


def test_dropped_input_is_our_error():
    model = _relu_conv_model()
    del model.graph.input[:]
    with pytest.raises(ImportError_, match="'x'"):
        from_onnx(model)


def test_wrong_rank_and_bad_attributes_are_our_errors():
    bad_weight = unary_model("Conv", [1, 3, 8, 8], None, {"w": rnd(4, 3, 3)}, ["w"])
    bad_perm = unary_model("Transpose", [2, 3], None, perm=[0, 0])
    bad_axis = unary_model("Softmax", [2, 3], None, axis=5)
    missing_attr = unary_model("LRN", [1, 3, 4, 4], None)
    for model in (bad_weight, bad_perm, bad_axis, missing_attr):
        with pytest.raises(NpuccError):
            from_onnx(model)


def test_corrupted_fields_never_leak_library_errors():
    rng = np.random.default_rng(0)
    data = bytearray(CASES["conv_group_pad_stride_dil"]().SerializeToString())
    for _ in range(40):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(mutated), 4):
            mutated[pos] = int(rng.integers(0, 256))
        try:
            from_onnx(bytes(mutated))
        except NpuccError:
            pass


def test_topk_values_and_indices():
    x = rnd(3, 7)
    x[0, 1] = x[0, 4]  # a tie: the lower index comes first
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=1)
    model = make_model([node], [("x", F, [3, 7])],
                       [("v", F, None), ("i", TensorProto.INT64, None)], {"k": np.array([3])})
    check(model, {"x": x})
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=0, largest=0)
    model = make_model([node], [("x", F, [3, 7])],
                       [("v", F, None), ("i", TensorProto.INT64, None)], {"k": np.array([2])})
    check(model, {"x": x})
