"""The default graph pipeline on real models: numerics and the structure the passes promise.

- resnet50 and inception_v1 (onnx's light models, opset 9 converted to 13): their weights are
  ConstantOfShape placeholders (all values equal), so after ``fold-constants`` every weight is
  replaced by a seeded random array of the same shape (He-scaled conv/FC weights, BN
  statistics away from identity) — the comparison then means something and BN folding
  changes every number. The logits (the softmax's operand) are an extra output, so a
  saturated softmax cannot hide an error.
- MobileNetV2 (examples.models, through from_torch): trained-like BN statistics.
- MiniLM's ONNX export: every MatMul + bias Add is one dense.

Numerics go through the pass manager's numeric-check instrument: every pass of the pipeline
keeps the outputs within 1e-4 (max error relative to the largest reference magnitude) of the
unoptimised graph, interpreted by the reference interpreter.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compiler.frontends import from_onnx
from compiler.ir.graph import Graph, Node
from compiler.numeric import NumericCheck
from compiler.pass_manager import PassManager
from examples.random_weights import light_graph
from passes import DEFAULT_PIPELINE

TOL = 1e-4


# -- helpers -------------------------------------------------------------------------
def numeric_check(graph: Graph, inputs: dict[str, np.ndarray]) -> tuple[Graph, NumericCheck]:
    check = NumericCheck(inputs, tolerance=TOL, metric="max_rel", stream=False)
    out = PassManager(DEFAULT_PIPELINE, [check]).run(graph)
    return out, check


def _reach(start: Node, forward: bool) -> set[int]:
    seen: set[int] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        nxt = ([u for v in n.outputs for u in v.uses] if forward
               else [v.producer for v in n.inputs if v.producer is not None])
        for m in nxt:
            if id(m) not in seen:
                seen.add(id(m))
                stack.append(m)
    return seen


def transpose_report(graph: Graph) -> dict[str, int]:
    """Transposes between two convs, at the input edge (no conv above), at the output edge
    (no conv below)."""
    convs = {id(n) for n in graph.find("conv2d")}
    rep = {"total": 0, "between_convs": 0, "input_edge": 0, "output_edge": 0}
    for t in graph.find("transpose"):
        rep["total"] += 1
        above = bool(_reach(t, False) & convs)
        below = bool(_reach(t, True) & convs)
        if above and below:
            rep["between_convs"] += 1
        elif not above:
            rep["input_edge"] += 1
        else:
            rep["output_edge"] += 1
    return rep


def check_structure(graph: Graph) -> dict[str, int]:
    assert not graph.find("batch_norm"), "a batch_norm survived the pipeline"
    unfused = [n.label for n in graph.nodes if n.op in ("relu", "clip")
               and n.inputs[0].producer is not None and n.inputs[0].producer.op == "conv2d"]
    assert not unfused, f"conv2d -> activation pairs left unfused: {unfused}"
    assert all(n.attrs["layout"] == "NHWC" for n in graph.find("conv2d"))
    rep = transpose_report(graph)
    assert rep["between_convs"] == 0, rep
    assert rep["input_edge"] <= len(graph.inputs), rep
    assert rep["output_edge"] <= len(graph.outputs), rep
    return rep


# -- the light ONNX models -------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet50", "inception_v1"])
def test_light_model_default_pipeline(name):
    graph = light_graph(name)
    counts = graph.op_counts()
    x = np.random.default_rng(1).standard_normal(graph.inputs[0].shape).astype(np.float32)
    out, check = numeric_check(graph, {graph.inputs[0].name: x})
    assert max(r.figures.max_rel for r in check.records) <= TOL
    logits = check.reference[0][1]
    assert np.isfinite(logits).all() and logits.std() > 1e-3  # not degenerate
    rep = check_structure(out)
    assert rep["total"] == 1, rep  # only the input's NCHW -> NHWC
    ops = out.op_counts()
    assert ops["conv2d"] == counts["conv2d"]
    assert "gemm" not in ops and ops["dense"] == 1
    if name == "resnet50":  # 49 relus follow convs; 16 follow the residual sums
        assert ops["relu"] == 16 and counts["batch_norm"] == 53
    else:
        assert "relu" not in ops and "lrn" not in ops


@pytest.mark.slow  # torch.export of the model: ~15 s
def test_mobilenet_v2_default_pipeline():
    import torch

    from compiler.frontends import from_torch
    from examples.models import mobilenet_inputs, mobilenet_v2

    torch.set_num_threads(1)
    res = 96  # the pipeline's structure does not depend on it; keeps the test quick
    model, x = mobilenet_v2(resolution=res), mobilenet_inputs(res)
    graph = from_torch(model, x)
    assert len(graph.find("batch_norm")) == 52
    out, check = numeric_check(graph, {graph.inputs[0].name: x})
    assert max(r.figures.max_rel for r in check.records) <= TOL
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    from compiler.ir import interpret

    got = interpret(out, [x])[0]
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()
    rep = check_structure(out)
    assert rep["total"] == 1, rep
    ops = out.op_counts()
    assert "clip" not in ops and ops["conv2d"] == 52
    assert sum(n.attrs["activation"] == "relu6" for n in out.find("conv2d")) == 35


@pytest.mark.slow  # ONNX export of the trained model: ~10 s
def test_minilm_matmul_add_become_dense():
    import torch

    from examples.models import export_onnx, minilm, minilm_inputs

    torch.set_num_threads(1)
    model, tok = minilm()
    inputs = minilm_inputs(tok, seq=16)
    graph = from_onnx(onnx.load(str(export_onnx(model, inputs))))
    # MatMul by a weight followed by an Add of a bias (either operand order) in the import
    pairs = 0
    for mm in graph.find("matmul"):
        w = mm.inputs[1]
        users = mm.output.uses
        if (w.producer is not None and w.producer.op == "const" and len(users) == 1
                and users[0].op == "add"):
            pairs += 1
    assert pairs == 36  # 6 layers x (q, k, v, attention out, ffn in, ffn out)
    out, check = numeric_check(graph, inputs)
    assert max(r.figures.max_rel for r in check.records) <= TOL
    dense = out.find("dense")
    assert sum(len(d.inputs) == 3 for d in dense) == pairs + 1  # + the pooler's Gemm
    assert sum(d.attrs["activation"] == "gelu" for d in dense) == 6  # the FFNs' erf GELU
    assert not out.find("erf")
    for mm in out.find("matmul"):  # what is left multiplies two activations
        assert all(v.producer is None or v.producer.op != "const" for v in mm.inputs)
    for d in dense:  # no bias add left behind a dense
        users = d.output.uses
        assert not (len(users) == 1 and users[0].op == "add"
                    and any(v.producer is not None and v.producer.op == "const"
                            for v in users[0].inputs)), d.label
