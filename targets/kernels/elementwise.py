"""Elementwise kernels: unary math and activations, broadcasting binary ops, comparisons,
logic, ``where``, ``cast``, n-ary ``sum``.

One TE compute per op over the result shape, operands read through numpy broadcasting;
the generic schedule parallelises the outer loops and vectorises the innermost when its
extent is a multiple of the SIMD lanes. exp/erf/tanh/sigmoid on f32 use polynomial forms
that vectorise (``_te.fast_*``), accurate to ~1e-6 relative.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from targets.kernels._te import (
    activation,
    broadcast_index,
    const,
    dtype_of,
    expr,
    fast_erf,
    fast_exp,
    fast_sigmoid,
    fast_tanh,
    generic,
    keep_nan,
    nan_max,
    nan_min,
    placeholders,
    prim_func,
    tvm_dtype,
)
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__: list[str] = []


def _is_int(dt: str) -> bool:
    return dt.startswith(("int", "uint"))


def _unary_fns() -> dict[str, Callable]:
    from tvm import te, tirx

    def c(v, x):
        return tirx.const(v, dtype_of(x))

    def sign(x):
        z = c(0, x)
        return keep_nan(x, tirx.Select(x > z, c(1, x), tirx.Select(x < z, c(-1, x), z)))

    def softplus(x):  # log(1 + exp(x)) without overflow
        return te.max(x, c(0, x)) + te.log(c(1, x) + fast_exp(-te.abs(x)))

    def hard_swish(x):
        return x * te.min(te.max(x / c(6, x) + c(0.5, x), c(0, x)), c(1, x))

    return {
        "exp": fast_exp, "log": te.log, "sqrt": te.sqrt, "tanh": fast_tanh,
        "sigmoid": fast_sigmoid, "erf": fast_erf, "reciprocal": lambda x: c(1, x) / x,
        "sin": te.sin, "cos": te.cos, "floor": te.floor, "ceil": te.ceil,
        "round": tirx.round, "softplus": softplus, "hard_swish": hard_swish,
        "neg": lambda x: -x, "abs": te.abs, "sign": sign,
        "relu": lambda x: keep_nan(x, te.max(x, c(0, x))),
    }


_UNARY = ["exp", "log", "sqrt", "tanh", "sigmoid", "erf", "reciprocal", "sin", "cos", "floor",
          "ceil", "round", "softplus", "hard_swish", "neg", "abs", "sign", "relu", "gelu",
          "leaky_relu", "hard_sigmoid", "clip", "logical_not", "cast"]
_NARY = ["add", "sub", "mul", "div", "max", "min", "pow", "mod", "equal", "less", "less_equal",
         "greater", "greater_equal", "logical_and", "logical_or", "logical_xor", "where", "sum"]


def _unary_expr(req: KernelRequest) -> Callable:
    from tvm import te, tirx

    op, a = req.op, req.attrs
    out_dt = tvm_dtype(req.output_types[0].dtype)
    if op == "gelu":
        return lambda x: activation(x, "gelu_tanh" if a["approximate"] == "tanh" else "gelu")
    if op == "leaky_relu":
        return lambda x: tirx.Select(x >= tirx.const(0, dtype_of(x)), x,
                                     x * tirx.const(a["alpha"], dtype_of(x)))
    if op == "hard_sigmoid":
        def hs(x):
            dt = dtype_of(x)
            y = x * tirx.const(a["alpha"], dt) + tirx.const(a["beta"], dt)
            return keep_nan(x, te.min(te.max(y, tirx.const(0, dt)), tirx.const(1, dt)))
        return hs
    if op == "clip":
        def clip(x):
            dt = dtype_of(x)
            lo, hi = a["min"], a["max"]
            if _is_int(dt):
                import numpy as np

                info = np.iinfo(np.dtype(dt))
                lo_i = info.min if not math.isfinite(lo) else max(math.ceil(lo), info.min)
                hi_i = info.max if not math.isfinite(hi) else min(math.floor(hi), info.max)
                lo_i, hi_i = min(lo_i, info.max), max(hi_i, info.min)
                return te.min(te.max(x, tirx.const(lo_i, dt)), tirx.const(hi_i, dt))
            return keep_nan(x, te.min(te.max(x, const(float(lo), dt)), const(float(hi), dt)))
        return clip
    if op == "logical_not":
        return lambda x: tirx.Not(x)
    if op == "cast":
        def cast(x):
            src = dtype_of(x)
            if out_dt == "bool":
                return tirx.NE(x, tirx.const(0, src))
            if src == "bool":
                return tirx.Select(x, tirx.const(1, out_dt), tirx.const(0, out_dt))
            return x.astype(out_dt)
        return cast
    return _unary_fns()[op]


def _binary_expr(op: str) -> Callable:
    from tvm import te, tirx

    def div(x, y):
        return tirx.truncdiv(x, y) if _is_int(dtype_of(x)) else x / y

    def pow_(x, y):
        dt = dtype_of(x)
        if _is_int(dt):
            return te.power(x.astype("float64"), y.astype("float64")).astype(dt)
        return te.power(x, y.astype(dt))

    return {
        "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
        "div": div, "max": nan_max, "min": nan_min, "pow": pow_,
        "equal": tirx.EQ, "less": tirx.LT, "less_equal": tirx.LE, "greater": tirx.GT,
        "greater_equal": tirx.GE, "logical_and": tirx.And, "logical_or": tirx.Or,
        "logical_xor": lambda x, y: tirx.Or(tirx.And(x, tirx.Not(y)), tirx.And(tirx.Not(x), y)),
    }[op]


def _mod_expr(fmod: bool) -> Callable:
    from tvm import te, tirx

    def mod(x, y):
        dt = dtype_of(x)
        if not _is_int(dt):  # C fmod: sign of x (llvm has no tirx.fmod lowering)
            return x - te.trunc(x / y) * y
        return tirx.truncmod(x, y) if fmod else tirx.floormod(x, y)
    return mod


@register_kernel(*_UNARY)
def unary(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    out = req.output_types[0]
    fn = _unary_expr(req)
    Y = te.compute(out.shape, lambda *i: fn(expr(X[i] if i else X[()])), name="out")
    return KernelImpl(prim_func([X, Y], generic(req.cpu, out.dtype)), note=f"{req.op}")


@register_kernel(*_NARY)
def nary(req: KernelRequest) -> KernelImpl:
    from tvm import te

    ins = placeholders(req)
    out = req.output_types[0]
    if req.op == "where":
        from tvm import tirx

        def fn(c, x, y):
            return tirx.Select(c, x, y)
    elif req.op == "sum":
        def fn(*xs):
            acc = xs[0]
            for x in xs[1:]:
                acc = acc + x
            return acc
    elif req.op == "mod":
        fn = _mod_expr(bool(req.attrs.get("fmod", False)))
    else:
        fn = _binary_expr(req.op)

    def body(*i):
        vals = []
        for t, X in zip(req.input_types, ins, strict=True):
            j = tuple(broadcast_index(i, out.shape, t.shape))
            vals.append(expr(X[j] if j else X[()]))
        return fn(*vals)

    Y = te.compute(out.shape, body, name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, out.dtype)), note=req.op)
