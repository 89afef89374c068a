"""Converters from ATen ops (core set plus :data:`KEEP`) to catalogue ops.

Each converter takes the importer and the node's arguments bound by schema name (fx nodes
already replaced by IR values; Python scalars and lists stay as they are) and returns a
Value, or a list for ops with several results (``None`` marks a result we do not import,
e.g. the saved mean of ``native_layer_norm``). A converter raises :class:`Unsupported`
for a variant it cannot express.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from compiler.frontends.torch import TorchImporter, Unsupported
from compiler.ir.graph import Value

Conv = Callable[[TorchImporter, dict[str, Any]], Any]
CONVERTERS: dict[str, Conv] = {}


def conv(*names: str) -> Callable[[Conv], Conv]:
    def deco(fn: Conv) -> Conv:
        for n in names:
            CONVERTERS[n] = fn
        return fn

    return deco


def axis_arg(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def pair_arg(v: Any) -> list[int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return v * 2 if len(v) == 1 else v


# -- no-ops ---------------------------------------------------------------------------
@conv("clone.default", "alias.default", "detach.default", "lift_fresh_copy.default",
      "contiguous.default")
def _passthrough(imp: TorchImporter, a: dict) -> Value:
    return a["self"]


@conv("dropout.default")
def _dropout(imp: TorchImporter, a: dict) -> Value:
    if a["train"]:
        raise Unsupported("dropout in training mode (call module.eval())")
    return a["input"]


@conv("_assert_tensor_metadata.default")
def _assert_meta(imp: TorchImporter, a: dict) -> None:
    return None


@conv("_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "type_as.default")
def _to_copy(imp: TorchImporter, a: dict) -> Value:
    return imp.tensor(a["self"], imp.out_type().dtype)


# -- constants (fold through the ops' reference implementations) ----------------------
@conv("arange.default", "arange.start", "arange.start_step")
def _arange(imp: TorchImporter, a: dict) -> Value:
    t = imp.out_type()
    start = a.get("start", 0) if "start" in a else 0
    step = a.get("step", 1) if "step" in a else 1
    return imp.emit("arange", start=float(start), limit=float(a["end"]), delta=float(step),
                    dtype=t.dtype)


@conv("full.default", "zeros.default", "ones.default", "scalar_tensor.default",
      "full_like.default", "zeros_like.default", "ones_like.default",
      "new_ones.default", "new_zeros.default", "new_full.default")
def _fill(imp: TorchImporter, a: dict) -> Value:
    t = imp.out_type()
    key = str(imp.node.target)
    value = a.get("fill_value", a.get("s"))
    if value is None:
        value = 1.0 if "ones" in key else 0.0
    return imp.emit("fill", shape=list(t.shape), value=float(value), dtype=t.dtype)


# -- elementwise --------------------------------------------------------------------
_UNARY = {
    "neg": "neg", "abs": "abs", "sign": "sign", "exp": "exp", "log": "log", "sqrt": "sqrt",
    "tanh": "tanh", "sigmoid": "sigmoid", "erf": "erf", "reciprocal": "reciprocal",
    "sin": "sin", "cos": "cos", "floor": "floor", "ceil": "ceil", "round": "round",
    "relu": "relu", "hardswish": "hard_swish", "logical_not": "logical_not",
}
for _aten, _op in _UNARY.items():
    def _unary(imp: TorchImporter, a: dict, _op: str = _op) -> Value:
        x = imp.tensor(a["self"], imp.out_type().dtype)
        return imp.emit(_op, x)

    conv(f"{_aten}.default")(_unary)


@conv("bitwise_not.default")
def _bitwise_not(imp: TorchImporter, a: dict) -> Value:
    if a["self"].dtype != "bool":
        raise Unsupported("bitwise_not on integers")
    return imp.emit("logical_not", a["self"])


@conv("rsqrt.default")
def _rsqrt(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("reciprocal", imp.emit("sqrt", a["self"]))


@conv("log1p.default")
def _log1p(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("log", imp.emit("add", x, imp.tensor(1.0, x.dtype)))


@conv("expm1.default")
def _expm1(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("sub", imp.emit("exp", x), imp.tensor(1.0, x.dtype))


@conv("silu.default")
def _silu(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("mul", a["self"], imp.emit("sigmoid", a["self"]))


@conv("gelu.default")
def _gelu(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("gelu", a["self"], approximate=a["approximate"])


@conv("leaky_relu.default")
def _leaky_relu(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("leaky_relu", a["self"], alpha=float(a["negative_slope"]))


@conv("hardsigmoid.default")
def _hardsigmoid(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("hard_sigmoid", a["self"], alpha=1.0 / 6.0, beta=0.5)


@conv("hardtanh.default", "clamp.default")
def _clip(imp: TorchImporter, a: dict) -> Value:
    lo = a.get("min_val", a.get("min"))
    hi = a.get("max_val", a.get("max"))
    if isinstance(lo, Value) or isinstance(hi, Value):
        raise Unsupported("clamp with tensor bounds")
    return imp.emit("clip", a["self"], min=-math.inf if lo is None else float(lo),
                    max=math.inf if hi is None else float(hi))


@conv("clamp.Tensor")
def _clamp_tensor(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    x = imp.tensor(a["self"], dt)
    if a["min"] is not None:
        x = imp.emit("max", x, imp.tensor(a["min"], dt))
    if a["max"] is not None:
        x = imp.emit("min", x, imp.tensor(a["max"], dt))
    return x


@conv("elu.default")
def _elu(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    dt = x.dtype
    alpha, scale, in_scale = float(a["alpha"]), float(a["scale"]), float(a["input_scale"])
    xs = imp.emit("mul", x, imp.tensor(in_scale, dt)) if in_scale != 1.0 else x
    neg = imp.emit("mul", imp.emit("sub", imp.emit("exp", xs), imp.tensor(1.0, dt)),
                   imp.tensor(alpha * scale, dt))
    pos = imp.emit("mul", x, imp.tensor(scale, dt)) if scale != 1.0 else x
    return imp.emit("where", imp.emit("greater", x, imp.tensor(0.0, dt)), pos, neg)


@conv("softplus.default")
def _softplus(imp: TorchImporter, a: dict) -> Value:
    x, beta = a["self"], float(a["beta"])
    if beta == 1.0:
        return imp.emit("softplus", x)
    y = imp.emit("softplus", imp.emit("mul", x, imp.tensor(beta, x.dtype)))
    return imp.emit("div", y, imp.tensor(beta, x.dtype))


def _binary(op: str) -> Conv:
    def fn(imp: TorchImporter, a: dict) -> Value:
        dt = imp.out_type().dtype
        x, y = a["self"], a["other"]
        alpha = a.get("alpha", 1)
        yv = imp.tensor(y, dt)
        if alpha is not None and alpha != 1:
            yv = imp.emit("mul", yv, imp.tensor(alpha, dt))
        return imp.emit(op, imp.tensor(x, dt), yv)

    return fn


for _aten, _op in {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}.items():
    conv(f"{_aten}.Tensor", f"{_aten}.Scalar")(_binary(_op))
conv("maximum.default")(_binary("max"))
conv("minimum.default")(_binary("min"))


@conv("rsub.Scalar", "rsub.Tensor")
def _rsub(imp: TorchImporter, a: dict) -> Value:
    return _binary("sub")(imp, {"self": a["other"], "other": a["self"], "alpha": a["alpha"]})


@conv("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    mode = a["rounding_mode"]
    if mode is None:
        return _binary("div")(imp, a)
    x, y = imp.tensor(a["self"], dt), imp.tensor(a["other"], dt)
    if dt.startswith("f"):
        q = imp.emit("div", x, y)
        if mode == "floor":
            return imp.emit("floor", q)
        return imp.emit("where", imp.emit("less", q, imp.tensor(0.0, dt)),
                        imp.emit("ceil", q), imp.emit("floor", q))
    if mode == "trunc":
        return imp.emit("div", x, y)
    q = imp.emit("div", imp.emit("cast", x, to="f64"), imp.emit("cast", y, to="f64"))
    return imp.emit("cast", imp.emit("floor", q), to=dt)


@conv("pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar")
def _pow(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    return imp.emit("pow", imp.tensor(a["self"], dt), imp.tensor(a["exponent"], dt))


@conv("fmod.Tensor", "fmod.Scalar")
def _fmod(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    return imp.emit("mod", imp.tensor(a["self"], dt), imp.tensor(a["other"], dt), fmod=True)


@conv("remainder.Tensor", "remainder.Scalar")
def _remainder(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    x, y = imp.tensor(a["self"], dt), imp.tensor(a["other"], dt)
    if not dt.startswith("f"):
        return imp.emit("mod", x, y)
    return imp.emit("sub", x, imp.emit("mul", imp.emit("floor", imp.emit("div", x, y)), y))


def _common_dtype(x: Any, y: Any) -> str:
    import torch

    from compiler.frontends.torch import torch_dtype_to_ir

    def td(v: Any) -> Any:
        if isinstance(v, Value):
            return _IR_TO_TORCH()[v.dtype]
        return torch.tensor(v).dtype

    if isinstance(x, Value) and isinstance(y, Value):
        return torch_dtype_to_ir(torch.promote_types(td(x), td(y)))
    v, s = (x, y) if isinstance(x, Value) else (y, x)
    if isinstance(s, float) and not v.dtype.startswith(("f", "bf")):
        return "f32"
    return v.dtype


def _IR_TO_TORCH() -> dict[str, Any]:
    import torch

    return {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
            "bf16": torch.bfloat16, "i64": torch.int64, "i32": torch.int32,
            "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool}


def _compare(op: str, negate: bool = False) -> Conv:
    def fn(imp: TorchImporter, a: dict) -> Value:
        dt = _common_dtype(a["self"], a["other"])
        r = imp.emit(op, imp.tensor(a["self"], dt), imp.tensor(a["other"], dt))
        return imp.emit("logical_not", r) if negate else r

    return fn


for _aten, (_op, _neg) in {"eq": ("equal", False), "ne": ("equal", True),
                           "lt": ("less", False), "le": ("less_equal", False),
                           "gt": ("greater", False), "ge": ("greater_equal", False)}.items():
    conv(f"{_aten}.Tensor", f"{_aten}.Scalar")(_compare(_op, _neg))


def _logical(op: str) -> Conv:
    def fn(imp: TorchImporter, a: dict) -> Value:
        x, y = a["self"], a["other"]
        if imp.out_type().dtype != "bool":
            raise Unsupported("bitwise ops on integers")
        return imp.emit(op, imp.tensor(x, "bool"), imp.tensor(y, "bool"))

    return fn


for _op in ("logical_and", "logical_or", "logical_xor"):
    conv(f"{_op}.default")(_logical(_op))
    conv(f"bitwise_{_op.split('_')[1]}.Tensor", f"bitwise_{_op.split('_')[1]}.Scalar")(
        _logical(_op))


@conv("where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar")
def _where(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    return imp.emit("where", imp.tensor(a["condition"], "bool"), imp.tensor(a["self"], dt),
                    imp.tensor(a["other"], dt))


@conv("masked_fill.Scalar", "masked_fill.Tensor")
def _masked_fill(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("where", imp.tensor(a["mask"], "bool"), imp.tensor(a["value"], x.dtype), x)


# -- linear algebra -----------------------------------------------------------------
@conv("linear.default")
def _linear(imp: TorchImporter, a: dict) -> Value:
    x, w, b = a["input"], a["weight"], a["bias"]
    if x.type.rank == 0 or w.type.rank != 2:
        raise Unsupported(f"linear with input {x.type} and weight {w.type}")
    return imp.emit("dense", *([x, w] if b is None else [x, w, b]))


@conv("matmul.default", "mm.default", "bmm.default")
def _matmul(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("matmul", a["self"], a.get("other", a.get("mat2")))


@conv("addmm.default")
def _addmm(imp: TorchImporter, a: dict) -> Value:
    return imp.emit("gemm", a["mat1"], a["mat2"], a["self"], alpha=float(a["alpha"]),
                    beta=float(a["beta"]))


@conv("baddbmm.default")
def _baddbmm(imp: TorchImporter, a: dict) -> Value:
    dt = imp.out_type().dtype
    p = imp.emit("matmul", a["batch1"], a["batch2"])
    if a["alpha"] != 1:
        p = imp.emit("mul", p, imp.tensor(a["alpha"], dt))
    c = a["self"]
    if a["beta"] == 0:
        return p
    if a["beta"] != 1:
        c = imp.emit("mul", c, imp.tensor(a["beta"], dt))
    return imp.emit("add", c, p)


@conv("trunc.default")
def _trunc(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("where", imp.emit("less", x, imp.tensor(0.0, x.dtype)),
                    imp.emit("ceil", x), imp.emit("floor", x))


# the nn, shape and reduce families live in their own files
from compiler.frontends import (  # noqa: E402,F401
    _torch_ops_index,
    _torch_ops_nn,
    _torch_ops_shape,
)
