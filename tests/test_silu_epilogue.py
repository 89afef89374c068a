"""The SiLU epilogue of the conv kernels (``_te.fast_silu``: x / (1 + exp(-x)) without exp's
NaN/overflow selects) against the IR reference ``x * sigmoid(x)`` in float64: the depthwise and
the register-tiled 1x1 conv, the detected host and the x86-64-v3 (AVX2) build. NaN and +inf
pass through, -inf gives NaN as the reference does, large negative inputs give a tiny normal
number or zero (never a denormal, which would slow every later kernel on x86)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from compiler.ir.ops.nn import apply_activation
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.kernels.base import KernelRequest, get_kernel_builder
from targets.tvm_codegen import host_cpu

C = 64


def _input() -> np.ndarray:
    """1 x 12 x 12 x C: -120..120 with NaN, +inf and -inf sprinkled in."""
    x = np.linspace(-120.0, 120.0, 12 * 12 * C).astype(np.float32)
    x[::37] = np.random.default_rng(0).standard_normal(x[::37].size).astype(np.float32)
    x[[3, 500, 7000]] = np.nan
    x[[11, 900]] = np.inf
    x[[13, 4000]] = -np.inf
    return x.reshape(1, 12, 12, C)


def _run(x: np.ndarray, depthwise: bool, cpu_name: str | None):
    """conv2d with identity weights (1x1, so the output is silu(x)), activation silu."""
    import tvm

    cpu = host_cpu(cpu_name)
    if depthwise:
        w = np.ones((C, 1, 1, 1), np.float32)
        groups = C
    else:
        w = np.eye(C, dtype=np.float32).reshape(C, 1, 1, C)
        groups = 1
    b = np.zeros(C, np.float32)
    attrs = get_op("conv2d").normalize_attrs(
        {"strides": [1, 1], "pads": [0, 0, 0, 0], "groups": groups, "layout": "NHWC",
         "kernel_layout": "OHWI", "activation": "silu"})
    req = KernelRequest("conv2d", attrs, [TensorType.of(v) for v in (x, w, b)],
                        [TensorType.of(x)], {1: w, 2: b}, cpu)
    impl = get_kernel_builder("conv2d")(req)
    mod = tvm.IRModule({"k": impl.prim_func.with_attr("global_symbol", "k")})
    ex = tvm.compile(mod, tvm.target.Target(cpu.tvm_target))
    wp = impl.weight_transforms[1](w) if 1 in impl.weight_transforms else w
    args = [tvm.runtime.tensor(v) for v in (x, wp, b, np.zeros_like(x))]
    ex["k"](*args)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = np.asarray(get_op("conv2d").reference([x, w, b], attrs)[0])
    return args[-1].numpy(), ref, ex


@pytest.mark.parametrize("cpu_name", [None, "x86-64-v3"], ids=["host", "x86-64-v3"])
@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "1x1"])
def test_silu_epilogue_matches_reference(depthwise, cpu_name):
    if cpu_name and host_cpu().arch != "x86_64":
        pytest.skip("an x86 CPU level")
    x = _input()
    got, ref, ex = _run(x, depthwise, cpu_name)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), "NaN positions differ"
    if depthwise:   # out = silu(x) elementwise (the 1x1 conv mixes a NaN into the whole pixel)
        with np.errstate(over="ignore", invalid="ignore"):
            assert np.array_equal(np.isnan(ref), np.isnan(
                apply_activation(x.astype(np.float64), {"activation": "silu"})))
        assert np.isnan(got[np.isneginf(x)]).all(), "silu(-inf) is -inf * sigmoid(-inf) = NaN"
        assert np.isposinf(got[np.isposinf(x)]).all()
    np.testing.assert_allclose(got, ref, rtol=3e-6, atol=1e-30)
    finite = got[np.isfinite(got) & (got != 0)]
    assert np.abs(finite).min() >= np.finfo(np.float32).tiny, "a denormal output"
    if host_cpu().arch == "x86_64":
        asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else \
            ex.mod.inspect_source("asm")
        assert re.search(r"\bvdivps\s+%[yz]mm", asm), "the division is not vectorised"
