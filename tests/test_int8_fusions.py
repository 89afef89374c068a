"""The int8 transformer fusions of lower-quantized: add_layer_norm (residual add + layer_norm
+ the next dense's quantize in one kernel) and merge-qkv (one qdense for q, k and v).

The kernel against the op's reference (the unfused add, layer_norm, quantize); a quantized
transformer-shaped block through ``lower-quantized`` and ``compile``: the fused ops appear,
no quantize is left after a norm, and the compiled package matches the reference interpreter
on the lowered graph and the float graph (cosine). IR patterns: tests/filecheck/lower-quantized.ir.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernel_harness import Case, reference, run_cases

from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret
from compiler.ir.types import TensorType
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline

RNG = np.random.default_rng(2026)


def _f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _cases() -> list[Case]:
    x, r = _f32(1, 64, 96), _f32(1, 64, 96)
    g, b = _f32(96), _f32(96)
    s_c = (RNG.random(96) * 0.05 + 0.01).astype(np.float32)
    return [
        # per-channel u8 (the SmoothQuant-folded quantize MiniLM has), with a bias
        Case("add_layer_norm", [x, r, g, b, s_c, np.full(96, 120, np.uint8)],
             {"epsilon": 1e-12}, consts=(2, 3, 4, 5)),
        # per-tensor i8, no bias
        Case("add_layer_norm", [x, r, g, np.asarray(0.03, np.float32),
                                np.asarray(-3, np.int8)], {}, consts=(2, 3, 4)),
        # f32 only; rows (30) that are not whole vectors
        Case("add_layer_norm", [x[..., :30], r[..., :30], g[:30], b[:30]], {}, consts=(2, 3)),
    ]


def test_add_layer_norm_kernel_matches_reference(tmp_path):
    cases = _cases()
    for c, got in zip(cases, run_cases(cases, tmp_path), strict=True):
        want = reference(c)
        assert len(got) == len(want) == (2 if len(c.inputs) >= 5 else 1)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=2e-5)
        if len(want) == 2:
            assert got[1].dtype == want[1].dtype
            # the f32 rows differ from the float64 reference in the last bits: a value at a
            # rounding boundary may quantize one step away, no further and rarely
            diff = np.abs(got[1].astype(np.int32) - want[1].astype(np.int32))
            assert diff.max() <= 1 and np.mean(diff) < 0.002
            assert len(np.unique(got[1])) > 50     # not clipped flat


def test_add_layer_norm_rejects_bad_quantization_operands():
    from compiler.errors import OpError
    from compiler.ir.registry import get_op

    op = get_op("add_layer_norm")
    x = TensorType((2, 8), "f32")
    attrs = op.normalize_attrs({})
    with pytest.raises(OpError, match="y_scale .*y_zp.*last axis"):
        op.infer([x, x, TensorType((8,), "f32"), TensorType((3,), "f32"),
                  TensorType((3,), "u8")], attrs)
    with pytest.raises(OpError, match="adds two f32 tensors of one type"):
        op.infer([x, TensorType((1, 8), "f32"), TensorType((8,), "f32")], attrs)


def _block(seed: int = 0) -> Graph:
    """Two transformer-shaped sublayers: dense -> +residual -> layer_norm, twice, then a
    dense reading the last norm (so its quantize is fused too)."""
    rng = np.random.default_rng(seed)
    g = Graph("block")
    h = g.add_input("x", TensorType((1, 16, 32), "f32"))
    for i, (n, act) in enumerate(((32, "none"), (32, "gelu"))):
        w = g.add_weight(f"w{i}", (rng.standard_normal((n, 32)) / 6).astype(np.float32))
        b = g.add_weight(f"b{i}", (0.1 * rng.standard_normal(n)).astype(np.float32))
        d = g.add("dense", h, w, b, activation=act, name=f"fc{i}")
        s = g.add("add", d, h)
        gam = g.add_weight(f"g{i}", (1 + 0.1 * rng.standard_normal(32)).astype(np.float32))
        bet = g.add_weight(f"be{i}", (0.1 * rng.standard_normal(32)).astype(np.float32))
        h = g.add("layer_norm", s, gam, bet, epsilon=1e-12, name=f"ln{i}")
    w = g.add_weight("wo", (rng.standard_normal((8, 32)) / 6).astype(np.float32))
    g.outputs = [g.add("dense", h, w, name="head"), h]
    return g


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(n)]


def test_quantized_block_fuses_add_norm_and_quantize():
    g = _block()
    ctx = PassContext(resources={"calib": _samples(16, 0)})
    low = run_pipeline(g.copy(), "quantize{calibration=@calib},lower-quantized", ctx=ctx)
    ops = low.op_counts()
    assert ops.get("add_layer_norm") == 2 and "layer_norm" not in ops and "add" not in ops
    # the first norm feeds fc1's quantize (fused); the second feeds head's
    fused = low.find("add_layer_norm")
    assert [len(n.outputs) for n in fused] == [2, 2]
    assert not [q for q in low.find("quantize") if q.inputs[0].producer in fused]
    off = run_pipeline(g.copy(), "quantize{calibration=@calib},lower-quantized{fuse-norm=false}",
                       ctx=ctx)
    assert "add_layer_norm" not in off.op_counts()
    for s in _samples(3, 7):   # the rule changes no value: same results as the unfused graph
        for a, b in zip(interpret(low, s), interpret(off, s), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_block_matches_lowered_graph_and_float(tmp_path):
    from bench.common import cosine
    from compiler import compile

    g = _block()
    m = compile(g, "host", pipeline="canonicalize", quantize="int8",
                calibration=_samples(32, 0), progress=False, work_dir=tmp_path)
    assert m.graph.op_counts().get("add_layer_norm") == 2
    outs, floats = [], []
    for s in _samples(4, 5):
        got = m.run(s)
        want = interpret(m.graph, s)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        outs.append(got[0])
        floats.append(interpret(g, s)[0])
    assert cosine(np.stack(outs), np.stack(floats)) > 0.99


# -- merge-qkv ------------------------------------------------------------------------------
def _attention_block(seed: int = 0) -> Graph:
    """q, k, v dense of one input -> attention (2 heads of 8, padding mask) -> output dense."""
    rng = np.random.default_rng(seed)
    g = Graph("attn")
    x = g.add_input("x", TensorType((1, 12, 16), "f32"))
    mask = g.add_weight("mask", np.where(np.arange(12) < 10, 0.0, -1e9)
                        .astype(np.float32).reshape(1, 1, 1, 12))
    qkv = []
    for name in "qkv":
        w = g.add_weight(f"w{name}", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
        b = g.add_weight(f"b{name}", (0.1 * rng.standard_normal(16)).astype(np.float32))
        qkv.append(g.add("dense", x, w, b, name=name))
    a = g.add("attention", *qkv, mask, heads=2, head_dim=8, scale=8 ** -0.5, name="att")
    w = g.add_weight("wo", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
    g.outputs = [g.add("dense", a, w, name="out")]
    return g


def _attn_samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 12, 16)).astype(np.float32)} for _ in range(n)]


def test_merge_qkv_makes_one_qdense_read_at_offsets(tmp_path):
    from bench.common import cosine
    from compiler import compile

    g = _attention_block()
    ctx = PassContext(resources={"calib": _attn_samples(16, 0)})
    low = run_pipeline(g.copy(), "quantize{calibration=@calib},lower-quantized", ctx=ctx)
    off = run_pipeline(g.copy(), "quantize{calibration=@calib},lower-quantized{merge-qkv=false}",
                       ctx=ctx)
    assert low.op_counts()["qdense"] == 2 and off.op_counts()["qdense"] == 4
    (att,) = low.find("qattention")   # the int8 preset makes attention int8 too
    qkv = att.inputs[0].producer
    assert att.inputs[:3] == [qkv.output] * 3 and qkv.output.shape == (1, 12, 48)
    assert (att.attrs["q_offset"], att.attrs["k_offset"], att.attrs["v_offset"]) == (0, 16, 32)
    for s in _attn_samples(3, 7):   # every channel computed as before: the same results
        np.testing.assert_allclose(interpret(low, s)[0], interpret(off, s)[0], rtol=1e-6,
                                   atol=1e-6)
    m = compile(g, "host", pipeline="canonicalize", quantize="int8",
                calibration=_attn_samples(32, 0), progress=False, work_dir=tmp_path)
    assert m.graph.op_counts()["qdense"] == 2
    got, floats = [], []
    for s in _attn_samples(4, 5):
        (y,) = m.run(s)
        np.testing.assert_allclose(y, interpret(m.graph, s)[0], rtol=1e-4, atol=1e-4)
        got.append(y)
        floats.append(interpret(g, s)[0])
    assert cosine(np.stack(got), np.stack(floats)) > 0.99
