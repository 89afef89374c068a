"""ATen converters for gathers and in-place-style writes: gather, scatter*, slice_scatter,
select_scatter, index_put, copy.

Writes become pure ops on a copy (``scatter_elements`` / ``scatter_nd`` / ``concat`` /
``where``); with constant operands (attention masks built by slice assignment, as in
swin's shifted windows) they fold at import.
"""

from __future__ import annotations

import numpy as np

from compiler.frontends._torch_ops import axis_arg, conv
from compiler.frontends.torch import TorchImporter, Unsupported
from compiler.ir.graph import Value

__all__: list[str] = []

_SCATTER_REDUCE = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _fit(imp: TorchImporter, v, shape, dtype: str) -> Value:
    """``v`` (a Value or a scalar) cast to ``dtype`` and broadcast to ``shape``."""
    v = imp.tensor(v, dtype)
    if tuple(v.shape) != tuple(shape):
        if v.type.rank > len(shape):
            v = imp.emit("reshape", v, shape=list(v.shape[v.type.rank - len(shape):]))
        v = imp.emit("expand", v, shape=list(shape))
    return v


@conv("gather.default")
def _gather(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("gather_elements", x, a["index"], axis=axis_arg(a["dim"], x.type.rank))


def _scatter(imp: TorchImporter, a: dict, src, reduction: str) -> Value:
    x, index = a["self"], a["index"]
    src = _fit(imp, src, index.shape, x.dtype)
    if src.type.size and tuple(src.shape) != tuple(index.shape):
        raise Unsupported("scatter with src larger than index")
    return imp.emit("scatter_elements", x, index, src, axis=axis_arg(a["dim"], x.type.rank),
                    reduction=reduction)


@conv("scatter.src", "scatter.value")
def _scatter_plain(imp: TorchImporter, a: dict) -> Value:
    if a.get("reduce") is not None:
        raise Unsupported("scatter with reduce= (use scatter_reduce)")
    return _scatter(imp, a, a["src"] if "src" in a else a["value"], "none")


@conv("scatter_add.default")
def _scatter_add(imp: TorchImporter, a: dict) -> Value:
    return _scatter(imp, a, a["src"], "add")


@conv("scatter_reduce.two")
def _scatter_reduce(imp: TorchImporter, a: dict) -> Value:
    red = _SCATTER_REDUCE.get(a["reduce"])
    if red is None or not a.get("include_self", True):
        raise Unsupported(f"scatter_reduce reduce={a['reduce']!r} include_self="
                          f"{a.get('include_self', True)}")
    return _scatter(imp, a, a["src"], red)


def _slice_scatter(imp: TorchImporter, x: Value, src: Value, dim: int, start, end,
                   step: int) -> Value:
    axis = axis_arg(dim, x.type.rank)
    n = x.shape[axis]
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = max(0, min(n, start)), max(0, min(n, end))
    positions = list(range(start, end, step))
    shape = list(x.shape)
    shape[axis] = len(positions)
    src = _fit(imp, src, shape, x.dtype)
    if not positions:
        return x
    if step == 1:  # a concat of the kept parts and src: plain copies
        parts = []
        for lo, hi, val in ((0, start, x), (None, None, src), (end, n, x)):
            if val is src:
                parts.append(src)
            elif hi > lo:
                parts.append(imp.emit("slice", x, starts=[lo], ends=[hi], axes=[axis],
                                      steps=[1]))
        return parts[0] if len(parts) == 1 else imp.emit("concat", *parts, axis=axis)
    idx_shape = [1] * x.type.rank
    idx_shape[axis] = len(positions)
    idx = np.broadcast_to(np.array(positions, np.int64).reshape(idx_shape), shape)
    return imp.emit("scatter_elements", x, imp.const(idx, "i64"), src, axis=axis)


@conv("slice_scatter.default")
def _slice_scatter_op(imp: TorchImporter, a: dict) -> Value:
    return _slice_scatter(imp, a["self"], a["src"], a.get("dim", 0), a.get("start"),
                          a.get("end"), a.get("step", 1))


@conv("select_scatter.default")
def _select_scatter(imp: TorchImporter, a: dict) -> Value:
    x, src = a["self"], a["src"]
    axis = axis_arg(a["dim"], x.type.rank)
    shape = list(x.shape)
    shape[axis] = 1
    src = imp.emit("reshape", _fit(imp, src, shape[:axis] + shape[axis + 1:], x.dtype),
                   shape=shape)
    i = a["index"] + x.shape[axis] if a["index"] < 0 else a["index"]
    return _slice_scatter(imp, x, src, axis, i, i + 1, 1)


@conv("copy.default", "lift_fresh_copy.default")
def _copy(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    if "src" not in a:
        return x
    return _fit(imp, a["src"], x.shape, x.dtype)


@conv("index_put.default")
def _index_put(imp: TorchImporter, a: dict) -> Value:
    """``x[i0, i1, ...] = values`` on adjacent integer index tensors (one ``scatter_nd``
    over the indexed dims moved to the front), or ``x[mask] = scalar`` (a ``where``)."""
    x, values, accumulate = a["self"], a["values"], bool(a.get("accumulate", False))
    idx = list(a["indices"])
    while idx and idx[-1] is None:
        idx.pop()
    first = next((i for i, v in enumerate(idx) if v is not None), None)
    if first is None:
        raise Unsupported("index_put without index tensors")
    tensors = idx[first:]
    if any(v is None for v in tensors):
        raise Unsupported("index tensors on non-adjacent dims")
    if tensors[0].dtype == "bool":
        return _masked_put(imp, x, first, tensors, values, accumulate)
    if any(v.dtype not in ("i64", "i32") for v in tensors):
        raise Unsupported("index tensors of mixed dtypes")
    k = len(tensors)
    r = x.type.rank
    bshape = tuple(np.broadcast_shapes(*(tuple(v.shape) for v in tensors)))
    cols = [imp.emit("reshape", _fit(imp, v, bshape, "i64"), shape=[*bshape, 1])
            for v in tensors]
    index = cols[0] if k == 1 else imp.emit("concat", *cols, axis=len(bshape))
    pre, post = list(x.shape[:first]), list(x.shape[first + k:])
    # values broadcast to torch's result shape pre + B + post, then B + pre + post
    vals = _fit(imp, values, pre + list(bshape) + post, x.dtype)
    nb = len(bshape)
    if pre:
        perm = list(range(first, first + nb)) + list(range(first)) \
            + list(range(first + nb, first + nb + len(post)))
        vals = imp.emit("transpose", vals, perm=perm)
    front = list(range(first, first + k)) + list(range(first)) + list(range(first + k, r))
    xt = imp.emit("transpose", x, perm=front) if first else x
    y = imp.emit("scatter_nd", xt, index, vals, reduction="add" if accumulate else "none")
    if first:
        y = imp.emit("transpose", y, perm=[int(p) for p in np.argsort(front)])
    return y


def _masked_put(imp: TorchImporter, x: Value, first: int, tensors: list, values,
                accumulate: bool) -> Value:
    (mask,) = tensors if len(tensors) == 1 else (None,)
    if mask is None or first != 0 or (isinstance(values, Value) and values.type.size != 1):
        raise Unsupported("boolean-mask index_put other than x[mask] = scalar")
    vals = _fit(imp, values, x.shape, x.dtype)
    if accumulate:
        vals = imp.emit("add", x, vals)
    mask = _fit(imp, mask, x.shape, "bool")
    return imp.emit("where", mask, vals, x)
