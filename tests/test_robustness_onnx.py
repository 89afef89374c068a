"""Mutated ONNX models: each is either imported (and the graph verifies) or refused with one
of our errors (:class:`NpuccError`); no other exception escapes ``from_onnx``.

Seeds: the digits CNN shipped in examples/, a small attention block built with
onnx.helper (its reshape shape computed from Shape/Gather/Concat, so folding is on the
path), and a few of onnx's conformance models (static operands bound as initializers, as
in tests/onnx_conformance.py). Every seed imports cleanly before mutation.

Mutations (one to four per example): dropped, renamed, dangling or rewired node inputs;
wrong ranks, shapes and element types on graph inputs and initializers; initializer data
that does not match its dims; bad attribute values and types; removed attributes;
changed op types; wrong or missing opsets; duplicated, removed and shuffled nodes;
added, dropped or renamed node and graph outputs. Serialized models are also truncated or bit-flipped and given to
``from_onnx`` as bytes or as a file path.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import NpuccError
from compiler.frontends import from_onnx
from compiler.frontends.onnx import SUPPORTED_OPS
from compiler.ir import verify
from tests.conftest import ROOT

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def attention_block(seq: int = 6, hidden: int = 8, heads: int = 2) -> onnx.ModelProto:
    """Self-attention + residual + LayerNorm, with a Shape-derived reshape target."""
    rng = np.random.default_rng(0)
    dh = hidden // heads

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    inits = {
        "wq": w(hidden, hidden), "wk": w(hidden, hidden), "wv": w(hidden, hidden),
        "wo": w(hidden, hidden), "bq": w(hidden), "scale": np.array(math.sqrt(dh), np.float32),
        "mask": np.triu(np.full((seq, seq), -1e4, np.float32), 1),
        "heads": np.array([heads, dh], np.int64), "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64), "axes0": np.array([0], np.int64),
        "ln_s": np.ones(hidden, np.float32), "ln_b": np.zeros(hidden, np.float32),
        "flat": np.array([1, seq, hidden], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        n("Add", ["q0", "bq"], ["q1"], name="q_bias"),
        n("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        n("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        n("Shape", ["x"], ["xs"], name="shape"),
        n("Gather", ["xs", "zero"], ["b"], axis=0, name="batch"),
        n("Gather", ["xs", "one"], ["s"], axis=0, name="seq"),
        n("Concat", ["b", "s", "heads"], ["split_shape"], axis=0, name="split_shape"),
        n("Reshape", ["q1", "split_shape"], ["q2"], name="q_split"),
        n("Reshape", ["k0", "split_shape"], ["k2"], name="k_split"),
        n("Reshape", ["v0", "split_shape"], ["v2"], name="v_split"),
        n("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3], name="q_t"),
        n("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1], name="k_t"),
        n("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3], name="v_t"),
        n("MatMul", ["q", "kt"], ["att0"], name="scores"),
        n("Div", ["att0", "scale"], ["att1"], name="scaled"),
        n("Add", ["att1", "mask"], ["att2"], name="masked"),
        n("Softmax", ["att2"], ["p"], axis=-1, name="softmax"),
        n("MatMul", ["p", "v"], ["ctx0"], name="context"),
        n("Transpose", ["ctx0"], ["ctx1"], perm=[0, 2, 1, 3], name="ctx_t"),
        n("Reshape", ["ctx1", "flat"], ["ctx"], name="merge"),
        n("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        n("Add", ["o", "x"], ["r"], name="residual"),
        n("LayerNormalization", ["r", "ln_s", "ln_b"], ["y"], axis=-1, epsilon=1e-5,
          name="ln"),
        n("ReduceMean", ["y", "axes0"], ["m"], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", F, [1, seq, hidden])],
        [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("m", F, None)],
        [numpy_helper.from_array(a, k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


CONFORMANCE_SEEDS = [
    "test_slice_neg_steps", "test_constant_pad_axes", "test_resize_upsample_scales_linear",
    "test_resize_downsample_sizes_nearest", "test_split_variable_parts_2d_opset18",
    "test_split_equal_parts_2d",
    "test_gather_negative_indices", "test_reduce_mean_keepdims_example",
    "test_expand_dim_changed", "test_where_example", "test_conv_with_strides_padding",
    "test_maxpool_2d_pads", "test_layer_normalization_4d_axis1_expanded",
]


def _conformance_seeds() -> list[onnx.ModelProto]:
    from tests.onnx_conformance import cases_of

    cases = {c.name: c for c in cases_of(
        "slice", "pad", "resize", "split", "gather", "reducemean", "expand", "where", "conv",
        "maxpool", "layernormalization")}
    return [cases[n].model for n in CONFORMANCE_SEEDS if n in cases]


@functools.cache
def seeds() -> tuple[onnx.ModelProto, ...]:
    models = [onnx.load(str(ROOT / "examples" / "digits_cnn.onnx")), attention_block(),
              *_conformance_seeds()]
    for m in models:  # the mutations start from models that import
        verify(from_onnx(m))
    return tuple(models)


# -- mutations ------------------------------------------------------------------------------
SMALL_INTS = [-2, -1, 0, 1, 2, 3]
INTS = [-(2**63), -(2**31), -7, *SMALL_INTS, 5, 64, 2**31 - 1, 2**40]
FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-30, 0.5, 3.0, 1e30]
STRS = ["", "NOTSET", "SAME_UPPER", "VALID", "constant", "reflect", "linear", "cubic",
        "none", "tanh", "\u00e9\u00e8", "x" * 40]
ELEM_TYPES = [0, F, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, I64,
              TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.STRING,
              TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.COMPLEX64, 999]


def _pick(draw, seq):
    return seq[draw(st.integers(0, len(seq) - 1))]


def _value_names(m) -> list[str]:
    names = [vi.name for vi in m.graph.input] + [t.name for t in m.graph.initializer]
    return names + [o for n in m.graph.node for o in n.output]


def mut_drop_input(m, draw):
    nodes = [n for n in m.graph.node if n.input]
    if nodes:
        node = _pick(draw, nodes)
        j = draw(st.integers(0, len(node.input) - 1))
        if draw(st.booleans()):
            del node.input[j]
        else:
            node.input[j] = ""


def mut_rename_input(m, draw):
    nodes = [n for n in m.graph.node if n.input]
    if nodes:
        node = _pick(draw, nodes)
        j = draw(st.integers(0, len(node.input) - 1))
        # a dangling name, or another value of the model (possibly defined later: a cycle)
        node.input[j] = draw(st.sampled_from(["dangling", *_value_names(m)]))


def mut_node_output(m, draw):
    node = _pick(draw, m.graph.node) if m.graph.node else None
    if node is not None and node.output:
        j = draw(st.integers(0, len(node.output) - 1))
        kind = draw(st.sampled_from(["rename", "drop", "add"]))
        if kind == "drop":
            del node.output[j]
        elif kind == "add":
            node.output.append(draw(st.sampled_from(["extra", *_value_names(m)])))
        else:
            node.output[j] = draw(st.sampled_from(["", "renamed", *_value_names(m)]))


def mut_graph_io(m, draw):
    kind = draw(st.sampled_from(["rename_in", "drop_in", "rename_out", "drop_out",
                                 "add_out", "dup_in"]))
    g = m.graph
    if kind == "rename_in" and g.input:
        _pick(draw, g.input).name = draw(st.sampled_from(["renamed", *_value_names(m)]))
    elif kind == "drop_in" and g.input:
        del g.input[draw(st.integers(0, len(g.input) - 1))]
    elif kind == "rename_out" and g.output:
        _pick(draw, g.output).name = draw(st.sampled_from(["nowhere", *_value_names(m)]))
    elif kind == "drop_out" and g.output:
        del g.output[draw(st.integers(0, len(g.output) - 1))]
    elif kind == "add_out":
        g.output.append(helper.make_tensor_value_info(
            draw(st.sampled_from(_value_names(m))), F, None))
    elif kind == "dup_in" and g.input:
        g.input.append(_pick(draw, g.input))


def _draw_dims(draw, dims: list[int]) -> list[int]:
    kind = draw(st.sampled_from(["add", "remove", "change", "zero", "huge"]))
    dims = list(dims)
    if kind == "add" or not dims:
        dims.insert(draw(st.integers(0, len(dims))), draw(st.sampled_from([1, 2, 3, 7])))
    elif kind == "remove":
        del dims[draw(st.integers(0, len(dims) - 1))]
    else:
        i = draw(st.integers(0, len(dims) - 1))
        dims[i] = {"change": draw(st.sampled_from([1, 2, 5, 9])), "zero": 0,
                   "huge": 2**40}[kind]
    return dims


def mut_input_shape(m, draw):
    if not m.graph.input:
        return
    vi = _pick(draw, m.graph.input)
    tt = vi.type.tensor_type
    kind = draw(st.sampled_from(["dims", "symbolic", "no_shape", "elem_type", "negative"]))
    if kind == "elem_type":
        tt.elem_type = draw(st.sampled_from(ELEM_TYPES))
        return
    if kind == "no_shape":
        tt.ClearField("shape")
        return
    dims = [d.dim_value for d in tt.shape.dim]
    tt.shape.Clear()
    new = _draw_dims(draw, dims)
    for i, d in enumerate(new):
        dim = tt.shape.dim.add()
        if kind == "symbolic" and i == 0:
            dim.dim_param = "batch"
        elif kind == "negative" and i == 0:
            dim.dim_value = -3
        else:
            dim.dim_value = d


def mut_input_dim(m, draw):
    """One dimension of a graph input changed, rank kept (often still importable)."""
    if not m.graph.input:
        return
    dims = _pick(draw, m.graph.input).type.tensor_type.shape.dim
    if dims:
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.sampled_from([1, 2, 3,
                                                                                    4, 8]))


def mut_initializer(m, draw):
    if not m.graph.initializer:
        return
    t = _pick(draw, m.graph.initializer)
    kind = draw(st.sampled_from(["reshape", "dims_only", "elem_type", "values", "drop",
                                 "scalar"]))
    if kind == "drop":
        m.graph.initializer.remove(t)
        return
    if kind == "elem_type":  # the raw bytes no longer match the declared type
        t.data_type = draw(st.sampled_from(ELEM_TYPES))
        return
    if kind == "dims_only":  # dims that the data does not fill
        new = _draw_dims(draw, list(t.dims))
        del t.dims[:]
        t.dims.extend(new)
        return
    try:
        arr = numpy_helper.to_array(t)
    except Exception:  # an earlier mutation broke this tensor already
        return
    if kind == "reshape":
        shape = _draw_dims(draw, list(arr.shape))
        shape = [min(d, 9) for d in shape]
        new = np.resize(arr, shape) if arr.size else np.zeros(shape, arr.dtype)
    elif kind == "scalar":
        new = np.asarray(arr.reshape(-1)[0] if arr.size else 0, arr.dtype)
    else:
        vals = INTS if arr.dtype.kind in "iu" else FLOATS
        new = arr.copy().reshape(-1)
        if new.size:
            with np.errstate(all="ignore"):
                new[draw(st.integers(0, new.size - 1))] = np.asarray(
                    draw(st.sampled_from(vals))).astype(arr.dtype)
        new = new.reshape(arr.shape)
    t.CopyFrom(numpy_helper.from_array(new, t.name))


def _new_attr_value(draw, a):
    kind = draw(st.sampled_from(["same_type", "other_type"]))
    if kind == "other_type":
        return draw(st.sampled_from([0, 7, -1.5, "bogus", [1, 2], [0.5], ["a"], [],
                                     [2**40, -(2**40)]]))
    if a.type == onnx.AttributeProto.INT:
        return draw(st.sampled_from(SMALL_INTS if draw(st.booleans()) else INTS))
    if a.type == onnx.AttributeProto.FLOAT:
        return draw(st.sampled_from(FLOATS))
    if a.type == onnx.AttributeProto.STRING:
        return draw(st.sampled_from(STRS))
    if a.type == onnx.AttributeProto.INTS:
        vals = list(a.ints)
        op = draw(st.sampled_from(["drop", "extend", "set", "empty"]))
        if op == "drop" and vals:
            del vals[draw(st.integers(0, len(vals) - 1))]
        elif op == "extend":
            vals.append(draw(st.sampled_from(INTS)))
        elif op == "set" and vals:
            pool = SMALL_INTS if draw(st.booleans()) else INTS
            vals[draw(st.integers(0, len(vals) - 1))] = draw(st.sampled_from(pool))
        else:
            vals = []
        return vals
    if a.type == onnx.AttributeProto.FLOATS:
        return [draw(st.sampled_from(FLOATS)) for _ in range(draw(st.integers(0, 3)))]
    return draw(st.sampled_from(INTS))


def mut_attribute(m, draw):
    nodes = list(m.graph.node)
    if not nodes:
        return
    node = _pick(draw, nodes)
    kind = draw(st.sampled_from(["change", "remove", "add"]))
    if kind == "add" or not node.attribute:
        name = draw(st.sampled_from(["axis", "perm", "pads", "kernel_shape", "group",
                                     "keepdims", "mode", "to", "value", "num_outputs",
                                     "bogus"]))
        value = draw(st.sampled_from([0, -1, 3, [1, 0], [0, 0, 0, 0], "nearest", 1.5]))
        del_idx = [i for i, a in enumerate(node.attribute) if a.name == name]
        for i in reversed(del_idx):
            del node.attribute[i]
        node.attribute.append(helper.make_attribute(name, value))
        return
    j = draw(st.integers(0, len(node.attribute) - 1))
    if kind == "remove":
        del node.attribute[j]
        return
    a = node.attribute[j]
    value = _new_attr_value(draw, a)
    lists = (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS)
    kind = (a.type if a.type in lists else onnx.AttributeProto.INTS) if value == [] else None
    node.attribute[j].CopyFrom(helper.make_attribute(a.name, value, attr_type=kind))


def mut_op_type(m, draw):
    if m.graph.node:
        node = _pick(draw, m.graph.node)
        node.op_type = draw(st.sampled_from([*sorted(SUPPORTED_OPS), "NoSuchOp", "If"]))
        if draw(st.integers(0, 9)) == 0:
            node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "bogus"]))


def mut_opset(m, draw):
    kind = draw(st.sampled_from(["version", "remove", "domain", "ir_version"]))
    if kind == "version" and m.opset_import:
        m.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 12, 13, 17, 21, 22, 28,
                                                          99, -1]))
    elif kind == "remove":
        del m.opset_import[:]
    elif kind == "domain" and m.opset_import:
        m.opset_import[0].domain = "com.example"
    else:
        m.ir_version = draw(st.sampled_from([0, 3, 7, 10, 99]))


def mut_nodes(m, draw):
    nodes = list(m.graph.node)
    if not nodes:
        return
    kind = draw(st.sampled_from(["duplicate", "remove", "shuffle", "swap"]))
    if kind == "duplicate":
        node = _pick(draw, nodes)
        m.graph.node.insert(draw(st.integers(0, len(nodes))), node)
    elif kind == "remove":
        del m.graph.node[draw(st.integers(0, len(nodes) - 1))]
    else:
        if kind == "shuffle":
            order = draw(st.permutations(range(len(nodes))))
        else:
            i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
            order = list(range(len(nodes)))
            order[i], order[j] = order[j], order[i]
        new = [nodes[i] for i in order]
        del m.graph.node[:]
        m.graph.node.extend(new)


MUTATIONS = [mut_drop_input, mut_rename_input, mut_node_output, mut_graph_io,
             mut_input_shape, mut_input_dim, mut_initializer, mut_attribute, mut_op_type,
             mut_opset, mut_nodes]


@st.composite
def mutated_models(draw):
    """(how to pass it, model or bytes): a mutated ModelProto, or serialized bytes."""
    seed = draw(st.sampled_from(seeds()))
    m = onnx.ModelProto()
    m.CopyFrom(seed)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        draw(st.sampled_from(MUTATIONS))(m, draw)
    form = draw(st.sampled_from(["proto", "proto", "proto", "bytes", "path"]))
    if form == "proto":
        return form, m
    data = bytearray(m.SerializeToString())
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "both"]))
    if damage in ("truncate", "both") and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    if damage in ("flip", "both") and data:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    return form, bytes(data)


def _import(form: str, obj, folder):
    if form == "path":
        path = folder / "model.onnx"
        path.write_bytes(obj)
        return from_onnx(str(path) if len(obj) % 2 else path)
    return from_onnx(obj)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mutated-onnx")


def test_seeds_import():
    assert len(seeds()) == 2 + len(CONFORMANCE_SEEDS)


@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example=mutated_models())
def test_mutated_onnx_models_import_or_refuse(example, model_dir):
    form, obj = example
    try:
        g = _import(form, obj, model_dir)
    except NpuccError as e:
        # the importer names its own failures so: a refusal must be about the model
        assert "importer bug" not in str(e), str(e)
        return
    verify(g)
