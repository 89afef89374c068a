"""Weight-only quantization: int4 packing, dense_wq / gather_q / norm_f16 kernels against
their references, RTN and GPTQ, and the quantize pass's handler on small graphs."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret
from compiler.ir.ops.quant_weight import (
    dequantize_groups,
    norm_f16_reference,
    pack_int4,
    unpack_int4,
)
from compiler.ir.types import TensorType
from compiler.pass_base import PassContext
from passes.quantization.config import PrecisionSpec
from passes.quantization.gptq import gptq_quantize, quantize_rtn
from passes.quantization.weight_only import apply, quantize_graph


def test_int4_packing_round_trip_and_nibble_order():
    q = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    p = pack_int4(q)
    assert p.dtype == np.uint8 and p.shape == (2, 4)
    # byte 0 of row 0: k=0 (-8 -> 0) in the low nibble, k=1 (-7 -> 1) in the high nibble
    assert p[0, 0] == 0x10
    np.testing.assert_array_equal(unpack_int4(p), q)
    rng = np.random.default_rng(0)
    r = rng.integers(-8, 8, (5, 7, 64)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(r)), r)


def test_rtn_int4_is_q4_0():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    q, s = quantize_rtn(w, 4, 32)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (6, 2)
    assert q.min() >= -8 and q.max() <= 7
    # the weight of largest magnitude of each group maps to -8 exactly
    g = w.reshape(6, 2, 32)
    arg = np.abs(g).argmax(-1)
    np.testing.assert_array_equal(np.take_along_axis(q.reshape(6, 2, 32), arg[..., None], -1),
                                  -8)
    deq = dequantize_groups(pack_int4(q), s, 4)
    assert np.abs(deq - w).max() <= np.abs(s.astype(np.float32)).max() * 0.5 + 1e-6 + \
        np.abs(w).max() / 8  # 7 vs 8 asymmetry at the positive end
    q8, s8 = quantize_rtn(w, 8, 64)
    assert np.abs(dequantize_groups(q8, s8, 8) - w).max() <= \
        float(np.abs(s8.astype(np.float32)).max()) * 0.51


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(2)
    n, k, m = 48, 128, 2048
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((m, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    H = 2 * x.T.astype(np.float64) @ x / m
    y = x @ w.T
    errs = {}
    for name, (q, s) in {"rtn": quantize_rtn(w, 4, 32),
                         "gptq": gptq_quantize(w, H, 4, 32)}.items():
        wq = dequantize_groups(pack_int4(q), s, 4)
        errs[name] = float(np.mean((x @ wq.T - y) ** 2))
    assert errs["gptq"] < 0.7 * errs["rtn"], errs


def _kernel_cases():
    from tests.kernel_harness import Case

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 128)).astype(np.float32)
    w = rng.standard_normal((40, 128)).astype(np.float32) * 0.1
    q4, s4 = quantize_rtn(w, 4, 64)
    q8, s8 = quantize_rtn(w, 8, 32)
    b = rng.standard_normal(40).astype(np.float32)
    tab = rng.integers(-32767, 32768, (30, 16)).astype(np.int16)
    ts = rng.random(30).astype(np.float32) * 1e-4
    idx = np.array([[1, -2, 29], [0, 5, 7]], np.int64)
    xn = (rng.standard_normal((2, 7, 48)) * 3 + 1).astype(np.float32)
    s16 = rng.standard_normal(48).astype(np.float16)
    b16 = rng.standard_normal(48).astype(np.float16)
    xi = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    c16 = rng.standard_normal((4, 1, 1)).astype(np.float16)
    return [
        Case("dense_wq", [x, pack_int4(q4), s4, b], {"bits": 4, "group_size": 64,
                                                     "activation": "gelu"}, consts=(1, 2, 3)),
        Case("dense_wq", [x[0, :1], pack_int4(q4), s4], {"bits": 4, "group_size": 64},
             consts=(1, 2)),
        Case("dense_wq", [x, q8, s8, b], {"bits": 8, "group_size": 32, "activation": "relu"},
             consts=(1, 2, 3)),
        Case("dense_wq", [x, pack_int4(q4), s4], {"bits": 4, "group_size": 64}),
        Case("gather_q", [tab, ts, idx], consts=(0, 1)),
        Case("gather_q", [(tab // 256).astype(np.int8), ts, idx[0]], consts=(0, 1)),
        Case("norm_f16", [xn, s16, b16], {"axes": [2]}, consts=(1, 2)),
        Case("norm_f16", [xi, c16, c16], {"axes": [2, 3]}, consts=(1, 2)),
        Case("norm_f16", [xi, c16, c16], {"axes": []}, consts=(1, 2)),
    ]


def test_kernels_match_references(tmp_path):
    from tests.kernel_harness import reference, run_cases

    cases = _kernel_cases()
    for case, got in zip(cases, run_cases(cases, tmp_path), strict=True):
        want = reference(case)[0]
        if case.op == "norm_f16":  # f32 statistics summed in another order: <= 1 f16 ulp
            np.testing.assert_allclose(got[0], want, rtol=2e-3, atol=2e-3, err_msg=case.op)
        else:
            np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=case.op)


def test_handler_dense_and_matmul_keep_names_and_numerics():
    rng = np.random.default_rng(4)
    g = Graph("mlp")
    x = g.add_input("x", TensorType((3, 64), "f32"))
    w1 = g.add_weight("fc.weight", rng.standard_normal((32, 64)).astype(np.float32))
    b1 = g.add_weight("fc.bias", rng.standard_normal(32).astype(np.float32))
    h = g.make_node("dense", [x, w1, b1], {"activation": "relu"}, name="fc",
                    out_names=["h"]).output
    w2 = g.add_weight("proj", rng.standard_normal((32, 16)).astype(np.float32))
    y = g.make_node("matmul", [h, w2], {}, name="proj", out_names=["y"]).output
    g.outputs = [y]
    sample = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    ref = interpret(g, sample)[0]
    q = quantize_graph(g, "w8", [sample])
    assert q.op_counts().get("dense_wq") == 2 and "dense" not in q.op_counts()
    assert [n.output.name for n in q.nodes if n.op == "dense_wq"] == ["h", "y"]
    assert set(q.weights) == {"fc.bias", "fc.weight.q8", "fc.weight.scales", "proj.q8",
                              "proj.scales"}
    out = interpret(q, sample)[0]
    assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()
    q4 = quantize_graph(g, "int4", [sample])
    out4 = interpret(q4, sample)[0]
    assert np.abs(out4 - ref).max() < 0.2 * np.abs(ref).max()
    # a handler refuses nodes it cannot take
    node = next(n for n in g.nodes if n.op == "dense")
    assert not apply(g, node, PrecisionSpec("int16"), PassContext())


def test_gptq_needs_calibration():
    g = Graph("d")
    x = g.add_input("x", TensorType((2, 32), "f32"))
    w = g.add_weight("w", np.ones((4, 32), np.float32))
    node = g.make_node("dense", [x, w], {}, name="fc")
    g.outputs = [node.output]
    with pytest.raises(NpuccError, match="calibration"):
        apply(g, node, PrecisionSpec("int4", method="gptq", group_size=32), PassContext())


def test_int16_and_int8_embeddings():
    rng = np.random.default_rng(5)
    g = Graph("emb")
    ids = g.add_input("ids", TensorType((2, 5), "i64"))
    table = (rng.standard_normal((50, 24)) * rng.uniform(0.01, 10, (50, 1))).astype(np.float32)
    t = g.add_weight("wte", table)
    e = g.make_node("gather", [t, ids], {"axis": 0}, name="wte", out_names=["e"]).output
    g.outputs = [e]
    sample = {"ids": np.array([[0, 1, 49, -1, 7], [3, 3, 2, 1, 0]], np.int64)}
    q = quantize_graph(g, {"gather": "int16"}, [sample])
    assert q.op_counts().get("gather_q") == 1
    assert q.weights["wte.q16"].dtype == np.int16 and q.weights["wte.row_scales"].shape == (50,)
    out, ref = interpret(q, sample)[0], interpret(g, sample)[0]
    # per-row scale: the error of each row is below half a step of that row
    step = np.abs(table).max(axis=1) / 32767
    idx = np.where(sample["ids"] < 0, sample["ids"] + 50, sample["ids"])
    assert np.all(np.abs(out - ref) <= step[idx][..., None] * 0.5 + 1e-12)
    q8 = quantize_graph(g, {"gather": "w8"}, [sample])
    assert q8.weights["wte.q8"].dtype == np.int8
    step8 = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(interpret(q8, sample)[0] - ref) <= step8[idx][..., None] * 0.5 + 1e-9)


def test_fp16_norms_numerics():
    rng = np.random.default_rng(6)
    g = Graph("norms")
    x = g.add_input("x", TensorType((2, 4, 3, 5), "f32"))
    xl = g.add_input("xl", TensorType((2, 6, 8), "f32"))
    c = lambda *s: rng.uniform(0.5, 1.5, s).astype(np.float32)  # noqa: E731
    ln = g.make_node("layer_norm", [xl, g.add_weight("ln.w", c(8)), g.add_weight("ln.b", c(8))],
                     {"axis": -1}, name="ln").output
    inn = g.make_node("instance_norm", [x, g.add_weight("in.w", c(4)),
                                        g.add_weight("in.b", c(4))], {}, name="in").output
    bn = g.make_node("batch_norm", [x, g.add_weight("bn.w", c(4)), g.add_weight("bn.b", c(4)),
                                    g.add_weight("bn.m", c(4)), g.add_weight("bn.v", c(4))],
                     {}, name="bn").output
    g.outputs = [ln, inn, bn]
    sample = {"x": rng.standard_normal((2, 4, 3, 5)).astype(np.float32) * 4,
              "xl": rng.standard_normal((2, 6, 8)).astype(np.float32) * 4 + 2}
    q = quantize_graph(g, {"default": "fp16"}, [sample])
    assert q.op_counts() == {"const": 6, "norm_f16": 3}
    refs, outs = interpret(g, sample), interpret(q, sample)
    for r, o in zip(refs, outs, strict=True):
        assert np.array_equal(o, o.astype(np.float16).astype(np.float32))  # f16 values
        np.testing.assert_allclose(o, r, rtol=4e-3, atol=4e-3)
    # the op's definition: the input rounded to f16, statistics in f32, result rounded once
    want = norm_f16_reference(sample["xl"], q.weights["ln.w.f16"], q.weights["ln.b.f16"], (2,),
                              1e-5)
    assert np.array_equal(outs[0], want)
