"""Mixed precision for LLMs: 3/2-bit weights and their kernels, per-matrix sensitivity, the
size-budget solver and the seed preset (compiler/llm/mixed.py, compiler/llm/sensitivity.py,
targets/kernels/gemv_q.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tests.kernel_harness import Case, check_cases

rng = np.random.default_rng(0)
MAX_CONTEXT, CHUNK = 64, 8
CALIB = [(7 * i + 3) % 256 for i in range(48)]


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits,group,rows", [(3, 32, 1), (3, 128, 1), (2, 32, 1), (2, 64, 1),
                                             (3, 64, 8), (2, 128, 5)])
def test_lowbit_dense_wq_matches_numpy_dequant(tmp_path, bits, group, rows):
    """The 3/2-bit kernel (decode: one row; prefill: several) against the op's reference, and
    that reference against x @ W^T with W dequantized independently in numpy."""
    from compiler.ir.ops.quant_weight import pack_bits
    from compiler.ir.registry import get_op
    from compiler.llm.quantize import quantize_asym

    n, k = 40, 256
    w = f32(n, k)
    q, s, c = quantize_asym(w, group, bits)
    assert q.min() >= -(1 << (bits - 1)) and q.max() < (1 << (bits - 1))
    wd = q.astype(np.float32) * np.repeat(s.astype(np.float32), group, 1) \
        + np.repeat(c.astype(np.float32), group, 1)
    x, b = f32(rows, k), f32(n)
    ins = [x, pack_bits(q, bits), s, c, b]
    attrs = {"bits": bits, "group_size": group, "asym": True}
    op = get_op("dense_wq")
    ref = op.reference(ins, op.normalize_attrs(attrs))[0]
    np.testing.assert_allclose(ref, x @ wd.T + b, rtol=1e-5, atol=1e-4)
    snr = 10 * np.log10((w ** 2).sum() / ((w - wd) ** 2).sum())
    assert snr > {3: 12, 2: 7}[bits]          # a real quantizer, not a constant
    check_cases([Case("dense_wq", ins, attrs, consts=(1, 2, 3, 4))], tmp_path,
                rtol=1e-4, atol=1e-4)


def test_pack_bits_layout():
    from compiler.ir.ops.quant_weight import pack_bits, pack_int4, unpack_bits

    q = np.array([[0, 1, 2, 3, -4, -3, -2, -1]], np.int8)
    p = pack_bits(q, 3)
    word = int(p[0, 0]) | int(p[0, 1]) << 8 | int(p[0, 2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == [4, 5, 6, 7, 0, 1, 2, 3]
    assert pack_bits(np.array([[-2, -1, 0, 1]], np.int8), 2).tolist() == [[0b11100100]]
    r = rng.integers(-8, 8, (3, 32)).astype(np.int8)
    assert (pack_bits(r, 4) == pack_int4(r)).all()
    for bits in (2, 3):
        r = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (5, 64)).astype(np.int8)
        assert (unpack_bits(pack_bits(r, bits), bits) == r).all()


def _loss_table(shapes, weight):
    """A constructed sensitivity: every matrix's loss is ``weight[m] * NSR`` of a
    scheme-only SNR (more bits, less loss)."""
    from compiler.llm.mixed import candidates, label_of

    base = {"int8": 40, "int16": 90, "int4-g32": 20, "int4-g128": 18, "int4-g32-asym": 21,
            "int3-g32": 15, "int3-g128": 13, "int2-g32": 9, "int2-g64": 8, "int2-g128": 7}
    return {m: {label_of(s): weight[m] * 10 ** (-base[label_of(s)] / 10)
                for s in candidates(m)} for m in shapes}


def test_solver_gives_low_bits_to_the_less_sensitive_matrices():
    from compiler.llm.mixed import plan_bytes, solve
    from compiler.llm.quantize import parse_scheme

    shapes = {f"l{i}.{p}": (256, 256) for i in range(2) for p in ("q", "down")}
    weight = {"l0.q": 100.0, "l1.q": 100.0, "l0.down": 1.0, "l1.down": 1.0}
    loss = _loss_table(shapes, weight)
    i4 = plan_bytes("l0.q", (256, 256), parse_scheme("int4-g32"))
    i2 = plan_bytes("l0.q", (256, 256), parse_scheme("int2-g128"))
    budget = 1000 + 2 * i4 + 2 * i2 + 100     # room for two int4 and two int2 matrices
    plan = solve(shapes, loss, budget, 1000)
    assert plan.total <= budget
    bits = {m: s.bits for m, s in plan.schemes.items()}
    assert bits["l0.down"] < bits["l0.q"] and bits["l1.down"] < bits["l1.q"], bits
    assert json.loads(json.dumps(plan.manifest()))["matrices"]["l0.q"].startswith("int")


def test_solver_is_the_exact_optimum():
    """Against brute force over every combination of three matrices' schemes."""
    from compiler.llm.mixed import candidates, label_of, plan_bytes, solve

    shapes = {"l0.q": (64, 128), "l0.up": (128, 64), "l0.down": (64, 128)}
    loss = _loss_table(shapes, {"l0.q": 3.0, "l0.up": 1.0, "l0.down": 0.2})
    opts = [[(s, plan_bytes(m, shapes[m], s), loss[m][label_of(s)]) for s in candidates(m)]
            for m in shapes]
    for budget in (17_000, 22_000, 30_000, 45_000):
        plan = solve(shapes, loss, budget, 500)
        best = min(sum(o[2] for o in combo) for combo in itertools.product(*opts)
                   if 500 + sum(o[1] for o in combo) <= budget)
        assert plan.total <= budget
        assert sum(plan.loss.values()) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def tiny():
    """A small random Llama (K = 64 and 128: 3-bit words and 2-bit groups fit)."""
    pytest.importorskip("transformers")
    from tests.llm_tiny import tiny_llama

    return tiny_llama()


def test_budget_compile_meets_the_budget_and_records_the_plan(tiny, tmp_path):
    """A real compile under a budget between the smallest and the int8 size: the package's
    weights fit, the plan is in the manifest, and the mixed package (unfused 3/2/4/8-bit
    GEMVs) computes what the reference interpreter computes on the same weights."""
    from compiler import compile_llm
    from compiler.llm.compile import load_spec
    from compiler.llm.mixed import MB, fixed_bytes, matrix_shapes, plan_bytes, quantize_mixed
    from compiler.llm.sensitivity import measure_sensitivity

    spec = load_spec(tiny)
    sens = measure_sensitivity(spec, CALIB, tokens=48, measure=None)
    assert set(sens.measured) == set(sens.snr_db)          # every matrix measured
    assert all(sens.snr_db[m]["int8"] > sens.snr_db[m]["int2-g128"] for m in sens.shapes
               if m != "embed")
    shapes = matrix_shapes(spec)
    from compiler.llm.quantize import parse_scheme

    top = fixed_bytes(spec, MAX_CONTEXT) + sum(
        plan_bytes(m, s, parse_scheme("int8")) for m, s in shapes.items())
    budget_mb = round(0.55 * top / MB, 4)
    logs: list[str] = []
    m = compile_llm(spec, max_context=MAX_CONTEXT, chunk=CHUNK, size_budget_mb=budget_mb,
                    sensitivity=sens, output=tmp_path / "mixed.npkg", progress=logs.append)
    assert m.stats()["weight_bytes"] <= budget_mb * MB
    plan = m.package.manifest["model"]["precision_plan"]
    assert plan["weights_bytes"] <= budget_mb * MB and plan["budget_bytes"] == budget_mb * MB
    labels = set(plan["matrices"].values())
    assert any(lab.startswith(("int2", "int3")) for lab in labels), labels
    assert any("precision plan" in line for line in logs)
    q = quantize_mixed(spec, None, budget_mb, max_context=MAX_CONTEXT, sensitivity=sens)
    assert q.precision == plan
    _matches_reference(m, q)


def _matches_reference(m, q) -> None:
    """The compiled package's logits are the reference interpreter's on the same weights."""
    from compiler.ir.interpreter import interpret
    from compiler.llm.graphs import build_step_graph, sample_graph_inputs

    ids = [5, 17, 99, 3, 200, 40]
    g = build_step_graph(q, 16, MAX_CONTEXT)
    chunk = np.zeros(16, np.int32)
    chunk[:len(ids)] = ids
    ref = interpret(g, sample_graph_inputs(q, 16, MAX_CONTEXT, chunk, 0))[0][:len(ids)]
    got = m.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_impossible_budget_names_the_smallest_size(tiny, tmp_path):
    from compiler import compile_llm
    from compiler.errors import NpuccError

    with pytest.raises(NpuccError, match=r"cannot be met: the smallest plan .* is "
                                         r"\d+\.\d\d MB.*give at least"):
        compile_llm(tiny, max_context=MAX_CONTEXT, chunk=CHUNK, size_budget_mb=0.001,
                    calibration=CALIB, output=tmp_path / "x.npkg")
    assert not (tmp_path / "x.npkg").exists()
    with pytest.raises(NpuccError, match="drop quantize"):
        compile_llm(tiny, size_budget_mb=1.0, quantize="int4-g32")


def test_seed_preset(tiny, tmp_path):
    """quantize="seed-2b": attention int4 g64, MLP int8, the embedding int16 rows."""
    from compiler import compile_llm
    from compiler.llm.compile import load_spec
    from compiler.llm.mixed import quantize_mixed

    m = compile_llm(tiny, max_context=MAX_CONTEXT, chunk=CHUNK, quantize="seed-2b",
                    output=tmp_path / "seed.npkg")
    model = m.package.manifest["model"]
    plan = model["precision_plan"]
    assert model["quantize"] == "seed-2b" and plan["solver"] == "preset"
    assert plan["matrices"]["l0.q"] == "int4-g64" and plan["matrices"]["l1.down"] == "int8"
    assert plan["matrices"]["embed"] == "int16"
    assert m.stats()["weight_bytes"] <= plan["weights_bytes"]
    q = quantize_mixed(load_spec(tiny), "seed-2b", None, max_context=MAX_CONTEXT)
    assert q.weights["embed.q16"].dtype == np.int16 and q.quant["l0.k"] == (4, 64)
    _matches_reference(m, q)
