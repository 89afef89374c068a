"""Data-dependent indexing: gather_elements, gather_nd, scatter_elements, scatter_nd.

Index operands are tensors (i32 or i64) read at run time; output shapes depend only on
operand shapes. Negative indices wrap once (``i + dim``), as in ONNX; an index still outside
``[0, dim)`` is an error in the references and is clamped by the kernels (a kernel never
reads or writes outside its buffers).

Scatter semantics are ONNX's: the result is a copy of ``x`` where the positions the indices
name receive the updates, in order (for ``reduction="none"`` the last write wins), or are
combined with them by ``add`` / ``mul`` / ``max`` / ``min``.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import norm_axis
from compiler.ir.registry import Attr, OpDef, register_op

__all__ = ["SCATTER_REDUCTIONS"]

SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")
_NP_REDUCE = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _index_type(t, op: str) -> None:
    if t.dtype not in ("i32", "i64"):
        raise OpError(f"{op}'s indices must be i32 or i64, got {t}")


def _wrap(idx: np.ndarray, dim: int | np.ndarray, op: str) -> np.ndarray:
    idx = idx.astype(np.int64)
    idx = np.where(idx < 0, idx + dim, idx)
    if idx.size and ((idx < 0).any() or (idx >= dim).any()):
        raise OpError(f"{op}: an index is outside [-dim, dim - 1]")
    return idx


# -- gather_elements --------------------------------------------------------------------
def _gather_elements_infer(types, attrs):
    x, idx = types
    _index_type(idx, "gather_elements")
    if x.rank == 0 or idx.rank != x.rank:
        raise OpError(f"gather_elements: indices {idx} must have the rank of the input {x} "
                      "(>= 1)")
    norm_axis(attrs["axis"], x.rank)
    return [x.with_shape(idx.shape)]


def _gather_elements_ref(xs, attrs):
    x, idx = xs
    axis = attrs["axis"] % x.ndim
    return [np.take_along_axis(x, _wrap(idx, x.shape[axis], "gather_elements"), axis=axis)]


register_op(OpDef("gather_elements", (2, 2), {"axis": Attr("int", 0)},
                  _gather_elements_infer, _gather_elements_ref, family="indexing",
                  doc="ONNX GatherElements / torch.gather: out[i] = x[i with i[axis] = "
                      "indices[i]]"))


# -- gather_nd --------------------------------------------------------------------------
def _gather_nd_infer(types, attrs):
    x, idx = types
    _index_type(idx, "gather_nd")
    b = attrs["batch_dims"]
    if idx.rank < 1 or b < 0 or b >= min(x.rank, idx.rank):
        raise OpError(f"gather_nd: batch_dims={b} must be below the ranks of {x} and {idx}")
    if x.shape[:b] != idx.shape[:b]:
        raise OpError(f"gather_nd: the first {b} dims of {x} and {idx} must agree")
    m = idx.shape[-1]
    if not 1 <= m <= x.rank - b:
        raise OpError(f"gather_nd: the last dim of indices {idx} must be in [1, "
                      f"{x.rank - b}]")
    return [x.with_shape(idx.shape[:-1] + x.shape[b + m:])]


def _gather_nd_ref(xs, attrs):
    x, idx = xs
    b = attrs["batch_dims"]
    m = idx.shape[-1]
    bshape = x.shape[:b]
    xb = x.reshape((-1,) + x.shape[b:])
    ib = idx.reshape((xb.shape[0], -1, m))
    dims = np.array(x.shape[b:b + m])
    ib = _wrap(ib, dims, "gather_nd")
    rows = [xb[j][tuple(ib[j].T)] for j in range(xb.shape[0])]
    out = np.stack(rows) if rows else np.zeros((0,) + ib.shape[1:2] + x.shape[b + m:], x.dtype)
    return [out.reshape(bshape + idx.shape[b:-1] + x.shape[b + m:])]


register_op(OpDef("gather_nd", (2, 2), {"batch_dims": Attr("int", 0)},
                  _gather_nd_infer, _gather_nd_ref, family="indexing",
                  doc="ONNX GatherND: slices of x addressed by the last dim of indices"))


# -- scatter_elements -------------------------------------------------------------------
def _scatter_elements_infer(types, attrs):
    x, idx, upd = types
    _index_type(idx, "scatter_elements")
    if x.rank == 0 or idx.rank != x.rank or upd.shape != idx.shape or upd.dtype != x.dtype:
        raise OpError(f"scatter_elements: indices {idx} and updates {upd} must share a shape "
                      f"of the rank of {x}, updates its dtype")
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _scatter_elements_ref(xs, attrs):
    x, idx, upd = xs
    axis = attrs["axis"] % x.ndim
    out = x.copy()
    idx = _wrap(idx, x.shape[axis], "scatter_elements")
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    _apply(out, tuple(grid), upd, attrs["reduction"])
    return [out]


def _apply(out: np.ndarray, where: tuple, upd: np.ndarray, reduction: str) -> None:
    """``out[where] (op)= upd`` element by element in order (repeated positions: the last
    write wins, or every update is combined: ``ufunc.at`` is unbuffered)."""
    fn = _NP_REDUCE.get(reduction)
    if fn is None:
        out[where] = upd  # numpy assigns repeated positions in order
    else:
        fn.at(out, where, upd)


register_op(OpDef("scatter_elements", (3, 3),
                  {"axis": Attr("int", 0), "reduction": Attr("str", "none", SCATTER_REDUCTIONS)},
                  _scatter_elements_infer, _scatter_elements_ref, family="indexing",
                  doc="ONNX ScatterElements / torch.scatter"))


# -- scatter_nd -------------------------------------------------------------------------
def _scatter_nd_infer(types, attrs):
    x, idx, upd = types
    _index_type(idx, "scatter_nd")
    if idx.rank < 1:
        raise OpError(f"scatter_nd: indices {idx} must have rank >= 1")
    m = idx.shape[-1]
    if not 1 <= m <= x.rank:
        raise OpError(f"scatter_nd: the last dim of indices {idx} must be in [1, {x.rank}]")
    want = idx.shape[:-1] + x.shape[m:]
    if upd.shape != want or upd.dtype != x.dtype:
        raise OpError(f"scatter_nd: updates {upd} must be {x.dtype}{list(want)} for x {x} "
                      f"and indices {idx}")
    return [x]


def _scatter_nd_ref(xs, attrs):
    x, idx, upd = xs
    m = idx.shape[-1]
    out = x.copy()
    idx = _wrap(idx.reshape(-1, m), np.array(x.shape[:m]), "scatter_nd")
    upd = upd.reshape((idx.shape[0],) + x.shape[m:])
    _apply(out, tuple(idx.T), upd, attrs["reduction"])
    return [out]


register_op(OpDef("scatter_nd", (3, 3),
                  {"reduction": Attr("str", "none", SCATTER_REDUCTIONS)},
                  _scatter_nd_infer, _scatter_nd_ref, family="indexing",
                  doc="ONNX ScatterND / torch index_put and slice_scatter"))
