"""The f32 transformer kernels keep their register tiles out of TVM's workspace pool.

TVM serves a buffer allocated inside a parallel loop from its workspace pool (an allocate and a
free call per iteration) unless it is in the global scope and under 1024 bytes; LLVM cannot
prove such a buffer does not alias the inputs, so an accumulator tile there is stored to memory
after every FMA (the attention kernel's 4 x 64 ``P @ V`` tile was, at exactly 1024 bytes) or
allocated and freed for every GEMM tile. Checked in the LLVM IR TVM generates, where each
workspace allocation is a call named after its buffer, for the detected host and for an
AVX2-only build (x86-64-v3)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.kernels.base import KernelRequest, get_kernel_builder

CPUS = {"host": None,
        "x86-64-v3": {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}}


def _cpu(name: str):
    from targets.host import cpu_info_for
    from targets.tvm_codegen import host_cpu

    return host_cpu() if CPUS[name] is None else cpu_info_for(CPUS[name])


def workspace_buffers(req: KernelRequest) -> list[str]:
    """Names of the buffers the built kernel allocates from TVM's workspace pool."""
    import tvm

    func = get_kernel_builder(req.op)(req).prim_func
    mod = tvm.IRModule({"f": func.with_attr("global_symbol", "f")})
    ll = tvm.compile(mod, target=tvm.target.Target(req.cpu.tvm_target)).mod.inspect_source("ll")
    # TVMBackendAllocWorkspace(device_type, device_id, nbytes, dtype code, dtype bits)
    return re.findall(r"%([\w.]+?)(?:\.i\d*)? = (?:tail )?call ptr %[\w.]+\(i32 [^,]+, "
                      r"i32 [^,]+, i64 \d+, i32 \d+, i32 \d+\)", ll)


def _request(op: str, attrs: dict, types: list[TensorType], out: TensorType, cpu,
             consts: dict | None = None) -> KernelRequest:
    return KernelRequest(op, get_op(op).normalize_attrs(attrs), types, [out], consts or {},
                         cpu, "k")


@pytest.mark.parametrize("cpu", list(CPUS))
def test_dense_tiles_are_stack_slots(cpu):
    """DeiT-tiny's fc1 (197 rows: no tile height divides it, GELU epilogue) and MiniLM's QKV
    (128 rows), weights packed at compile time: no workspace buffer at all."""
    c = _cpu(cpu)
    rng = np.random.default_rng(0)
    for (m, k, n), act in (((197, 192, 768), "gelu"), ((128, 384, 1152), "none")):
        w, b = rng.standard_normal((n, k), np.float32), np.zeros(n, np.float32)
        req = _request("dense", {"activation": act},
                       [TensorType((1, m, k), "f32"), TensorType.of(w), TensorType.of(b)],
                       TensorType((1, m, n), "f32"), c, {1: w, 2: b})
        assert workspace_buffers(req) == [], (cpu, m, k, n)


@pytest.mark.parametrize("cpu", list(CPUS))
def test_attention_accumulators_are_stack_slots(cpu):
    """DeiT-tiny's heads (3 x 64, 197 tokens) and MiniLM's (12 x 32, padding mask): only the
    transposed keys and a tile's score rows come from the workspace; the ``P @ V``
    accumulators, the score tile and the tile's coordinates do not."""
    c = _cpu(cpu)
    deit = _request("attention", {"heads": 3, "head_dim": 64, "scale": 0.125,
                                  "k_offset": 192, "v_offset": 384},
                    [TensorType((1, 197, 576), "f32")] * 3, TensorType((1, 197, 192), "f32"), c)
    minilm = _request("attention", {"heads": 12, "head_dim": 32, "scale": 32 ** -0.5},
                      [TensorType((1, 128, 384), "f32")] * 3
                      + [TensorType((1, 1, 1, 128), "f32")],
                      TensorType((1, 128, 384), "f32"), c)
    for req in (deit, minilm):
        assert sorted(workspace_buffers(req)) == ["kt", "sc"], (cpu, req.input_types)
