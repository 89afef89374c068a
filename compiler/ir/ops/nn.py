"""Convolution and pooling: conv2d, conv_transpose2d, max/avg pools, global pools.

Also the fused-activation helpers shared by ``conv2d`` and ``dense``. References are
vectorised: windows come from ``as_strided`` views and convolutions are one batched matmul
(im2col), so a ResNet-50 interprets in seconds. ``pads`` is ``[top, left, bottom, right]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from compiler.errors import OpError
from compiler.ir.ops._util import same_dtype
from compiler.ir.ops.elementwise import gelu_array
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_float

__all__ = ["ACTIVATIONS", "ACTIVATION_ATTRS", "apply_activation", "check_activation",
           "conv_out_size", "pool_out_size", "kernel_dims", "accumulator_dtype"]

ACTIVATIONS = ("none", "relu", "relu6", "clip", "sigmoid", "gelu", "gelu_tanh", "silu",
               "hard_swish", "hard_sigmoid")
ACTIVATION_ATTRS = {
    "activation": Attr("str", "none", ACTIVATIONS, "fused activation"),
    "clip_min": Attr("float", 0.0, doc="lower bound when activation is clip"),
    "clip_max": Attr("float", 6.0, doc="upper bound when activation is clip"),
}
LAYOUTS = ("NCHW", "NHWC")


def accumulator_dtype(dt: np.dtype) -> np.dtype:
    """What conv/dense/matmul/gemm sum products in: f32 for the 16-bit floats (an fp16 NPU's
    matrix unit accumulates in f32, adds the bias and activation there and rounds once; the
    kernels do the same), int64 for integers (wrapped to the result type), else the dtype."""
    dt = np.dtype(dt)
    if np.issubdtype(dt, np.integer):
        return np.dtype(np.int64)
    if dt.itemsize == 2 and dt.kind in "fV":  # float16, bfloat16 (ml_dtypes)
        return np.dtype(np.float32)
    return dt


def check_activation(attrs: dict[str, Any]) -> None:
    if attrs["activation"] == "clip" and attrs["clip_min"] > attrs["clip_max"]:
        raise OpError(f"clip_min={attrs['clip_min']} is above clip_max={attrs['clip_max']}")


def apply_activation(y: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """The fused activation of ``attrs`` applied to ``y`` (same dtype out)."""
    act = attrs.get("activation", "none")
    dt = y.dtype
    if act == "none":
        return y
    if act == "relu":
        return np.maximum(y, np.zeros((), dt))
    if act in ("relu6", "clip"):
        lo, hi = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
        return np.clip(y, np.asarray(lo, dt), np.asarray(hi, dt))
    if act in ("sigmoid", "silu"):
        s = 1.0 / (1.0 + np.exp(-y.astype(np.float64)))
        return (s if act == "sigmoid" else y * s).astype(dt)
    if act in ("hard_swish", "hard_sigmoid"):  # torch's: clip(y / 6 + 0.5, 0, 1) [* y]
        s = np.clip(y.astype(np.float64) / 6.0 + 0.5, 0.0, 1.0)
        return (s if act == "hard_sigmoid" else y * s).astype(dt)
    return gelu_array(y, "tanh" if act == "gelu_tanh" else "none")


def _ints(attrs, key, n, lo, what):
    v = attrs[key]
    if len(v) != n or any(x < lo for x in v):
        raise OpError(f"{key}={v} must be {n} integers >= {lo} ({what})")
    return v


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + pad - dil * (k - 1) - 1) // stride + 1


def pool_out_size(size: int, k: int, stride: int, pad_b: int, pad_e: int, dil: int,
                  ceil_mode: bool) -> int:
    span = size + pad_b + pad_e - dil * (k - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_b:  # the last window must start inside the input
        out -= 1
    return out


def _windows(xp: np.ndarray, kh: int, kw: int, strides, dilations, oh: int, ow: int):
    """View [N, C, OH, OW, KH, KW] of the padded NCHW tensor ``xp``."""
    n, c = xp.shape[:2]
    s0, s1, s2, s3 = xp.strides
    sh, sw = strides
    dh, dw = dilations
    return as_strided(xp, (n, c, oh, ow, kh, kw),
                      (s0, s1, s2 * sh, s3 * sw, s2 * dh, s3 * dw), writeable=False)


def to_nchw(x, layout):
    return x if layout == "NCHW" else x.transpose(0, 3, 1, 2)


def from_nchw(y, layout):
    return y if layout == "NCHW" else np.ascontiguousarray(y.transpose(0, 2, 3, 1))


def _spatial(t: TensorType, layout: str, what: str):
    if t.rank != 4:
        raise OpError(f"{what} must be 4-D ({layout}), got {t}")
    if layout == "NCHW":
        n, c, h, w = t.shape
    else:
        n, h, w, c = t.shape
    return n, c, h, w


def _make(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


# -- conv2d -------------------------------------------------------------------------
KERNEL_LAYOUTS = ("OIHW", "OHWI", "HWIO")


def kernel_dims(w: tuple[int, ...], kl: str) -> tuple[int, int, int, int]:
    """(O, I/groups, KH, KW) of a conv weight shape in kernel layout ``kl``."""
    if kl == "OIHW":
        o, i, kh, kw = w
    elif kl == "OHWI":
        o, kh, kw, i = w
    else:
        kh, kw, i, o = w
    return o, i, kh, kw


def conv_infer(types, attrs):
    x, w = types[0], types[1]
    dtype = same_dtype(types, "conv2d's operands")
    if dtype == "bool":
        raise OpError(f"conv2d needs numeric operands, got {x}")
    if not is_float(dtype) and attrs["activation"] not in ("none", "relu"):
        raise OpError(f"conv2d on {dtype} supports activation none or relu only")
    layout, kl = attrs["layout"], attrs["kernel_layout"]
    n, c, h, wd = _spatial(x, layout, "conv2d's input")
    if w.rank != 4:
        raise OpError(f"conv2d's weight must be 4-D ({kl}), got {w}")
    o, i, kh, kw = kernel_dims(w.shape, kl)
    g = attrs["groups"]
    if g < 1 or c % g or o % g:
        raise OpError(f"groups={g} must divide the input channels ({c}) and the output "
                      f"channels ({o})")
    if i * g != c:
        raise OpError(f"conv2d's weight {w} ({kl}) expects {i * g} input channels "
                      f"(I={i} x groups={g}), the input {x} has {c}")
    if len(types) == 3 and types[2].shape != (o,):
        raise OpError(f"conv2d's bias must be [{o}], got {types[2]}")
    s = _ints(attrs, "strides", 2, 1, "[sh, sw]")
    p = _ints(attrs, "pads", 4, 0, "[top, left, bottom, right]")
    d = _ints(attrs, "dilations", 2, 1, "[dh, dw]")
    oh = conv_out_size(h, kh, s[0], p[0] + p[2], d[0])
    ow = conv_out_size(wd, kw, s[1], p[1] + p[3], d[1])
    if oh < 1 or ow < 1:
        raise OpError(f"conv2d: the {kh}x{kw} kernel (dilations {d}) does not fit the "
                      f"padded {h}x{wd} input (pads {p})")
    return [TensorType(_make(layout, n, o, oh, ow), dtype)]


def conv2d_nchw(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides, pads,
                dilations, groups: int, *, keep_acc: bool = False) -> np.ndarray:
    """NCHW x, OIHW w: grouped im2col convolution as one batched matmul.

    Sums in :func:`accumulator_dtype`; ``keep_acc`` returns the accumulator (the caller rounds
    after its activation), else the result in x's dtype."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = groups
    oh = conv_out_size(h, kh, strides[0], pads[0] + pads[2], dilations[0])
    ow = conv_out_size(wd, kw, strides[1], pads[1] + pads[3], dilations[1])
    acc = accumulator_dtype(x.dtype)
    xp = np.pad(x.astype(acc, copy=False), ((0, 0), (0, 0), (pads[0], pads[2]),
                                            (pads[1], pads[3])))
    if kh == kw == 1 and strides == [1, 1] and not any(pads):
        cols = xp.reshape(n, g, cg, h * wd).transpose(0, 1, 3, 2)
    else:
        win = _windows(xp, kh, kw, strides, dilations, oh, ow)  # N C OH OW KH KW
        cols = win.reshape(n, g, cg, oh, ow, kh, kw).transpose(0, 1, 3, 4, 2, 5, 6)
        cols = cols.reshape(n, g, oh * ow, cg * kh * kw)
    wm = w.astype(acc, copy=False).reshape(g, o // g, cg * kh * kw).transpose(0, 2, 1)
    y = np.matmul(cols, wm)  # N G OH*OW O/g
    y = y.transpose(0, 1, 3, 2).reshape(n, o, oh, ow)
    if b is not None:
        y = y + b.astype(acc, copy=False).reshape(1, o, 1, 1)
    return y if keep_acc else y.astype(x.dtype, copy=False)


def _conv_ref(xs, attrs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) == 3 else None
    kl = attrs["kernel_layout"]
    if kl == "OHWI":
        w = w.transpose(0, 3, 1, 2)
    elif kl == "HWIO":
        w = w.transpose(3, 2, 0, 1)
    wide = accumulator_dtype(x.dtype) == np.float32 and x.dtype != np.float32
    y = conv2d_nchw(to_nchw(x, attrs["layout"]), w, b, attrs["strides"], attrs["pads"],
                    attrs["dilations"], attrs["groups"], keep_acc=wide)
    y = apply_activation(y, attrs).astype(x.dtype, copy=False)
    return [from_nchw(y, attrs["layout"])]


CONV_ATTRS = {
    "strides": Attr("ints", [1, 1]), "pads": Attr("ints", [0, 0, 0, 0]),
    "dilations": Attr("ints", [1, 1]), "groups": Attr("int", 1),
}
register_op(OpDef(
    "conv2d", (2, 3),
    {**CONV_ATTRS, "layout": Attr("str", "NCHW", LAYOUTS),
     "kernel_layout": Attr("str", "OIHW", KERNEL_LAYOUTS), **ACTIVATION_ATTRS},
    conv_infer, _conv_ref, verify=check_activation, family="nn",
    doc="2-D convolution, optional bias and fused activation"))


# -- conv_transpose2d ------------------------------------------------------------------
def _convt_infer(types, attrs):
    x, w = types[0], types[1]
    dtype = same_dtype(types, "conv_transpose2d's operands")
    if not is_float(dtype):
        raise OpError(f"conv_transpose2d needs float operands, got {x}")
    if x.rank != 4 or w.rank != 4:
        raise OpError(f"conv_transpose2d takes NCHW x and [I, O/g, KH, KW] w, got {x} and {w}")
    n, c, h, wd = x.shape
    ci, og, kh, kw = w.shape
    g = attrs["groups"]
    if g < 1 or c % g or ci != c:
        raise OpError(f"conv_transpose2d: weight {w} needs {ci} input channels divisible "
                      f"by groups={g}; the input {x} has {c}")
    o = og * g
    if len(types) == 3 and types[2].shape != (o,):
        raise OpError(f"conv_transpose2d's bias must be [{o}], got {types[2]}")
    s = _ints(attrs, "strides", 2, 1, "[sh, sw]")
    p = _ints(attrs, "pads", 4, 0, "[top, left, bottom, right]")
    d = _ints(attrs, "dilations", 2, 1, "[dh, dw]")
    op = _ints(attrs, "output_padding", 2, 0, "[h, w]")
    oh = (h - 1) * s[0] + d[0] * (kh - 1) + 1 + op[0] - p[0] - p[2]
    ow = (wd - 1) * s[1] + d[1] * (kw - 1) + 1 + op[1] - p[1] - p[3]
    if oh < 1 or ow < 1:
        raise OpError(f"conv_transpose2d: pads {p} leave an empty output")
    return [TensorType((n, o, oh, ow), dtype)]


def _convt_ref(xs, attrs):
    x, w = xs[0], xs[1]
    out_dt = x.dtype
    if accumulator_dtype(out_dt) != out_dt:  # f16/bf16: f32 sums, rounded once at the end
        xs = [a.astype(np.float32) for a in xs]
        return [r.astype(out_dt) for r in _convt_ref(xs, attrs)]
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    g = attrs["groups"]
    s, p, d, opad = attrs["strides"], attrs["pads"], attrs["dilations"], attrs["output_padding"]
    cg = c // g
    # contrib[n, g, og, kh, kw, h, w] = sum_c x[n, g, c, h, w] * w[g, c, og, kh, kw]
    xm = x.reshape(n, g, cg, h * wd)
    wm = w.reshape(g, cg, og * kh * kw).transpose(0, 2, 1)  # g, og*kh*kw, cg
    contrib = np.matmul(wm[None], xm).reshape(n, g, og, kh, kw, h, wd)
    fh = (h - 1) * s[0] + d[0] * (kh - 1) + 1 + opad[0]
    fw = (wd - 1) * s[1] + d[1] * (kw - 1) + 1 + opad[1]
    full = np.zeros((n, g, og, fh, fw), dtype=x.dtype)
    for i in range(kh):  # loops over kernel taps, not pixels
        for j in range(kw):
            full[:, :, :, i * d[0]: i * d[0] + (h - 1) * s[0] + 1: s[0],
                 j * d[1]: j * d[1] + (wd - 1) * s[1] + 1: s[1]] += contrib[:, :, :, i, j]
    y = full.reshape(n, g * og, fh, fw)[:, :, p[0]: fh - p[2], p[1]: fw - p[3]]
    if len(xs) == 3:
        y = y + xs[2].reshape(1, -1, 1, 1)
    return [np.ascontiguousarray(y)]


register_op(OpDef(
    "conv_transpose2d", (2, 3), {**CONV_ATTRS, "output_padding": Attr("ints", [0, 0])},
    _convt_infer, _convt_ref, family="nn",
    doc="transposed 2-D convolution (ONNX ConvTranspose), NCHW, w [I, O/g, KH, KW]"))


# -- pooling --------------------------------------------------------------------------
def _pool_infer(types, attrs):
    (x,) = types
    if x.dtype == "bool":
        raise OpError(f"pooling needs a numeric tensor, got {x}")
    layout = attrs["layout"]
    n, c, h, w = _spatial(x, layout, "the pooled input")
    k = _ints(attrs, "kernel", 2, 1, "[kh, kw]")
    s = _ints(attrs, "strides", 2, 1, "[sh, sw]")
    p = _ints(attrs, "pads", 4, 0, "[top, left, bottom, right]")
    d = _ints(attrs, "dilations", 2, 1, "[dh, dw]")
    if p[0] >= k[0] * d[0] or p[2] >= k[0] * d[0] or p[1] >= k[1] * d[1] \
            or p[3] >= k[1] * d[1]:
        raise OpError(f"pads {p} must be smaller than the (dilated) kernel {k}")
    oh = pool_out_size(h, k[0], s[0], p[0], p[2], d[0], attrs["ceil_mode"])
    ow = pool_out_size(w, k[1], s[1], p[1], p[3], d[1], attrs["ceil_mode"])
    if oh < 1 or ow < 1:
        raise OpError(f"the {k[0]}x{k[1]} window does not fit the padded {h}x{w} input")
    return [TensorType(_make(layout, n, c, oh, ow), x.dtype)]


def _pool_geometry(x, attrs):
    _, _, h, w = x.shape
    k, s, p, d = attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"]
    oh = pool_out_size(h, k[0], s[0], p[0], p[2], d[0], attrs["ceil_mode"])
    ow = pool_out_size(w, k[1], s[1], p[1], p[3], d[1], attrs["ceil_mode"])
    # extra end padding so every (ceil-mode) window lies inside the buffer
    eh = max(0, (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - (h + p[0] + p[2]))
    ew = max(0, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - (w + p[1] + p[3]))
    return k, s, p, d, oh, ow, eh, ew


def _max_pool_ref(xs, attrs):
    x = to_nchw(xs[0], attrs["layout"])
    k, s, p, d, oh, ow, eh, ew = _pool_geometry(x, attrs)
    if np.issubdtype(x.dtype, np.integer):
        low = np.iinfo(x.dtype).min
    else:
        low = -np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2] + eh), (p[1], p[3] + ew)),
                constant_values=low)
    y = _windows(xp, k[0], k[1], s, d, oh, ow).max(axis=(4, 5))
    return [from_nchw(y, attrs["layout"])]


def _avg_pool_ref(xs, attrs):
    x = to_nchw(xs[0], attrs["layout"])
    k, s, p, d, oh, ow, eh, ew = _pool_geometry(x, attrs)
    _, _, h, w = x.shape
    acc = np.float64
    xp = np.pad(x.astype(acc), ((0, 0), (0, 0), (p[0], p[2] + eh), (p[1], p[3] + ew)))
    total = _windows(xp, k[0], k[1], s, d, oh, ow).sum(axis=(4, 5))
    mask = np.zeros((1, 1) + xp.shape[2:], acc)
    if attrs["count_include_pad"]:
        mask[:, :, : h + p[0] + p[2], : w + p[1] + p[3]] = 1
    else:
        mask[:, :, p[0]: p[0] + h, p[1]: p[1] + w] = 1
    count = _windows(mask, k[0], k[1], s, d, oh, ow).sum(axis=(4, 5))
    y = total / np.maximum(count, 1)
    return [from_nchw(y.astype(x.dtype), attrs["layout"])]


_POOL_ATTRS = {
    "kernel": Attr("ints"), "strides": Attr("ints", [1, 1]),
    "pads": Attr("ints", [0, 0, 0, 0]), "dilations": Attr("ints", [1, 1]),
    "ceil_mode": Attr("bool", False), "layout": Attr("str", "NCHW", LAYOUTS),
}
register_op(OpDef("max_pool2d", (1, 1), dict(_POOL_ATTRS), _pool_infer, _max_pool_ref,
                  family="nn", doc="2-D max pooling (padding never wins)"))
register_op(OpDef("avg_pool2d", (1, 1),
                  {**_POOL_ATTRS, "count_include_pad": Attr("bool", False)},
                  _pool_infer, _avg_pool_ref, family="nn",
                  doc="2-D average pooling; the ceil-mode overhang never counts"))


def _global_infer(types, attrs):
    (x,) = types
    if x.rank < 3 or x.dtype == "bool":
        raise OpError(f"global pooling needs a numeric tensor of rank >= 3, got {x}")
    if attrs["layout"] == "NCHW":
        return [x.with_shape(x.shape[:2] + (1,) * (x.rank - 2))]
    return [x.with_shape((x.shape[0],) + (1,) * (x.rank - 2) + (x.shape[-1],))]


def _global_axes(x, layout):
    return tuple(range(2, x.ndim)) if layout == "NCHW" else tuple(range(1, x.ndim - 1))


def _gap_ref(xs, attrs):
    x = xs[0]
    y = x.astype(np.float64).mean(axis=_global_axes(x, attrs["layout"]), keepdims=True)
    return [y.astype(x.dtype)]


def _gmp_ref(xs, attrs):
    x = xs[0]
    return [x.max(axis=_global_axes(x, attrs["layout"]), keepdims=True)]


_LAYOUT = {"layout": Attr("str", "NCHW", LAYOUTS)}
register_op(OpDef("global_avg_pool", (1, 1), dict(_LAYOUT), _global_infer, _gap_ref,
                  family="nn", doc="mean over the spatial axes, kept as size 1"))
register_op(OpDef("global_max_pool", (1, 1), dict(_LAYOUT), _global_infer, _gmp_ref,
                  family="nn", doc="max over the spatial axes, kept as size 1"))
