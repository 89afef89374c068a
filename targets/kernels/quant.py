"""Integer kernels: quantize / dequantize / requantize, qdense, qconv2d, qmatmul.

qdense and qconv2d take the AVX-512 VNNI micro-kernel (``vnni.py``) on CPUs whose features
include avx512vnni; everywhere else (AVX2-only x86, Arm, K not a multiple of 4 in qdense,
grouped convs) a generic int32 TE kernel computes the same values (LLVM widens and
multiplies: ``vpmaddwd`` on AVX2). Both end in the same epilogue (``int8_epilogue.py``):
bias, zero-point term, then the f32 scale and a float activation, or fixed-point
requantization, bit-exact with the reference interpreter.
"""

from __future__ import annotations

from compiler.ir.ops.quant import qrange
from compiler.ir.types import TensorType
from targets.kernels._te import generic, placeholders, prim_func, tvm_dtype
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.int8_epilogue import epilogue, fixed_point, int_bounds
from targets.kernels.vnni import vnni_qconv, vnni_qdense

__all__ = ["qdense", "qconv2d", "qmatmul", "quantize", "dequantize", "requantize"]


# -- qdense ---------------------------------------------------------------------------------
@register_kernel("qdense")
def qdense(req: KernelRequest) -> KernelImpl:
    return vnni_qdense(req) or _generic_qdense(req)


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
                   lambda *i: epilogue(req, C[i], i[-1], ins, None, per_channel), name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, "i32")),
                      note=f"qdense generic K={K} N={N}")


# -- qconv2d --------------------------------------------------------------------------------
@register_kernel("qconv2d")
def qconv2d(req: KernelRequest) -> KernelImpl:
    return vnni_qconv(req) or _generic_qconv(req)


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
    Y = te.compute(out_t.shape, lambda *i: epilogue(req, C[i], i[ch], ins, None, per_channel),
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
        mult, shift = fixed_point(m64)
        one = tirx.const(1, "int64")
        r = (acc.astype("int64") * mult + (one << (shift - one))) >> shift
        lo, hi = int_bounds({}, req.attrs["out_dtype"], ins[6][()], ins[7][()])
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


    xt = req.input_types[0]
    X, S, Z = placeholders(req)
    lo, hi = qrange(req.attrs["dtype"])
    ax = req.attrs["axis"]

    def body(*i):
        s = _param(S, i, ax, xt.rank, req.input_types[1])
        z = _param(Z, i, ax, xt.rank, req.input_types[2])
        # tirx.round is LLVM's nearbyint (half to even, as np.rint) and vectorises;
        # tirx.nearbyint scalarises the vector loop (gathers and byte stores, ~10x slower).
        q = tirx.round(X[i].astype("float32") / s) + z.astype("float32")
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
        mult, shift = fixed_point(m64)
        one = tirx.const(1, "int64")
        acc = Q[i].astype("int64") - Z1[()].astype("int64")
        r = (acc * mult + (one << (shift - one))) >> shift
        lo, hi = int_bounds({}, out_dt, S2[()], Z2[()])
        return te.min(te.max(r + Z2[()].astype("int64"), lo), hi).astype(tvm_dtype(out_dt))
    Y = te.compute(qt.shape, body, name="out")
    return KernelImpl(prim_func([Q, S1, Z1, S2, Z2, Y], generic(req.cpu, "i32")),
                      note="requantize")
