"""Elementwise ops: unary math, activations, binary arithmetic with broadcasting,
comparisons, logic, ``where``, ``cast``, ``clip``.

Binary ops follow numpy/ONNX multidirectional broadcasting. Integer division truncates
toward zero like ONNX's Div; float math is computed in the operand dtype.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import (
    broadcast_infer,
    broadcast_shapes,
    compare_infer,
    require_float,
    same_dtype,
    same_type,
)
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, to_numpy_dtype


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return np.asarray(erf(x)).astype(x.dtype)


def gelu_array(x: np.ndarray, approximate: str) -> np.ndarray:
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    else:
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    return y.astype(x.dtype)


def _float_unary(fn):
    def infer(types, attrs):
        require_float(types[0])
        return [types[0]]

    return infer


_UNARY_FLOAT = {
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
    "sigmoid": lambda x: (1.0 / (1.0 + np.exp(-x.astype(np.float64)))),
    "erf": _erf, "reciprocal": lambda x: 1.0 / x,
    "sin": np.sin, "cos": np.cos, "floor": np.floor, "ceil": np.ceil,
    "round": np.round,  # round half to even, like ONNX Round
    "softplus": lambda x: np.log1p(np.exp(x.astype(np.float64))),
    "hard_swish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
}
_UNARY_ANY = {
    "neg": np.negative, "abs": np.abs, "sign": np.sign,
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
}


def _unary_ref(fn):
    def ref(xs, attrs):
        x = xs[0]
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x)).astype(x.dtype)]

    return ref


for _name, _fn in _UNARY_FLOAT.items():
    register_op(OpDef(_name, (1, 1), {}, _float_unary(_fn), _unary_ref(_fn),
                      elementwise=True, family="elementwise"))
for _name, _fn in _UNARY_ANY.items():
    register_op(OpDef(_name, (1, 1), {}, same_type, _unary_ref(_fn),
                      elementwise=True, family="elementwise"))


def _ref_gelu(xs, attrs):
    return [gelu_array(xs[0], attrs["approximate"])]


register_op(OpDef("gelu", (1, 1), {"approximate": Attr("str", "none", ("none", "tanh"))},
                  _float_unary(None), _ref_gelu, elementwise=True, family="elementwise"))


def _ref_leaky(xs, attrs):
    x = xs[0]
    return [np.where(x >= 0, x, x * np.asarray(attrs["alpha"], x.dtype)).astype(x.dtype)]


register_op(OpDef("leaky_relu", (1, 1), {"alpha": Attr("float", 0.01)}, _float_unary(None),
                  _ref_leaky, elementwise=True, family="elementwise"))


def _ref_hard_sigmoid(xs, attrs):
    x = xs[0]
    y = np.clip(x * np.asarray(attrs["alpha"], x.dtype) + np.asarray(attrs["beta"], x.dtype), 0, 1)
    return [y.astype(x.dtype)]


register_op(OpDef("hard_sigmoid", (1, 1),
                  {"alpha": Attr("float", 0.2), "beta": Attr("float", 0.5)},
                  _float_unary(None), _ref_hard_sigmoid, elementwise=True,
                  family="elementwise"))


def _ref_clip(xs, attrs):
    x = xs[0]
    lo, hi = attrs["min"], attrs["max"]
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        lo, hi = max(lo, info.min), min(hi, info.max)
        lo, hi = math.ceil(lo) if math.isfinite(lo) else info.min, \
            math.floor(hi) if math.isfinite(hi) else info.max
    return [np.minimum(np.maximum(x, np.asarray(lo).astype(x.dtype)),
                       np.asarray(hi).astype(x.dtype)).astype(x.dtype)]


register_op(OpDef("clip", (1, 1),
                  {"min": Attr("float", -math.inf), "max": Attr("float", math.inf)},
                  same_type, _ref_clip, elementwise=True, family="elementwise",
                  doc="clip(x, min, max); relu6 is clip{min=0.0,max=6.0}"))


# -- binary ------------------------------------------------------------------------
def _div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a.astype(np.float64) / b.astype(np.float64)).astype(a.dtype)
    return a / b


def _mod(a, b, fmod):
    if fmod or np.issubdtype(a.dtype, np.floating):
        return np.fmod(a, b)
    return np.mod(a, b)


_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _div,
    "max": np.maximum, "min": np.minimum,
}


def _binary_ref(fn):
    def ref(xs, attrs):
        a, b = xs
        with np.errstate(all="ignore"):
            return [np.asarray(fn(a, b)).astype(a.dtype)]

    return ref


for _name, _fn in _BINARY.items():
    register_op(OpDef(_name, (2, 2), {}, broadcast_infer, _binary_ref(_fn),
                      inplace=True, family="elementwise"))


def _ref_pow(xs, attrs):
    a, b = xs
    with np.errstate(all="ignore"):
        if np.issubdtype(a.dtype, np.integer):
            return [np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)]
        return [np.power(a, b.astype(a.dtype)).astype(a.dtype)]


def _infer_pow(types, attrs):
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), types[0].dtype)]


register_op(OpDef("pow", (2, 2), {}, _infer_pow, _ref_pow, inplace=True, family="elementwise",
                  doc="a ** b; b may have another dtype (ONNX Pow)"))


def _ref_mod(xs, attrs):
    return [np.asarray(_mod(xs[0], xs[1], attrs["fmod"])).astype(xs[0].dtype)]


register_op(OpDef("mod", (2, 2), {"fmod": Attr("bool", False)}, broadcast_infer, _ref_mod,
                  family="elementwise"))

_COMPARE = {
    "equal": np.equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
}
for _name, _fn in _COMPARE.items():
    register_op(OpDef(_name, (2, 2), {}, compare_infer,
                      (lambda f: lambda xs, a: [f(xs[0], xs[1])])(_fn), family="elementwise"))


def _bool_infer(types, attrs):
    for t in types:
        if t.dtype != "bool":
            raise OpError(f"logical ops take bool operands, got {t}")
    return [TensorType(broadcast_shapes(*(t.shape for t in types)), "bool")]


for _name, _fn in {"logical_and": np.logical_and, "logical_or": np.logical_or,
                   "logical_xor": np.logical_xor}.items():
    register_op(OpDef(_name, (2, 2), {}, _bool_infer,
                      (lambda f: lambda xs, a: [f(xs[0], xs[1])])(_fn), family="elementwise"))
register_op(OpDef("logical_not", (1, 1), {}, _bool_infer,
                  lambda xs, a: [np.logical_not(xs[0])], elementwise=True,
                  family="elementwise"))


def _where_infer(types, attrs):
    c, a, b = types
    if c.dtype != "bool":
        raise OpError(f"where's condition must be bool, got {c}")
    dtype = same_dtype([a, b], "where's branches")
    return [TensorType(broadcast_shapes(c.shape, a.shape, b.shape), dtype)]


register_op(OpDef("where", (3, 3), {}, _where_infer,
                  lambda xs, a: [np.where(xs[0], xs[1], xs[2])], inplace=True,
                  family="elementwise"))


def _cast_infer(types, attrs):
    return [types[0].with_dtype(attrs["to"])]


def _cast_ref(xs, attrs):
    x = xs[0]
    to = to_numpy_dtype(attrs["to"])
    with np.errstate(all="ignore"):
        if np.issubdtype(to, np.integer) and np.issubdtype(x.dtype, np.floating):
            x = np.trunc(x)
        return [x.astype(to)]


register_op(OpDef("cast", (1, 1), {"to": Attr("dtype")}, _cast_infer, _cast_ref,
                  family="elementwise"))


def _variadic_infer(types, attrs):
    return broadcast_infer(types, attrs)


def _sum_ref(xs, attrs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return [np.asarray(out).astype(xs[0].dtype)]


register_op(OpDef("sum", (1, None), {}, _variadic_infer, _sum_ref, family="elementwise",
                  doc="n-ary broadcasting sum (ONNX Sum)"))
