"""Mixed precision under a size budget, and the quantization report (JSON, HTML, PNG, CLI,
CompiledModel.quant_report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.ir.graph import Graph
from compiler.ir.types import TensorType
from compiler.pass_base import PassContext
from passes.quantization.insert import InsertQuantize, precision_text
from passes.quantization.mixed import MIB, BudgetError, layer_bytes
from passes.quantization.report import build_report, weight_bytes, write_report


def two_branch(seed: int = 0) -> tuple[Graph, list[dict[str, np.ndarray]]]:
    """y = a(x) + 0.001 * b(x): layer "b" barely reaches the output, layer "a" dominates."""
    rng = np.random.default_rng(seed)
    g = Graph("two")
    x = g.add_input("x", TensorType((8, 128), "f32"))
    outs = []
    for name in ("a", "b"):
        w = g.add_weight(f"{name}.weight", rng.standard_normal((64, 128)).astype(np.float32))
        b = g.add_weight(f"{name}.bias", rng.standard_normal(64).astype(np.float32))
        outs.append(g.make_node("dense", [x, w, b], {}, name=name, out_names=[name]).output)
    small = g.add_const(np.asarray(0.001, np.float32))
    scaled = g.add("mul", outs[1], small, name="scale")
    g.outputs = [g.add("add", outs[0], scaled, name="sum")]
    samples = [{"x": rng.standard_normal((8, 128)).astype(np.float32)} for _ in range(3)]
    return g, samples


def _run(g: Graph, samples, budget_mb: float, quantize="int4") -> tuple[Graph, PassContext]:
    ctx = PassContext(resources={"calib": samples})
    quantize = InsertQuantize(precision=precision_text(quantize), budget_mb=budget_mb,
                              calibration="@calib")
    return quantize.run(g.copy(), ctx).graph, ctx


def _precision_of(graph: Graph, name: str) -> str:
    node = next(n for n in graph.nodes if n.name == name and n.op not in ("const",
                                                                            "dequantize"))
    if node.op == "dense_wq":
        return "int4" if node.attrs["bits"] == 4 else "w8"
    if any(v.producer is not None and v.producer.op == "dequantize" for v in node.inputs):
        return "int8"
    return "float"


def test_budget_met_and_less_sensitive_layer_gets_lower_precision():
    g, samples = two_branch()
    a, b = (next(n for n in g.nodes if n.name == k) for k in ("a", "b"))
    budget = layer_bytes(g, a, "w8", 128) + layer_bytes(g, b, "int4", 128) + 32
    q, ctx = _run(g, samples, budget / MIB)
    assert weight_bytes(q) <= budget
    assert _precision_of(q, "b") == "int4"
    assert _precision_of(q, "a") == "w8"
    plan = ctx.options["mixed_plan"]
    assert plan["total_bytes"] <= plan["budget_bytes"] == int(budget / MIB * MIB)
    layers = {ly["name"]: ly for ly in plan["layers"]}
    assert layers["a"]["snr_db"]["int4"] < layers["b"]["snr_db"]["int4"]
    # a generous budget keeps both float; a tiny one is refused with the smallest size
    q2, _ = _run(g, samples, 1.0)
    assert _precision_of(q2, "a") == _precision_of(q2, "b") == "float"
    with pytest.raises(BudgetError, match="raise the budget to at least"):
        _run(g, samples, 1e-3)


def test_report_fields_and_files(tmp_path):
    from passes.quantization.weight_only import quantize_graph

    g, samples = two_branch(1)
    q = quantize_graph(g, {"a": "int4", "b": "w8"}, samples)
    rep = build_report(g, q, samples)
    assert rep["samples"] == 3 and rep["unmatched_layers"] == 0
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(rows) == {"a", "b"}
    for r in rows.values():
        for key in ("mse", "cosine", "max_abs", "snr_db", "bytes_float", "bytes_quant",
                    "channel_rel_err", "op", "shape"):
            assert key in r
        assert r["op"] == "dense_wq" and r["bytes_quant"] < r["bytes_float"] / 3
        assert 0.9 < r["cosine"] <= 1.0 and np.isfinite(r["snr_db"])
    assert rows["a"]["snr_db"] < rows["b"]["snr_db"]  # int4 noisier than int8 weights
    out = rep["outputs"][0]
    assert out["snr_db"] > 15 and rep["bytes"]["ratio"] < 0.3
    files = write_report(rep, tmp_path / "rep")
    data = json.loads(files["json"].read_text())
    assert data["layers"][0]["name"] == "a"
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files["html"].read_text()
    assert "data:image/png;base64," in page and "<td>a</td>" in page


def test_cli_report(tmp_path, capsys):
    from compiler.cli import main
    from compiler.ir.serialize import save

    g, samples = two_branch(2)
    path = save(g, tmp_path / "two.ir")
    np.savez(tmp_path / "cal.npz", x=np.stack([s["x"] for s in samples]))
    rc = main(["report", str(path), "-q", '{"dense": "w8"}', "--calibration",
               str(tmp_path / "cal.npz"), "-o", str(tmp_path / "out")])
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "quant_report.json").read_text())
    assert rep["samples"] == 3 and len(rep["layers"]) == 2
    assert (tmp_path / "out" / "quant_report.html").exists()
    assert "quantization report" in capsys.readouterr().out
    # re-render a saved report; a bad -q is a user error, not a traceback
    assert main(["report", str(tmp_path / "out" / "quant_report.json"), "-o",
                 str(tmp_path / "again")]) == 0
    assert main(["report", str(path), "-q", "{bad", "-o", str(tmp_path / "x")]) == 1


def test_compile_with_budget_runs_and_reports(tmp_path):
    from compiler import compile
    from compiler.ir.interpreter import interpret

    g, samples = two_branch(3)
    a, b = (next(n for n in g.nodes if n.name == k) for k in ("a", "b"))
    budget = layer_bytes(g, a, "w8", 128) + layer_bytes(g, b, "int4", 128) + 32
    m = compile(g, "host", quantize={"dense": {"precision": "int4", "group_size": 64}},
                calibration=samples, size_budget_mb=budget / MIB, progress=False)
    assert m.graph.op_counts().get("dense_wq") == 2
    got = m.run(samples[0])[0]
    np.testing.assert_allclose(got, interpret(m.graph, samples[0])[0], rtol=1e-5, atol=1e-4)
    rep = m.quant_report(out_dir=tmp_path)
    assert {r["name"] for r in rep["layers"]} == {"a", "b"}
    assert rep["plan"]["total_bytes"] <= budget
    assert (tmp_path / "quant_report_heatmap.png").exists()
