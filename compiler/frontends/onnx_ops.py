"""ONNX → IR converters: elementwise, shape, reduction and linear-algebra ops.

Convolution, pooling, normalisation, pad and resize live in :mod:`onnx_ops_nn`.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.frontends.onnx_ctx import Ctx, Unsupported, converter, onnx_dtype
from compiler.ir import onnx_names
from compiler.ir.graph import Value
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType, from_numpy_dtype, is_float


def f32(x: float) -> float:
    """An ONNX float attribute as the shortest Python float naming the same f32."""
    return float(str(np.float32(x)))


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise Unsupported(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


# -- elementwise --------------------------------------------------------------------------
# the shared table (compiler/ir/onnx_names.py), inverted; Identity, Max and Min (variadic in
# ONNX) have their own converters
_UNARY = {name: op for op, name in onnx_names.unary().items() if op != "identity"}
_BINARY = {name: op for op, name in onnx_names.binary().items() if op not in ("max", "min")}


@converter(*_UNARY)
def _unary(c: Ctx):
    return [c.emit(_UNARY[c.op_type], c.value(0))]


@converter(*_BINARY)
def _binary(c: Ctx):
    return [c.emit(_BINARY[c.op_type], c.value(0), c.value(1))]


@converter("Mod")
def _mod(c: Ctx):
    return [c.emit("mod", c.value(0), c.value(1), fmod=bool(c.attr("fmod", 0)))]


@converter("Max", "Min")
def _maxmin(c: Ctx):
    op = c.op_type.lower()
    acc = c.value(0)
    for i in range(1, c.n_inputs):
        acc = c.emit(op, acc, c.value(i))
    return [acc]


@converter("Sum")
def _sum(c: Ctx):
    if c.n_inputs == 1:
        return [c.raw(0)]
    return [c.emit("sum", *[c.value(i) for i in range(c.n_inputs)])]


@converter("Mean")
def _mean(c: Ctx):
    total = c.value(0) if c.n_inputs == 1 else \
        c.emit("sum", *[c.value(i) for i in range(c.n_inputs)])
    if c.n_inputs == 1:
        return [total]
    return [c.emit("div", total, c.const_value(np.array(c.n_inputs, total.type.np_dtype)))]


@converter("IsNaN")
def _isnan(c: Ctx):
    x = c.value(0)
    if not is_float(x.type.dtype):
        return [np.zeros(x.type.shape, dtype=bool)]
    return [c.emit("logical_not", c.emit("equal", x, x))]


@converter("IsInf")
def _isinf(c: Ctx):
    x = c.value(0)
    pos, neg = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    if not is_float(x.type.dtype) or not (pos or neg):
        return [np.zeros(x.type.shape, dtype=bool)]
    inf = c.const_value(np.array(np.inf if pos else -np.inf, x.type.np_dtype))
    return [c.emit("equal", c.emit("abs", x) if pos and neg else x, inf)]


@converter("Where")
def _where(c: Ctx):
    return [c.emit("where", c.value(0), c.value(1), c.value(2))]


def _cast_to(c: Ctx, dtype: str):
    if c.type(0).dtype == dtype:
        return [c.raw(0)]
    return [c.emit("cast", c.value(0), to=dtype)]


@converter("Cast")
def _cast(c: Ctx):
    to = onnx_dtype(c.attr("to"))
    if to is None:
        raise Unsupported(f"cast to the ONNX element type {c.attr('to')} is not supported")
    return _cast_to(c, to)


@converter("CastLike")
def _cast_like(c: Ctx):
    dtype = c.type(1).dtype
    x = c.const(0)
    if x is not None and dtype != TensorType.of(x).dtype:
        # only the type of 'like' matters: a constant stays a constant (foldable downstream)
        return get_op("cast").reference([x], {"to": dtype})
    return _cast_to(c, dtype)


@converter("Gelu")
def _gelu(c: Ctx):
    return [c.emit("gelu", c.value(0), approximate=c.attr("approximate", "none"))]


@converter("LeakyRelu")
def _leaky(c: Ctx):
    return [c.emit("leaky_relu", c.value(0), alpha=f32(c.attr("alpha", 0.01)))]


@converter("HardSigmoid")
def _hard_sigmoid(c: Ctx):
    return [c.emit("hard_sigmoid", c.value(0), alpha=f32(c.attr("alpha", 0.2)),
                   beta=f32(c.attr("beta", 0.5)))]


@converter("Clip")
def _clip(c: Ctx):
    lo = c.static(1, "min") if c.has(1) else None
    hi = c.static(2, "max") if c.has(2) else None
    attrs = {}
    if lo is not None:
        attrs["min"] = float(lo.reshape(-1)[0])
    if hi is not None:
        attrs["max"] = float(hi.reshape(-1)[0])
    return [c.emit("clip", c.value(0), **attrs)]


@converter("PRelu")
def _prelu(c: Ctx):
    return [c.emit("prelu", c.value(0), c.value(1))]


@converter("Identity")
def _identity(c: Ctx):
    return [c.raw(0)]


@converter("Dropout")
def _dropout(c: Ctx):
    train = c.const(2)
    ratio = c.const(1)
    zero_ratio = ratio is not None and float(ratio.reshape(-1)[0]) == 0.0
    if c.has(2) and (train is None or bool(train.reshape(-1)[0])) and not zero_ratio:
        raise Unsupported("training_mode must be a constant false (or the ratio 0)")
    outs = [c.raw(0)]
    if c.output_used(1):
        outs.append(np.ones(c.shape(0), dtype=bool))
    return outs


@converter("Constant")
def _constant(c: Ctx):
    from onnx import numpy_helper

    a = c.attrs
    if "value" in a:
        arr = numpy_helper.to_array(a["value"])
    elif "value_float" in a:
        arr = np.array(a["value_float"], np.float32)
    elif "value_floats" in a:
        arr = np.array(a["value_floats"], np.float32)
    elif "value_int" in a:
        arr = np.array(a["value_int"], np.int64)
    elif "value_ints" in a:
        arr = np.array(a["value_ints"], np.int64)
    else:
        raise Unsupported(f"constant attribute(s) {', '.join(a) or 'none'}; supported: value, "
                          "value_float(s), value_int(s)")
    from_numpy_dtype(arr.dtype)
    return [arr]


@converter("ConstantOfShape")
def _constant_of_shape(c: Ctx):
    from onnx import numpy_helper

    shape = c.ints(0, "shape")
    val = c.attr("value")
    arr = numpy_helper.to_array(val) if val is not None else np.zeros(1, np.float32)
    dtype = from_numpy_dtype(arr.dtype)
    v = arr.reshape(-1)[0]
    value = float(str(v)) if np.issubdtype(arr.dtype, np.floating) else float(v)
    return [c.emit("fill", shape=shape, value=value, dtype=dtype)]


@converter("Shape")
def _shape(c: Ctx):
    shape = c.shape(0)
    rank = len(shape)
    start, end = c.attr("start", 0), c.attr("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return [np.array(shape[start:end], dtype=np.int64)]


@converter("Size")
def _size(c: Ctx):
    return [np.array(math.prod(c.shape(0)), dtype=np.int64)]


# -- shape ------------------------------------------------------------------------------
def reshape_to(c: Ctx, shape: list[int] | tuple[int, ...]) -> Value | np.ndarray:
    if tuple(shape) == c.shape(0):
        return c.raw(0)
    return c.emit("reshape", c.value(0), shape=list(shape))


@converter("Reshape")
def _reshape(c: Ctx):
    src = c.shape(0)
    want = c.ints(1, "shape")
    allowzero = bool(c.attr("allowzero", 0))
    out = [src[i] if d == 0 and not allowzero and i < len(src) else d
           for i, d in enumerate(want)]
    if out.count(-1) > 1:
        raise Unsupported(f"shape {want} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(src)
        if known == 0 or total % known:
            raise Unsupported(f"cannot reshape {list(src)} to {want}")
        out[out.index(-1)] = total // known
    return [reshape_to(c, out)]


@converter("Flatten")
def _flatten(c: Ctx):
    shape = c.shape(0)
    axis = c.attr("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        raise Unsupported(f"axis {c.attr('axis')} is out of range for rank {len(shape)}")
    return [reshape_to(c, [math.prod(shape[:axis]), math.prod(shape[axis:])])]


@converter("Squeeze")
def _squeeze(c: Ctx):
    shape = c.shape(0)
    if c.has(1):
        axes = {norm_axis(a, len(shape)) for a in c.ints(1, "axes")}
        bad = [a for a in axes if shape[a] != 1]
        if bad:
            raise Unsupported(f"cannot squeeze axes {sorted(bad)} of shape {list(shape)}: "
                              "not size 1")
    else:
        axes = {i for i, d in enumerate(shape) if d == 1}
    return [reshape_to(c, [d for i, d in enumerate(shape) if i not in axes])]


@converter("Unsqueeze")
def _unsqueeze(c: Ctx):
    shape = list(c.shape(0))
    axes = c.ints(1, "axes")
    rank = len(shape) + len(axes)
    norm = sorted(norm_axis(a, rank) for a in axes)
    if len(set(norm)) != len(norm):
        raise Unsupported(f"axes {axes} repeat an axis")
    for a in norm:
        shape.insert(a, 1)
    return [reshape_to(c, shape)]


@converter("Transpose")
def _transpose(c: Ctx):
    rank = len(c.shape(0))
    perm = list(c.attr("perm", list(range(rank))[::-1]))
    if perm == list(range(rank)):
        return [c.raw(0)]
    return [c.emit("transpose", c.value(0), perm=perm)]


@converter("Concat")
def _concat(c: Ctx):
    ins = [c.value(i) for i in range(c.n_inputs) if c.has(i)]
    if len(ins) == 1:
        return [ins[0]]
    return [c.emit("concat", *ins, axis=c.attr("axis"))]


@converter("Split")
def _split(c: Ctx):
    shape = c.shape(0)
    axis = norm_axis(c.attr("axis", 0), len(shape))
    dim = shape[axis]
    if c.has(1):
        sizes = c.ints(1, "split")
    elif "split" in c.attrs:
        sizes = list(c.attrs["split"])
    else:
        n = c.attr("num_outputs", c.n_outputs)
        if n < 1:
            raise Unsupported(f"num_outputs={n} must be positive")
        each = -(-dim // n)
        sizes = [min(each, max(dim - i * each, 0)) for i in range(n)]
    if len(sizes) != c.n_outputs:
        raise Unsupported(f"{len(sizes)} split sizes for {c.n_outputs} outputs")
    return c.emit_multi("split", [c.value(0)], axis=axis, sizes=sizes)




@converter("Slice")
def _slice(c: Ctx):
    shape = c.shape(0)
    starts = c.ints(1, "starts")
    ends = c.ints(2, "ends")
    axes = c.ints(3, "axes") if c.has(3) else list(range(len(starts)))
    steps = c.ints(4, "steps") if c.has(4) else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise Unsupported("starts, ends, axes and steps differ in length")
    axes = [norm_axis(a, len(shape)) for a in axes]
    dims = [shape[a] for a in axes]
    starts = [min(max(s, -d - 1), d) for s, d in zip(starts, dims, strict=True)]
    ends = [min(max(e, -d - 1), d) for e, d in zip(ends, dims, strict=True)]
    return [c.emit("slice", c.value(0), starts=starts, ends=ends, axes=axes, steps=steps)]


@converter("Gather")
def _gather(c: Ctx):
    return [c.emit("gather", c.value(0), c.value(1), axis=c.attr("axis", 0))]


@converter("Expand")
def _expand(c: Ctx):
    shape = c.ints(1, "shape")
    src = c.shape(0)
    try:
        out = tuple(np.broadcast_shapes(src, tuple(shape)))
    except ValueError:
        raise Unsupported(f"shape {shape} does not broadcast with {list(src)}") from None
    if out == src:
        return [c.raw(0)]
    return [c.emit("expand", c.value(0), shape=shape)]


@converter("Tile")
def _tile(c: Ctx):
    return [c.emit("tile", c.value(0), repeats=c.ints(1, "repeats"))]


@converter("Range")
def _range(c: Ctx):
    vals = [c.static(i, w).reshape(-1)[0] for i, w in enumerate(("start", "limit", "delta"))]
    dtype = from_numpy_dtype(c.static(0, "start").dtype)
    return [c.emit("arange", start=float(vals[0]), limit=float(vals[1]), delta=float(vals[2]),
                   dtype=dtype)]


@converter("Trilu")
def _trilu(c: Ctx):
    k = int(c.static(1, "k").reshape(-1)[0]) if c.has(1) else 0
    return [c.emit("trilu", c.value(0), upper=bool(c.attr("upper", 1)), k=k)]


@converter("CumSum")
def _cumsum(c: Ctx):
    axis = int(c.static(1, "axis").reshape(-1)[0])
    return [c.emit("cumsum", c.value(0), axis=axis, exclusive=bool(c.attr("exclusive", 0)),
                   reverse=bool(c.attr("reverse", 0)))]


# -- reductions ---------------------------------------------------------------------------
_REDUCE = {name: op for op, name in onnx_names.reductions().items()}
_REDUCE_COMPOSITE = ("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                     "ReduceLogSumExp")


def _reduce_axes(c: Ctx) -> list[int] | None:
    """The axes, or None when the node is a no-op (empty axes with noop_with_empty_axes)."""
    axes_as_input = c.opset >= 18 or c.op_type == "ReduceSum"
    axes = (c.ints(1, "axes") if c.has(1) else []) if axes_as_input \
        else list(c.attr("axes", []))
    if not axes and c.attr("noop_with_empty_axes", 0):
        return None
    return axes


def _reduce(c: Ctx, op: str, x: Value) -> Value:
    axes = _reduce_axes(c)
    if axes is None:
        return x
    return c.emit(op, x, axes=axes, keepdims=bool(c.attr("keepdims", 1)))


@converter(*_REDUCE)
def _reduce_simple(c: Ctx):
    return [_reduce(c, _REDUCE[c.op_type], c.value(0))]


@converter(*_REDUCE_COMPOSITE)
def _reduce_composite(c: Ctx):
    x = c.value(0)
    t = c.op_type
    if t == "ReduceL1":
        return [_reduce(c, "reduce_sum", c.emit("abs", x))]
    if t == "ReduceLogSumExp":
        return [c.emit("log", _reduce(c, "reduce_sum", c.emit("exp", x)))]
    if t == "ReduceLogSum":
        return [c.emit("log", _reduce(c, "reduce_sum", x))]
    sq = _reduce(c, "reduce_sum", c.emit("mul", x, x))
    return [c.emit("sqrt", sq) if t == "ReduceL2" else sq]


@converter("ArgMax", "ArgMin")
def _arg(c: Ctx):
    return [c.emit(c.op_type.lower(), c.value(0), axis=c.attr("axis", 0),
                   keepdims=bool(c.attr("keepdims", 1)),
                   select_last_index=bool(c.attr("select_last_index", 0)))]


@converter("TopK")
def _topk(c: Ctx):
    k = c.ints(1, "k")
    if len(k) != 1:
        raise Unsupported(f"k must hold one value, got {k}")
    return c.emit_multi("topk", [c.value(0)], k=k[0], axis=c.attr("axis", -1),
                        largest=bool(c.attr("largest", 1)))


# -- linear algebra -------------------------------------------------------------------------
@converter("MatMul")
def _matmul(c: Ctx):
    return [c.emit("matmul", c.value(0), c.value(1))]


@converter("Gemm")
def _gemm(c: Ctx):
    ins = [c.value(0), c.value(1)] + ([c.value(2)] if c.has(2) else [])
    return [c.emit("gemm", *ins, alpha=f32(c.attr("alpha", 1.0)), beta=f32(c.attr("beta", 1.0)),
                   trans_a=bool(c.attr("transA", 0)), trans_b=bool(c.attr("transB", 0)))]


# -- activations composed from elementwise ops -----------------------------------------------
def _scalar(c: Ctx, x: Value, v: float) -> Value:
    return c.const_value(np.array(v, x.type.np_dtype))


@converter("Elu", "Celu", "Selu", "ThresholdedRelu", "Softsign", "Mish")
def _composed_activation(c: Ctx):
    x = c.value(0)
    if not is_float(x.type.dtype):
        raise Unsupported(f"needs a float input, got {x.type}")
    t = c.op_type
    if t == "Softsign":
        one = _scalar(c, x, 1.0)
        return [c.emit("div", x, c.emit("add", one, c.emit("abs", x)))]
    if t == "Mish":
        return [c.emit("mul", x, c.emit("tanh", c.emit("softplus", x)))]
    zero = _scalar(c, x, 0.0)
    if t == "ThresholdedRelu":
        alpha = _scalar(c, x, f32(c.attr("alpha", 1.0)))
        return [c.emit("where", c.emit("greater", x, alpha), x, zero)]
    default_alpha = {"Elu": 1.0, "Celu": 1.0, "Selu": 1.67326319217681884765625}[t]
    alpha = f32(c.attr("alpha", default_alpha))
    one = _scalar(c, x, 1.0)
    if t == "Celu":  # max(0, x) + min(0, alpha * (exp(x / alpha) - 1))
        a = _scalar(c, x, alpha)
        neg = c.emit("mul", a, c.emit("sub", c.emit("exp", c.emit("div", x, a)), one))
        return [c.emit("add", c.emit("max", zero, x), c.emit("min", zero, neg))]
    neg = c.emit("mul", _scalar(c, x, alpha), c.emit("sub", c.emit("exp", x), one))
    y = c.emit("where", c.emit("greater", x, zero), x, neg)
    if t == "Selu":
        y = c.emit("mul", _scalar(c, x, f32(c.attr("gamma", 1.05070102214813232421875))), y)
    return [y]


import compiler.frontends.onnx_ops_index  # noqa: E402,F401  (indexing, data-dependent)
import compiler.frontends.onnx_ops_nn  # noqa: E402,F401  (registers the nn converters)

__all__ = ["f32", "norm_axis", "reshape_to"]
