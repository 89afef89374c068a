"""The decoder-LLM kernels (targets/kernels/llm.py) against their ops' numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.ir.ops.llm import rope_tables
from tests.kernel_harness import Case, check_cases

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def pos(p):
    return np.array([p], np.int32)


def test_norm_activation_and_positions(tmp_path):
    cos, sin = rope_tables(40, 16, 10000.0)
    check_cases([
        Case("rms_norm", [f32(5, 48), f32(48)], {"epsilon": 1e-5}),
        Case("rms_norm", [f32(1, 576), f32(576)], {"epsilon": 1e-6}),
        Case("silu_mul", [f32(3, 96), f32(3, 96)]),
        Case("rope", [f32(4, 3, 16), pos(7), cos, sin], consts=(2, 3)),
        Case("rope", [f32(8, 2, 16), pos(36), cos, sin], consts=(2, 3)),   # clamped tail
        Case("positions", [pos(5)], {"count": 8, "limit": 10}),
    ], tmp_path)


@pytest.mark.parametrize("t,p", [(1, 0), (1, 20), (6, 0), (6, 9), (6, 28)])
def test_cached_attention(tmp_path, t, p):
    c = 32
    check_cases([Case("cached_attention", [f32(t, 6, 16), f32(c, 2, 16), f32(c, 2, 16),
                                           pos(p)], {"scale": 0.25})], tmp_path)


def test_kv_write_writes_only_its_rows(tmp_path):
    cache = np.zeros((16, 2, 8), np.float32)
    check_cases([Case("kv_write", [cache, f32(4, 2, 8), pos(5)]),
                 Case("kv_write", [cache, f32(4, 2, 8), pos(14)])], tmp_path)  # tail dropped


def test_tied_table_rows_and_projection(tmp_path):
    i8 = rng.integers(-127, 128, (37, 48)).astype(np.int8)
    rs = rng.random(37).astype(np.float32)
    ids = np.array([0, 36, 5, 31, 32], np.int32)
    check_cases([
        Case("dense_rows", [f32(3, 64), f32(50, 64)], consts=(1,)),
        Case("dense_rows", [f32(1, 36), f32(7, 36)], consts=(1,)),
        Case("dense_rows", [f32(2, 48), i8, rs], consts=(1, 2)),
        Case("embed_rows", [ids, f32(37, 48)], consts=(1,)),
        Case("embed_rows", [ids, i8, rs], consts=(1, 2)),
    ], tmp_path)


@pytest.mark.parametrize("bits,group,bias,n", [(4, 32, False, 40), (4, 128, True, 64),
                                                (8, 64, False, 33), (8, 128, True, 96)])
def test_dense_wq_gemv(tmp_path, bits, group, bias, n):
    """dense_wq with one row (decode) runs the GEMV of targets/kernels/gemv_q.py."""
    from compiler.ir.ops.quant_weight import pack_int4
    from passes.quantization.gptq import quantize_rtn

    k = 256
    q, s = quantize_rtn(f32(n, k), bits, group)
    wq = pack_int4(q) if bits == 4 else q
    ins = [f32(1, k), wq, s] + ([f32(n)] if bias else [])
    check_cases([Case("dense_wq", ins, {"bits": bits, "group_size": group},
                      consts=tuple(range(1, len(ins))))], tmp_path, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,bias", [(1, False), (1, True), (5, True), (16, False)])
def test_dense_wq_asym(tmp_path, rows, bias):
    """dense_wq{asym}: a per-group offset on top of the int4 grid, GEMV (one row) and GEMM."""
    from compiler.ir.ops.quant_weight import pack_int4
    from compiler.llm.quantize import quantize_asym

    n, k, g = 40, 128, 32
    q, s, c = quantize_asym(f32(n, k), g)
    ins = [f32(rows, k), pack_int4(q), s, c] + ([f32(n)] if bias else [])
    check_cases([Case("dense_wq", ins, {"bits": 4, "group_size": g, "asym": True},
                      consts=tuple(range(1, len(ins))))], tmp_path, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cpu", [None, "x86-64-v3"])
def test_dense_wq_gemv_int8_input(tmp_path, cpu):
    """dense_wq{act_bits=8}: the input quantized to int8 per block of 32 — the VNNI kernel
    (integer dot products, gemv_q.dense_wq_gemv_x8) where the CPU has it, the f32 GEMV over the
    quantized input elsewhere (x86-64-v3 here) — against the op's reference, which differs
    from the f32-input result by the input's rounding."""
    import tvm

    from compiler.ir.ops.quant_weight import pack_int4
    from compiler.llm.quantize import quantize_asym
    from passes.quantization.gptq import quantize_rtn
    from runtime.pool import load_library
    from targets.kernels.gemv_q import has_dot_gemv
    from targets.tvm_codegen import host_cpu
    from tests.kernel_harness import build_cases, reference

    n, k = 72, 256
    target = host_cpu(cpu)
    assert has_dot_gemv(target, 32, k, 32) == (cpu is None and has_dot_gemv(host_cpu(), 32,
                                                                            k, 32))
    cases, plain = [], []
    for group, asym, bias in [(32, False, False), (128, False, True), (32, True, True),
                              (64, True, False)]:
        w, x = f32(n, k), f32(1, k)
        x[0, 32:64] = 0                  # an all-zero block: step 0, codes 0
        if asym:
            q, s, c = quantize_asym(w, group)
            ins = [x, pack_int4(q), s, c]
        else:
            q, s = quantize_rtn(w, 4, group)
            ins = [x, pack_int4(q), s]
        ins += [f32(n)] if bias else []
        attrs = {"bits": 4, "group_size": group, "asym": asym}
        cases.append(Case("dense_wq", ins, dict(attrs, act_bits=8),
                          consts=tuple(range(1, len(ins)))))
        plain.append(Case("dense_wq", ins, attrs))
    lib_path, calls = build_cases(cases, tmp_path, cpu=target)
    lib = load_library(tvm, lib_path, require=True)
    for case, f32_case, (sym, args, otypes) in zip(cases, plain, calls, strict=True):
        out = tvm.runtime.tensor(np.zeros(otypes[0].shape, np.float32))
        lib[sym](*[tvm.runtime.tensor(a) for a in args], out)
        got, ref = out.numpy(), reference(case)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=str(case.attrs))
        f32_ref = reference(f32_case)[0]
        rel = np.abs(got - f32_ref).max() / np.abs(f32_ref).max()
        assert 1e-4 < rel < 3e-2, (case.attrs, rel)   # the input's int8 rounding, no more
