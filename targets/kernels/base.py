"""The kernel registry: how one node of a lowered graph becomes one TVM PrimFunc.

A kernel builder is registered per op and receives a :class:`KernelRequest` (the node's op,
attributes, operand/result types, the constant operands' arrays, and the CPU it is for). It
returns a :class:`KernelImpl`: a scheduled ``tvm.tirx.PrimFunc`` in destination-passing style
(parameters = operands in node order, then results) plus, for constant operands the kernel wants
in another layout, a transform applied once at compile time (weight packing).

Identical requests (same op, attributes, types, target and packing) share one kernel: the
request's ``key`` is what deduplication uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.ir.types import TensorType

__all__ = ["CpuInfo", "KernelRequest", "KernelImpl", "register_kernel", "get_kernel_builder",
           "registered_ops", "STACK_ALLOCA_BYTES"]

# TVM (runtime::kMaxStackAlloca) serves a buffer allocated inside a parallel loop from its
# workspace pool, an allocate and a free call per iteration that LLVM cannot prove free of
# aliasing with the inputs, unless the buffer is in the global scope and smaller than this; a
# smaller one becomes a stack slot (alloca) whose register tile LLVM keeps in registers
STACK_ALLOCA_BYTES = 1024


@dataclass(frozen=True)
class CpuInfo:
    """What a kernel schedule needs to know about the CPU it runs on.

    ``features`` are the ISA features (LLVM names) the kernels are built for, from LLVM's
    description of ``tvm_target`` (``targets.host.cpu_info_for`` fills them). A kernel that
    emits a special instruction asks for its capability here and keeps a fallback for CPUs
    without it: never a CPU name.
    """

    tvm_target: dict[str, Any]      # handed to tvm.target.Target(...)
    arch: str = "x86_64"            # "x86_64" | "aarch64"
    simd_bits: int = 128            # vector register width: 512 AVX-512, 256 AVX2, 128 NEON
    num_cores: int = 1              # threads a parallel loop may use
    l1d_bytes: int = 32 * 1024
    l2_bytes: int = 512 * 1024
    features: frozenset[str] = frozenset()

    def lanes(self, dtype: str) -> int:
        return max(1, self.simd_bits // (TensorType((), dtype).itemsize * 8))

    def has(self, *features: str) -> bool:
        return all(f in self.features for f in features)

    @property
    def fp16_arith(self) -> bool:
        """Half-precision vector arithmetic (AVX512-FP16, ARMv8.2 fullfp16); without it f16
        values are stored as f16 and computed in f32 (F16C conversions on x86)."""
        return self.has("avx512fp16") or self.has("fullfp16")

    @property
    def int8_dot(self) -> bool:
        """An 8-bit dot-product instruction: VNNI (AVX512 or AVX), Arm dotprod."""
        return self.has("avx512vnni") or self.has("avxvnni") or self.has("dotprod")

    @property
    def amx(self) -> bool:
        return self.has("amx-tile", "amx-int8")


@dataclass
class KernelRequest:
    op: str
    attrs: dict[str, Any]
    input_types: list[TensorType]
    output_types: list[TensorType]
    const_inputs: dict[int, np.ndarray]  # operand index -> array, for constant operands
    cpu: CpuInfo
    node_label: str = ""

    @property
    def key(self) -> str:
        """Identical keys build identical kernels (constants matter only by type)."""
        def enc(v):
            if isinstance(v, np.ndarray):
                return {"array": str(TensorType.of(v))}
            return v
        blob = json.dumps({
            "op": self.op,
            "attrs": {k: enc(v) for k, v in sorted(self.attrs.items())},
            "in": [str(t) for t in self.input_types],
            "out": [str(t) for t in self.output_types],
            "const": sorted(self.const_inputs),
            "target": self.cpu.tvm_target,
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class KernelImpl:
    """A scheduled PrimFunc plus compile-time transforms of constant operands.

    ``prim_func`` parameters: operands in node order (transformed ones in their packed type),
    then results. ``weight_transforms[i]`` maps operand i's array to the packed array the kernel
    reads. ``extra_const_inputs`` lets a kernel append constant operands it computes itself
    (e.g. a precomputed table), placed after the node's operands and before the results.
    """

    prim_func: Any
    weight_transforms: dict[int, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    extra_const_inputs: list[np.ndarray] = field(default_factory=list)
    note: str = ""  # e.g. "nhwc conv 3x3, oc tile 32, vectorised 16, parallel over h"


_BUILDERS: dict[str, Callable[[KernelRequest], KernelImpl]] = {}


def register_kernel(*ops: str):
    """Decorator: ``@register_kernel("conv2d")`` on ``fn(req: KernelRequest) -> KernelImpl``."""
    def deco(fn):
        for op in ops:
            if op in _BUILDERS:
                raise ValueError(f"kernel for {op!r} registered twice")
            _BUILDERS[op] = fn
        return fn
    return deco


def get_kernel_builder(op: str) -> Callable[[KernelRequest], KernelImpl] | None:
    import targets.kernels  # noqa: F401  (registers every kernel family)

    return _BUILDERS.get(op)


def registered_ops() -> list[str]:
    import targets.kernels  # noqa: F401

    return sorted(_BUILDERS)
