"""Winograd F(m, 3) convolution (m = 2 or 4) for 3x3, stride-1, ungrouped f32 convs.

A 3x3 conv computes ``m x m`` outputs from an ``a x a`` input tile (``a = m + 2``) as
``Y = A^T [ (G g G^T) * (B^T d B) ] A`` (Lavin & Gray, arXiv:1509.09308): ``a^2`` multiplies
per tile and channel pair instead of ``9 m^2``: 2.25x fewer for F(2,3), 4x for F(4,3). Summed
over input channels, the element-wise product becomes ``a^2`` independent GEMMs
``[tiles, IC] x [IC, OC]``, which is where the time goes; the kernel has four stages:

- ``pad``: the zero-padded NHWC copy of the input (conv.input_stage, also transposes NCHW).
- ``V = B^T d B`` per tile and input channel (``[a, a, tiles, IC]``), two separable passes
  whose constant coefficients are unrolled into adds (zero coefficients vanish).
- ``M[e, n, tile, oc] = sum_ic V[e, n, tile, ic] * U[e, n, ic, oc]``: the register-tiled
  micro-kernel of conv.py's 1x1 case (``owb`` tiles x ``ob`` channels of accumulators,
  ``ob`` vectorised), parallel over (e, n, channel block).
- ``Y = A^T M A`` per tile, then bias and activation, written in NHWC or NCHW.

The weight transform ``U = G g G^T`` runs once at compile time (numpy, float64, stored in the
package packed ``[a, a, NB, IC, ob]``). F(4,3)'s larger coefficients make it less accurate
than F(2,3) in f32; both stay well inside 1e-4 relative (tests/test_kernels_winograd.py).

Whether a conv runs this way is :func:`winograd_tile`'s rule (module docstring there).
"""

from __future__ import annotations

import numpy as np

from targets.kernels._te import accumulator_dtype, tvm_dtype
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest
from targets.kernels.conv import (
    PARALLEL_MIN_MACS,
    accumulate_in_registers,
    conv_epilogue,
    fused_operands,
    input_stage,
    schedule_stage,
)
from targets.kernels.conv_common import ConvGeom, accumulator_registers, pick_width, to_oihw

__all__ = ["winograd_matrices", "winograd_weight", "winograd_tile", "winograd_conv2d",
           "WinogradPlan"]

# F(2,3) and F(4,3) with the interpolation points 0, +-1 (, +-2) and infinity (Lavin & Gray)
_MATRICES = {
    2: ([[1, 1, 1, 0], [0, 1, -1, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    4: ([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
}


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T, G, B^T)`` of F(m, 3) as float64 arrays (``m x a``, ``a x 3``, ``a x a``)."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd F({m},3) not available; use one of {sorted(_MATRICES)}")
    return tuple(np.array(x, np.float64) for x in _MATRICES[m])  # type: ignore[return-value]


def winograd_weight(w_oihw: np.ndarray, m: int, ob: int) -> np.ndarray:
    """``[OC, IC, 3, 3]`` -> ``U = G g G^T`` packed ``[a, a, NB, IC, ob]`` (OC zero-padded)."""
    _, g_mat, _ = winograd_matrices(m)
    oc, ic = w_oihw.shape[:2]
    u = np.einsum("ek,oikl,nl->enio", g_mat, w_oihw.astype(np.float64), g_mat)
    nb = -(-oc // ob)
    a = m + 2
    up = np.zeros((a, a, ic, nb * ob), np.float64)
    up[..., :oc] = u
    up = up.reshape(a, a, ic, nb, ob).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(up.astype(w_oihw.dtype))


class WinogradPlan:
    """Tile geometry of one Winograd conv: ``m``, tiles per image (``th x tw``), GEMM tiles."""

    def __init__(self, g: ConvGeom, m: int, cpu: CpuInfo) -> None:
        lanes = cpu.lanes("f32")
        acc_regs = accumulator_registers(cpu)
        self.m, self.a = m, m + 2
        self.th, self.tw = -(-g.oh // m), -(-g.ow // m)
        self.tiles = g.n * self.th * self.tw
        self.ob = 2 * lanes if g.oc % (2 * lanes) == 0 or g.oc > 4 * lanes else lanes
        self.nb = -(-g.oc // self.ob)
        owb_max = max(1, acc_regs * lanes // self.ob)
        # One row of tiles at a time (transform, GEMM, inverse transform) when the transformed
        # tensors would spill out of L2 but the transformed weights, re-read per row, are
        # smaller than them, and the row splits into register tiles of at least half width.
        row_owb = max(d for d in range(1, min(owb_max, self.tw) + 1) if self.tw % d == 0)
        planes = 4 * self.a * self.a
        spill = planes * self.tiles * (g.ic + g.oc) > cpu.l2_bytes
        self.rows = spill and self.tw > 1 and planes * g.ic * g.oc < planes * self.tiles * (g.ic + g.oc) \
            and 2 * row_owb >= min(owb_max, self.tw)
        self.owb = row_owb if self.rows else pick_width(self.tiles, owb_max)
        self.tiles_p = -(-self.tiles // self.owb) * self.owb
        self.cb = next((c for c in (lanes, lanes // 2, lanes // 4, 4, 2) if c and g.ic % c == 0),
                       1)


def winograd_tile(g: ConvGeom, cpu: CpuInfo, dtype: str, w_const: bool) -> int:
    """``m`` of the Winograd variant to use for this conv, or 0 for the direct conv.

    Only 3x3 stride-1 undilated ungrouped f32 convs with a constant weight qualify, with at
    least ``lanes`` input channels and a multiple of ``lanes`` output channels (below that the
    transforms cost more than the GEMM saves). The rule compares estimated costs in
    multiply-adds:

    - work: the direct conv's ``9`` per output and channel pair; Winograd's ``a^2`` per tile
      and channel pair (tiles padded up to whole ``m x m`` tiles) plus the transforms (about
      ``a`` adds per transformed value, one multiply-add per ``a/2`` adds);
    - weights: every inference streams the weights from memory (a model's weights do not stay
      in cache), and ``U`` is ``a^2/9`` times the direct conv's weight. A byte counts as
      ``lanes/4`` multiply-adds: a core doing two ``lanes``-wide FMAs a cycle against about
      8 bytes a cycle of memory bandwidth.

    Winograd must beat the direct conv by 1.5x (its transforms stream through memory, the
    direct conv's tiles do not); ``m`` is the cheaper of 2 and 4. Measured on a Zen 4 EPYC
    (AVX-512, 2 threads, loaded machine, cold caches): 256->256 @14 direct 2.11 ms, F(4,3)
    1.15 ms; 512->512 @7 direct 2.11 ms, F(2,3) 3.96 ms (its 16.8 MB of ``U`` streamed for
    16 tiles), which this rule leaves direct.
    """
    lanes = cpu.lanes("f32")
    if (dtype != "f32" or not w_const or (g.kh, g.kw, g.sh, g.sw, g.dh, g.dw) != (3, 3, 1, 1, 1, 1)
            or g.groups != 1 or g.ic < lanes or g.oc % lanes):
        return 0
    per_byte = lanes / 4
    pairs = g.ic * g.oc
    direct = 9.0 * g.n * g.oh * g.ow * pairs + per_byte * 4 * 9 * pairs
    best, best_cost = 0, direct / 1.5
    for m in (2, 4):
        a, tiles = m + 2, g.n * -(-g.oh // m) * -(-g.ow // m)
        gemm = a * a * tiles * pairs
        transforms = tiles * (a * a * g.ic * a + a * m * g.oc * a) / 2
        cost = gemm + transforms + per_byte * 4 * a * a * pairs
        if cost < best_cost:
            best, best_cost = m, cost
    return best


# ---------------------------------------------------------------- TE helpers

def _lincomb(row, terms):
    """``sum(row[k] * terms[k])`` with zero coefficients dropped and +-1 as add/sub."""
    from tvm import tirx

    out = None
    for c, t in zip(row, terms, strict=True):
        if c == 0:
            continue
        if c == 1:
            v, sub = t, False
        elif c == -1:
            v, sub = t, True
        else:
            v, sub = t * tirx.const(float(c), t.dtype), False
        if out is None:
            out = -v if sub else v
        else:
            out = out - v if sub else out + v
    return out


def _by_index(i, values):
    """``values[i]`` for a loop variable ``i`` (a Select chain; unrolled loops fold it)."""
    from tvm import tirx

    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = tirx.Select(i == k, values[k], out)
    return out


def winograd_conv2d(req: KernelRequest, g: ConvGeom, layout: str, kernel_layout: str,
                    m: int) -> KernelImpl:
    """The Winograd F(m,3) kernel of a conv2d request (constant weight, f32)."""
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    dtype = tvm_dtype(req.output_types[0].dtype)
    p = WinogradPlan(g, m, req.cpu)
    at_m, _, bt_m = winograd_matrices(m)
    a, lanes = p.a, req.cpu.lanes("f32")
    X = te.placeholder(req.input_types[0].shape, dtype, name="in0")
    U = te.placeholder((a, a, p.nb, g.ic, p.ob), dtype, name="in1")
    bias, _, residual = fused_operands(req, dtype)  # conv2d_fused: no input scale here
    hs, ws = p.th * m + 2, p.tw * m + 2
    need_stage = layout == "NCHW" or g.pt or g.pl or hs > g.h or ws > g.w
    xs = input_stage(X, layout, g.n, g.ic, g.h, g.w, hs, ws, g.pt, g.pl) if need_stage else X
    per_img = p.th * p.tw

    def tile_origin(t):
        t = tirx.min(t, p.tiles - 1)  # GEMM padding tiles repeat the last one
        return t // per_img, (t % per_img) // p.tw * m, t % p.tw * m

    def bt_rows(b, y0, x0, r2, c):  # B^T d along the tile's rows, column r2
        col = [xs[b, y0 + r1, x0 + r2, c] for r1 in range(a)]
        return [_lincomb(bt_m[e], col) for e in range(a)]

    def t1_body(e, r2, t, c):
        b, y0, x0 = tile_origin(t)
        return _by_index(e, bt_rows(b, y0, x0, r2, c))

    T1 = te.compute((a, a, p.tiles_p, g.ic), t1_body, name="bt1")
    V = te.compute((a, a, p.tiles_p, g.ic),
                   lambda e, nu, t, c: _by_index(
                       nu, [_lincomb(bt_m[k], [T1[e, r2, t, c] for r2 in range(a)])
                            for k in range(a)]), name="V")
    acc = accumulator_dtype(dtype)
    rc = te.reduce_axis((0, g.ic), "rc")
    M = te.compute((a, a, p.tiles_p, p.nb, p.ob),
                   lambda e, nu, t, blk, oci: te.sum(
                       V[e, nu, t, rc].astype(acc) * U[e, nu, blk, rc, oci].astype(acc),
                       axis=rc), name="mm")

    def mm_at(e, nu, b, ty, tx, oc):
        return M[e, nu, (b * p.th + ty) * p.tw + tx, oc // p.ob, oc % p.ob]

    A1 = te.compute((g.n, p.th, p.tw, m, a, g.oc),
                    lambda b, ty, tx, i, nu, oc: _by_index(
                        i, [_lincomb(at_m[k], [mm_at(e, nu, b, ty, tx, oc) for e in range(a)])
                            for k in range(m)]), name="at1")
    Y = te.compute((g.n, p.th, p.tw, m, m, g.oc),
                   lambda b, ty, tx, i, j, oc: _by_index(
                       j, [_lincomb(at_m[k], [A1[b, ty, tx, i, nu, oc] for nu in range(a)])
                           for k in range(m)]), name="ot")
    out = conv_epilogue(lambda b, y, x, oc: Y[b, y // m, x // m, y % m, x % m, oc], bias,
                        req.attrs, g, layout, dtype, residual)
    args = [X, U, *(p for p in (bias, residual) if p is not None), out]
    sch = Schedule(te.create_prim_func(args))
    par = req.cpu.num_cores > 1 and g.macs >= PARALLEL_MIN_MACS
    rb = _schedule_output(sch, p, layout, lanes, par)
    if p.rows:  # the GEMM and the input transform of one tile row, inside the row loop
        sch.compute_at(sch.get_sblock("mm"), rb)
        sch.compute_at(sch.get_sblock("V"), rb)
    _schedule_gemm(sch, p, par and not p.rows)
    _schedule_input(sch, p, par and not p.rows)
    schedule_stage(sch, "pad", lanes, par)
    note = (f"conv2d {layout} 3x3/1 winograd F({m},3): {p.tiles} tiles"
            f"{' by rows' if p.rows else ''}, GEMM tile {p.owb}x{p.ob}"
            f"{', pad stage' if need_stage else ''}")
    return KernelImpl(sch.mod["main"],
                      {1: lambda w: winograd_weight(to_oihw(w, kernel_layout), m, p.ob)},
                      note=note)


# ---------------------------------------------------------------- schedules

def _schedule_input(sch, p: WinogradPlan, par: bool) -> None:
    """V: per tile and channel vector, both passes in registers; parallel over tiles."""
    v, t1 = sch.get_sblock("V"), sch.get_sblock("bt1")
    outer = sch.get_loops(v)[:-4]  # the row loop when by rows
    e, nu, t, c = sch.get_loops(v)[-4:]
    co, ci = sch.split(c, [None, p.cb])
    sch.reorder(t, co, e, nu, ci)
    if par:
        sch.parallel(t)
    sch.compute_at(t1, co)   # default scope: a register alloca, not a workspace (conv.py)
    sch.unroll(e)
    sch.unroll(nu)
    sch.vectorize(ci)
    _unroll_vectorize(sch, t1, len(outer) + 2)


def _unroll_vectorize(sch, block, outer: int) -> None:
    """Unroll a compute_at block's loops below the ``outer`` enclosing ones, vectorise the last."""
    loops = sch.get_loops(block)[outer:]
    for lp in loops[:-1]:
        sch.unroll(lp)
    sch.vectorize(loops[-1])


def _schedule_gemm(sch, p: WinogradPlan, par: bool) -> None:
    mm = sch.get_sblock("mm")
    loops = sch.get_loops(mm)[1 if p.rows else 0:]
    if len(loops) == 5:  # compute_at under the row loop drops a single channel block's loop
        loops.insert(3, None)
    e, nu, t, blk, oci, rc = loops
    to, ti = sch.split(t, [None, p.owb])
    outer = [e, nu] + ([blk] if blk is not None else [])
    sch.reorder(*outer, to, rc, ti, oci)
    fused = sch.fuse(*outer)
    if par:
        sch.parallel(fused)
    accumulate_in_registers(sch, mm, to, ti, oci, rc, parallel=par)


def _schedule_output(sch, p: WinogradPlan, layout: str, lanes: int, par: bool):
    """Y = A^T M A per tile and channel vector, written out with bias and activation."""
    out, ot, a1 = sch.get_sblock("out"), sch.get_sblock("ot"), sch.get_sblock("at1")
    if layout == "NHWC":
        b, y, x, oc = sch.get_loops(out)
    else:
        b, oc, y, x = sch.get_loops(out)
    ty, i = sch.split(y, [None, p.m])
    tx, j = sch.split(x, [None, p.m])
    oco, oci = sch.split(oc, [None, lanes])
    sch.reorder(b, ty, tx, oco, i, j, oci)
    rb = sch.fuse(b, ty)
    if not p.rows:
        rb = sch.fuse(rb, tx)
    if par:
        sch.parallel(rb)
    sch.compute_at(ot, oco)
    sch.compute_at(a1, oco)   # ot and a1 in the default scope (see _schedule_input)
    for blk in (a1, ot):
        _unroll_vectorize(sch, blk, 3 if p.rows else 2)
    sch.unroll(i)
    sch.unroll(j)
    if layout == "NHWC":
        sch.vectorize(oci)
    return rb
