"""Integer kernels: quantize / dequantize / requantize, qdense, qconv2d, qmatmul.

qdense and qconv2d (NHWC, OHWI, groups 1) run an AVX-512 VNNI micro-kernel on x86 CPUs whose
features (``CpuInfo.features``) include avx512vnni: ``vpdpbusd`` multiplies 64 u8 activations by 64 i8 weights and adds groups of 4 into
16 int32 lanes. Weights are packed at compile time to ``[N/16, K/4 + 1, 16, 4]`` (i8; convs flatten their taps into K): for an
output-channel block and 4 consecutive k, the 64 bytes one ``vpdpbusd`` reads; the extra last
k-row holds the 16 per-channel weight sums as int32 bytes, which the epilogue needs for the
zero-point term ``sum_k (x - zp) w = sum_k x w - zp * sum_k w``. i8 activations are read as
u8 with the sign bit flipped (``x ^ 0x80 = x + 128``) and zero point + 128.

The register tile is ``mr`` rows x ``16 * nv`` channels of int32 accumulators (``local``
scope, promoted to zmm registers); each k-step broadcasts 4 activation bytes of a row and
issues ``nv`` vpdpbusd. The epilogue (per element): bias, zero-point term, then either the
f32 scale ``x_scale * w_scale[n]`` and a float activation, or TFLite-style fixed-point
requantization (multiplier and shift derived in the kernel from the f32 scales exactly as
``compiler.ir.ops.quant.quantize_multiplier`` does, so results are bit-exact).

The LLVM intrinsic takes ``<64 x i8>`` operands in LLVM 22 (the ``<16 x i32>`` form TVM's
own ``dot_16x4_vnni`` uses fails to build there).

Without VNNI (or with K not a multiple of 4 in qdense, or grouped convs) a generic int32 TE
kernel computes the same values.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from compiler.ir.types import TensorType
from targets.kernels._te import generic, placeholders, prim_func, tvm_dtype
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest, register_kernel

__all__ = ["has_vnni", "pack_vnni", "pack_conv_vnni", "VNNI_INTRIN"]

VNNI_INTRIN = "npucc_vnni_u8i8i32_16x4"


def has_vnni(cpu: CpuInfo) -> bool:
    """Whether the CPU has the 512-bit ``vpdpbusd`` this micro-kernel issues (AVX512-VNNI).
    CPUs without it (AVX2-only, AVX-VNNI's 256-bit form, Arm) take the generic kernel."""
    return cpu.arch == "x86_64" and cpu.has("avx512vnni", "avx512bw")


@functools.cache
def _register_intrin() -> str:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, desc, impl)
    return VNNI_INTRIN


def pack_vnni(w_nk: np.ndarray, nb: int = 16) -> np.ndarray:
    """i8 ``[N, K]`` (K % 4 == 0) -> ``[Np/16, K/4 + 1, 16, 4]`` with N padded to ``nb`` (zero
    channels); the last k-row holds each channel's int32 weight sum as 4 little-endian
    bytes."""
    w = np.asarray(w_nk, np.int8)
    n, k = w.shape
    npad = -(-n // nb) * nb
    full = np.zeros((npad, k), np.int8)
    full[:n] = w
    body = full.reshape(npad // 16, 16, k // 4, 4).transpose(0, 2, 1, 3)
    sums = full.astype(np.int32).sum(axis=1).astype("<i4")
    tail = sums.view(np.int8).reshape(npad // 16, 1, 16, 4)
    return np.ascontiguousarray(np.concatenate([body, tail], axis=1))


def _panel(n_ch: int) -> int:
    """Output channels per register tile: 32 (two zmm) unless there are at most 16."""
    return 32 if n_ch > 16 else 16


# -- epilogue helpers (TE expressions) ------------------------------------------------------
def _fixed_point(m64):
    """(mult i64, shift i64) from a float64 multiplier, as quantize_multiplier does."""
    from tvm import te, tirx

    i64 = "int64"

    def c(v):
        return tirx.const(v, i64)
    bits = tirx.reinterpret(i64, m64)
    e = ((bits >> c(52)) & c(0x7FF)) - c(1022)
    mant = (bits & c((1 << 52) - 1)) | c(1 << 52)
    mult = (mant + c(1 << 21)) >> c(22)
    over = mult == c(1 << 31)
    mult = tirx.Select(over, c(1 << 30), mult)
    e = tirx.Select(over, e + c(1), e)
    shift = c(31) - e
    extra = te.max(shift - c(62), c(0))
    mult = mult >> te.min(extra, c(62))
    shift = te.min(shift, c(62))
    zero = tirx.any(m64 <= tirx.const(0.0, "float64"), mult == c(0))
    return tirx.Select(zero, c(0), mult), tirx.Select(zero, c(31), shift)


def _int_bounds(attrs: dict[str, Any], out_dt: str, y_scale, y_zp):
    """Integer clamp bounds (TIR exprs, int64) of a fused activation on the result."""
    from tvm import te, tirx

    from compiler.ir.ops.quant import qrange

    qlo, qhi = qrange(out_dt)
    lo, hi = tirx.const(qlo, "int64"), tirx.const(qhi, "int64")
    act = attrs.get("activation", "none")
    zp = y_zp.astype("int64")
    if act == "relu":
        lo = te.max(lo, zp)
    elif act in ("relu6", "clip"):
        fmin, fmax = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
        ys = y_scale.astype("float64")
        if math.isfinite(fmin):
            lo = te.max(lo, tirx.nearbyint(tirx.const(fmin, "float64") / ys).astype("int64")
                        + zp)
        if math.isfinite(fmax):
            hi = te.min(hi, tirx.nearbyint(tirx.const(fmax, "float64") / ys).astype("int64")
                        + zp)
    return lo, hi


def _epilogue(req: KernelRequest, acc, n, ins, wsum, per_channel: bool, mult_shift=None):
    """acc (i32, without bias/zero-point terms) -> the result element for channel n."""
    from tvm import te, tirx

    from targets.kernels._te import activation

    attrs = req.attrs
    out_dt = attrs["out_dtype"]
    bias, x_scale, x_zp, w_scale = ins[2], ins[3], ins[4], ins[5]
    zp = x_zp[()].astype("int32")
    if req.input_types[0].dtype == "i8" and wsum is not None:
        zp = zp + tirx.const(128, "int32")
    v = acc + bias[n]
    if wsum is not None:
        v = v - zp * wsum
    ws = w_scale[n] if per_channel else w_scale[()]
    if out_dt == "f32":
        y = v.astype("float32") * (x_scale[()] * ws)
        return activation(y, attrs.get("activation", "none"), attrs.get("clip_min", 0.0),
                          attrs.get("clip_max", 6.0))
    y_scale, y_zp = ins[6], ins[7]
    if mult_shift is not None:
        mult, shift = mult_shift
    else:
        m64 = x_scale[()].astype("float64") * ws.astype("float64") / \
            y_scale[()].astype("float64")
        mult, shift = _fixed_point(m64)
    one = tirx.const(1, "int64")
    r = (v.astype("int64") * mult + (one << (shift - one))) >> shift
    lo, hi = _int_bounds(attrs, out_dt, y_scale[()], y_zp[()])
    r = te.min(te.max(r + y_zp[()].astype("int64"), lo), hi)
    return r.astype(tvm_dtype(out_dt))


def _mult_shift_stage(req: KernelRequest, ins, n_ch: int, per_channel: bool):
    """Root-level [n_ch] stages with the fixed-point multiplier and shift (int out only)."""
    from tvm import te

    if req.attrs["out_dtype"] == "f32":
        return None
    x_scale, w_scale, y_scale = ins[3], ins[5], ins[6]

    def m64(n):
        ws = w_scale[n] if per_channel else w_scale[()]
        return x_scale[()].astype("float64") * ws.astype("float64") / \
            y_scale[()].astype("float64")
    MS = te.compute((n_ch,), lambda n: _fixed_point(m64(n))[0], name="mult")
    SH = te.compute((n_ch,), lambda n: _fixed_point(m64(n))[1], name="shift")
    return MS, SH


def _pick_mr(rows: int, limit: int = 8) -> int:
    for mr in (limit, 4, 6, 7, 5, 3, 2):
        if mr <= limit and rows % mr == 0:
            return mr
    return 1


# -- VNNI GEMM-shaped kernels ---------------------------------------------------------------
def _u8_view(req: KernelRequest, x):
    """The activation as u8: itself, or (i8) a stage with the sign bit flipped (x + 128)."""
    from tvm import te

    if req.input_types[0].dtype == "u8":
        return x
    return te.compute(x.shape, lambda *i: (x[i] ^ te.const(-128, "int8")).astype("uint8"),
                      name="xflip")


def _vnni_kernel(req: KernelRequest, ins: list, *, rows_shape: tuple[int, ...], n_ch: int,
                 k4: int, a_at, taps: tuple[int, ...], w_at):
    """VNNI build of ``out[rows..., n]`` reducing over ``taps`` x (4 * k4).

    ``a_at(rows, taps_axes, k)`` is the u8 activation (a buffer access, for tensorization),
    ``w_at(n, taps_axes, k)`` the packed weight access.
    """
    from tvm import te
    from tvm.s_tir import Schedule

    intrin = _register_intrin()
    out_t = req.output_types[0]
    nb = _panel(n_ch)
    nv = nb // 16
    per_channel = req.input_types[5].rank == 1
    rax = [te.reduce_axis((0, t), f"t{i}") for i, t in enumerate(taps)]
    kax = te.reduce_axis((0, k4 * 4), "k")
    npad = -(-n_ch // nb) * nb

    def c_body(*idx):
        rows, n = idx[:-1], idx[-1]
        return te.sum(a_at(rows, rax, kax).astype("int32")
                      * w_at(n, rax, kax).astype("int32"), axis=[*rax, kax])
    C = te.compute(tuple(rows_shape) + (npad,), c_body, name="C")
    W = ins[1]
    WS = te.compute((npad,), lambda n: _wsum(W, n, int(W.shape[1]) - 1), name="wsum")
    ms = _mult_shift_stage(req, ins, n_ch, per_channel)

    def out_body(*idx):
        n = idx[-1]
        mult_shift = (ms[0][n], ms[1][n]) if ms is not None else None
        return _epilogue(req, C[idx], n, ins, WS[n], per_channel, mult_shift)
    Y = te.compute(out_t.shape, out_body, name="out")
    sch = Schedule(te.create_prim_func([*ins, Y]))
    cblk, oblk = sch.get_sblock("C"), sch.get_sblock("out")
    loops = sch.get_loops(oblk)
    rloops, nl = loops[:-1], loops[-1]
    mr = _pick_mr(rows_shape[-1])
    no, ni = sch.split(nl, [None, nb])
    ro, ri = sch.split(rloops[-1], [None, mr])
    outer = [*rloops[:-1], ro]
    sch.reorder(*outer, no, ri, ni)
    sch.compute_at(cblk, no)
    sch.set_scope(cblk, 0, "local")
    work = out_t.size * math.prod(taps) * k4 * 4
    if req.cpu.num_cores > 1 and work >= 1 << 16:
        sch.parallel(sch.fuse(*outer, no))
    else:
        sch.fuse(*outer, no)
    own = sch.get_loops(cblk)[1:]  # under the fused outer loop: [m (if mr > 1)], n, taps, k
    nred = 1 + sum(t > 1 for t in taps)  # unit reduction loops are not materialised
    spatial, red = own[:len(own) - nred], own[len(own) - nred:]
    cn = spatial[-1]
    cm = [spatial[-2]] if len(spatial) >= 2 else []
    cnv, cn16 = sch.split(cn, [nv, 16])
    cko, cki = sch.split(red[-1], [None, 4])
    sch.reorder(*red[:-1], cko, *cm, cnv, cn16, cki)
    for lp in cm:
        sch.unroll(lp)
    sch.unroll(cnv)
    init = sch.decompose_reduction(cblk, red[0] if len(red) > 1 else cko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(cn16, intrin)
    sch.vectorize(sch.get_loops(oblk)[-1])
    return sch.mod["main"]


def _wsum(W, n, row: int):
    """Channel n's weight sum: 4 bytes of the packed sums row, little endian."""
    from tvm import tirx

    v = tirx.const(0, "int32")
    for j in range(4):
        byte = W[n // 16, row, n % 16, j].astype("uint8").astype("int32")
        v = v | (byte << tirx.const(8 * j, "int32"))
    return v


# -- qdense ---------------------------------------------------------------------------------
@register_kernel("qdense")
def qdense(req: KernelRequest) -> KernelImpl:
    xt, wt = req.input_types[0], req.input_types[1]
    N, K = wt.shape
    M = math.prod(xt.shape[:-1])
    if not (has_vnni(req.cpu) and K % 4 == 0 and 1 in req.const_inputs and M > 0):
        return _generic_qdense(req)
    k4 = K // 4
    nb = _panel(N)
    ins = placeholders(req, {1: TensorType((-(-N // nb) * nb // 16, k4 + 1, 16, 4), "i8")})
    X, W = _u8_view(req, ins[0]), ins[1]
    lead = xt.shape[:-1] or (1,)

    def a_at(rows, rax, k):
        return X[(*rows, k)] if xt.shape[:-1] else X[k]

    def w_at(n, rax, k):
        return W[n // 16, k // 4, n % 16, k % 4]

    func = _vnni_kernel(req, ins, rows_shape=tuple(lead), n_ch=N, k4=k4, a_at=a_at, taps=(),
                        w_at=w_at)
    return KernelImpl(func, {1: lambda w, nb=nb: pack_vnni(w, nb)},
                      note=f"qdense VNNI M={M} K={K} N={N}"
                           + (" (i8 x flipped to u8)" if xt.dtype == "i8" else ""))


def _generic_qdense(req: KernelRequest) -> KernelImpl:
    from tvm import te

    N, K = req.input_types[1].shape
    ins = placeholders(req)
    X, W = ins[0], ins[1]
    per_channel = req.input_types[5].rank == 1
    k = te.reduce_axis((0, K), "k")
    zp = ins[4]
    C = te.compute(req.output_types[0].shape, lambda *i: te.sum(
        (X[(*i[:-1], k)].astype("int32") - zp[()].astype("int32"))
        * W[i[-1], k].astype("int32"), axis=k), name="C")
    Y = te.compute(req.output_types[0].shape,
                   lambda *i: _epilogue(req, C[i], i[-1], ins, None, per_channel), name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, "i32")),
                      note=f"qdense generic K={K} N={N}")


# -- qconv2d --------------------------------------------------------------------------------
@register_kernel("qconv2d")
def qconv2d(req: KernelRequest) -> KernelImpl:
    a = req.attrs
    if not (has_vnni(req.cpu) and a["layout"] == "NHWC" and a["kernel_layout"] == "OHWI"
            and a["groups"] == 1 and 1 in req.const_inputs):
        return _generic_qconv(req)
    return _vnni_qconv(req)


def pack_conv_vnni(w_ohwi: np.ndarray, nb: int = 16) -> np.ndarray:
    """i8 OHWI -> ``[Op/16, KH*KW*C4 + 1, 16, 4]``: O padded to ``nb``, input channels to a
    multiple of 4 (zero weights), taps flattened (kh, kw, c4); the last row holds the channel
    sums as int32 bytes (as :func:`pack_vnni`)."""
    w = np.asarray(w_ohwi, np.int8)
    o, kh, kw, c = w.shape
    cp = -(-c // 4) * 4
    full = np.zeros((o, kh, kw, cp), np.int8)
    full[..., :c] = w
    return pack_vnni(full.reshape(o, kh * kw * cp), nb)


def _vnni_qconv(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    a = req.attrs
    xt, wt = req.input_types[0], req.input_types[1]
    out_t = req.output_types[0]
    o, kh, kw, c = wt.shape
    c4 = -(-c // 4)
    n_, h, w_, _ = xt.shape
    pt, pl, pb, pr = a["pads"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    nb = _panel(o)
    packed = TensorType((-(-o // nb) * nb // 16, kh * kw * c4 + 1, 16, 4), "i8")
    ins = placeholders(req, {1: packed})
    X, W, zp = ins[0], ins[1], ins[4]
    i8x = xt.dtype == "i8"
    need_pad = any(a["pads"]) or c % 4 != 0
    if need_pad or i8x:
        zp_u8 = (zp[()].astype("int32") + (128 if i8x else 0)).astype("uint8")

        def pad_body(b, y, x, ch):
            iy, ix = y - pt, x - pl
            inb = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w_, ch < c)
            v = X[b, te.min(te.max(iy, 0), h - 1), te.min(te.max(ix, 0), w_ - 1),
                  te.min(ch, c - 1)]
            v = (v ^ te.const(-128, "int8")).astype("uint8") if i8x else v
            return tirx.Select(inb, v, zp_u8)
        Xp = te.compute((n_, h + pt + pb, w_ + pl + pr, c4 * 4), pad_body, name="xpad")
    else:
        Xp = X

    def a_at(rows, rax, k):
        b, y, x = rows
        return Xp[b, y * sh + rax[0] * dh, x * sw + rax[1] * dw, k]

    def w_at(n, rax, k):
        return W[n // 16, (rax[0] * kw + rax[1]) * c4 + k // 4, n % 16, k % 4]

    func = _vnni_kernel(req, ins, rows_shape=tuple(out_t.shape[:3]), n_ch=o, k4=c4,
                        a_at=a_at, taps=(kh, kw), w_at=w_at)
    return KernelImpl(func, {1: lambda w, nb=nb: pack_conv_vnni(w, nb)},
                      note=f"qconv2d VNNI {kh}x{kw}/{sh} {c}->{o}"
                           + (" padded copy" if need_pad else ""))


def _generic_qconv(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    a = req.attrs
    xt, wt = req.input_types[0], req.input_types[1]
    out_t = req.output_types[0]
    ins = placeholders(req)
    X, W = ins[0], ins[1]
    nhwc = a["layout"] == "NHWC"
    kl = a["kernel_layout"]
    if kl == "OIHW":
        o, cg, kh, kw = wt.shape
    elif kl == "OHWI":
        o, kh, kw, cg = wt.shape
    else:
        kh, kw, cg, o = wt.shape
    g = a["groups"]
    og = o // g
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    pt, pl = a["pads"][0], a["pads"][1]
    H, Wd = (xt.shape[1], xt.shape[2]) if nhwc else (xt.shape[2], xt.shape[3])
    rc = te.reduce_axis((0, cg), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    zp = ins[4]
    per_channel = req.input_types[5].rank == 1

    def wv(oc, c, y, x):
        if kl == "OIHW":
            return W[oc, c, y, x]
        if kl == "OHWI":
            return W[oc, y, x, c]
        return W[y, x, c, oc]

    def body(*i):
        if nhwc:
            n, oh, ow, oc = i
        else:
            n, oc, oh, ow = i
        ih = oh * sh + ry * dh - pt
        iw = ow * sw + rx * dw - pl
        ic = (oc // og) * cg + rc
        inb = tirx.all(ih >= 0, ih < H, iw >= 0, iw < Wd)
        xv = X[n, ih, iw, ic] if nhwc else X[n, ic, ih, iw]
        xd = tirx.Select(inb, xv.astype("int32") - zp[()].astype("int32"),
                         tirx.const(0, "int32"))
        return te.sum(xd * wv(oc, rc, ry, rx).astype("int32"), axis=[ry, rx, rc])
    C = te.compute(out_t.shape, body, name="C")
    ch = 3 if nhwc else 1
    Y = te.compute(out_t.shape, lambda *i: _epilogue(req, C[i], i[ch], ins, None, per_channel),
                   name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, "i32")),
                      note=f"qconv2d generic {kh}x{kw} groups={g}")


# -- qmatmul (activation x activation) ------------------------------------------------------
@register_kernel("qmatmul")
def qmatmul(req: KernelRequest) -> KernelImpl:
    from tvm import te

    from targets.kernels._te import broadcast_index

    at, bt = req.input_types[0], req.input_types[1]
    out_t = req.output_types[0]
    ins = placeholders(req)
    A, B = ins[0], ins[1]
    K = at.shape[-1]
    k = te.reduce_axis((0, K), "k")
    az, bz = ins[3], ins[5]

    def body(*i):
        bi = i[:-2]
        ai = broadcast_index(bi, out_t.shape[:-2], at.shape[:-2])
        bj = broadcast_index(bi, out_t.shape[:-2], bt.shape[:-2])
        av = A[(*ai, i[-2], k)].astype("int32") - az[()].astype("int32")
        bv = B[(*bj, k, i[-1])].astype("int32") - bz[()].astype("int32")
        return te.sum(av * bv, axis=k)
    C = te.compute(out_t.shape, body, name="C")

    def out_body(*i):
        from tvm import tirx

        acc = C[i]
        if req.attrs["out_dtype"] == "f32":
            return acc.astype("float32") * (ins[2][()] * ins[4][()])
        m64 = ins[2][()].astype("float64") * ins[4][()].astype("float64") / \
            ins[6][()].astype("float64")
        mult, shift = _fixed_point(m64)
        one = tirx.const(1, "int64")
        r = (acc.astype("int64") * mult + (one << (shift - one))) >> shift
        lo, hi = _int_bounds({}, req.attrs["out_dtype"], ins[6][()], ins[7][()])
        r = te.min(te.max(r + ins[7][()].astype("int64"), lo), hi)
        return r.astype(tvm_dtype(req.attrs["out_dtype"]))
    Y = te.compute(out_t.shape, out_body, name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, "i32")), note="qmatmul generic")


# -- quantize / dequantize / requantize -----------------------------------------------------
def _param(p, idx, axis: int, rank: int, ptype: TensorType):
    if ptype.rank == 0:
        return p[()]
    return p[idx[axis % rank]]


@register_kernel("quantize")
def quantize(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    from compiler.ir.ops.quant import qrange

    xt = req.input_types[0]
    X, S, Z = placeholders(req)
    lo, hi = qrange(req.attrs["dtype"])
    ax = req.attrs["axis"]

    def body(*i):
        s = _param(S, i, ax, xt.rank, req.input_types[1])
        z = _param(Z, i, ax, xt.rank, req.input_types[2])
        q = tirx.nearbyint(X[i].astype("float32") / s) + z.astype("float32")
        q = te.min(te.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
        return q.astype(tvm_dtype(req.attrs["dtype"]))
    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([X, S, Z, Y], generic(req.cpu, "f32")), note="quantize")


@register_kernel("dequantize")
def dequantize(req: KernelRequest) -> KernelImpl:
    from tvm import te

    qt = req.input_types[0]
    Q, S, Z = placeholders(req)
    ax = req.attrs["axis"]

    def body(*i):
        s = _param(S, i, ax, qt.rank, req.input_types[1])
        z = _param(Z, i, ax, qt.rank, req.input_types[2])
        return (Q[i].astype("int32") - z.astype("int32")).astype("float32") * s
    Y = te.compute(qt.shape, body, name="out")
    return KernelImpl(prim_func([Q, S, Z, Y], generic(req.cpu, "f32")), note="dequantize")


@register_kernel("requantize")
def requantize(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    qt = req.input_types[0]
    Q, S1, Z1, S2, Z2 = placeholders(req)
    out_dt = req.attrs["dtype"]

    def body(*i):
        m64 = S1[()].astype("float64") / S2[()].astype("float64")
        mult, shift = _fixed_point(m64)
        one = tirx.const(1, "int64")
        acc = Q[i].astype("int64") - Z1[()].astype("int64")
        r = (acc * mult + (one << (shift - one))) >> shift
        lo, hi = _int_bounds({}, out_dt, S2[()], Z2[()])
        return te.min(te.max(r + Z2[()].astype("int64"), lo), hi).astype(tvm_dtype(out_dt))
    Y = te.compute(qt.shape, body, name="out")
    return KernelImpl(prim_func([Q, S1, Z1, S2, Z2, Y], generic(req.cpu, "i32")),
                      note="requantize")
