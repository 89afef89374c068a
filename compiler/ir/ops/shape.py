"""Shape and data-movement ops: reshape, transpose, concat, split, slice, gather, expand,
tile, shape, fill, arange, identity, trilu, cumsum.

Every shape-like parameter is a static attribute; importers fold ONNX's shape tensors.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import broadcast_shapes, norm_axis, same_dtype, same_type
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_int, to_numpy_dtype

__all__ = ["slice_bounds"]


# -- reshape / transpose ----------------------------------------------------------------
def _reshape_infer(types, attrs):
    (x,) = types
    shape = attrs["shape"]
    if any(d < 0 for d in shape):
        raise OpError(f"reshape: shape {shape} must be fully resolved (no -1 or negative "
                      "entries)")
    if math.prod(shape) != x.size:
        raise OpError(f"reshape: cannot reshape {x} ({x.size} elements) to {shape} "
                      f"({math.prod(shape)} elements)")
    return [x.with_shape(shape)]


register_op(OpDef("reshape", (1, 1), {"shape": Attr("ints")}, _reshape_infer,
                  lambda xs, a: [xs[0].reshape(a["shape"])], inplace=True, family="shape"))


def _transpose_infer(types, attrs):
    (x,) = types
    perm = attrs["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise OpError(f"transpose: perm {perm} is not a permutation of 0..{x.rank - 1}")
    return [x.with_shape([x.shape[p] for p in perm])]


register_op(OpDef("transpose", (1, 1), {"perm": Attr("ints")}, _transpose_infer,
                  lambda xs, a: [np.ascontiguousarray(np.transpose(xs[0], a["perm"]))],
                  family="shape"))


# -- concat / split ---------------------------------------------------------------------
def _concat_infer(types, attrs):
    dtype = same_dtype(types, "concat's operands")
    rank = types[0].rank
    if rank == 0:
        raise OpError("concat cannot join scalars (rank 0)")
    axis = norm_axis(attrs["axis"], rank)
    for t in types:
        if t.rank != rank or any(a != b for i, (a, b) in enumerate(zip(t.shape, types[0].shape,
                                                                      strict=True))
                                 if i != axis):
            raise OpError(f"concat on axis {axis}: operands must agree on every other "
                          f"axis, got {', '.join(str(t) for t in types)}")
    shape = list(types[0].shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return [TensorType(shape, dtype)]


register_op(OpDef("concat", (1, None), {"axis": Attr("int")}, _concat_infer,
                  lambda xs, a: [np.concatenate(xs, axis=a["axis"])], family="shape"))


def _split_infer(types, attrs):
    (x,) = types
    if x.rank == 0:
        raise OpError("split cannot split a scalar")
    axis = norm_axis(attrs["axis"], x.rank)
    sizes = attrs["sizes"]
    if not sizes or any(s < 0 for s in sizes) or sum(sizes) != x.shape[axis]:
        raise OpError(f"split: sizes {sizes} must be non-negative and sum to axis {axis}'s "
                      f"length {x.shape[axis]} of {x}")
    out = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        out.append(x.with_shape(shape))
    return out


def _split_ref(xs, attrs):
    cuts = np.cumsum(attrs["sizes"])[:-1]
    return np.split(xs[0], cuts, axis=attrs["axis"])


register_op(OpDef("split", (1, 1), {"axis": Attr("int", 0), "sizes": Attr("ints")},
                  _split_infer, _split_ref, family="shape", doc="one result per size"))


# -- slice ------------------------------------------------------------------------------
def slice_bounds(dim: int, start: int, end: int, step: int) -> slice:
    """ONNX Slice clamping for one axis, as a Python slice."""
    if step > 0:
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        return slice(start, end, step)
    start = min(max(start + dim if start < 0 else start, 0), dim - 1)
    end = min(max(end + dim if end < 0 else end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def slice_parts(shape, attrs):
    starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]
    n = len(starts)
    axes = axes or list(range(n))
    steps = steps or [1] * n
    if not (len(ends) == len(axes) == len(steps) == n):
        raise OpError(f"slice: starts {starts}, ends {ends}, axes {axes} and steps {steps} "
                      "must have the same length")
    rank = len(shape)
    norm = [norm_axis(a, rank, "slice axis") for a in axes]
    if len(set(norm)) != len(norm):
        raise OpError(f"slice: axes {axes} repeat an axis")
    if any(s == 0 for s in steps):
        raise OpError(f"slice: steps {steps} must be non-zero")
    index = [slice(None)] * rank
    for a, b, e, s in zip(norm, starts, ends, steps, strict=True):
        index[a] = slice_bounds(shape[a], b, e, s)
    return tuple(index)


def _slice_infer(types, attrs):
    (x,) = types
    index = slice_parts(x.shape, attrs)
    shape = [len(range(*sl.indices(d))) for sl, d in zip(index, x.shape, strict=True)]
    return [x.with_shape(shape)]


register_op(OpDef("slice", (1, 1),
                  {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints", []),
                   "steps": Attr("ints", [])},
                  _slice_infer,
                  lambda xs, a: [np.ascontiguousarray(xs[0][slice_parts(xs[0].shape, a)])],
                  family="shape", doc="ONNX Slice (clamping, negative steps); axes/steps "
                  "empty mean all axes / step 1"))


# -- gather -----------------------------------------------------------------------------
def _gather_infer(types, attrs):
    x, idx = types
    if idx.dtype not in ("i32", "i64"):
        raise OpError(f"gather's indices must be i32 or i64, got {idx}")
    if x.rank == 0:
        raise OpError("gather needs an input of rank >= 1")
    axis = norm_axis(attrs["axis"], x.rank)
    return [x.with_shape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _gather_ref(xs, attrs):
    x, idx = xs
    axis = attrs["axis"] % x.ndim
    dim = x.shape[axis]
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        raise OpError(f"gather: an index is outside [-{dim}, {dim - 1}]")
    return [np.take(x, np.where(idx < 0, idx + dim, idx), axis=axis)]


register_op(OpDef("gather", (2, 2), {"axis": Attr("int", 0)}, _gather_infer, _gather_ref,
                  family="shape", doc="ONNX Gather (negative indices wrap)"))


# -- expand / tile ----------------------------------------------------------------------
def _expand_infer(types, attrs):
    (x,) = types
    if any(d < 0 for d in attrs["shape"]):
        raise OpError(f"expand: shape {attrs['shape']} has negative entries")
    return [x.with_shape(broadcast_shapes(x.shape, tuple(attrs["shape"])))]


def _expand_ref(xs, attrs):
    x = xs[0]
    out = broadcast_shapes(x.shape, tuple(attrs["shape"]))
    return [np.ascontiguousarray(np.broadcast_to(x, out))]


register_op(OpDef("expand", (1, 1), {"shape": Attr("ints")}, _expand_infer, _expand_ref,
                  family="shape", doc="bidirectional broadcast of x with shape"))


def _tile_infer(types, attrs):
    (x,) = types
    reps = attrs["repeats"]
    if len(reps) != x.rank or any(r < 0 for r in reps):
        raise OpError(f"tile: repeats {reps} must be {x.rank} non-negative integers")
    return [x.with_shape([d * r for d, r in zip(x.shape, reps, strict=True)])]


register_op(OpDef("tile", (1, 1), {"repeats": Attr("ints")}, _tile_infer,
                  lambda xs, a: [np.tile(xs[0], a["repeats"])], family="shape"))


# -- shape / fill / arange / identity ---------------------------------------------------------
def _shape_range(rank, attrs):
    start, end = attrs["start"], attrs["end"]
    end = rank if end is None else end
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, end


def _shape_infer(types, attrs):
    start, end = _shape_range(types[0].rank, attrs)
    return [TensorType((max(end - start, 0),), "i64")]


def _shape_ref(xs, attrs):
    start, end = _shape_range(xs[0].ndim, attrs)
    return [np.array(xs[0].shape[start:end], dtype=np.int64)]


register_op(OpDef("shape", (1, 1), {"start": Attr("int", 0), "end": Attr("int", None)},
                  _shape_infer, _shape_ref, family="shape",
                  doc="the static shape as i64 (ONNX Shape-15 start/end); always foldable"))


def _fill_infer(types, attrs):
    if any(d < 0 for d in attrs["shape"]):
        raise OpError(f"fill: shape {attrs['shape']} has negative entries")
    return [TensorType(attrs["shape"], attrs["dtype"])]


def _fill_ref(xs, attrs):
    dt = to_numpy_dtype(attrs["dtype"])
    return [np.full(attrs["shape"], np.asarray(attrs["value"]).astype(dt), dtype=dt)]


register_op(OpDef("fill", (0, 0), {"shape": Attr("ints"), "value": Attr("float", 0.0),
                                   "dtype": Attr("dtype", "f32")},
                  _fill_infer, _fill_ref, family="shape",
                  doc="a tensor of one value (ONNX ConstantOfShape with a constant shape)"))


def _arange_len(attrs) -> int:
    start, limit, delta = attrs["start"], attrs["limit"], attrs["delta"]
    if delta == 0:
        raise OpError("arange: delta must be non-zero")
    if is_int(attrs["dtype"]):
        return max(-(-(int(limit) - int(start)) // int(delta)), 0)
    return max(math.ceil((limit - start) / delta), 0)


def _arange_infer(types, attrs):
    if attrs["dtype"] == "bool":
        raise OpError("arange: dtype must be numeric")
    if not all(math.isfinite(attrs[k]) for k in ("start", "limit", "delta")):
        raise OpError("arange: start, limit and delta must be finite")
    return [TensorType((_arange_len(attrs),), attrs["dtype"])]


def _arange_ref(xs, attrs):
    n = _arange_len(attrs)
    dt = to_numpy_dtype(attrs["dtype"])
    if is_int(attrs["dtype"]):
        vals = int(attrs["start"]) + int(attrs["delta"]) * np.arange(n, dtype=np.int64)
    else:
        vals = attrs["start"] + attrs["delta"] * np.arange(n, dtype=np.float64)
    return [vals.astype(dt)]


register_op(OpDef("arange", (0, 0), {"start": Attr("float"), "limit": Attr("float"),
                                     "delta": Attr("float", 1.0), "dtype": Attr("dtype")},
                  _arange_infer, _arange_ref, family="shape",
                  doc="ONNX Range with constant operands"))

register_op(OpDef("identity", (1, 1), {}, same_type, lambda xs, a: [xs[0].copy()],
                  elementwise=True, family="shape"))


# -- trilu / cumsum -------------------------------------------------------------------------
def _trilu_infer(types, attrs):
    if types[0].rank < 2:
        raise OpError(f"trilu needs rank >= 2, got {types[0]}")
    return [types[0]]


def _trilu_ref(xs, attrs):
    x = xs[0]
    fn = np.triu if attrs["upper"] else np.tril
    return [fn(x, attrs["k"]).astype(x.dtype)]


register_op(OpDef("trilu", (1, 1), {"upper": Attr("bool", True), "k": Attr("int", 0)},
                  _trilu_infer, _trilu_ref, family="shape",
                  doc="keep the upper (or lower) triangle of the last two axes"))


def _cumsum_infer(types, attrs):
    (x,) = types
    if x.dtype == "bool":
        raise OpError(f"cumsum needs a numeric tensor, got {x}")
    if x.rank == 0:
        raise OpError("cumsum needs rank >= 1")
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _cumsum_ref(xs, attrs):
    x = xs[0]
    axis = attrs["axis"] % x.ndim
    y = np.flip(x, axis) if attrs["reverse"] else x
    c = np.cumsum(y, axis=axis, dtype=x.dtype)
    if attrs["exclusive"]:
        head = np.zeros_like(np.take(c, [0], axis=axis))
        c = np.concatenate([head, np.take(c, np.arange(c.shape[axis] - 1), axis=axis)],
                           axis=axis)
    if attrs["reverse"]:
        c = np.flip(c, axis)
    return [np.ascontiguousarray(c)]


register_op(OpDef("cumsum", (1, 1), {"axis": Attr("int"), "exclusive": Attr("bool", False),
                                     "reverse": Attr("bool", False)},
                  _cumsum_infer, _cumsum_ref, family="shape"))
