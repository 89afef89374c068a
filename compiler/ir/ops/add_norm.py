"""Residual add + layer norm, optionally writing the quantized result too: ``add_layer_norm``.

``add_layer_norm(x, residual, scale[, bias][, y_scale, y_zp]){axis, epsilon}``

- ``s = x + residual`` (f32, the same shape; the add of a transformer's residual branch);
- result 0: ``layer_norm(s, scale, bias){axis, epsilon}`` in f32 (the next residual);
- with ``y_scale, y_zp`` (5 operands without a bias, 6 with one; per tensor, or ``[C]`` per
  channel of the last axis, as the SmoothQuant-folded quantize has them): result 1 is
  ``quantize{axis=-1}(result 0, y_scale, y_zp)`` in ``y_zp``'s dtype (u8/i8), the input of the
  next integer dense, so no separate quantize pass over the tensor runs.

The reference is exactly the unfused chain (``add``, ``layer_norm``, ``quantize``), which is
what ``lower-quantized`` replaces (passes/quantization/fuse_norm.py).
"""

from __future__ import annotations

from compiler.errors import OpError
from compiler.ir.registry import Attr, OpDef, get_op, register_op
from compiler.ir.types import TensorType

__all__: list[str] = []

_QDTYPES = ("u8", "i8")


def split_operands(n: int) -> tuple[bool, bool]:
    """(has bias, has quantized result) of an add_layer_norm with ``n`` operands; 4 is a
    bias (a quantized result needs both of y_scale, y_zp)."""
    return n in (4, 6), n >= 5


def _infer(types, attrs):
    x, r = types[0], types[1]
    if x.dtype != "f32" or r != x:
        raise OpError(f"add_layer_norm adds two f32 tensors of one type, got {x} and {r}")
    has_bias, quantized = split_operands(len(types))
    ln = get_op("layer_norm")
    norm_ops = types[2:4] if has_bias else types[2:3]
    (y,) = ln.infer([x, *norm_ops], ln.normalize_attrs(attrs))
    if not quantized:
        return [y]
    s, z = types[-2], types[-1]
    per = ((), (x.shape[-1],)) if x.rank else ((),)
    if s.dtype != "f32" or s.shape not in per or z.shape != s.shape or z.dtype not in _QDTYPES:
        raise OpError(f"add_layer_norm's quantized result needs an f32 y_scale and a u8/i8 "
                      f"y_zp, both [] or [{x.shape[-1] if x.rank else ''}] (the last axis), "
                      f"got {s} and {z}")
    return [y, y.with_dtype(z.dtype)]


def _ref(xs, attrs):
    has_bias, quantized = split_operands(len(xs))
    s = (xs[0] + xs[1]).astype(xs[0].dtype)
    ln = get_op("layer_norm")
    (y,) = ln.reference([s, *xs[2:4 if has_bias else 3]], ln.normalize_attrs(attrs))
    if not quantized:
        return [y]
    q = get_op("quantize")
    dtype = TensorType.of(xs[-1]).dtype
    (yq,) = q.reference([y, xs[-2], xs[-1]], q.normalize_attrs({"dtype": dtype}))
    return [y, yq]


register_op(OpDef("add_layer_norm", (3, 6),
                  {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
                  _infer, _ref, family="nn",
                  doc="layer_norm(x + residual, scale, bias), and (with y_scale, y_zp) that "
                      "result quantized as a second result"))
