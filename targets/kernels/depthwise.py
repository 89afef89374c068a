"""Depthwise conv2d (groups == channels == output channels): vectorised over channels.

Moved out of conv.py; ``conv.conv2d`` delegates here when ``ConvGeom.depthwise``.

- Weights are ``[KH, KW, C]`` (packed at compile time from OIHW/OHWI/HWIO; a non-constant
  weight gets the same layout from an in-kernel ``wpack`` stage).
- The output is tiled ``owb`` columns x ``cb`` channels (``cb`` a power of two up to two
  vectors of ``cpu.lanes``); the kernel window is unrolled and accumulates in registers.
- NHWC padding is inlined as conditions (memory-bound: a padded copy would double the
  traffic); an NCHW input keeps conv.py's transposing ``pad`` stage.
- Bias and the fused activation are the epilogue, applied as each tile is written.
- Rows x channel tiles are one parallel loop (7x7x960 is 7 x 60 tasks: balanced on any
  thread count), parallel whenever it has a few tasks per core: whether a small one is worth
  sharing out is timed per loop by the runtime's launcher (``runtime/pool.py``), not guessed
  from its MAC count here.
"""

from __future__ import annotations

from targets.kernels._te import accumulator_dtype, tvm_dtype
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest
from targets.kernels.conv_common import ConvGeom, pack_dw_weight, pick_width, to_oihw

__all__ = ["depthwise_conv2d", "dw_tiles", "window_tile", "ACC_VECTORS"]


# accumulator vectors per register tile: half of a 16-register ISA (AVX2), leaving room for
# the input and weight vectors; 32-register ISAs measured no faster with more (spills)
ACC_VECTORS = 8


def dw_tiles(g: ConvGeom, cpu: CpuInfo, dtype: str) -> tuple[int, int, int]:
    """(cb, owb, owp): channels per vector tile, columns per register tile, padded width.

    Wide maps: two vectors of channels x ``ACC_VECTORS / 2`` columns. Narrow maps (a row in
    at most two tiles: the 14x14 and 7x7 stages): one vector of channels x half a row or the
    whole row, so the few columns are not cut into 2-column tiles with padding (on one Zen 4
    core 7x7x1152 5x5 + SiLU 0.054 -> 0.045 ms, 14x14x672 0.130 -> 0.113 ms; loaded machine,
    best of 200)."""
    lanes = cpu.lanes(dtype)
    narrow = g.ow <= 2 * ACC_VECTORS
    cb = 1
    for cand in (lanes, lanes // 2, lanes // 4, 8, 4, 2) if narrow else \
            (2 * lanes, lanes, lanes // 2, lanes // 4, 8, 4, 2):
        if cand >= 1 and g.oc % cand == 0:
            cb = cand
            break
    vecs = max(1, cb // lanes)
    if narrow:
        owb = -(-g.ow // -(-g.ow // (ACC_VECTORS // vecs)))
    else:
        owb = pick_width(g.ow, max(1, ACC_VECTORS // vecs))
    return cb, owb, -(-g.ow // owb) * owb


def window_tile(sch, blk, ry, rx, xi, ci, window: int) -> None:
    """The depthwise register tile of block ``blk``, its loops ordered (ry, rx, xi, ci): the
    window unrolled when it has at most 25 taps, the tile's columns ``xi`` unrolled, its
    channels ``ci`` vectorised, the zeroing split off at ``ry``."""
    if window <= 25:
        sch.unroll(ry)
        sch.unroll(rx)
    sch.unroll(xi)
    sch.vectorize(ci)
    sch.decompose_reduction(blk, ry)


def depthwise_conv2d(req: KernelRequest, g: ConvGeom, layout: str, kernel_layout: str
                     ) -> KernelImpl:
    """The depthwise conv of ``req`` (geometry ``g``, input ``layout``, weight layout)."""
    from tvm import te
    from tvm.s_tir import Schedule

    from targets.kernels.conv import (
        acc_ir_dtype,
        conv_epilogue,
        input_stage,
        schedule_stage,
    )

    odt = req.output_types[0].dtype
    dtype = tvm_dtype(odt)
    lanes = req.cpu.lanes(acc_ir_dtype(odt))
    cb, owb, owp = dw_tiles(g, req.cpu, acc_ir_dtype(odt))
    X = te.placeholder(req.input_types[0].shape, dtype, name="in0")
    w_const = 1 in req.const_inputs
    if w_const:
        W = te.placeholder((g.kh, g.kw, g.oc), dtype, name="in1")
        wd = W
    else:
        W = te.placeholder(req.input_types[1].shape, dtype, name="in1")

        def wbody(ky, kx, ch):
            if kernel_layout == "OIHW":
                return W[ch, 0, ky, kx]
            if kernel_layout == "OHWI":
                return W[ch, ky, kx, 0]
            return W[ky, kx, 0, ch]

        wd = te.compute((g.kh, g.kw, g.oc), wbody, name="wpack")
    bias = te.placeholder(req.input_types[2].shape, dtype, name="in2") \
        if len(req.input_types) > 2 else None
    hs = (g.oh - 1) * g.sh + g.dh * (g.kh - 1) + 1
    ws = (owp - 1) * g.sw + g.dw * (g.kw - 1) + 1
    need_stage = layout == "NCHW" or g.pt or g.pl or hs > g.h or ws > g.w
    xs = input_stage(X, layout, g.n, g.ic, g.h, g.w, hs, ws, g.pt, g.pl) if need_stage else X
    ry = te.reduce_axis((0, g.kh), "ry")
    rx = te.reduce_axis((0, g.kw), "rx")
    acc = accumulator_dtype(dtype)
    D = te.compute((g.n, g.oh, owp, g.oc),
                   lambda b, y, x, ch: te.sum(
                       xs[b, y * g.sh + ry * g.dh, x * g.sw + rx * g.dw, ch].astype(acc)
                       * wd[ry, rx, ch].astype(acc), axis=[ry, rx]), name="conv")
    out = conv_epilogue(lambda b, y, x, ch: D[b, y, x, ch], bias, req.attrs, g, layout, dtype)
    args = [X, W] + ([bias] if bias is not None else []) + [out]
    sch = Schedule(te.create_prim_func(args))
    tasks = g.n * g.oh * (g.oc // cb)
    par = req.cpu.num_cores > 1 and tasks >= 2 * req.cpu.num_cores
    conv, out = sch.get_sblock("conv"), sch.get_sblock("out")
    b, y, x, ch, ry_, rx_ = sch.get_loops(conv)
    xo, xi = sch.split(x, [None, owb])
    co, ci = sch.split(ch, [None, cb])
    sch.reorder(b, y, co, xo, ry_, rx_, xi, ci)
    fused = sch.fuse(b, y, co)  # rows x channel tiles: enough tasks to balance small maps
    if par:
        sch.parallel(fused)
    sch.reverse_compute_at(out, xo)
    # the tile stays in the default scope: a small buffer there becomes a stack alloca that
    # LLVM promotes to registers; "local" inside the parallel body was a workspace buffer,
    # which LLVM could not prove apart from the input, so it stored the accumulators between
    # window steps (EfficientNet-B0 and MobileNetV2 depthwise, 2 threads, AVX-512 x86 host
    # at load ~6: 2.11 -> 0.99 ms summed, every shape 0.34-0.60x)
    if layout == "NHWC":
        sch.vectorize(sch.get_loops(out)[-1])
    window_tile(sch, conv, ry_, rx_, xi, ci, g.kh * g.kw)
    if need_stage and layout == "NHWC":  # a padded copy costs more than the conditions
        sch.compute_inline(sch.get_sblock("pad"))
    schedule_stage(sch, "pad", lanes, par)  # NCHW: the stage transposes to NHWC
    schedule_stage(sch, "wpack", lanes, False)
    note = f"depthwise {layout} {g.kh}x{g.kw}/{g.sh}: tile {owb}x{cb}"
    return KernelImpl(sch.mod["main"],
                      {1: lambda w: pack_dw_weight(to_oihw(w, kernel_layout))} if w_const else {},
                      note=note)
