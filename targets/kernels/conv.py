"""conv2d and conv_transpose2d kernels: one register-tiled NHWC micro-kernel for all of them.

The shape of every conv kernel (x86 AVX-512 numbers; everything scales with ``cpu.lanes``):

- The input is read as NHWC. If the conv needs zero padding (or the input is NCHW, or the conv
  is transposed) a ``pad`` stage first writes a padded NHWC copy (parallel, vectorised over C).
- Constant weights are packed at compile time to ``[NB, KH, KW, ICg, ob]`` (conv_common.py),
  ``ob`` = 32 output channels, so the inner loop reads one contiguous ``ob`` vector per
  (kh, kw, ic). Non-constant weights get the same packing as an in-kernel ``wpack`` stage.
- 3x3 stride-1 f32 convs with a constant weight run as Winograd F(2,3) or F(4,3) where
  ``winograd.winograd_tile`` estimates a gain (winograd.py); everything below is the direct conv.
- The output is tiled ``owb`` columns x ``ob`` channels (7 x 32 = 14 zmm accumulators; the
  accumulator budget comes from the ISA's register count, ``conv_common.accumulator_registers``);
  each tile accumulates in a local buffer (registers) over (kh, kw, ic), columns unrolled,
  channels vectorised, the kernel width unrolled. Bias and the activation are applied as the
  tile is written out (epilogue), in NHWC or NCHW.
- Loop order: (n, row, block, column-tile) when the input is bigger than the weights, else
  (n, block, row, column-tile) so one block's weights stay in L2; the three outer loops are
  fused and parallel. A 1x1 stride-1 conv is the same loop nest: a GEMM whose M tile is a run
  of ``owb`` pixels of one row.
- Depthwise convs (groups == C) are depthwise.py's (vectorised over channels).
- f16/bf16 convs sum in f32 and round once after bias and activation; tiles are sized by the
  accumulator's registers. Vector widths are powers of two (LLVM scalarises 24-wide vectors).
- conv_transpose2d is the conv with flipped, in/out-swapped weights over the zero-upsampled,
  padded input (the ``pad`` stage does the upsampling), so it reuses this micro-kernel.
"""

from __future__ import annotations

from typing import Any

from compiler.errors import OpError
from targets.kernels._te import accumulator_dtype, activation, dtype_of, expr, tvm_dtype
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest, register_kernel
from targets.kernels.conv_common import (
    ConvGeom,
    ConvTiles,
    conv_geom,
    conv_tiles,
    pack_conv_weight,
    to_oihw,
    transpose_weight_to_conv,
)

__all__ = ["conv2d", "conv2d_fused", "conv_transpose2d", "input_stage", "conv_epilogue",
           "schedule_stage", "fused_operands", "accumulate_in_registers", "acc_ir_dtype",
           "PARALLEL_MIN_MACS", "ClampedColumns"]

# Below this many multiply-adds (~10-25 µs on one AVX-512 core) a conv runs on one thread: a
# parallel launch costs µs, and on a busy machine a descheduled worker stalls the whole call.
PARALLEL_MIN_MACS = 1_000_000


def acc_ir_dtype(dtype: str) -> str:
    """IR name of the accumulator dtype for operands of IR dtype ``dtype`` (f16 sums in f32)."""
    return "f32" if accumulator_dtype(tvm_dtype(dtype)) == "float32" else dtype


# ---------------------------------------------------------------- TE stages

def fused_operands(req: KernelRequest, dtype: str):
    """``(bias, scale, residual)`` placeholders of a conv2d / conv2d_fused request, None where
    the node has no such operand (conv2d_fused: ``b`` always, ``scale`` with ``input_scale``,
    ``residual`` last with ``residual``)."""
    from tvm import te

    types = req.input_types
    bias = te.placeholder(types[2].shape, dtype, name="in2") if len(types) > 2 else None
    scale = (te.placeholder(types[3].shape, dtype, name="in3")
             if req.attrs.get("input_scale") else None)
    residual = (te.placeholder(types[-1].shape, dtype, name=f"in{len(types) - 1}")
                if req.attrs.get("residual") else None)
    return bias, scale, residual


def input_stage(X, layout: str, n: int, c: int, src_h: int, src_w: int, hs: int, ws: int,
                 top: int, left: int, up_h: int = 1, up_w: int = 1):
    """``Xs[n, y, x, c]`` (NHWC, ``hs x ws``) = the input at ``((y - top)/up_h, (x - left)/up_w)``
    where that is an input pixel, else 0 (padding, or a zero inserted by upsampling)."""
    from tvm import te, tirx

    zero = tirx.const(0, X.dtype)

    def body(b, y, x, ch):
        conds = []
        iy, ix = y - top, x - left
        if up_h > 1:
            conds.append(tirx.floormod(iy, up_h) == 0)
            iy = tirx.floordiv(iy, up_h)
        if up_w > 1:
            conds.append(tirx.floormod(ix, up_w) == 0)
            ix = tirx.floordiv(ix, up_w)
        conds += [iy >= 0, iy < src_h, ix >= 0, ix < src_w]
        iyc = tirx.max(tirx.min(iy, src_h - 1), 0)
        ixc = tirx.max(tirx.min(ix, src_w - 1), 0)
        v = X[b, ch, iyc, ixc] if layout == "NCHW" else X[b, iyc, ixc, ch]
        return tirx.if_then_else(tirx.all(*conds), v, zero)

    return te.compute((n, hs, ws, c), body, name="pad")


class ClampedColumns:
    """An NHWC tensor read at ``[n, y, min(x, width - 1), c]``: the input of a conv whose
    padded last column tile reads past the input (those columns' results are discarded)."""

    def __init__(self, x, width: int) -> None:
        self.x, self.width, self.dtype = x, width, x.dtype

    def __getitem__(self, idx):
        from tvm import tirx

        b, y, col, ch = idx
        return self.x[b, y, tirx.min(col, self.width - 1), ch]


def _activation(v, attrs: dict[str, Any]):
    return activation(v, str(attrs.get("activation", "none")),
                      float(attrs.get("clip_min", 0.0)), float(attrs.get("clip_max", 6.0)))


def conv_epilogue(acc_at, bias, attrs, g: ConvGeom, out_layout: str, out_dt: str | None = None,
                  residual=None):
    """The output tensor: ``act(acc_at(n, y, x, oc) + bias[oc] + residual[...])`` in
    ``out_layout``, rounded to ``out_dt`` when the accumulator is wider (f16 convs sum in f32);
    ``residual`` (optional) is shaped like the output."""
    from tvm import te

    def val(b, y, x, oc):
        v = expr(acc_at(b, y, x, oc))
        if bias is not None:
            v = v + bias[oc]
        if residual is not None:
            r = residual[b, y, x, oc] if out_layout == "NHWC" else residual[b, oc, y, x]
            v = v + r.astype(dtype_of(v))
        v = _activation(v, attrs)
        return v if out_dt is None or dtype_of(v) == out_dt else v.astype(out_dt)

    if out_layout == "NHWC":
        return te.compute((g.n, g.oh, g.ow, g.oc), lambda b, y, x, oc: val(b, y, x, oc),
                          name="out")
    return te.compute((g.n, g.oc, g.oh, g.ow), lambda b, oc, y, x: val(b, y, x, oc), name="out")


def _conv_core(xs, wp, g: ConvGeom, t: ConvTiles, scale_at=None):
    """``C[n, y, x, blk, oci]`` = the conv of the NHWC stage ``xs`` with packed weights.
    ``scale_at(n, ic)`` (optional) scales the input channels: it multiplies the weight vector
    as it is loaded (one multiply per weight vector and column tile, not one per input
    pixel). A conv with many output channels scales its input in a ``scale`` stage instead
    (measured on a 2-core AVX-512 x86 host under load, see the commit; conv + mul kernels /
    scale in the weight loads / scale stage: 1152->192 @7x7 212 / 261 / 210 us, 480->80
    @14x14 189 / 207 / 176 us; 32->16 @112x112 177 / 141 us and 144->24 @56x56 351 /
    301-351 us keep it in the weight loads)."""
    from tvm import te

    rc = te.reduce_axis((0, g.icg), "rc")
    ry = te.reduce_axis((0, g.kh), "ry")
    rx = te.reduce_axis((0, g.kw), "rx")

    def body(b, y, x, blk, oci):
        ch = rc if g.groups == 1 else (blk // t.nb_g) * g.icg + rc
        acc = accumulator_dtype(str(xs.dtype))
        w = wp[blk, ry, rx, rc, oci].astype(acc)
        if scale_at is not None:
            w = w * scale_at(b, ch).astype(acc)
        return te.sum(xs[b, y * g.sh + ry * g.dh, x * g.sw + rx * g.dw, ch].astype(acc)
                      * w, axis=[rc, ry, rx])

    return te.compute((g.n, g.oh, t.owp, g.groups * t.nb_g, t.ob), body, name="conv")


def _weight_stage(W, kernel_layout: str, g: ConvGeom, t: ConvTiles, transposed: bool):
    """In-kernel packing of a non-constant weight (same layout as :func:`pack_conv_weight`)."""
    from tvm import te, tirx

    ocg = g.ocg

    def at(oc, ic, ky, kx):  # canonical [OC, ICg, KH, KW]
        if transposed:  # W: [IC, OCg, KH, KW]
            grp = oc // ocg
            return W[grp * g.icg + ic, oc % ocg, g.kh - 1 - ky, g.kw - 1 - kx]
        if kernel_layout == "OIHW":
            return W[oc, ic, ky, kx]
        if kernel_layout == "OHWI":
            return W[oc, ky, kx, ic]
        return W[ky, kx, ic, oc]

    def body(blk, ky, kx, ic, oci):
        r = (blk % t.nb_g) * t.ob + oci
        oc = (blk // t.nb_g) * ocg + tirx.min(r, ocg - 1)
        return tirx.if_then_else(r < ocg, at(oc, ic, ky, kx), tirx.const(0, W.dtype))

    return te.compute((g.groups * t.nb_g, g.kh, g.kw, g.icg, t.ob), body, name="wpack")


# ---------------------------------------------------------------- schedules

def schedule_stage(sch, name: str, lanes: int, parallel: bool) -> None:
    """Parallel over the two outer loops, vectorised over the last one when it is whole."""
    try:
        blk = sch.get_sblock(name)
    except Exception:  # noqa: BLE001 (stage absent)
        return
    loops = sch.get_loops(blk)
    last = int(sch.get(loops[-1]).extent)
    if last % lanes == 0 and len(loops) > 2:
        _, vi = sch.split(loops[-1], [None, lanes])
        sch.vectorize(vi)
    if parallel:
        sch.parallel(sch.fuse(loops[0], loops[1]))


def accumulate_in_registers(sch, blk, at, unrolled, vector, red, parallel: bool) -> None:
    """``blk``'s result tile under loop ``at`` lives in a small buffer written back once,
    vectorised; ``unrolled`` is unrolled, ``vector`` vectorised, and the reduction's
    initialisation split off at loop ``red`` (a GEMM register tile). ``parallel``: ``at`` is
    inside a parallel loop.

    Inside a parallel body the buffer is in the default scope (a small one becomes a stack
    alloca that LLVM promotes to registers), because "local" there became a
    ``TVMBackendAllocWorkspace`` buffer LLVM could not tell apart from the inputs (it stored
    the accumulators between steps): Winograd F(4,3)/F(2,3) ResNet-50 3x3 convs, 2 threads,
    AVX-512 x86 host at load ~4, two alternating runs: 0.86-0.98x each, 13.8 -> 13.1 and
    13.5 -> 12.6 ms summed. Outside one "local" stays: squeeze_excite's (serial) FCs measured
    12-15% slower in the default scope (480 and 672 channels at 14x14, three runs)."""
    wb = sch.cache_write(blk, 0, "global" if parallel else "local")
    sch.reverse_compute_at(wb, at)
    sch.vectorize(sch.get_loops(wb)[-1])
    sch.unroll(unrolled)
    sch.vectorize(vector)
    sch.decompose_reduction(blk, red)


def _schedule_conv(sch, g: ConvGeom, t: ConvTiles, cpu: CpuInfo, lanes: int,
                   out_layout: str) -> None:
    par = cpu.num_cores > 1 and g.macs >= PARALLEL_MIN_MACS
    conv, out = sch.get_sblock("conv"), sch.get_sblock("out")
    b, y, x, blk, oci, rc, ry, rx = sch.get_loops(conv)
    xo, xi = sch.split(x, [None, t.owb])
    outer = [b, blk, y] if t.blocks_outer else [b, y, blk]
    red = [ry, rx, rc]  # (splitting IC into L1-sized chunks measured no faster here)
    sch.reorder(*outer, xo, *red, xi, oci)
    if g.icg <= 4:
        sch.unroll(rc)
    elif g.kw <= 7:
        # Not with rc unrolled too: neighbouring columns read the same input pixel at another
        # rx, LLVM keeps those broadcasts live across the whole unrolled body and spills them
        # (7x7/2 stem 3->64 at 224: 82 -> 95 GFLOP/s on one Zen 4 core with rx kept a loop)
        sch.unroll(rx)
    fused = sch.fuse(*outer)
    if par:
        sch.parallel(fused)
    simple = g.groups == 1 or g.ocg % t.ob == 0
    if simple:
        sch.reverse_compute_at(out, xo)   # the tile: default scope (see depthwise.py)
        if out_layout == "NHWC":
            sch.vectorize(sch.get_loops(out)[-1])
    else:  # per-group channel padding: the epilogue runs over the whole output afterwards
        schedule_stage(sch, "out", lanes, par)
    sch.unroll(xi)
    sch.vectorize(oci)
    sch.decompose_reduction(conv, red[0])
    schedule_stage(sch, "scale", lanes, par)
    schedule_stage(sch, "pad", lanes, par)
    schedule_stage(sch, "wpack", lanes, par)


def _conv_impl(req: KernelRequest, g: ConvGeom, layout: str, out_layout: str,
               stage_args: dict[str, int], wtransform, wstage, label: str) -> KernelImpl:
    """Build the PrimFunc of a (possibly transposed) grouped conv from its parts."""
    from tvm import te

    dtype = tvm_dtype(req.output_types[0].dtype)
    acc_ir = acc_ir_dtype(req.output_types[0].dtype)
    lanes = req.cpu.lanes(acc_ir)
    t = conv_tiles(g, req.cpu, acc_ir)  # tiles count accumulator registers
    X = te.placeholder(req.input_types[0].shape, dtype, name="in0")
    w_const = 1 in req.const_inputs
    nb = g.groups * t.nb_g
    if w_const:
        W = te.placeholder((nb, g.kh, g.kw, g.icg, t.ob), dtype, name="in1")
        wp = W
    else:
        W = te.placeholder(req.input_types[1].shape, dtype, name="in1")
        wp = wstage(W, t)
    bias, scale, residual = fused_operands(req, dtype)
    hs = (g.oh - 1) * g.sh + g.dh * (g.kh - 1) + 1
    ws = (t.owp - 1) * g.sw + g.dw * (g.kw - 1) + 1
    sa = stage_args
    need_stage = (layout == "NCHW" or sa["top"] != 0 or sa["left"] != 0 or sa.get("up", 1) > 1
                  or hs > sa["src_h"] or ws > sa["src_w"])
    # columns past the input only because the last column tile is padded (owp > ow, no zero
    # padding a real output reads): clamp those reads to the last column instead of copying
    # the whole input into a padded stage (their results are never stored)
    clamp = need_stage and layout == "NHWC" and not (sa["top"] or sa["left"]) \
        and sa.get("up", 1) == 1 and hs <= sa["src_h"] \
        and (g.ow - 1) * g.sw + g.dw * (g.kw - 1) + 1 <= sa["src_w"]
    need_stage = need_stage and not clamp
    xin, scale_at = X, None
    if scale is not None:
        def scale_of(b, ch):
            return scale[b, 0, 0, ch] if layout == "NHWC" else scale[b, ch, 0, 0]

        # a scaled copy of the input costs about one pass over it, ~6 FMAs per vector, i.e.
        # 6/OC per FMA of the conv; in the weight loads it costs 1/owb per FMA
        if g.oc > 6 * t.owb:
            xin = te.compute(X.shape, lambda b, i1, i2, i3: X[b, i1, i2, i3] * scale_of(
                b, i3 if layout == "NHWC" else i1), name="scale")
        else:
            scale_at = scale_of
    if clamp:
        xs = ClampedColumns(xin, sa["src_w"])
    elif need_stage:
        xs = input_stage(xin, layout, g.n, g.ic, sa["src_h"], sa["src_w"], hs, ws, sa["top"],
                          sa["left"], sa.get("up_h", 1), sa.get("up_w", 1))
    else:
        xs = xin
    C = _conv_core(xs, wp, g, t, scale_at)
    simple = g.groups == 1 or g.ocg % t.ob == 0

    def acc_at(b, y, x, oc):
        if simple:
            return C[b, y, x, oc // t.ob, oc % t.ob]
        r = oc % g.ocg
        return C[b, y, x, (oc // g.ocg) * t.nb_g + r // t.ob, r % t.ob]

    out = conv_epilogue(acc_at, bias, req.attrs, g, out_layout, dtype, residual)
    args = [X, W, *(p for p in (bias, scale, residual) if p is not None), out]
    func = te.create_prim_func(args)
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    _schedule_conv(sch, g, t, req.cpu, lanes, out_layout)
    note = (f"{label} {layout}->{out_layout} {g.kh}x{g.kw}/{g.sh} g{g.groups}: tile "
            f"{t.owb}x{t.ob}, {'blocks' if t.blocks_outer else 'rows'} outer"
            f"{', pad stage' if need_stage else ''}{', clamped columns' if clamp else ''}{', in-kernel weight packing' if not w_const else ''}")
    return KernelImpl(sch.mod["main"], {1: wtransform(t)} if w_const else {}, note=note)


# ---------------------------------------------------------------- registration

def _check_out(req: KernelRequest, shape: tuple[int, ...], label: str) -> None:
    got = tuple(req.output_types[0].shape)
    if got != tuple(shape):
        raise OpError(f"{label}: result type {list(got)} does not match the computed shape "
                      f"{list(shape)}")


@register_kernel("conv2d")
def conv2d(req: KernelRequest) -> KernelImpl:
    return _conv2d_any(req, "conv2d")


@register_kernel("conv2d_fused")
def conv2d_fused(req: KernelRequest) -> KernelImpl:
    """conv2d with an input channel scale (in the weight loads), a residual (in the epilogue)
    and another result layout (the NCHW input read through the input stage)."""
    return _conv2d_any(req, "conv2d_fused")


def _conv2d_any(req: KernelRequest, op: str) -> KernelImpl:
    label = f"{op} {req.node_label}".strip()
    layout = str(req.attrs.get("layout", "NCHW"))
    out_layout = str(req.attrs.get("out_layout") or layout)
    kl = str(req.attrs.get("kernel_layout", "OIHW"))
    g = conv_geom(req.input_types[0].shape, layout, req.input_types[1].shape, kl, req.attrs,
                  label)
    _check_out(req, (g.n, g.oh, g.ow, g.oc) if out_layout == "NHWC" else
               (g.n, g.oc, g.oh, g.ow), label)
    plain = op == "conv2d"
    if g.depthwise and plain:
        from targets.kernels.depthwise import depthwise_conv2d  # imports this module

        return depthwise_conv2d(req, g, layout, kl)
    from targets.kernels import winograd  # imports this module

    m = winograd.winograd_tile(g, req.cpu, req.output_types[0].dtype, 1 in req.const_inputs)
    if m and (plain or (out_layout == layout and not req.attrs.get("input_scale"))):
        return winograd.winograd_conv2d(req, g, layout, kl, m)
    stage = {"src_h": g.h, "src_w": g.w, "top": g.pt, "left": g.pl}
    return _conv_impl(
        req, g, layout, out_layout, stage,
        lambda t: (lambda w: pack_conv_weight(to_oihw(w, kl), g.groups, t.ob)),
        lambda W, t: _weight_stage(W, kl, g, t, transposed=False), op)


@register_kernel("conv_transpose2d")
def conv_transpose2d(req: KernelRequest) -> KernelImpl:
    label = f"conv_transpose2d {req.node_label}".strip()
    a = req.attrs
    xs, wsh = req.input_types[0].shape, req.input_types[1].shape
    if len(xs) != 4 or len(wsh) != 4:
        raise OpError(f"{label}: needs NCHW input and [I, O/g, KH, KW] weight, got "
                      f"{list(xs)} and {list(wsh)}")
    n, ic, h, w = xs
    groups = int(a.get("groups", 1))
    wic, ocg, kh, kw = wsh
    if wic != ic or ic % groups:
        raise OpError(f"{label}: weight {list(wsh)} does not fit {ic} input channels in "
                      f"{groups} groups")
    sh, sw = (list(a.get("strides") or [1, 1]) + [1, 1])[:2]
    dh, dw = (list(a.get("dilations") or [1, 1]) + [1, 1])[:2]
    pt, pl, pb, pr = list(a.get("pads") or [0, 0, 0, 0])
    oph, opw = list(a.get("output_padding") or [0, 0])
    oh = (h - 1) * sh - pt - pb + dh * (kh - 1) + oph + 1
    ow = (w - 1) * sw - pl - pr + dw * (kw - 1) + opw + 1
    if oh < 1 or ow < 1:
        raise OpError(f"{label}: pads {[pt, pl, pb, pr]} leave no output")
    _check_out(req, (n, ocg * groups, oh, ow), label)
    # the equivalent stride-1 conv over the upsampled input, shifted by (top, left)
    g = ConvGeom(n, (h - 1) * sh + 1, (w - 1) * sw + 1, ic, ocg * groups, kh, kw, oh, ow,
                 1, 1, dh, dw, groups=groups)
    stage = {"src_h": h, "src_w": w, "top": dh * (kh - 1) - pt, "left": dw * (kw - 1) - pl,
             "up": max(sh, sw), "up_h": sh, "up_w": sw}
    return _conv_impl(
        req, g, "NCHW", "NCHW", stage,
        lambda t: (lambda wt: pack_conv_weight(transpose_weight_to_conv(wt, groups),
                                               groups, t.ob)),
        lambda W, t: _weight_stage(W, "OIHW", g, t, transposed=True), "conv_transpose2d")
