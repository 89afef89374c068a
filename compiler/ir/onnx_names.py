"""The one table of ops that are one ONNX operator each, read both ways: the ONNX importer
(``compiler/frontends/onnx_ops.py``) inverts it, the region exporter
(``targets/onnx_writer.py``) reads it forwards. Same operands, same attributes' meaning, same
semantics; ops whose mapping needs more (attributes renamed, several ONNX nodes) have their
own converters on each side."""

from __future__ import annotations

from compiler.ir.registry import get_op, ops_with

__all__ = ["ONNX_OPS", "unary", "binary", "reductions"]

ONNX_OPS: dict[str, str] = {
    # unary
    "abs": "Abs", "neg": "Neg", "sign": "Sign", "relu": "Relu", "exp": "Exp", "log": "Log",
    "sqrt": "Sqrt", "tanh": "Tanh", "sigmoid": "Sigmoid", "erf": "Erf",
    "reciprocal": "Reciprocal", "sin": "Sin", "cos": "Cos", "floor": "Floor", "ceil": "Ceil",
    "round": "Round", "softplus": "Softplus", "hard_swish": "HardSwish",
    "logical_not": "Not", "identity": "Identity",
    # binary (ONNX's Max and Min are variadic)
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "max": "Max",
    "min": "Min", "equal": "Equal", "less": "Less", "less_equal": "LessOrEqual",
    "greater": "Greater", "greater_equal": "GreaterOrEqual", "logical_and": "And",
    "logical_or": "Or", "logical_xor": "Xor",
    # reductions over an `axes` attribute
    "reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd",
}


def unary() -> dict[str, str]:
    """Our one-operand ops of the table -> their ONNX names."""
    return {op: name for op, name in ONNX_OPS.items()
            if get_op(op).inputs == (1, 1) and not get_op(op).has("reduction")}


def binary() -> dict[str, str]:
    """Our two-operand (broadcasting) ops of the table -> their ONNX names."""
    return {op: name for op, name in ONNX_OPS.items() if get_op(op).has("broadcast")}


def reductions() -> dict[str, str]:
    """Our reductions of the table -> their ONNX names."""
    return {op: name for op, name in ONNX_OPS.items() if op in ops_with("reduction")}
