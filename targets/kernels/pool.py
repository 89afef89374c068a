"""max_pool2d, avg_pool2d, global_avg_pool, global_max_pool kernels (NCHW and NHWC).

Pooling is memory-bound; the schedules only make sure memory is streamed well:

- Windowed pools read the input directly (padding is a condition on the window position,
  the same for every channel); NHWC vectorises over channels, NCHW over output columns.
  ``avg_pool2d`` divides by a closed-form per-position count (count_include_pad counts the
  padded area, never the ceil-mode overhang), matching compiler/ir/ops/nn.py.
- Global pools accumulate a channel vector (NHWC) or a channel's contiguous plane (NCHW) in a
  local buffer; the mean multiplies by ``1/(H*W)``.
- The outer loops are fused and parallel across ``cpu.num_cores`` when the work is large.
"""

from __future__ import annotations

import math
from typing import Any

from compiler.errors import OpError
from compiler.ir.ops.nn import pool_out_size
from targets.kernels._te import nan_max_reducer, tvm_dtype
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest, register_kernel

__all__ = ["pool2d", "global_pool"]

_PARALLEL_MIN = 262144  # input elements below which a pool runs on one thread (~10 µs)


def _ints(attrs: dict[str, Any], key: str, default: list[int], n: int, label: str) -> list[int]:
    v = attrs.get(key)
    v = list(default if v is None else v)
    if len(v) != n:
        raise OpError(f"{label}: {key} must have {n} values, got {v}")
    return [int(x) for x in v]


def _vec_width(extent: int, lanes: int) -> int:
    """The vector width for a loop of ``extent``: a power of two dividing it (LLVM scalarises
    odd widths like 24), at least 4, else 0 (not vectorised)."""
    w = lanes
    while w >= 4:
        if extent % w == 0:
            return w
        w //= 2
    return 0


def _low(dtype: str):
    from tvm import tirx

    return tirx.min_value(dtype)


def _axis_count(o, s: int, p: int, k: int, d: int, lo: int, hi: int):
    """How many of the window taps ``o*s - p + j*d`` (j < k) lie in ``[lo, hi)``."""
    from tvm import tirx

    base = o * s - p
    first = tirx.max(tirx.floordiv(lo - base + d - 1, d), 0)
    last = tirx.min(tirx.floordiv(hi - base + d - 1, d), k)
    return tirx.max(last - first, 0)


@register_kernel("max_pool2d", "avg_pool2d")
def pool2d(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    label = f"{req.op} {req.node_label}".strip()
    a = req.attrs
    layout = str(a.get("layout", "NCHW"))
    if layout not in ("NCHW", "NHWC") or req.input_types[0].rank != 4:
        raise OpError(f"{label}: needs a 4-D NCHW or NHWC input, got {req.input_types[0]} "
                      f"({layout})")
    kh, kw = _ints(a, "kernel", [1, 1], 2, label)
    sh, sw = _ints(a, "strides", [1, 1], 2, label)
    dh, dw = _ints(a, "dilations", [1, 1], 2, label)
    pt, pl, pb, pr = _ints(a, "pads", [0, 0, 0, 0], 4, label)
    ceil_mode = bool(a.get("ceil_mode", False))
    xt = req.input_types[0]
    dtype = tvm_dtype(xt.dtype)
    if layout == "NCHW":
        n, c, h, w = xt.shape
    else:
        n, h, w, c = xt.shape
    oh = pool_out_size(h, kh, sh, pt, pb, dh, ceil_mode)
    ow = pool_out_size(w, kw, sw, pl, pr, dw, ceil_mode)
    oshape = (n, c, oh, ow) if layout == "NCHW" else (n, oh, ow, c)
    if tuple(req.output_types[0].shape) != oshape:
        raise OpError(f"{label}: result type {req.output_types[0]} does not match the pooled "
                      f"shape {list(oshape)}")
    X = te.placeholder(xt.shape, dtype, name="in0")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    is_max = req.op == "max_pool2d"

    def tap(b, ch, y, x):
        iy = y * sh - pt + ry * dh
        ix = x * sw - pl + rx * dw
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        iyc = tirx.max(tirx.min(iy, h - 1), 0)
        ixc = tirx.max(tirx.min(ix, w - 1), 0)
        v = X[b, ch, iyc, ixc] if layout == "NCHW" else X[b, iyc, ixc, ch]
        return tirx.if_then_else(inside, v, _low(dtype) if is_max else tirx.const(0, dtype))

    def red(b, ch, y, x):
        if is_max:   # a NaN in the window gives NaN (te.max would drop it)
            return nan_max_reducer()(tap(b, ch, y, x), axis=[ry, rx])
        return te.sum(tap(b, ch, y, x), axis=[ry, rx])

    if layout == "NCHW":
        R = te.compute(oshape, lambda b, ch, y, x: red(b, ch, y, x), name="acc")
    else:
        R = te.compute(oshape, lambda b, y, x, ch: red(b, ch, y, x), name="acc")
    if is_max:
        args = [X, R]
    else:
        incl = bool(a.get("count_include_pad", False))
        lo_h, hi_h = (-pt, h + pb) if incl else (0, h)
        lo_w, hi_w = (-pl, w + pr) if incl else (0, w)

        def avg(idx):
            y, x = (idx[2], idx[3]) if layout == "NCHW" else (idx[1], idx[2])
            cnt = (_axis_count(y, sh, pt, kh, dh, lo_h, hi_h)
                   * _axis_count(x, sw, pl, kw, dw, lo_w, hi_w))
            return R[idx] / tirx.Cast(dtype, tirx.max(cnt, 1))

        out = te.compute(oshape, lambda *i: avg(i), name="out")
        args = [X, out]
    sch = Schedule(te.create_prim_func(args))
    _schedule_pool(sch, req.cpu, req.cpu.lanes(xt.dtype), layout, is_max,
                   xt.size >= _PARALLEL_MIN, (kh, kw))
    return KernelImpl(sch.mod["main"], note=f"{req.op} {layout} {kh}x{kw}/{sh}")


def _after(sch, block, at) -> list:
    """The loops of ``block`` nested inside loop ``at``."""
    loops = sch.get_loops(block)
    for i, lp in enumerate(loops):
        if sch.get(lp).same_as(sch.get(at)):
            return loops[i + 1:]
    return loops


def _reduce_outside(sch, acc, at, vec: int, n_red: int = 2) -> None:
    """Move ``acc``'s ``n_red`` reduction loops outside its spatial loops under ``at``,
    vectorise the innermost spatial one, and split off the initialisation.

    ``n_red`` < 2 when compute_at dropped unit-extent window loops (a 1xk or kx1 window)."""
    rest = _after(sch, acc, at) if at is not None else sch.get_loops(acc)
    if n_red == 0:
        if vec and rest:
            sch.vectorize(rest[-1])
        return  # a 1x1 window: no reduction loop; the block keeps its init
    spatial, red = rest[:-n_red], rest[-n_red:]
    if spatial:
        sch.reorder(*red, *spatial)
        if vec:
            sch.vectorize(spatial[-1])
    sch.decompose_reduction(acc, red[0])


def _schedule_pool(sch, cpu: CpuInfo, lanes: int, layout: str, is_max: bool, big: bool,
                   window: tuple[int, int] = (2, 2)) -> None:
    acc = sch.get_sblock("acc")
    top = acc if is_max else sch.get_sblock("out")
    b, d1, d2, d3 = sch.get_loops(top)[:4]
    inner = int(sch.get(d3).extent)
    vec = _vec_width(inner, lanes)
    outer = sch.fuse(b, d1)
    at = d2
    if vec and vec < inner:
        at, _ = sch.split(d3, [None, vec])
    # parallel before decompose_reduction: TVM refuses it over a bare update block
    if big and cpu.num_cores > 1:
        sch.parallel(outer)
    if is_max:
        _reduce_outside(sch, acc, at, vec)
    else:
        sch.compute_at(acc, at)
        sch.set_scope(acc, 0, "local")
        if vec:
            sch.vectorize(sch.get_loops(top)[-1])
        # compute_at drops unit-extent loops: a 1x5 window leaves one reduction loop
        _reduce_outside(sch, acc, at, vec, sum(k > 1 for k in window))


@register_kernel("global_avg_pool", "global_max_pool")
def global_pool(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    label = f"{req.op} {req.node_label}".strip()
    layout = str(req.attrs.get("layout", "NCHW"))
    xt = req.input_types[0]
    if layout not in ("NCHW", "NHWC") or xt.rank < 3:
        raise OpError(f"{label}: needs an NCHW or NHWC input of rank >= 3, got {xt} ({layout})")
    dtype = tvm_dtype(xt.dtype)
    shape = xt.shape
    spatial = list(range(2, xt.rank)) if layout == "NCHW" else list(range(1, xt.rank - 1))
    oshape = tuple(1 if i in spatial else d for i, d in enumerate(shape))
    if tuple(req.output_types[0].shape) != oshape:
        raise OpError(f"{label}: result type {req.output_types[0]} does not match "
                      f"{list(oshape)}")
    X = te.placeholder(shape, dtype, name="in0")
    raxes = [te.reduce_axis((0, shape[i]), f"r{i}") for i in spatial]
    is_max = req.op == "global_max_pool"

    def body(*idx):
        src = list(idx)
        for i, r in zip(spatial, raxes, strict=True):
            src[i] = r
        return (nan_max_reducer() if is_max else te.sum)(X[tuple(src)], axis=raxes)

    R = te.compute(oshape, body, name="acc")
    inv = 1.0 / math.prod(shape[i] for i in spatial)
    if is_max:
        args = [X, R]
    else:
        out = te.compute(oshape, lambda *i: R[i] * tirx.const(inv, dtype), name="out")
        args = [X, out]
    sch = Schedule(te.create_prim_func(args))
    lanes = req.cpu.lanes(xt.dtype)
    par = req.cpu.num_cores > 1 and xt.size >= _PARALLEL_MIN
    if layout == "NHWC" and xt.rank == 4:
        _schedule_global_nhwc(sch, lanes, is_max, par)
    else:
        _schedule_global_nchw(sch, is_max, par, xt.rank)
    return KernelImpl(sch.mod["main"], note=f"{req.op} {layout}")


def _schedule_global_nhwc(sch, lanes: int, is_max: bool, par: bool) -> None:
    acc = sch.get_sblock("acc")
    top = acc if is_max else sch.get_sblock("out")
    b, d1, d2, c = sch.get_loops(top)[:4]
    cext = int(sch.get(c).extent)
    vec = _vec_width(cext, lanes)
    if vec:
        co, ci = sch.split(c, [None, vec])
        outer = sch.fuse(b, d1, d2, co)
    else:
        outer, ci = sch.fuse(b, d1, d2, c), None
    if par:  # before decompose_reduction (TVM refuses it over a bare update block)
        sch.parallel(outer)
    if not is_max:
        sch.compute_at(acc, outer)
        sch.set_scope(acc, 0, "local")
        if ci is not None:
            sch.vectorize(ci)
    _reduce_outside(sch, acc, outer, vec)


def _schedule_global_nchw(sch, is_max: bool, par: bool, rank: int) -> None:
    acc = sch.get_sblock("acc")
    top = acc if is_max else sch.get_sblock("out")
    loops = sch.get_loops(top)[:rank]
    outer = sch.fuse(*loops)
    if par:
        sch.parallel(outer)
    if not is_max:
        sch.compute_at(acc, outer)
        sch.set_scope(acc, 0, "local")
