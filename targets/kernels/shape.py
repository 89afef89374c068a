"""Shape kernels: reshape, transpose, concat, split, slice, gather, expand, tile, trilu,
cumsum, identity, and the constant producers shape / fill / arange.

All are index maps (copies) with the generic schedule. ``shape`` and ``arange`` results
depend on attributes alone: they are computed by the op's numpy reference at compile time
and the kernel copies that table (an extra constant operand).
"""

from __future__ import annotations

import math

import numpy as np

from compiler.ir.ops.shape import slice_parts
from compiler.ir.registry import get_op
from targets.kernels._te import (
    broadcast_index,
    generic,
    placeholders,
    prim_func,
    tvm_dtype,
)
from targets.kernels._te import (
    load as _load,
)
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__: list[str] = []


def _unravel(flat, shape):
    out = []
    for d in reversed(shape):
        out.append(flat % d if d != 1 else 0)
        flat = flat // d
    return list(reversed(out))


def _ravel(idx, shape):
    flat = 0
    for i, d in zip(idx, shape, strict=True):
        flat = flat * d + i
    return flat


def _simple(req: KernelRequest, ins: list, outs: list, note: str = "") -> KernelImpl:
    dt = req.output_types[0].dtype
    return KernelImpl(prim_func([*ins, *outs], generic(req.cpu, dt)), note=note or req.op)


@register_kernel("reshape", "identity")
def reshape(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    xs, out = req.input_types[0].shape, req.output_types[0]
    if tuple(xs) == tuple(out.shape):
        Y = te.compute(out.shape, lambda *i: _load(X, i), name="out")
    else:
        Y = te.compute(out.shape, lambda *i: _load(X, _unravel(_ravel(i, out.shape), xs)),
                       name="out")
    return _simple(req, [X], [Y])


@register_kernel("transpose")
def transpose(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    perm = req.attrs["perm"]
    out = req.output_types[0]

    def body(*i):
        src = [0] * len(perm)
        for o, p in enumerate(perm):
            src[p] = i[o]
        return _load(X, src)

    return _simple(req, [X], [te.compute(out.shape, body, name="out")])


@register_kernel("concat")
def concat(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    ins = placeholders(req)
    out = req.output_types[0]
    axis = req.attrs["axis"] % out.rank
    offsets = np.cumsum([0] + [t.shape[axis] for t in req.input_types]).tolist()

    def body(*i):
        val = None
        for j in reversed(range(len(ins))):
            if req.input_types[j].shape[axis] == 0:
                continue
            src = list(i)
            src[axis] = i[axis] - offsets[j]
            v = _load(ins[j], src)
            val = v if val is None else tirx.Select(i[axis] < offsets[j + 1], v, val)
        return val

    return _simple(req, ins, [te.compute(out.shape, body, name="out")])


@register_kernel("split")
def split(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    axis = req.attrs["axis"] % req.input_types[0].rank
    offsets = np.cumsum([0] + list(req.attrs["sizes"])).tolist()

    def piece(j, t):
        def body(*i):
            src = list(i)
            src[axis] = i[axis] + offsets[j]
            return _load(X, src)
        return te.compute(t.shape, body, name=f"out{j}")

    outs = [piece(j, t) for j, t in enumerate(req.output_types)]
    return _simple(req, [X], outs)


@register_kernel("slice")
def slice_(req: KernelRequest) -> KernelImpl:
    from tvm import te


    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    parts = slice_parts(xt.shape, req.attrs)
    starts_steps = [sl.indices(d)[::2] for sl, d in zip(parts, xt.shape, strict=True)]

    def body(*i):
        return _load(X, [b + s * ii if (b, s) != (0, 1) else ii
                         for ii, (b, s) in zip(i, starts_steps, strict=True)])

    return _simple(req, [X], [te.compute(out.shape, body, name="out")])


@register_kernel("gather")
def gather(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    X, Idx = placeholders(req)
    xt, it, out = req.input_types[0], req.input_types[1], req.output_types[0]
    axis = req.attrs["axis"] % xt.rank
    dim = xt.shape[axis]

    def body(*o):
        r = it.rank
        v = _load(Idx, o[axis:axis + r]).astype("int32")
        v = tirx.Select(v < 0, v + dim, v)
        v = te.min(te.max(v, 0), dim - 1)  # out-of-range indices: clamp, never read outside
        return _load(X, list(o[:axis]) + [v] + list(o[axis + r:]))

    return _simple(req, [X, Idx], [te.compute(out.shape, body, name="out")])


@register_kernel("expand")
def expand(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    Y = te.compute(out.shape, lambda *i: _load(X, broadcast_index(i, out.shape, xt.shape)),
                   name="out")
    return _simple(req, [X], [Y])


@register_kernel("tile")
def tile(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    off = out.rank - xt.rank

    def body(*i):
        return _load(X, [i[off + j] % d if d != out.shape[off + j] else i[off + j]
                         for j, d in enumerate(xt.shape)])

    return _simple(req, [X], [te.compute(out.shape, body, name="out")])


@register_kernel("trilu")
def trilu(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    out = req.output_types[0]
    k, upper = int(req.attrs["k"]), bool(req.attrs["upper"])
    zero = tirx.const(0, tvm_dtype(out.dtype)) if out.dtype != "bool" else tirx.const(False)

    def body(*i):
        r, c = i[-2], i[-1]
        keep = (c - r >= k) if upper else (c - r <= k)
        return tirx.Select(keep, _load(X, i), zero)

    return _simple(req, [X], [te.compute(out.shape, body, name="out")])


@register_kernel("cumsum")
def cumsum(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    out = req.output_types[0]
    axis = req.attrs["axis"] % out.rank
    n = out.shape[axis]
    excl, rev = bool(req.attrs["exclusive"]), bool(req.attrs["reverse"])
    dt = tvm_dtype(out.dtype)

    def body(*i):
        j = te.reduce_axis((0, n), "j")
        src = list(i)
        src[axis] = j
        if rev:
            cond = j > i[axis] if excl else j >= i[axis]
        else:
            cond = j < i[axis] if excl else j <= i[axis]
        return te.sum(tirx.Select(cond, _load(X, src), tirx.const(0, dt)), axis=j)

    return _simple(req, [X], [te.compute(out.shape, body, name="out")],
                   note=f"cumsum over {n} (quadratic)")


@register_kernel("fill")
def fill(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    out = req.output_types[0]
    val = np.asarray(req.attrs["value"]).astype(out.np_dtype).item()
    dt = tvm_dtype(out.dtype)
    Y = te.compute(out.shape, lambda *i: tirx.const(val, dt), name="out")
    return _simple(req, [], [Y])


@register_kernel("shape", "arange")
def table(req: KernelRequest) -> KernelImpl:
    """Results that depend on attributes alone: computed now, copied at run time."""
    from tvm import te


    out = req.output_types[0]
    xs = [np.zeros(t.shape, t.np_dtype) for t in req.input_types]
    arr = np.asarray(get_op(req.op).reference(xs, req.attrs)[0]).astype(out.np_dtype)
    ins = placeholders(req)
    T = te.placeholder(out.shape, tvm_dtype(out.dtype), name="table")
    Y = te.compute(out.shape, lambda *i: _load(T, i), name="out")
    impl = _simple(req, [*ins, T], [Y], note=f"{req.op}: {math.prod(out.shape)} values")
    impl.extra_const_inputs = [arr]
    return impl
