"""Test helper: build kernels for KernelRequests in one library, run them, return results.

Kernels are called exactly as the runtime will call them: operands (constant ones passed
through the builder's weight transforms), extra constants, then preallocated results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir.types import TensorType
from runtime.pool import load_library
from targets.kernels.base import KernelRequest, get_kernel_builder
from targets.tvm_codegen import compile_funcs, empty_kernel, host_cpu


@dataclass
class Case:
    op: str
    inputs: list[np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: tuple[int, ...] = ()          # operand indices given as constants
    output_types: list[TensorType] | None = None  # default: from the op's reference


def _contig(a) -> np.ndarray:
    return np.require(np.asarray(a), requirements="C")


def reference(case: Case) -> list[np.ndarray]:
    from compiler.ir.registry import get_op

    opdef = get_op(case.op)
    attrs = opdef.normalize_attrs(case.attrs)
    return [np.asarray(r) for r in opdef.reference(case.inputs, attrs)]


def build_cases(cases: list[Case], tmp: Path, cpu=None, cross_compiler=None):
    """Build every case's kernel into one library ``tmp/k.so``; returns (path, calls) where
    ``calls[i]`` = (symbol, argument arrays, result types)."""
    from compiler.ir.registry import get_op

    cpu = cpu or host_cpu()
    funcs, impls, reqs = {}, [], []
    for i, c in enumerate(cases):
        attrs = get_op(c.op).normalize_attrs(c.attrs)
        otypes = c.output_types
        if otypes is None:
            ref = reference(c)
            otypes = [TensorType.of(r.astype(r.dtype)) for r in ref]
        req = KernelRequest(c.op, attrs, [TensorType.of(a) for a in c.inputs], otypes,
                            {j: c.inputs[j] for j in c.consts}, cpu, f"case{i}")
        if all(t.size == 0 for t in otypes):
            from targets.kernels.base import KernelImpl
            impl = KernelImpl(empty_kernel(req.input_types, otypes))
        else:
            impl = get_kernel_builder(c.op)(req)
        funcs[f"case{i}"] = impl.prim_func
        impls.append(impl)
        reqs.append(req)
    lib_path = compile_funcs(funcs, cpu, tmp / "k.so", cross_compiler=cross_compiler)
    calls = []
    for i, (c, impl, req) in enumerate(zip(cases, impls, reqs, strict=True)):
        args = []
        for j, a in enumerate(c.inputs):
            if j in impl.weight_transforms and j in req.const_inputs:
                a = impl.weight_transforms[j](a)
            args.append(_contig(a))
        args += [_contig(a) for a in impl.extra_const_inputs]
        calls.append((f"case{i}", args, req.output_types))
    return lib_path, calls


def run_cases(cases: list[Case], tmp: Path, cpu=None) -> list[list[np.ndarray]]:
    """Build every case's kernel into one library (for ``cpu``, default the detected host;
    it must run here), run each once, return its results."""
    import tvm

    lib_path, calls = build_cases(cases, tmp, cpu)
    lib = load_library(tvm, lib_path, require=True)   # parallel loops on npucc's launcher
    results = []
    for sym, args, otypes in calls:
        touts = [tvm.runtime.tensor(np.zeros(t.shape, t.np_dtype)) for t in otypes]
        lib[sym](*[tvm.runtime.tensor(a) for a in args], *touts)
        results.append([t.numpy() for t in touts])
    return results


def check_cases(cases: list[Case], tmp: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    got = run_cases(cases, tmp)
    for c, res in zip(cases, got, strict=True):
        ref = reference(c)
        assert len(ref) == len(res)
        for r, g in zip(ref, res, strict=True):
            r = np.asarray(r)
            assert g.shape == r.shape, f"{c.op}: shape {g.shape} != {r.shape}"
            if r.dtype.kind in "fc":
                np.testing.assert_allclose(g, r.astype(g.dtype), rtol=rtol, atol=atol,
                                           err_msg=f"{c.op} {c.attrs}")
            else:
                np.testing.assert_array_equal(g, r.astype(g.dtype), err_msg=f"{c.op} {c.attrs}")


def assert_matches_reference(name: str, case: Case, got: list[np.ndarray],
                             atol: float = 1e-5) -> None:
    """Every result of ``case`` equals the op's numpy reference (floats to rtol 1e-4)."""
    with np.errstate(all="ignore"):
        ref = reference(case)
    for r, g in zip(ref, got, strict=True):
        r = np.asarray(r)
        assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
        if r.dtype.kind == "f":
            np.testing.assert_allclose(g, r.astype(g.dtype), rtol=1e-4, atol=atol)
        else:
            np.testing.assert_array_equal(g, r.astype(g.dtype))
