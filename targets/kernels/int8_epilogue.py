"""Integer kernels' epilogue, shared by the VNNI micro-kernel and the generic kernels: from an
int32 accumulator to the result element (bias, zero-point term, f32 scale and activation, or
TFLite-style fixed-point requantization derived in the kernel from the f32 scales exactly as
``compiler.ir.ops.quant.quantize_multiplier`` does, so results are bit-exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compiler.ir.ops.quant import float_requant, qrange
from targets.kernels._te import tvm_dtype
from targets.kernels.base import KernelRequest

__all__ = ["fixed_point", "int_bounds", "epilogue", "mult_shift_stage", "channel_stages",
           "ChannelStages", "quantized_gelu"]


def fixed_point(m64):
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


def int_bounds(attrs: dict[str, Any], out_dt: str, y_scale, y_zp):
    """Integer clamp bounds (TIR exprs, int64) of a fused activation on the result."""
    from tvm import te, tirx


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


@dataclass(frozen=True)
class ChannelStages:
    """Per-output-channel values a GEMM-shaped kernel computes once per call (root-level
    ``[N]`` stages) instead of once per result element: the int32 bias with the zero-point
    term folded in (``bias - zp * sum_k w``), the f32 dequantization scale (``x_scale *
    w_scale``), and, where the result is the f32 value quantized, ``1 / y_scale`` (a multiply
    per element instead of a divide).

    ``gelu_folded``: a GELU whose result is quantized; ``deq`` and ``inv_y`` then both carry
    a factor ``1 / sqrt(2)`` (see :func:`quantized_gelu`)."""

    bias: Any
    deq: Any
    inv_y: Any | None
    gelu_folded: bool = False


def channel_stages(req: KernelRequest, ins, n_ch: int, per_channel: bool, wsum) -> ChannelStages:
    """The :class:`ChannelStages` of a qdense/qconv2d; ``wsum(n)`` is channel n's weight sum."""
    from tvm import te, tirx

    bias, x_scale, w_scale = ins[2], ins[3], ins[5]
    zp = _x_zp(req, ins)
    b = te.compute((n_ch,), lambda n: bias[n] - zp * wsum(n), name="bias_zp")
    quantized = req.attrs["out_dtype"] != "f32" and float_requant(req.attrs, _y_shape(req))
    fold = quantized and req.attrs.get("activation", "none") == "gelu"
    root2 = tirx.const(_INV_SQRT2 if fold else 1.0, "float32")
    deq = te.compute((n_ch,), lambda n: x_scale[()] * (w_scale[n] if per_channel
                                                       else w_scale[()]) * root2, name="deq")
    inv_y = None
    if quantized:
        ys = ins[6]
        inv_y = te.compute((n_ch,), lambda n: root2 / (ys[n] if _y_shape(req) else ys[()]),
                           name="inv_y")
    return ChannelStages(b, deq, inv_y, fold)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def quantized_gelu(v, n, stages: ChannelStages, y_zp, out_dt: str):
    """``quantize(gelu(v * deq))`` for an int32 ``v`` in fewer vector operations than
    activation() then the quantize: with ``u = y / sqrt(2)`` (the folded ``deq``),
    ``gelu(y) / y_scale = (u + u * erf(u)) / (sqrt(2) * y_scale)`` (the folded ``inv_y``),
    and erf without its NaN guard (``v`` is an integer, the scales finite). Rounds half to
    even and adds the zero point after rounding, as quantize does."""
    from tvm import te, tirx

    from targets.kernels._te import fast_erf

    u = v.astype("float32") * stages.deq[n]
    lo, hi = qrange(out_dt)
    uv = tirx.Var("u", "float32")
    scaled = (uv + uv * fast_erf(uv, finite=True)) * stages.inv_y[n]
    q = tirx.round(scaled) + y_zp.astype("float32")
    q = te.min(te.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
    return tirx.Let(uv, u, q.astype(tvm_dtype(out_dt)))


def _x_zp(req: KernelRequest, ins):
    """The activation zero point as int32; i8 activations are read as u8 (x + 128) by the
    VNNI kernels, whose zero point is then zp + 128."""
    from tvm import tirx

    zp = ins[4][()].astype("int32")
    return zp + tirx.const(128, "int32") if req.input_types[0].dtype == "i8" else zp


def epilogue(req: KernelRequest, acc, n, ins, wsum, per_channel: bool, mult_shift=None,
             stages: ChannelStages | None = None):
    """acc (i32, without bias/zero-point terms) -> the result element for channel n.

    ``wsum``: channel n's weight sum when ``acc`` is ``sum x w`` of raw activations (the
    zero-point term is then subtracted here), None when ``acc`` already is ``sum (x - zp) w``.
    ``stages``: per-channel precomputed values (:func:`channel_stages`, the bias there
    already has the zero-point term); ``wsum`` is then unused."""
    from tvm import te, tirx

    from targets.kernels._te import activation

    attrs = req.attrs
    out_dt = attrs["out_dtype"]
    bias, x_scale, w_scale = ins[2], ins[3], ins[5]
    if stages is not None:
        v = acc + stages.bias[n]
    else:
        v = acc + bias[n]
        if wsum is not None:
            v = v - _x_zp(req, ins) * wsum
    ws = w_scale[n] if per_channel else w_scale[()]
    act = attrs.get("activation", "none")
    if stages is not None and stages.gelu_folded:
        return quantized_gelu(v, n, stages, ins[7][(n,) if _y_shape(req) else ()], out_dt)
    if out_dt == "f32" or float_requant(attrs, _y_shape(req)):
        deq = stages.deq[n] if stages is not None else x_scale[()] * ws
        y = v.astype("float32") * deq
        y = activation(y, act, attrs.get("clip_min", 0.0), attrs.get("clip_max", 6.0))
        if out_dt == "f32":
            return y
        # the f32 result quantized in place, as quantize() would (round half to even:
        # tirx.round is LLVM's nearbyint, and it vectorises where tirx.nearbyint does not)
        lo, hi = qrange(out_dt)
        at = (n,) if _y_shape(req) else ()
        scaled = y * stages.inv_y[n] if stages is not None else y / ins[6][at]
        q = tirx.round(scaled) + ins[7][at].astype("float32")
        q = te.min(te.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
        return q.astype(tvm_dtype(out_dt))
    y_scale, y_zp = ins[6], ins[7]
    if mult_shift is not None:
        mult, shift = mult_shift
    else:
        m64 = x_scale[()].astype("float64") * ws.astype("float64") / \
            y_scale[()].astype("float64")
        mult, shift = fixed_point(m64)
    one = tirx.const(1, "int64")
    r = (v.astype("int64") * mult + (one << (shift - one))) >> shift
    lo, hi = int_bounds(attrs, out_dt, y_scale[()], y_zp[()])
    r = te.min(te.max(r + y_zp[()].astype("int64"), lo), hi)
    return r.astype(tvm_dtype(out_dt))


def _y_shape(req: KernelRequest) -> tuple[int, ...]:
    return tuple(req.input_types[6].shape) if len(req.input_types) > 6 else ()


def mult_shift_stage(req: KernelRequest, ins, n_ch: int, per_channel: bool):
    """Root-level [n_ch] stages with the fixed-point multiplier and shift (int out only)."""
    from tvm import te

    if req.attrs["out_dtype"] == "f32" or float_requant(req.attrs, _y_shape(req)):
        return None
    x_scale, w_scale, y_scale = ins[3], ins[5], ins[6]

    def m64(n):
        ws = w_scale[n] if per_channel else w_scale[()]
        return x_scale[()].astype("float64") * ws.astype("float64") / \
            y_scale[()].astype("float64")
    MS = te.compute((n_ch,), lambda n: fixed_point(m64(n))[0], name="mult")
    SH = te.compute((n_ch,), lambda n: fixed_point(m64(n))[1], name="shift")
    return MS, SH
