"""The size-budget solver chooses the tied embedding's precision too (compiler/llm/mixed.py,
compiler/llm/sensitivity.py): under a tight budget a grouped low-bit table, which the package
stores once for the row gather (``embed_wq``) and the output projection (``dense_wq``), and
whose logits are the numpy forward pass over the package's own dequantized weights."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

MAX_CONTEXT, CHUNK = 64, 8
CALIB = [(7 * i + 3) % 256 for i in range(48)]


@pytest.fixture(scope="module")
def tiny():
    """tests/llm_tiny.py's small random Llama (tied embedding, K = 64 and 128) as a spec."""
    pytest.importorskip("transformers")
    from compiler.llm.compile import load_spec
    from tests.llm_tiny import tiny_llama

    return load_spec(tiny_llama())


@pytest.fixture(scope="module")
def sens(tiny):
    from compiler.llm.sensitivity import measure_sensitivity

    return measure_sensitivity(tiny, CALIB, tokens=48, measure=None)


def test_every_table_scheme_is_measured(sens):
    from compiler.llm.mixed import candidates, label_of

    labels = {label_of(s) for s in candidates("embed")}
    assert {"int16", "int8", "int4-g32", "int3-g64", "int2-g64"} <= labels
    assert set(sens.loss["embed"]) == labels
    loss = sens.loss["embed"]
    assert loss["int2-g64"] > loss["int4-g32"] > loss["int8"] >= 0


def dequantized_spec(q):
    """``q`` (a quantized spec) with every stored matrix turned back into f32 by numpy."""
    from compiler.ir.ops.embed_q import dequantize_table
    from compiler.ir.ops.quant_weight import unpack_bits

    w = {k: v for k, v in q.weights.items()
         if not k.endswith((".wq", ".scales", ".offsets"))}
    for prefix, (bits, g) in q.quant.items():
        codes = unpack_bits(q.weights[f"{prefix}.wq"], bits) if bits < 8 \
            else q.weights[f"{prefix}.wq"]
        off = q.weights.get(f"{prefix}.offsets")
        deq = dequantize_table(q.weights[f"{prefix}.wq"], q.weights[f"{prefix}.scales"], bits,
                               off)
        # written out once more from the codes: q * scale (+ offset) per group
        n, k = codes.shape
        alt = codes.reshape(n, k // g, g) * q.weights[f"{prefix}.scales"].astype(
            np.float32)[..., None]
        if off is not None:
            alt = alt + off.astype(np.float32)[..., None]
        np.testing.assert_array_equal(deq, alt.reshape(n, k).astype(np.float32))
        w[prefix if prefix == "embed" else f"{prefix}.w"] = deq
    for name in [k for k in w if k.startswith("embed.")]:   # int8/int16 rows
        w.pop(name)
    return replace(q, weights=w, quant={})


def test_tight_budget_takes_a_grouped_low_bit_embedding(tiny, sens, tmp_path):
    from compiler import compile_llm
    from compiler.llm.mixed import (
        MB,
        candidates,
        matrix_shapes,
        plan_bytes,
        quantize_mixed,
        smallest_bytes,
    )
    from compiler.llm.quantize import Scheme
    from compiler.llm.sensitivity import FloatForward

    least = smallest_bytes(tiny, MAX_CONTEXT)
    shapes = matrix_shapes(tiny)
    int8_table = plan_bytes("embed", shapes["embed"], Scheme(8, None, "rtn"))
    smallest_table = min(plan_bytes("embed", shapes["embed"], s) for s in candidates("embed"))
    # room for everything at its smallest plus less than an int8 table's extra bytes
    budget_mb = math.floor(least + 0.5 * (int8_table - smallest_table)) / MB
    m = compile_llm(tiny, max_context=MAX_CONTEXT, chunk=CHUNK, size_budget_mb=budget_mb,
                    sensitivity=sens, output=tmp_path / "tight.npkg", work_dir=tmp_path / "w")
    plan = m.package.manifest["model"]["precision_plan"]
    emb = plan["matrices"]["embed"]
    assert emb.startswith(("int4", "int3", "int2")), emb
    assert m.stats()["weight_bytes"] <= plan["weights_bytes"] <= budget_mb * MB

    # one copy of the table: the gather and the output projection bind the same arrays
    dec = m.package.manifest["graphs"]["decode"]
    gather = next(s for s in dec["steps"] if s["op"] == "embed_wq")
    head = [s for s in dec["steps"] if s["op"] == "dense_wq"][-1]
    keys = [[dec["tensors"][a].get("key") for a in s["args"][1:3]] for s in (gather, head)]
    assert keys[0] == keys[1] and None not in keys[0]

    # the package's logits are numpy's forward pass over its own dequantized weights
    q = quantize_mixed(tiny, None, budget_mb, max_context=MAX_CONTEXT, sensitivity=sens)
    assert q.precision == plan and "embed" in q.quant
    ids = np.array([5, 17, 99, 3, 200, 40, 255, 0, 128])
    ref = FloatForward(dequantized_spec(q), ids).run()
    got = m.logits(ids.tolist()).astype(np.float64)
    got = got - got.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())


def test_a_1_7b_plan_fits_500_mb_only_with_a_grouped_embedding(sens):
    """SmolLM2-1.7B's shape at 500 MB: with int8 rows for the tied table no plan exists (the
    table alone is 101 MB); with grouped tables the solver finds one, from losses carried over
    by depth, and its bytes are the sum of plan_bytes over its schemes."""
    from compiler.llm.mixed import (
        MB,
        fixed_bytes,
        matrix_shapes,
        plan_bytes,
        plan_of,
        shape_spec,
        solve,
        transfer_by_depth,
    )
    from compiler.llm.quantize import Scheme

    spec = shape_spec(49152, 2048, 8192, 24, 32, 32)
    shapes = matrix_shapes(spec)
    assert sum(n * k for n, k in shapes.values()) == 1_711_276_032
    fixed = fixed_bytes(spec, 2048)
    loss = transfer_by_depth(sens.loss, 2, shapes)
    rows_only = {**loss, "embed": {k: v for k, v in loss["embed"].items()
                                   if k in ("int8", "int16")}}
    int8 = plan_bytes("embed", shapes["embed"], Scheme(8, None, "rtn"))
    assert int8 > 100 * MB
    with pytest.raises(Exception, match="cannot be met"):
        solve(shapes, rows_only, 500 * MB, fixed)
    plan = solve(shapes, loss, 500 * MB, fixed, name="1.7b")
    assert plan.total <= 500 * MB and plan.schemes["embed"].group is not None
    again = plan_of("1.7b", spec, plan.schemes, 2048)
    assert again.total == plan.total and 2.2 < plan.bits_per_weight() < 2.35

    # the kirin990 estimate of that plan, and the inputs it prints are the ones it used
    from targets.llm_cost import decode_ms_per_token

    est = decode_ms_per_token("kirin990", weight_bytes=plan.total, kv_bytes_per_position=393216,
                              position=1023, layers=24, kernels_per_layer=16)
    i = est["inputs"]
    assert i["weight_bytes"] == plan.total and i["kv_bytes"] == 393216 * 1024
    bw = i["dram_gbps"] * 1e9 * i["memory_factor"]
    assert est["ms_per_token"] == pytest.approx(
        (i["weight_bytes"] + i["kv_bytes"]) / bw * 1e3 + i["launches"] * i["launch_us"] * 1e-3)
    assert f"{plan.total / 1e6:.1f} MB weights" in est["formula"]
