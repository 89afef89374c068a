"""Reductions: reduce_sum/mean/max/min/prod over static axes, argmax/argmin.

One TE reduction per op; the generic schedule parallelises the kept (spatial) axes and
keeps the reduced axes innermost. f16/bf16 accumulate in f32.
"""

from __future__ import annotations

import math

from compiler.ir.ops.reduce import reduce_axes
from targets.kernels._te import (
    expr,
    generic,
    nan_max_reducer,
    nan_min_reducer,
    placeholders,
    prim_func,
    tvm_dtype,
)
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__: list[str] = []


@register_kernel("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod")
def reduce(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    axes = reduce_axes(xt.rank, req.attrs["axes"])
    keep = bool(req.attrs["keepdims"])
    dt = tvm_dtype(out.dtype)
    acc = "float32" if dt in ("float16", "bfloat16") else dt
    count = math.prod(xt.shape[a] for a in axes)
    kind = req.op.removeprefix("reduce_")
    if kind == "prod":
        reducer = te.comm_reducer(lambda a, b: a * b, lambda t: tirx.const(1, t), name="prod")
    else:
        # max/min: a NaN anywhere in the reduced elements gives NaN (numpy, torch)
        reducer = {"sum": te.sum, "mean": te.sum, "max": nan_max_reducer(),
                   "min": nan_min_reducer()}[kind]

    def src_index(i, raxes):
        src, o, r = [], 0, 0
        for d in range(xt.rank):
            if d in axes:
                src.append(raxes[r])
                r += 1
                if keep:
                    o += 1
            else:
                src.append(i[o])
                o += 1
        return src

    def body(*i):
        if count == 0:
            if kind in ("max", "min"):
                v = tirx.min_value(acc) if kind == "max" else tirx.max_value(acc)
                if acc.startswith("float"):
                    v = tirx.const(-math.inf if kind == "max" else math.inf, acc)
            elif kind == "mean":
                v = tirx.const(math.nan, acc) if acc.startswith("float") else tirx.const(0, acc)
            else:
                v = tirx.const(1 if kind == "prod" else 0, acc)
            return v.astype(dt)
        raxes = [te.reduce_axis((0, xt.shape[a]), f"r{a}") for a in axes]
        src = src_index(i, raxes)
        v = expr(X[tuple(src)] if src else X[()]).astype(acc)
        r = reducer(v, axis=raxes)
        return r

    R = te.compute(out.shape, body, name="red")
    if kind == "mean" and count:
        if acc.startswith("float"):
            Y = te.compute(out.shape, lambda *i: (expr(R[i] if i else R[()])
                                                  / tirx.const(count, acc)).astype(dt),
                           name="out")
        else:
            Y = te.compute(out.shape, lambda *i: tirx.truncdiv(expr(R[i] if i else R[()]),
                                                               tirx.const(count, acc)),
                           name="out")
    else:
        Y = te.compute(out.shape, lambda *i: expr(R[i] if i else R[()]).astype(dt), name="out")
    return KernelImpl(prim_func([X, Y], generic(req.cpu, out.dtype)),
                      note=f"{req.op} over {list(axes)} ({count} each)")


@register_kernel("argmax", "argmin")
def argminmax(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    axis = req.attrs["axis"] % xt.rank
    keep = bool(req.attrs["keepdims"])
    last = bool(req.attrs["select_last_index"])
    is_max = req.op == "argmax"
    xdt = tvm_dtype(xt.dtype)

    def combine(lhs, rhs):
        # (index, value): prefer the better value, ties -> smaller (or larger) index
        li, lv = lhs
        ri, rv = rhs
        better = rv > lv if is_max else rv < lv
        tie = tirx.EQ(rv, lv)
        if xdt.startswith(("float", "bfloat")):   # NaN is both the max and the min (numpy)
            rn, ln = tirx.isnan(rv), tirx.isnan(lv)
            better = tirx.Or(tirx.And(rn, tirx.Not(ln)), better)
            tie = tirx.Or(tie, tirx.And(rn, ln))
        pick_r = tirx.Or(better, tirx.And(tie, ri > li if last else ri < li))
        return tirx.Select(pick_r, ri, li), tirx.Select(pick_r, rv, lv)

    def identity(t0, t1):
        init = tirx.min_value(t1) if is_max else tirx.max_value(t1)
        return tirx.const(-1, t0), init

    reducer = te.comm_reducer(combine, identity, name="argred")
    n = xt.shape[axis]

    def body(*i):
        k = te.reduce_axis((0, n), "k")
        src = list(i)
        if keep:
            src[axis] = k
        else:
            src.insert(axis, k)
        return reducer((k.var.astype("int64"), expr(X[tuple(src)])), axis=k)

    idx, _val = te.compute(out.shape, body, name="arg")
    Y = te.compute(out.shape, lambda *i: expr(idx[i] if i else idx[()]), name="out")
    return KernelImpl(prim_func([X, Y], generic(req.cpu, "f32")),
                      note=f"{req.op} over axis {axis} of {n}" + f" ({xdt})")


@register_kernel("topk")
def topk(req: KernelRequest) -> KernelImpl:
    """Rank counting: rank(i) = #elements ordered before i (larger, or equal with a lower
    index); result t is the element of rank t. O(n^2) per row: fine for TopK's usual sizes."""
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt = req.input_types[0]
    vt, it = req.output_types
    axis = req.attrs["axis"] % xt.rank
    n, k = xt.shape[axis], int(req.attrs["k"])
    largest = bool(req.attrs["largest"])

    def at(i, pos):
        src = list(i)
        src[axis] = pos
        return expr(X[tuple(src)])

    def rank_body(*i):
        j = te.reduce_axis((0, n), "j")
        xi, xj = at(i, i[axis]), at(i, j)
        better = xj > xi if largest else xj < xi
        before = tirx.Or(better, tirx.And(tirx.EQ(xj, xi), j < i[axis]))
        return te.sum(tirx.Select(before, tirx.const(1, "int32"), tirx.const(0, "int32")),
                      axis=j)

    rank = te.compute(xt.shape, rank_body, name="rank")

    def idx_body(*o):
        j = te.reduce_axis((0, n), "j")
        src = list(o)
        src[axis] = j
        hit = tirx.EQ(rank[tuple(src)], o[axis])
        return te.sum(tirx.Select(hit, j.var.astype("int64"), tirx.const(0, "int64")), axis=j)

    idx = te.compute(it.shape, idx_body, name="topk_idx")
    vals = te.compute(vt.shape, lambda *o: at(o, idx[o].astype("int32")), name="values")
    out_idx = te.compute(it.shape, lambda *o: idx[o], name="indices")
    return KernelImpl(prim_func([X, vals, out_idx], generic(req.cpu, "f32")),
                      note=f"topk {k} of {n} (rank counting)")
