"""Shared helpers for op definitions: broadcasting, type checks, inference shorthands."""

from __future__ import annotations

from typing import Any

from compiler.errors import OpError
from compiler.ir.types import TensorType, is_float

__all__ = ["broadcast_shapes", "same_type", "same_dtype", "require_float", "norm_axis",
           "broadcast_infer", "compare_infer"]


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """Numpy/ONNX multidirectional broadcasting; OpError on mismatch."""
    rank = max(map(len, shapes), default=0)
    out = [1] * rank
    for s in shapes:
        off = rank - len(s)
        for i, d in enumerate(s, off):
            if out[i] == 1:
                out[i] = d
            elif d != 1 and d != out[i]:
                raise OpError("shapes " + ", ".join(str(list(s)) for s in shapes)
                              + " do not broadcast")
    return tuple(out)


def same_dtype(types: list[TensorType], what: str = "operands") -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        raise OpError(f"{what} have different dtypes: {', '.join(str(t) for t in types)}")
    return types[0].dtype


def require_float(t: TensorType, what: str = "operand") -> None:
    if not is_float(t.dtype):
        raise OpError(f"{what} must be a float tensor, got {t}")


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def same_type(types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
    return [types[0]]


def broadcast_infer(types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
    dtype = same_dtype(types)
    return [TensorType(broadcast_shapes(*(t.shape for t in types)), dtype)]


def compare_infer(types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
    same_dtype(types)
    return [TensorType(broadcast_shapes(*(t.shape for t in types)), "bool")]
