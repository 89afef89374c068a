"""Quantization ops: quantize / dequantize / requantize and the integer compute ops.

Scales and zero points are explicit operands (DESIGN.md): a scalar (``[]``) is per tensor, a
1-D ``[C]`` array is per channel along ``axis`` (quantize / dequantize / requantize) or along
the output channels (``w_scale`` of qdense / qconv2d).

- ``quantize(x, scale, zp){axis, dtype}``: ``clip(round_half_even(x / scale) + zp)`` to the
  range of ``dtype`` (u8 i8 u16 i16 i32); ``zp`` has dtype ``dtype``.
- ``dequantize(q, scale, zp){axis}``: ``(q - zp) * scale`` in f32.
- ``requantize(q, in_scale, in_zp, out_scale, out_zp){dtype}``: integer rescale with a
  fixed-point multiplier (below), per tensor.
- ``qdense(xq, wq, bias, x_scale, x_zp, w_scale[, y_scale, y_zp]){activation, out_dtype}``:
  ``acc[m, n] = sum_k (xq - x_zp) * wq[n, k] + bias[n]`` in int32 (xq u8/i8, wq i8 [N, K]
  symmetric, bias i32 at scale ``x_scale * w_scale``). ``out_dtype`` f32: ``acc *
  f32(x_scale * w_scale[n])`` then the activation (any); u8/i8: requantized with ``y_scale,
  y_zp`` and the activation (none/relu/relu6/clip) as a clamp; with any other (float)
  activation or per-channel ``y_scale, y_zp`` (``[N]``), the f32 result quantized:
  ``clip(round_half_even(f32 result / y_scale) + y_zp)`` (it never reaches memory).
- ``qconv2d(xq, wq, bias, x_scale, x_zp, w_scale[, y_scale, y_zp]){conv2d's attributes,
  out_dtype}``: the same for a convolution (padding reads the zero point: exact zero).
- ``qmatmul(aq, bq, a_scale, a_zp, b_scale, b_zp[, y_scale, y_zp]){out_dtype}``:
  activation x activation (attention): ``sum_k (a - a_zp)(b - b_zp)``, per-tensor scales.

Fixed-point requantisation (TFLite's single-rounding form): the real multiplier ``M =
in_scale / out_scale`` (float64 from the f32 scales) becomes ``mult`` (int32, [2^30, 2^31),
``floor(frac * 2^31 + 0.5)`` of the float64 mantissa) and a right shift ``s``; ``y = (acc * mult + 2^(s-1)) >> s`` in int64 (round half up), then
``+ zp`` and clip. :func:`quantize_multiplier` is what kernels use too, so the integer
results are bit-exact between the reference and the kernels.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.nn import (
    ACTIVATION_ATTRS,
    CONV_ATTRS,
    KERNEL_LAYOUTS,
    LAYOUTS,
    apply_activation,
    check_activation,
    conv2d_nchw,
    conv_infer,
    from_nchw,
    to_nchw,
)
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_float

__all__ = ["quantize_multiplier", "requantize_acc", "qrange", "QDTYPES", "round_half_even",
           "int_clamp_bounds", "INT_ACTIVATIONS", "float_requant"]

# Activations an integer result applies as a clamp (fixed-point path); any other activation
# with an integer result is computed in f32 and then quantized.
INT_ACTIVATIONS = ("none", "relu", "relu6", "clip")


def float_requant(attrs: dict, y_scale_shape: tuple[int, ...]) -> bool:
    """Whether a qdense/qconv2d with an integer result computes it as the f32 result
    quantized (a float activation, or per-channel output scales) rather than in fixed
    point."""
    return attrs.get("activation", "none") not in INT_ACTIVATIONS or len(y_scale_shape) > 0

QDTYPES = ("u8", "i8", "u16", "i16", "i32")
_RANGES = {"u8": (0, 255), "i8": (-128, 127), "u16": (0, 65535), "i16": (-32768, 32767),
           "i32": (-(2**31), 2**31 - 1)}


def qrange(dtype: str) -> tuple[int, int]:
    try:
        return _RANGES[dtype]
    except KeyError:
        raise OpError(f"{dtype} is not a quantized dtype; use one of {', '.join(QDTYPES)}"
                      ) from None


def round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)


def quantize_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers -> (mult int32 in [2^30, 2^31), shift int32 in [1, 62]) with
    ``m ~= mult * 2^-shift``. Zero maps to (0, 31)."""
    m = np.asarray(m, np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise OpError("requantisation multipliers must be finite and >= 0")
    frac, exp = np.frexp(m)                       # m = frac * 2^exp, frac in [0.5, 1)
    mult = np.floor(frac * 2.0**31 + 0.5).astype(np.int64)  # exact in f64; half up
    over = mult == 2**31
    mult = np.where(over, mult // 2, mult)
    exp = np.where(over, exp + 1, exp)
    shift = 31 - exp.astype(np.int64)
    if np.any((shift < 1) & (mult > 0)):
        raise OpError(f"requantisation multiplier {float(m.max()):g} is too large (>= 2^30)")
    extra = np.maximum(shift - 62, 0)             # tiny multipliers: fewer mantissa bits
    mult = mult >> np.minimum(extra, 62)
    shift = np.minimum(shift, 62)
    zero = mult == 0
    return (np.where(zero, 0, mult).astype(np.int32),
            np.where(zero, 31, shift).astype(np.int32))


def requantize_acc(acc: np.ndarray, multiplier: np.ndarray | float, zp: int, dtype: str,
                   lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """``clip(((acc * mult + 2^(s-1)) >> s) + zp)``; ``multiplier`` broadcasts on acc's last
    axis (per channel) or is a scalar. ``lo``/``hi`` narrow the clip (fused activations)."""
    mult, shift = quantize_multiplier(multiplier)
    a = acc.astype(np.int64)
    m64, s64 = mult.astype(np.int64), shift.astype(np.int64)
    y = (a * m64 + (np.int64(1) << (s64 - 1))) >> s64
    qlo, qhi = qrange(dtype)
    lo = qlo if lo is None else max(lo, qlo)
    hi = qhi if hi is None else min(hi, qhi)
    return np.clip(y + int(zp), lo, hi).astype(_np(dtype))


def int_clamp_bounds(attrs: dict, y_scale: float, y_zp: int, dtype: str) -> tuple[int, int]:
    """A fused relu/relu6/clip as integer bounds in the output's quantized domain."""
    lo, hi = qrange(dtype)
    act = attrs.get("activation", "none")
    if act == "none":
        return lo, hi
    if act == "relu":
        return max(lo, y_zp), hi
    fmin, fmax = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
    qmin = lo if not np.isfinite(fmin) else int(np.rint(fmin / y_scale)) + y_zp
    qmax = hi if not np.isfinite(fmax) else int(np.rint(fmax / y_scale)) + y_zp
    return max(lo, qmin), min(hi, qmax)


def _np(dtype: str) -> np.dtype:
    from compiler.ir.types import to_numpy_dtype

    return to_numpy_dtype(dtype)


def _scale_zp_check(scale: TensorType, zp: TensorType, x: TensorType, axis: int, what: str,
                    zp_dtype: str | None) -> None:
    if scale.dtype != "f32":
        raise OpError(f"{what}: scale must be f32, got {scale}")
    if scale.shape != zp.shape:
        raise OpError(f"{what}: scale {scale} and zero point {zp} must have the same shape")
    if zp_dtype is not None and zp.dtype != zp_dtype:
        raise OpError(f"{what}: the zero point must be {zp_dtype}, got {zp}")
    if scale.rank == 0:
        return
    if scale.rank != 1:
        raise OpError(f"{what}: scale must be a scalar (per tensor) or 1-D (per axis), "
                      f"got {scale}")
    if not -x.rank <= axis < x.rank or x.shape[axis] != scale.shape[0]:
        raise OpError(f"{what}: per-axis scale {scale} does not match axis {axis} of {x}")


def _bcast(p: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if p.ndim == 0:
        return p
    shape = [1] * rank
    shape[axis % rank] = p.shape[0]
    return p.reshape(shape)


# -- quantize / dequantize / requantize -------------------------------------------------
def _quantize_infer(types, attrs):
    x, s, z = types
    if not is_float(x.dtype):
        raise OpError(f"quantize takes a float tensor, got {x}")
    qrange(attrs["dtype"])
    _scale_zp_check(s, z, x, attrs["axis"], "quantize", attrs["dtype"])
    return [x.with_dtype(attrs["dtype"])]


def _quantize_ref(xs, attrs):
    x, s, z = xs
    ax = attrs["axis"]
    lo, hi = qrange(attrs["dtype"])
    q = np.rint(x.astype(np.float32) / _bcast(s, x.ndim, ax)) + _bcast(z, x.ndim, ax)
    return [np.clip(q, lo, hi).astype(_np(attrs["dtype"]))]


register_op(OpDef(
    "quantize", (3, 3),
    {"axis": Attr("int", -1, doc="channel axis of a per-axis scale"),
     "dtype": Attr("dtype", "u8", doc="quantized dtype (u8 i8 u16 i16 i32)")},
    _quantize_infer, _quantize_ref, family="quant",
    doc="clip(round_half_even(x / scale) + zp) to dtype's range"))


def _dequantize_infer(types, attrs):
    q, s, z = types
    qrange(q.dtype)
    _scale_zp_check(s, z, q, attrs["axis"], "dequantize", q.dtype)
    return [q.with_dtype("f32")]


def _dequantize_ref(xs, attrs):
    q, s, z = xs
    ax = attrs["axis"]
    d = (q.astype(np.int32) - _bcast(z, q.ndim, ax).astype(np.int32)).astype(np.float32)
    return [d * _bcast(s, q.ndim, ax).astype(np.float32)]


register_op(OpDef(
    "dequantize", (3, 3), {"axis": Attr("int", -1, doc="channel axis of a per-axis scale")},
    _dequantize_infer, _dequantize_ref, family="quant", doc="(q - zp) * scale, in f32"))


def _requantize_infer(types, attrs):
    q, s1, z1, s2, z2 = types
    qrange(q.dtype)
    qrange(attrs["dtype"])
    for s, z, dt in ((s1, z1, q.dtype), (s2, z2, attrs["dtype"])):
        if s.rank != 0:
            raise OpError(f"requantize takes per-tensor scales, got {s}")
        _scale_zp_check(s, z, q, -1, "requantize", dt)
    return [q.with_dtype(attrs["dtype"])]


def _requantize_ref(xs, attrs):
    q, s1, z1, s2, z2 = xs
    m = np.float64(s1) / np.float64(s2)
    acc = q.astype(np.int64) - np.int64(z1)
    return [requantize_acc(acc, m, int(z2), attrs["dtype"])]


register_op(OpDef(
    "requantize", (5, 5), {"dtype": Attr("dtype", "u8")}, _requantize_infer, _requantize_ref,
    family="quant", doc="integer rescale (q - in_zp) * in_scale / out_scale + out_zp"))


# -- qdense / qconv2d / qmatmul ---------------------------------------------------------
_QOUT = {"out_dtype": Attr("dtype", "f32", doc="f32 (dequantized) or u8/i8 (requantized)")}


def _check_tail(types, attrs, what: str, x: TensorType, n_out: int, w_rank_ok: bool,
                first_params: int) -> None:
    """Shared checks of (bias, x_scale, x_zp, w_scale[, y_scale, y_zp])."""
    out = attrs["out_dtype"]
    want = first_params + (2 if out != "f32" else 0)
    if len(types) not in (want, first_params + 2):
        raise OpError(f"{what} with out_dtype={out} takes {want} operands, got {len(types)}")
    if out != "f32":
        if out not in ("u8", "i8"):
            raise OpError(f"{what}: out_dtype must be f32, u8 or i8, got {out}")
        if len(types) != first_params + 2:
            raise OpError(f"{what}: out_dtype={out} needs y_scale and y_zp operands")
        ys, yz = types[first_params], types[first_params + 1]
        if ys.shape not in ((), (n_out,)) or ys.dtype != "f32" or yz.shape != ys.shape \
                or yz.dtype != out:
            raise OpError(f"{what}: y_scale must be f32[] or f32[{n_out}] and y_zp {out} of "
                          f"the same shape, got {ys}, {yz}")


def _qdense_infer(types, attrs):
    x, w, b, xs, xz, ws = types[:6]
    if x.dtype not in ("u8", "i8") or w.dtype != "i8":
        raise OpError(f"qdense takes u8/i8 x and i8 w, got {x} and {w}")
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise OpError(f"qdense takes x[..., K] and w[N, K], got {x} and {w}")
    n = w.shape[0]
    if b.shape != (n,) or b.dtype != "i32":
        raise OpError(f"qdense: bias must be i32[{n}], got {b}")
    if xs.rank != 0 or xs.dtype != "f32" or xz.rank != 0 or xz.dtype != x.dtype:
        raise OpError(f"qdense: x_scale must be f32[] and x_zp {x.dtype}[], got {xs}, {xz}")
    if ws.dtype != "f32" or ws.shape not in ((), (n,)):
        raise OpError(f"qdense: w_scale must be f32[] or f32[{n}], got {ws}")
    _check_tail(types, attrs, "qdense", x, n, True, 6)
    return [TensorType(x.shape[:-1] + (n,), attrs["out_dtype"])]


def _finish(acc: np.ndarray, xs, attrs, x_scale, w_scale, axis: int) -> np.ndarray:
    """int64 accumulator -> the result (float, or requantized), per-channel on ``axis``."""
    out = attrs["out_dtype"]
    if out == "f32" or float_requant(attrs, np.shape(xs[6])):
        comb = np.float32(x_scale) * w_scale.astype(np.float32)
        y = acc.astype(np.int32).astype(np.float32) * _bcast(comb, acc.ndim, axis)
        y = apply_activation(y, attrs).astype(np.float32)
        if out == "f32":
            return y
        ys = _bcast(np.asarray(xs[6], np.float32), acc.ndim, axis)
        q = round_half_even(y / ys) + _bcast(np.asarray(xs[7]), acc.ndim, axis)
        return np.clip(q, *qrange(out)).astype(_np(out))
    y_scale, y_zp = np.float32(xs[6]), int(xs[7])
    mult = np.float64(x_scale) * w_scale.astype(np.float64) / np.float64(y_scale)
    lo, hi = int_clamp_bounds(attrs, float(y_scale), y_zp, out)
    if axis % acc.ndim != acc.ndim - 1:
        moved = np.moveaxis(acc, axis, -1)
        r = requantize_acc(moved, mult, y_zp, out, lo, hi)
        return np.moveaxis(r, -1, axis)
    return requantize_acc(acc, mult, y_zp, out, lo, hi)


def _qdense_ref(xs, attrs):
    x, w, b, x_scale, x_zp, w_scale = xs[:6]
    xi = x.astype(np.int64) - np.int64(x_zp)
    acc = np.matmul(xi, w.astype(np.int64).T) + b.astype(np.int64)
    return [_finish(acc, xs, attrs, x_scale, np.asarray(w_scale), -1)]


register_op(OpDef(
    "qdense", (6, 8), {**ACTIVATION_ATTRS, **_QOUT}, _qdense_infer, _qdense_ref,
    verify=check_activation, family="quant",
    doc="int8 dense: int32 sum of (x - x_zp) * w + bias, then dequantized or requantized"))


def _qconv_infer(types, attrs):
    x, w, b, xs, xz, ws = types[:6]
    if x.dtype not in ("u8", "i8") or w.dtype != "i8":
        raise OpError(f"qconv2d takes u8/i8 x and i8 w, got {x} and {w}")
    fattrs = {k: v for k, v in attrs.items() if k != "out_dtype"}
    fattrs["activation"] = "none"
    (ft,) = conv_infer([x.with_dtype("f32"), w.with_dtype("f32")], fattrs)
    o = ft.shape[1] if attrs["layout"] == "NCHW" else ft.shape[3]
    if b.shape != (o,) or b.dtype != "i32":
        raise OpError(f"qconv2d: bias must be i32[{o}], got {b}")
    if xs.rank != 0 or xs.dtype != "f32" or xz.rank != 0 or xz.dtype != x.dtype:
        raise OpError(f"qconv2d: x_scale must be f32[] and x_zp {x.dtype}[], got {xs}, {xz}")
    if ws.dtype != "f32" or ws.shape not in ((), (o,)):
        raise OpError(f"qconv2d: w_scale must be f32[] or f32[{o}], got {ws}")
    _check_tail(types, attrs, "qconv2d", x, o, True, 6)
    return [ft.with_dtype(attrs["out_dtype"])]


def _qconv_ref(xs, attrs):
    x, w, b, x_scale, x_zp, w_scale = xs[:6]
    kl = attrs["kernel_layout"]
    if kl == "OHWI":
        w = w.transpose(0, 3, 1, 2)
    elif kl == "HWIO":
        w = w.transpose(3, 2, 0, 1)
    xi = to_nchw(x, attrs["layout"]).astype(np.int64) - np.int64(x_zp)
    acc = conv2d_nchw(xi, w.astype(np.int64), b.astype(np.int64), attrs["strides"],
                      attrs["pads"], attrs["dilations"], attrs["groups"], keep_acc=True)
    y = _finish(acc, xs, attrs, x_scale, np.asarray(w_scale), 1)
    return [from_nchw(y, attrs["layout"])]


register_op(OpDef(
    "qconv2d", (6, 8),
    {**CONV_ATTRS, "layout": Attr("str", "NCHW", LAYOUTS),
     "kernel_layout": Attr("str", "OIHW", KERNEL_LAYOUTS), **ACTIVATION_ATTRS, **_QOUT},
    _qconv_infer, _qconv_ref, verify=check_activation, family="quant",
    doc="int8 conv2d: int32 accumulation, then dequantized or requantized"))


def _qmatmul_infer(types, attrs):
    a, b, as_, az, bs, bz = types[:6]
    from compiler.ir.ops.linalg import matmul_shape

    if a.dtype not in ("u8", "i8") or b.dtype not in ("u8", "i8"):
        raise OpError(f"qmatmul takes u8/i8 operands, got {a} and {b}")
    for s, z, t in ((as_, az, a), (bs, bz, b)):
        if s.rank != 0 or s.dtype != "f32" or z.rank != 0 or z.dtype != t.dtype:
            raise OpError(f"qmatmul: per-tensor f32 scales and {t.dtype} zero points, "
                          f"got {s}, {z}")
    shape = matmul_shape(a.shape, b.shape)
    out = attrs["out_dtype"]
    if out != "f32":
        if len(types) != 8 or out not in ("u8", "i8"):
            raise OpError(f"qmatmul: out_dtype={out} needs y_scale and y_zp (u8/i8 only)")
    elif len(types) not in (6, 8):
        raise OpError(f"qmatmul takes 6 or 8 operands, got {len(types)}")
    return [TensorType(shape, out)]


def _qmatmul_ref(xs, attrs):
    a, b, a_s, a_z, b_s, b_z = xs[:6]
    acc = np.matmul(a.astype(np.int64) - np.int64(a_z), b.astype(np.int64) - np.int64(b_z))
    out = attrs["out_dtype"]
    if out == "f32":
        comb = np.float32(a_s) * np.float32(b_s)
        return [acc.astype(np.int32).astype(np.float32) * comb]
    m = np.float64(np.float32(a_s)) * np.float64(np.float32(b_s)) / np.float64(xs[6])
    return [requantize_acc(acc, m, int(xs[7]), out)]


register_op(OpDef(
    "qmatmul", (6, 8), dict(_QOUT), _qmatmul_infer, _qmatmul_ref, family="quant",
    doc="int8 matmul of two activations: int32 sum of (a - a_zp)(b - b_zp)"))
