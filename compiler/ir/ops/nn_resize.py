"""``pad`` and ``resize`` (ONNX Pad and Resize semantics, with static pads/scales)."""

from __future__ import annotations

import math

import numpy as np

from compiler.errors import OpError
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import is_float


# -- pad --------------------------------------------------------------------------------
def _pad_infer(types, attrs):
    (x,) = types
    pads = attrs["pads"]
    if len(pads) != 2 * x.rank:
        raise OpError(f"pad: pads has {len(pads)} entries, a rank-{x.rank} input needs "
                      f"{2 * x.rank} (all begins, then all ends)")
    shape = []
    for i, d in enumerate(x.shape):
        b, e = pads[i], pads[i + x.rank]
        if d + b + e < 0:
            raise OpError(f"pad: pads {b}, {e} on axis {i} remove more than its {d} elements")
        if attrs["mode"] == "reflect" and (b >= d or e >= d) and (b > 0 or e > 0):
            raise OpError(f"pad: reflect pads on axis {i} must be below its size {d}, "
                          f"got {b}, {e}")
        if attrs["mode"] in ("edge", "wrap") and d == 0 and (b > 0 or e > 0):
            raise OpError(f"pad: {attrs['mode']} mode cannot pad the empty axis {i}")
        shape.append(d + b + e)
    return [x.with_shape(shape)]


def _pad_ref(xs, attrs):
    x = xs[0]
    r = x.ndim
    pads = attrs["pads"]
    crop = tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[i + r])) for i in range(r))
    x = x[crop]
    width = [(max(0, pads[i]), max(0, pads[i + r])) for i in range(r)]
    mode = attrs["mode"]
    if mode == "constant":
        return [np.pad(x, width, mode="constant",
                       constant_values=np.asarray(attrs["value"]).astype(x.dtype))]
    return [np.pad(x, width, mode=mode)]


register_op(OpDef("pad", (1, 1),
                  {"pads": Attr("ints"),
                   "mode": Attr("str", "constant", ("constant", "reflect", "edge", "wrap")),
                   "value": Attr("float", 0.0)},
                  _pad_infer, _pad_ref, family="nn",
                  doc="pads: all begins then all ends; negative entries crop"))


# -- resize -----------------------------------------------------------------------------
_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                "asymmetric", "tf_crop_and_resize")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_out(x_shape, attrs) -> list[int]:
    if attrs["sizes"]:
        return list(attrs["sizes"])
    return [int(math.floor(d * s)) for d, s in zip(x_shape, attrs["scales"], strict=True)]


def _resize_infer(types, attrs):
    (x,) = types
    if len(attrs["scales"]) != x.rank:
        raise OpError(f"resize: scales has {len(attrs['scales'])} entries, the input {x} "
                      f"has rank {x.rank}")
    if any(s <= 0 for s in attrs["scales"]):
        raise OpError(f"resize: scales {attrs['scales']} must be positive")
    if attrs["sizes"] and len(attrs["sizes"]) != x.rank:
        raise OpError(f"resize: sizes has {len(attrs['sizes'])} entries, the input {x} "
                      f"has rank {x.rank}")
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" \
            and len(attrs["roi"]) != 2 * x.rank:
        raise OpError(f"resize: tf_crop_and_resize needs roi with {2 * x.rank} entries (all "
                      f"starts, then all ends), got {attrs['roi']}")
    if attrs["mode"] != "nearest" and not is_float(x.dtype):
        raise OpError(f"resize mode {attrs['mode']!r} needs a float input, got {x}")
    out = _resize_out(x.shape, attrs)
    if any(d < 1 for d in out):
        raise OpError(f"resize: the output shape {out} has an empty axis")
    return [x.with_shape(out)]


def _source_coords(out_len: int, in_len: int, scale: float, mode: str,
                   roi: tuple[float, float]) -> np.ndarray:
    x = np.arange(out_len, dtype=np.float64)
    # The ONNX reference (and so the conformance data) uses the unrounded output length
    # here; onnxruntime uses the integer one. They differ only for non-integral scale * size.
    width = scale * in_len
    if mode == "align_corners":
        return np.zeros_like(x) if width == 1 else x * (in_len - 1) / (width - 1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_crop_and_resize":
        lo, hi = roi
        if width == 1:
            return np.full_like(x, (hi - lo) * (in_len - 1) / 2 + lo * (in_len - 1))
        return x * (hi - lo) * (in_len - 1) / (width - 1) + lo * (in_len - 1)
    if mode == "pytorch_half_pixel":
        return np.full_like(x, -0.5) if width == 1 else (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / width)
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5


def _cubic(t: np.ndarray, a: float) -> list[np.ndarray]:
    s = 1 - t
    return [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * s - (a + 3)) * s * s + 1,
            ((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a]


def resize_axis(x: np.ndarray, axis: int, out_len: int, scale: float, attrs) -> np.ndarray:
    in_len = x.shape[axis]
    ctm = attrs["coordinate_transformation_mode"]
    roi = (attrs["roi"][axis], attrs["roi"][axis + x.ndim]) if attrs["roi"] else (0.0, 1.0)
    src = _source_coords(out_len, in_len, scale, ctm, roi)
    if attrs["antialias"] and attrs["mode"] != "nearest":
        y = _interpolate_antialias(x, axis, src, scale, attrs)
    else:
        y = _interpolate(x, axis, src, attrs)
    if ctm == "tf_crop_and_resize":  # positions outside the input take the fill value
        outside = ((src < 0) | (src > in_len - 1)).reshape(
            [out_len if i == axis else 1 for i in range(x.ndim)])
        y = np.where(outside, attrs["extrapolation_value"], y)
    return y


def _interpolate_antialias(x: np.ndarray, axis: int, src: np.ndarray, scale: float,
                          attrs) -> np.ndarray:
    """Linear/cubic with the kernel widened by 1/scale when downsampling (ONNX antialias)."""
    in_len, out_len = x.shape[axis], len(src)
    s = min(scale, 1.0)
    base = np.floor(src)
    ratio = np.where(src == base, 1.0, src - base)[:, None]  # the reference's convention
    if attrs["mode"] == "linear":
        start = int(np.floor(-1 / s) + 1)
        args = (np.arange(start, 2 - start) - ratio) * s
        coeffs = np.clip(1 - np.abs(args), 0, 1)
    else:
        start = int(np.floor(-2 / s) + 1)
        a, t = attrs["cubic_coeff_a"], np.abs(s * (np.arange(start, 2 - start) - ratio))
        coeffs = np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                          np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))
    coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
    n = coeffs.shape[1]
    pad = -(-n // 2)
    p = np.floor(src + pad)
    frac = src + pad - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    taps = (p.astype(np.int64) + offset)[:, None] + np.arange(n)[None, :] - pad
    if attrs["exclude_outside"]:
        coeffs = np.where((taps < 0) | (taps >= in_len), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    gathered = np.take(x.astype(np.float64), np.clip(taps, 0, in_len - 1), axis=axis)
    shape = (1,) * axis + (out_len, n) + (1,) * (x.ndim - axis - 1)
    return (gathered * coeffs.reshape(shape)).sum(axis=axis + 1)


def _interpolate(x: np.ndarray, axis: int, src: np.ndarray, attrs) -> np.ndarray:
    in_len, out_len = x.shape[axis], len(src)
    base = np.floor(src)
    t = src - base
    base = base.astype(np.int64)
    mode = attrs["mode"]
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        if nm == "floor":
            up = np.zeros_like(t, dtype=bool)
        elif nm == "ceil":
            up = t > 0
        elif nm == "round_prefer_floor":
            up = t > 0.5
        else:
            up = t >= 0.5
        idx = np.clip(base + up, 0, in_len - 1)
        return np.take(x, idx, axis=axis)
    if mode == "linear":
        taps, weights = [base, base + 1], [1 - t, t]
    else:
        taps = [base - 1, base, base + 1, base + 2]
        weights = _cubic(t, attrs["cubic_coeff_a"])
        if attrs["exclude_outside"]:
            weights = [np.where((i >= 0) & (i < in_len), w, 0.0)
                       for i, w in zip(taps, weights, strict=True)]
            total = sum(weights)
            weights = [w / total for w in weights]
    shape = [1] * x.ndim
    shape[axis] = out_len
    x64 = x.astype(np.float64)
    out = sum(np.take(x64, np.clip(i, 0, in_len - 1), axis=axis) * w.reshape(shape)
              for i, w in zip(taps, weights, strict=True))
    return out


def _resize_ref(xs, attrs):
    x = xs[0]
    y = x
    roi = attrs["roi"]
    for axis, (out_len, s) in enumerate(zip(_resize_out(x.shape, attrs), attrs["scales"],
                                            strict=True)):
        full = not roi or (roi[axis] == 0.0 and roi[axis + x.ndim] == 1.0)
        if out_len == x.shape[axis] and s == 1.0 and full:
            continue
        y = resize_axis(y, axis, out_len, s, attrs)
    return [np.asarray(y).astype(x.dtype)]


register_op(OpDef(
    "resize", (1, 1),
    {"scales": Attr("floats"), "sizes": Attr("ints", []),
     "mode": Attr("str", "nearest", ("nearest", "linear", "cubic")),
     "coordinate_transformation_mode": Attr("str", "half_pixel", _COORD_MODES),
     "nearest_mode": Attr("str", "round_prefer_floor", _NEAREST),
     "cubic_coeff_a": Attr("float", -0.75), "exclude_outside": Attr("bool", False),
     "roi": Attr("floats", [], doc="tf_crop_and_resize: all starts, then all ends"),
     "extrapolation_value": Attr("float", 0.0), "antialias": Attr("bool", False)},
    _resize_infer, _resize_ref, family="nn",
    doc="ONNX Resize with static scales (sizes, when given, fix the output shape)"))
