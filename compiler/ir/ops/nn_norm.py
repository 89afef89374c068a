"""Normalisation and softmax: batch_norm, layer_norm, instance_norm, lrn, softmax,
log_softmax, prelu.

Statistics are computed in float64 and the result cast back to the operand dtype, so the
reference is at least as exact as onnxruntime's float32 kernels.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import broadcast_shapes, norm_axis, require_float, same_dtype
from compiler.ir.registry import Attr, OpDef, register_op

LAYOUTS = ("NCHW", "NHWC")


# -- batch_norm -------------------------------------------------------------------------
def _bn_infer(types, attrs):
    x = types[0]
    require_float(x, "batch_norm's input")
    same_dtype(types, "batch_norm's operands")
    if x.rank < 2:
        raise OpError(f"batch_norm needs rank >= 2, got {x}")
    axis = norm_axis(attrs["axis"], x.rank)
    c = x.shape[axis]
    for name, t in zip(("scale", "bias", "mean", "var"), types[1:], strict=True):
        if t.shape != (c,):
            raise OpError(f"batch_norm's {name} must be [{c}] (channels on axis {axis}), "
                          f"got {t}")
    return [x]


def _bn_ref(xs, attrs):
    x, scale, bias, mean, var = xs
    axis = attrs["axis"] % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    inv = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + attrs["epsilon"])
    shift = bias.astype(np.float64) - mean.astype(np.float64) * inv
    y = x * inv.astype(x.dtype).reshape(shape) + shift.astype(x.dtype).reshape(shape)
    return [y.astype(x.dtype, copy=False)]


register_op(OpDef("batch_norm", (5, 5),
                  {"epsilon": Attr("float", 1e-5), "axis": Attr("int", 1)},
                  _bn_infer, _bn_ref, family="nn",
                  doc="inference batch norm: (x - mean) / sqrt(var + eps) * scale + bias"))


# -- layer_norm -------------------------------------------------------------------------
def _ln_infer(types, attrs):
    x = types[0]
    require_float(x, "layer_norm's input")
    same_dtype(types, "layer_norm's operands")
    if x.rank < 1:
        raise OpError(f"layer_norm needs rank >= 1, got {x}")
    axis = norm_axis(attrs["axis"], x.rank)
    normed = x.shape[axis:]
    for name, t in zip(("scale", "bias"), types[1:], strict=False):
        try:
            ok = t.rank <= len(normed) and broadcast_shapes(t.shape, normed) == normed
        except OpError:
            ok = False
        if not ok:
            raise OpError(f"layer_norm's {name} {t} must broadcast to the normalised "
                          f"shape {list(normed)} (axes {axis}..{x.rank - 1})")
    return [x]


def _ln_ref(xs, attrs):
    x = xs[0]
    axes = tuple(range(attrs["axis"] % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + attrs["epsilon"]) * xs[1].astype(np.float64)
    if len(xs) == 3:
        y = y + xs[2]
    return [y.astype(x.dtype)]


register_op(OpDef("layer_norm", (2, 3),
                  {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
                  _ln_infer, _ln_ref, family="nn",
                  doc="normalise over axes [axis, rank), then * scale + bias"))


# -- instance_norm ----------------------------------------------------------------------
def _in_infer(types, attrs):
    x = types[0]
    require_float(x, "instance_norm's input")
    same_dtype(types, "instance_norm's operands")
    if x.rank < 3:
        raise OpError(f"instance_norm needs rank >= 3 (N, C, spatial...), got {x}")
    c = x.shape[1] if attrs["layout"] == "NCHW" else x.shape[-1]
    for name, t in zip(("scale", "bias"), types[1:], strict=True):
        if t.shape != (c,):
            raise OpError(f"instance_norm's {name} must be [{c}], got {t}")
    return [x]


def _in_ref(xs, attrs):
    x, scale, bias = xs
    nchw = attrs["layout"] == "NCHW"
    axes = tuple(range(2, x.ndim)) if nchw else tuple(range(1, x.ndim - 1))
    shape = [1] * x.ndim
    shape[1 if nchw else -1] = -1
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + attrs["epsilon"]) * scale.reshape(shape) \
        + bias.reshape(shape)
    return [y.astype(x.dtype)]


register_op(OpDef("instance_norm", (3, 3),
                  {"epsilon": Attr("float", 1e-5), "layout": Attr("str", "NCHW", LAYOUTS)},
                  _in_infer, _in_ref, family="nn", doc="per-sample, per-channel norm"))


# -- lrn ------------------------------------------------------------------------------
def _lrn_infer(types, attrs):
    (x,) = types
    require_float(x, "lrn's input")
    if x.rank < 3:
        raise OpError(f"lrn needs rank >= 3 (N, C, ...), got {x}")
    if attrs["size"] < 1:
        raise OpError(f"lrn size={attrs['size']} must be >= 1")
    return [x]


def _lrn_ref(xs, attrs):
    x = xs[0]
    size = attrs["size"]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = np.square(x.astype(np.float64))
    pad = [(0, 0)] * x.ndim
    pad[1] = (lo + 1, hi)
    csum = np.cumsum(np.pad(sq, pad), axis=1)
    c = x.shape[1]
    window = np.take(csum, np.arange(c) + lo + hi + 1, axis=1) - np.take(csum, np.arange(c),
                                                                          axis=1)
    y = x / (attrs["bias"] + attrs["alpha"] / size * window) ** attrs["beta"]
    return [y.astype(x.dtype)]


register_op(OpDef("lrn", (1, 1),
                  {"size": Attr("int"), "alpha": Attr("float", 1e-4),
                   "beta": Attr("float", 0.75), "bias": Attr("float", 1.0)},
                  _lrn_infer, _lrn_ref, family="nn",
                  doc="ONNX LRN across channels (axis 1)"))


# -- softmax ----------------------------------------------------------------------------
def _softmax_infer(types, attrs):
    (x,) = types
    require_float(x, "softmax's input")
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _softmax_ref(xs, attrs):
    x = xs[0]
    x64 = x.astype(np.float64)
    m = x64.max(axis=attrs["axis"], keepdims=True)
    # a row of -inf: max taken as 0; NaN and +inf rows give NaN, as onnxruntime (inf - inf)
    e = np.exp(x64 - np.where(m == -np.inf, 0, m))
    return [(e / e.sum(axis=attrs["axis"], keepdims=True)).astype(x.dtype)]


def _log_softmax_ref(xs, attrs):
    x = xs[0]
    x64 = x.astype(np.float64)
    m = x64.max(axis=attrs["axis"], keepdims=True)
    z = x64 - np.where(m == -np.inf, 0, m)
    y = z - np.log(np.exp(z).sum(axis=attrs["axis"], keepdims=True))
    return [y.astype(x.dtype)]


register_op(OpDef("softmax", (1, 1), {"axis": Attr("int", -1)}, _softmax_infer,
                  _softmax_ref, family="nn"))
register_op(OpDef("log_softmax", (1, 1), {"axis": Attr("int", -1)}, _softmax_infer,
                  _log_softmax_ref, family="nn"))


# -- prelu ------------------------------------------------------------------------------
def _prelu_infer(types, attrs):
    x, slope = types
    if x.dtype == "bool":
        raise OpError(f"prelu needs a numeric input, got {x}")
    same_dtype(types, "prelu's operands")
    if broadcast_shapes(x.shape, slope.shape) != x.shape:
        raise OpError(f"prelu's slope {slope} must broadcast to the input {x}")
    return [x]


def _prelu_ref(xs, attrs):
    x, slope = xs
    return [np.where(x < 0, x * slope, x).astype(x.dtype)]


register_op(OpDef("prelu", (2, 2), {}, _prelu_infer, _prelu_ref, family="nn",
                  doc="x if x >= 0 else slope * x; slope broadcasts to x"))
