"""Linear algebra: ``matmul`` (numpy semantics), ``gemm`` (ONNX Gemm), ``dense``.

``dense`` is the fusion target for MatMul+Add and Gemm: ``x[..., K] @ w[N, K]^T + b[N]``
followed by an optional activation (see :mod:`compiler.ir.ops.nn` for the activation set).
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import broadcast_shapes, same_dtype
from compiler.ir.ops.nn import (
    ACTIVATION_ATTRS,
    accumulator_dtype,
    apply_activation,
    check_activation,
)
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_float


def _require_numeric(t: TensorType, what: str) -> None:
    if t.dtype == "bool":
        raise OpError(f"{what} must be a numeric tensor, got {t}")


def matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy.matmul result shape (1-D promotion, batch broadcasting); OpError if invalid."""
    if not a or not b:
        raise OpError(f"matmul operands must have rank >= 1, got {list(a)} and {list(b)}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise OpError(f"matmul: inner dimensions differ: {list(a)} @ {list(b)} "
                      f"({a2[-1]} vs {b2[-2]})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _matmul_infer(types, attrs):
    a, b = types
    _require_numeric(a, "matmul's a")
    dtype = same_dtype([a, b], "matmul's operands")
    return [TensorType(matmul_shape(a.shape, b.shape), dtype)]


def _matmul_ref(xs, attrs):
    a, b = xs
    acc = accumulator_dtype(a.dtype)
    if acc != a.dtype:  # integers in int64 (wrapped), f16/bf16 in f32: rounded once
        return [np.matmul(a.astype(acc), b.astype(acc)).astype(a.dtype)]
    return [np.matmul(a, b)]


register_op(OpDef("matmul", (2, 2), {}, _matmul_infer, _matmul_ref, family="linalg",
                  doc="numpy matmul: batch broadcasting, 1-D operands promoted"))


def _gemm_infer(types, attrs):
    a, b = types[0], types[1]
    dtype = same_dtype(types, "gemm's operands")
    _require_numeric(a, "gemm's a")
    if a.rank != 2 or b.rank != 2:
        raise OpError(f"gemm takes 2-D a and b, got {a} and {b}")
    m, k = (a.shape[1], a.shape[0]) if attrs["trans_a"] else a.shape
    k2, n = (b.shape[1], b.shape[0]) if attrs["trans_b"] else b.shape
    if k != k2:
        raise OpError(f"gemm: inner dimensions differ ({k} vs {k2}) for a {a} "
                      f"(trans_a={attrs['trans_a']}) and b {b} (trans_b={attrs['trans_b']})")
    if len(types) == 3:
        c = types[2]
        try:
            out = broadcast_shapes(c.shape, (m, n))
        except OpError:
            out = None
        if out != (m, n):
            raise OpError(f"gemm: c {c} does not broadcast to the result [{m},{n}]")
    return [TensorType((m, n), dtype)]


def _gemm_ref(xs, attrs):
    dt = xs[0].dtype
    if accumulator_dtype(dt) == np.float32 and dt != np.float32:  # f16/bf16: f32, round once
        return [r.astype(dt) for r in _gemm_ref([x.astype(np.float32) for x in xs], attrs)]
    a, b = xs[0], xs[1]
    if attrs["trans_a"]:
        a = a.T
    if attrs["trans_b"]:
        b = b.T
    dt = a.dtype
    y = np.matmul(a, b)
    if attrs["alpha"] != 1.0:
        y = y * np.asarray(attrs["alpha"], dt)
    if len(xs) == 3:
        c = xs[2]
        y = y + (c * np.asarray(attrs["beta"], dt) if attrs["beta"] != 1.0 else c)
    return [y.astype(dt)]


register_op(OpDef(
    "gemm", (2, 3),
    {"alpha": Attr("float", 1.0), "beta": Attr("float", 1.0),
     "trans_a": Attr("bool", False), "trans_b": Attr("bool", False)},
    _gemm_infer, _gemm_ref, family="linalg",
    doc="ONNX Gemm: alpha * op(a) @ op(b) + beta * c"))


def _dense_infer(types, attrs):
    x, w = types[0], types[1]
    dtype = same_dtype(types, "dense's operands")
    if not is_float(dtype) and attrs["activation"] not in ("none", "relu"):
        raise OpError(f"dense on {dtype} supports activation none or relu only")
    if x.rank < 1 or w.rank != 2:
        raise OpError(f"dense takes x[..., K] and w[N, K], got {x} and {w}")
    if x.shape[-1] != w.shape[1]:
        raise OpError(f"dense: x's last dimension {x.shape[-1]} differs from w's K "
                      f"{w.shape[1]} (w is [N, K] = {list(w.shape)})")
    n = w.shape[0]
    if len(types) == 3 and types[2].shape != (n,):
        raise OpError(f"dense: bias must be [{n}], got {types[2]}")
    return [TensorType(x.shape[:-1] + (n,), dtype)]


def _dense_ref(xs, attrs):
    x, w = xs[0], xs[1]
    if accumulator_dtype(x.dtype) == np.float32 and x.dtype != np.float32:
        # f16/bf16: f32 products and sums, bias and activation in f32, rounded once
        y = np.matmul(x.astype(np.float32), w.astype(np.float32).T)
        if len(xs) == 3:
            y = y + xs[2].astype(np.float32)
        return [apply_activation(y, attrs).astype(x.dtype)]
    y = np.matmul(x, w.T)
    if len(xs) == 3:
        y = y + xs[2]
    return [apply_activation(y.astype(x.dtype), attrs)]


register_op(OpDef("dense", (2, 3), dict(ACTIVATION_ATTRS), _dense_infer, _dense_ref,
                  verify=check_activation, family="linalg",
                  doc="x[..., K] @ w[N, K]^T + b[N], then activation"))
