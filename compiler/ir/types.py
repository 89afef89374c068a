"""Tensor types: a static shape and a dtype, both printable as ``f32[1,3,224,224]``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from compiler.errors import OpError

__all__ = ["DTYPES", "TensorType", "to_numpy_dtype", "from_numpy_dtype", "is_float", "is_int"]

# IR dtype name -> numpy dtype. Quantized types are plain dtypes; scales are operands.
DTYPES: dict[str, np.dtype] = {
    "f64": np.dtype(np.float64),
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "i64": np.dtype(np.int64),
    "i32": np.dtype(np.int32),
    "i16": np.dtype(np.int16),
    "i8": np.dtype(np.int8),
    "i4": np.dtype(ml_dtypes.int4),
    "u64": np.dtype(np.uint64),
    "u32": np.dtype(np.uint32),
    "u16": np.dtype(np.uint16),
    "u8": np.dtype(np.uint8),
    "u4": np.dtype(ml_dtypes.uint4),
    "bool": np.dtype(np.bool_),
}
_FROM_NUMPY = {v: k for k, v in DTYPES.items()}
_FLOATS = frozenset({"f64", "f32", "f16", "bf16"})


def to_numpy_dtype(dtype: str) -> np.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise OpError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


def from_numpy_dtype(dtype: np.dtype | type) -> str:
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise OpError(f"numpy dtype {np.dtype(dtype)} has no IR dtype") from None


def is_float(dtype: str) -> bool:
    return dtype in _FLOATS


def is_int(dtype: str) -> bool:
    return dtype not in _FLOATS and dtype != "bool"


@dataclass(frozen=True, slots=True)
class TensorType:
    """A statically shaped tensor type. ``shape == ()`` is a scalar."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise OpError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        shape = tuple(map(int, self.shape))
        if shape and min(shape) < 0:
            raise OpError(f"negative dimension in shape {list(shape)}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        if self.dtype in ("i4", "u4"):
            return (self.size + 1) // 2
        return self.size * self.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def with_shape(self, shape) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(tuple(array.shape), from_numpy_dtype(array.dtype))

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"
