"""Dtype names as the manifest writes them (the IR's short names) and their numpy/TVM forms.

Kept separate from ``compiler.ir.types`` on purpose: the runtime must not import the compiler.
Numpy spellings (``"float32"``) are accepted too and normalised to the short names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import PackageError

__all__ = ["canonical", "numpy_dtype", "tvm_dtype", "bits", "dlpack_native", "nbytes"]

# short name -> (TVM dtype string, bits per element)
_TABLE: dict[str, tuple[str, int]] = {
    "f64": ("float64", 64), "f32": ("float32", 32), "f16": ("float16", 16),
    "bf16": ("bfloat16", 16),
    "i64": ("int64", 64), "i32": ("int32", 32), "i16": ("int16", 16), "i8": ("int8", 8),
    "i4": ("int4", 4),
    "u64": ("uint64", 64), "u32": ("uint32", 32), "u16": ("uint16", 16), "u8": ("uint8", 8),
    "u4": ("uint4", 4),
    "bool": ("bool", 8),
}
_ALIASES = {tvm: short for short, (tvm, _) in _TABLE.items()}
# Numpy can hand these to DLPack itself; the others (ml_dtypes) need a typed TVM view.
_NATIVE = frozenset({"f64", "f32", "f16", "i64", "i32", "i16", "i8", "u64", "u32", "u16", "u8",
                     "bool"})


def canonical(dtype: str | np.dtype) -> str:
    """The short name of ``dtype`` (``"f32"``), from a short name, a TVM name or a numpy dtype."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name in _TABLE:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise PackageError(f"unknown dtype {dtype!r}; known: {', '.join(_TABLE)}")


def numpy_dtype(dtype: str) -> np.dtype:
    short = canonical(dtype)
    if short in _NATIVE:
        return np.dtype(_TABLE[short][0])
    import ml_dtypes  # only needed for bf16 / int4 / uint4

    return np.dtype(getattr(ml_dtypes, _TABLE[short][0]))


def tvm_dtype(dtype: str) -> str:
    return _TABLE[canonical(dtype)][0]


def bits(dtype: str) -> int:
    return _TABLE[canonical(dtype)][1]


def dlpack_native(dtype: str) -> bool:
    """Whether a numpy array of this dtype can be passed to ``from_dlpack`` directly."""
    return canonical(dtype) in _NATIVE


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor (sub-byte dtypes packed): ceil(elements * bits / 8)."""
    return (math.prod(int(d) for d in shape) * bits(dtype) + 7) // 8
