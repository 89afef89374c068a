"""Reductions: reduce_mean/sum/max/min/prod over static axes, argmax/argmin.

``axes == []`` reduces every axis. Float sums and means accumulate in float64.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import norm_axis
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["reduce_axes"]


def reduce_axes(rank: int, axes: list[int]) -> tuple[int, ...]:
    """Normalised, sorted axes (all axes when empty); OpError on bad or repeated axes."""
    if not axes:
        return tuple(range(rank))
    norm = [norm_axis(a, rank, "reduce axis") for a in axes]
    if len(set(norm)) != len(norm):
        raise OpError(f"reduce axes {axes} repeat an axis")
    return tuple(sorted(norm))


def _reduce_infer(name):
    def infer(types, attrs):
        (x,) = types
        if x.dtype == "bool" and name not in ("reduce_max", "reduce_min"):
            raise OpError(f"{name} needs a numeric tensor, got {x}")
        axes = reduce_axes(x.rank, attrs["axes"])
        shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if attrs["keepdims"] \
            else [d for i, d in enumerate(x.shape) if i not in axes]
        return [x.with_shape(shape)]

    return infer


def _reduce_ref(fn, accumulate):
    def ref(xs, attrs):
        x = xs[0]
        axes = reduce_axes(x.ndim, attrs["axes"])
        src = x
        if accumulate and np.issubdtype(x.dtype, np.floating):
            src = x.astype(np.float64)
        return [np.asarray(fn(src, axes, attrs["keepdims"])).astype(x.dtype)]

    return ref


def _limit(dtype, low: bool):
    """The identity of max (low) or min (not low) for ``dtype``."""
    if dtype == np.bool_:
        return not low
    if np.issubdtype(dtype, np.floating):
        return -np.inf if low else np.inf
    return np.iinfo(dtype).min if low else np.iinfo(dtype).max


def _max(x, axes, keep):
    if x.size == 0 or any(x.shape[a] == 0 for a in axes):
        init = _limit(x.dtype, low=True)
        return np.max(x, axis=axes, keepdims=keep, initial=init)
    return np.max(x, axis=axes, keepdims=keep)


def _min(x, axes, keep):
    if x.size == 0 or any(x.shape[a] == 0 for a in axes):
        init = _limit(x.dtype, low=False)
        return np.min(x, axis=axes, keepdims=keep, initial=init)
    return np.min(x, axis=axes, keepdims=keep)


_REDUCERS = {
    "reduce_mean": (lambda x, a, k: np.mean(x, axis=a, keepdims=k), True),
    "reduce_sum": (lambda x, a, k: np.sum(x, axis=a, keepdims=k), True),
    "reduce_prod": (lambda x, a, k: np.prod(x, axis=a, keepdims=k), True),
    "reduce_max": (_max, False),
    "reduce_min": (_min, False),
}
for _name, (_fn, _acc) in _REDUCERS.items():
    register_op(OpDef(_name, (1, 1), {"axes": Attr("ints", []), "keepdims": Attr("bool", True)},
                      _reduce_infer(_name), _reduce_ref(_fn, _acc), family="reduce",
                      doc="reduce over axes (empty = all axes)"))


def _arg_infer(types, attrs):
    (x,) = types
    if x.rank == 0:
        raise OpError("argmax/argmin need rank >= 1")
    axis = norm_axis(attrs["axis"], x.rank)
    if x.shape[axis] == 0:
        raise OpError(f"argmax/argmin over the empty axis {axis} of {x}")
    shape = list(x.shape)
    if attrs["keepdims"]:
        shape[axis] = 1
    else:
        del shape[axis]
    return [TensorType(shape, "i64")]


def _arg_ref(fn):
    def ref(xs, attrs):
        x = xs[0]
        axis = attrs["axis"] % x.ndim
        if attrs["select_last_index"]:
            flipped = np.flip(x, axis)
            idx = x.shape[axis] - 1 - fn(flipped, axis=axis)
        else:
            idx = fn(x, axis=axis)
        if attrs["keepdims"]:
            idx = np.expand_dims(idx, axis)
        return [idx.astype(np.int64)]

    return ref


for _name, _fn in {"argmax": np.argmax, "argmin": np.argmin}.items():
    register_op(OpDef(_name, (1, 1),
                      {"axis": Attr("int", 0), "keepdims": Attr("bool", True),
                       "select_last_index": Attr("bool", False)},
                      _arg_infer, _arg_ref(_fn), family="reduce", doc="index as i64"))


# -- topk -------------------------------------------------------------------------------
def _topk_infer(types, attrs):
    (x,) = types
    if x.rank == 0 or x.dtype == "bool":
        raise OpError(f"topk needs a numeric tensor of rank >= 1, got {x}")
    axis = norm_axis(attrs["axis"], x.rank)
    k = attrs["k"]
    if not 0 <= k <= x.shape[axis]:
        raise OpError(f"topk: k={k} must be in 0..{x.shape[axis]} (axis {axis} of {x})")
    shape = list(x.shape)
    shape[axis] = k
    return [x.with_shape(shape), TensorType(tuple(shape), "i64")]


def _topk_ref(xs, attrs):
    x = xs[0]
    axis = attrs["axis"] % x.ndim
    key = x.astype(np.float64)
    # stable sort: equal values keep the lower index first, largest or smallest
    order = np.argsort(-key if attrs["largest"] else key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(attrs["k"]), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


register_op(OpDef("topk", (1, 1),
                  {"k": Attr("int"), "axis": Attr("int", -1), "largest": Attr("bool", True)},
                  _topk_infer, _topk_ref, family="reduce",
                  doc="the k largest (or smallest) values along axis, sorted, and their i64 "
                      "indices; ties keep the lower index first (ONNX TopK with static k)"))
