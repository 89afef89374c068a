"""``depthwise_pointwise``: a depthwise conv and the 1x1 conv reading it, as one kernel.

The MobileNet block's depthwise 3x3 and its 1x1 projection: the depthwise result (the
expanded tensor, 6x the block's channels) is made one output row at a time into a row buffer
and read back by the 1x1 conv's register tiles while it is in L1/L2, instead of going through
memory between two kernels (one launch fewer per block, one write and one read of the
expanded tensor fewer).

- One parallel task per output row (times ``splits`` groups of output-channel blocks when a
  map has too few rows for the threads, each group making the row again: 7 rows on 2 cores
  are 4 + 3 tasks, 14 are balanced to a task).
- Inside a task: the depthwise row, in depthwise.py's register tiles (``cb`` channels x
  ``owb`` columns, the window unrolled, bias and activation applied as a tile is stored),
  then the 1x1 conv over the row in conv.py's GEMM register tiles (``owb`` columns x ``ob``
  channels, accumulating over all input channels), bias, residual and activation in its
  epilogue.
- NHWC, f32, constant weights (packed at compile time as depthwise.py's ``[KH, KW, C]`` and
  conv.py's ``[NB, 1, 1, C, ob]``); padding is inlined as conditions on the input reads.
"""

from __future__ import annotations

from compiler.errors import OpError
from targets.kernels._te import activation, tvm_dtype
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.conv_common import (
    ConvGeom,
    ConvTiles,
    conv_geom,
    conv_tiles,
    pack_conv_weight,
    pack_dw_weight,
    to_oihw,
)

__all__ = ["depthwise_pointwise", "row_splits"]

# a depthwise result made again per channel group costs (splits - 1) x its MACs; allow that
# up to this share of the 1x1 conv's MACs
RECOMPUTE_SHARE = 0.1


def row_splits(g: ConvGeom, t: ConvTiles, cores: int) -> int:
    """Groups of output-channel blocks per row (the last group may hold fewer blocks): 1
    unless the rows are fewer than 4 per core; then the fewest groups that give 4 tasks per
    core, if making the depthwise row that many times costs little beside the 1x1 conv."""
    rows = g.n * g.oh
    if cores <= 1 or rows >= 4 * cores:
        return 1
    s = min(t.nb_g, -(-4 * cores // rows))
    return s if (s - 1) * g.kh * g.kw <= RECOMPUTE_SHARE * t.nb_g * t.ob else 1


def _geoms(req: KernelRequest, label: str) -> tuple[ConvGeom, ConvGeom]:
    a = req.attrs
    x, wdw, wpw = (req.input_types[i].shape for i in (0, 1, 3))
    if a["layout"] != "NHWC":
        raise OpError(f"{label}: the kernel reads NHWC only (got layout {a['layout']}); run "
                      f"to-nhwc before fuse-conv-blocks")
    c = x[3]
    gd = conv_geom(x, "NHWC", wdw, a["kernel_layout"],
                   {"strides": a["strides"], "pads": a["pads"], "dilations": a["dilations"],
                    "groups": c}, label)
    oc = wpw[0] if a["kernel_layout"] != "HWIO" else wpw[3]
    gp = ConvGeom(gd.n, gd.oh, gd.ow, c, oc, 1, 1, gd.oh, gd.ow)
    return gd, gp


@register_kernel("depthwise_pointwise")
def depthwise_pointwise(req: KernelRequest) -> KernelImpl:
    from tvm import te
    from tvm.s_tir import Schedule

    from targets.kernels.conv import conv_epilogue, input_stage
    from targets.kernels.depthwise import dw_tiles, window_tile

    label = f"depthwise_pointwise {req.node_label}".strip()
    a = req.attrs
    dtype = tvm_dtype(req.output_types[0].dtype)
    if dtype != "float32":
        raise OpError(f"{label}: f32 only, got {req.output_types[0].dtype}; compile with "
                      f"fuse-conv-blocks{{depthwise_pointwise=false}}")
    if not {1, 3} <= set(req.const_inputs):
        raise OpError(f"{label}: both weights must be constants (they are packed at compile "
                      f"time); compile with fuse-conv-blocks{{depthwise_pointwise=false}}")
    gd, gp = _geoms(req, label)
    kl = str(a["kernel_layout"])
    cpu = req.cpu
    t = conv_tiles(gp, cpu, "f32")
    cb, owb_d, _ = dw_tiles(gd, cpu, "f32")
    owb_d = max(d for d in range(1, owb_d + 1) if t.owp % d == 0)  # tiles the row buffer
    c, nb = gd.ic, t.nb_g
    X = te.placeholder(req.input_types[0].shape, dtype, name="in0")
    Wd = te.placeholder((gd.kh, gd.kw, c), dtype, name="in1")
    Bd = te.placeholder((c,), dtype, name="in2")
    Wp = te.placeholder((nb, 1, 1, c, t.ob), dtype, name="in3")
    Bp = te.placeholder((gp.oc,), dtype, name="in4")
    R = te.placeholder(req.input_types[5].shape, dtype, name="in5") if a["residual"] else None
    hs = (gd.oh - 1) * gd.sh + gd.dh * (gd.kh - 1) + 1
    ws = (t.owp - 1) * gd.sw + gd.dw * (gd.kw - 1) + 1
    need_stage = gd.pt or gd.pl or hs > gd.h or ws > gd.w
    xs = input_stage(X, "NHWC", gd.n, c, gd.h, gd.w, hs, ws, gd.pt, gd.pl) if need_stage \
        else X
    ry = te.reduce_axis((0, gd.kh), "ry")
    rx = te.reduce_axis((0, gd.kw), "rx")
    D = te.compute((gd.n, gd.oh, t.owp, c), lambda b, y, x, ch: te.sum(
        xs[b, y * gd.sh + ry * gd.dh, x * gd.sw + rx * gd.dw, ch] * Wd[ry, rx, ch],
        axis=[ry, rx]), name="dw")
    A = te.compute((gd.n, gd.oh, t.owp, c), lambda b, y, x, ch: activation(
        D[b, y, x, ch] + Bd[ch], str(a["dw_activation"]), float(a["dw_clip_min"]),
        float(a["dw_clip_max"])), name="dwact")
    rc = te.reduce_axis((0, c), "rc")
    C = te.compute((gd.n, gd.oh, t.owp, nb, t.ob), lambda b, y, x, blk, oci: te.sum(
        A[b, y, x, rc] * Wp[blk, 0, 0, rc, oci], axis=[rc]), name="conv")
    out = conv_epilogue(lambda b, y, x, oc: C[b, y, x, oc // t.ob, oc % t.ob], Bp, a, gp,
                        "NHWC", dtype, R)
    args = [X, Wd, Bd, Wp, Bp, *([R] if R is not None else []), out]
    sch = Schedule(te.create_prim_func(args))
    splits = row_splits(gd, t, cpu.num_cores)
    par = cpu.num_cores > 1 and gd.n * gd.oh * splits >= 2 * cpu.num_cores
    # the 1x1 conv: (row, channel-block group) tasks; blocks, column tiles, then the GEMM tile
    conv = sch.get_sblock("conv")
    b, y, x, blk, oci, rc_ = sch.get_loops(conv)
    xo, xi = sch.split(x, [None, t.owb])
    bo, bi = sch.split(blk, [splits, None])
    sch.reorder(b, y, bo, bi, xo, rc_, xi, oci)
    task = sch.fuse(b, y, bo)
    if par:
        sch.parallel(task)
    sch.reverse_compute_at(sch.get_sblock("out"), xo)  # default scope: see depthwise.py
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    sch.unroll(xi)
    sch.vectorize(oci)
    sch.decompose_reduction(conv, rc_)
    # the depthwise row, made in each task: its row buffer is the only thing in memory.
    # compute_at drops unit loops, so the tiles need every tile dimension > 1; otherwise (a
    # 1-wide map, 1-wide window, odd channels) the depthwise result is a whole stage
    tiled = min(t.owp, owb_d, cb, gd.kh, gd.kw) > 1
    if tiled:
        act = sch.get_sblock("dwact")
        sch.compute_at(act, task)
        ax, ach = sch.get_loops(act)[-2:]
        axo, axi = sch.split(ax, [None, owb_d])
        aco, aci = sch.split(ach, [None, cb])
        sch.reorder(aco, axo, axi, aci)
        dw = sch.get_sblock("dw")
        sch.compute_at(dw, axo)
        dx, dch, dry, drx = sch.get_loops(dw)[-4:]
        sch.reorder(dry, drx, dx, dch)
        window_tile(sch, dw, dry, drx, dx, dch, gd.kh * gd.kw)
        sch.unroll(axi)
        sch.vectorize(aci)
    if need_stage:
        sch.compute_inline(sch.get_sblock("pad"))
    note = (f"depthwise {gd.kh}x{gd.kw}/{gd.sh} {f'tile {owb_d}x{cb}' if tiled else 'stage'} -> 1x1 {c}->{gp.oc} tile "
            f"{t.owb}x{t.ob}, {splits} block group(s) per row")
    return KernelImpl(sch.mod["main"],
                      {1: lambda w: pack_dw_weight(to_oihw(w, kl)),
                       3: lambda w: pack_conv_weight(to_oihw(w, kl), 1, t.ob)}, note=note)
