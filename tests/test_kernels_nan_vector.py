"""NaN-keeping elementwise kernels stay vectorised (``_te.is_nan``).

``tirx.isnan`` inside the Select of relu / clip / hard_sigmoid / binary max made TVM's
vectoriser give up; LLVM then vectorised the scalar loop with gathers and scatters, ~7x slower
(relu was 7% of ResNet50's kernel time). The bit test keeps the vector loop and the semantics:
NaN, +inf and -inf in, the same out as numpy; f16 and f64 too.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.kernels.base import KernelRequest, get_kernel_builder
from targets.tvm_codegen import host_cpu

SHAPE = (1, 8, 8, 64)
CASES = [("relu", 1, {}), ("clip", 1, {"min": -1.0, "max": 1.0}),
         ("hard_sigmoid", 1, {"alpha": 1 / 6, "beta": 0.5}), ("max", 2, {}), ("min", 2, {})]


def _input(dtype, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)
    flat = x.reshape(-1)
    flat[[0, 17, 300, 1001, 4095]] = np.nan
    flat[[5, 64, 2000]] = np.inf
    flat[[9, 700]] = -np.inf
    return x


def _build(op: str, ins: list[np.ndarray], attrs: dict):
    import tvm

    cpu = host_cpu()
    attrs = get_op(op).normalize_attrs(attrs)
    ref = np.asarray(get_op(op).reference(ins, attrs)[0])
    req = KernelRequest(op, attrs, [TensorType.of(v) for v in ins], [TensorType.of(ref)], {}, cpu)
    impl = get_kernel_builder(op)(req)
    mod = tvm.IRModule({"k": impl.prim_func.with_attr("global_symbol", "k")})
    ex = tvm.compile(mod, tvm.target.Target(cpu.tvm_target))
    args = [tvm.runtime.tensor(v) for v in ins] + [tvm.runtime.tensor(np.zeros_like(ref))]
    ex["k"](*args)
    return ex, args[-1].numpy(), ref, cpu


@pytest.mark.parametrize("op,arity,attrs", CASES, ids=[c[0] for c in CASES])
def test_nan_kept_and_vectorised(op, arity, attrs):
    ins = [_input(np.float32, s) for s in range(arity)]
    ex, got, ref, cpu = _build(op, ins, attrs)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{op}: NaN positions differ"
    assert np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)  # equal_nan: inf positions too
    if cpu.arch == "x86_64":
        asm = ex.mod.inspect_source("asm")
        assert not re.search(r"\bvgather|\bvscatter", asm), f"{op}: scalar loop gathers"
        assert re.search(r"\bv(max|min|cmp|blendm|pcmpgt)\w*\s+%[yz]mm", asm), \
            f"{op}: no vector compare or min/max on ymm/zmm registers"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_relu_keeps_nan_in_other_float_widths(dtype):
    x = _input(dtype, 3)
    _, got, ref, _ = _build("relu", [x], {})
    assert got.dtype == dtype
    assert np.array_equal(np.isnan(got), np.isnan(x))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference on NaN rows
@pytest.mark.parametrize("n", [197, 50])
def test_softmax_rows_padded_to_whole_vectors(n):
    """Rows that are not whole vectors (ViT's 197 tokens) run over a -inf-padded row buffer:
    same values as the reference, NaN / +inf / all -inf rows included, no gathers."""
    x = np.random.default_rng(n).standard_normal((2, 3, n)).astype(np.float32) * 4
    x[0, 0, 5] = np.nan
    x[0, 1, n - 1] = np.inf
    x[1, 2, :] = -np.inf
    ex, got, ref, cpu = _build("softmax", [x], {"axis": -1})
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert np.isnan(got[0, 0]).all() and np.isnan(got[1, 2]).all()
    np.testing.assert_allclose(got[1, :2].sum(-1), 1.0, rtol=1e-5)
    if cpu.arch == "x86_64":
        assert not re.search(r"\bvgather|\bvscatter", ex.mod.inspect_source("asm"))
