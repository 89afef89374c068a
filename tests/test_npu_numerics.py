"""npu-numerics: NPU regions of an fp16 NPU (kirin990) compute on f16 data.

- the pass: f16 weights, entry/exit casts on the NPU side, f32 inside softmax/avg-pool,
  graph interface unchanged, idempotent, verified;
- f16 kernels accumulate conv/dense/matmul/gemm in f32 and round once, as the references do
  (compiler/ir/ops: ``accumulator_dtype``): kernels and references agree to <= 2 f16 ulp;
- compile(..., target="kirin990") runs the f16 kernels: its outputs match the interpreter on
  the lowered (f16) graph to ~1e-3, the f32 reference with cosine >= 0.999, and differ from
  the host (f32) build.
The whole models (resnet50, MobileNetV2, MiniLM) are in test_npu_models.py (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
from npu_helpers import cosine, image, rel_l2, small_cnn

from compiler.ir.interpreter import interpret
from compiler.ir.verify import verify
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline
from passes.npu_numerics import ENTRY, EXIT, NARROW, WIDEN

PARTITION = ("canonicalize,fuse-dense-act,to-nhwc,canonicalize,partition{min-region-nodes=1}")


def _lowered(graph, pipeline=PARTITION + ",npu-numerics"):
    return run_pipeline(graph, pipeline, ctx=PassContext(target="kirin990"))


def test_pass_makes_npu_regions_f16():
    g0 = small_cnn(with_layer_norm=True)
    g = _lowered(g0.copy())
    verify(g)
    npu = [n for n in g.nodes if n.device == "npu"]
    cpu = [n for n in g.nodes if n.device == "cpu"]
    assert [n.op for n in cpu] == ["layer_norm"]          # not an NPU op on kirin990
    for n in npu:
        if n.op == "cast":
            continue
        dts = {v.dtype for v in (*n.inputs, *n.outputs)}
        if n.op in ("softmax", "global_avg_pool"):      # f32 inside, between casts
            assert dts == {"f32"}
            assert all(v.producer.name == WIDEN for v in n.inputs)
            assert all(u.name == NARROW for v in n.outputs for u in v.uses)
        else:
            assert dts == {"f16"}, n.label
    # every NPU weight was converted at compile time
    for n in g.find("const"):
        if any(u.device == "npu" and u.op != "cast" and u.op not in ("softmax",)
               for u in n.output.uses):
            assert n.output.dtype == "f16"
            assert g.const_value(n.output).dtype == np.float16
    # entries/exits: casts on the NPU side, at the CPU boundary and at the graph edges
    casts = {n.name for n in g.find("cast")}
    assert {ENTRY, EXIT, WIDEN, NARROW} <= casts
    assert all(n.device == "npu" for n in g.find("cast"))
    (ln,) = g.find("layer_norm")
    assert ln.inputs[0].dtype == "f32" and ln.inputs[0].producer.name == EXIT
    assert all(u.name == ENTRY for u in ln.output.uses)
    # interface unchanged: names, f32 types
    assert [(v.name, v.type) for v in g.inputs] == [(v.name, v.type) for v in g0.inputs]
    assert [v.type for v in g.outputs] == [v.type for v in g0.outputs]
    assert "logits" in {v.name for v in g.outputs}


def test_pass_is_idempotent_and_numerics_change():
    g = _lowered(small_cnn(with_layer_norm=True))
    text = str(g)
    again = run_pipeline(g.copy(), "npu-numerics", ctx=PassContext(target="kirin990"))
    assert str(again) == text
    f32 = _lowered(small_cnn(with_layer_norm=True), PARTITION)
    x = image()
    for a, b in zip(interpret(g, x), interpret(f32, x), strict=True):
        assert cosine(a, b) > 0.999
        assert not np.array_equal(a, b)   # f16 storage is real


def test_host_target_is_untouched():
    g = run_pipeline(small_cnn(), "partition,npu-numerics", ctx=PassContext(target="host"))
    assert not g.find("cast") and all(v.dtype == "f32" for v in g.values())


def test_f16_kernels_accumulate_in_f32_like_the_references(tmp_path):
    from kernel_harness import Case, reference, run_cases

    rng = np.random.default_rng(0)

    def h(*s, scale=1.0):
        return (rng.standard_normal(s) * scale).astype(np.float16)

    cases = [
        Case("conv2d", [h(1, 8, 8, 32), h(32, 3, 3, 32, scale=0.1), h(32)],
             {"layout": "NHWC", "kernel_layout": "OHWI", "pads": [1, 1, 1, 1],
              "activation": "relu"}, consts=(1, 2)),
        Case("conv2d", [h(1, 8, 8, 32), h(32, 3, 3, 1), h(32)],
             {"layout": "NHWC", "kernel_layout": "OHWI", "pads": [1, 1, 1, 1], "groups": 32,
              "activation": "relu6"}, consts=(1, 2)),
        Case("dense", [h(4, 512), h(40, 512, scale=0.05), h(40)], {"activation": "sigmoid"},
             consts=(1, 2)),
        Case("matmul", [h(2, 16, 256), h(2, 256, 16)]),
        Case("gemm", [h(8, 64), h(32, 64), h(32)], {"trans_b": True, "alpha": 0.5},
             consts=(1,)),
    ]
    got = run_cases(cases, tmp_path)
    for c, (g,) in zip(cases, got, strict=True):
        (r,) = reference(c)
        assert g.dtype == r.dtype == np.float16
        ulp = np.abs(g.astype(np.float32) - r) / np.spacing(np.abs(r)).astype(np.float32)
        assert ulp.max() <= 2, c.op
        # the reference: f32 products and sums, rounded to f16 once (not f16 accumulation)
        (r32,) = reference(type(c)(c.op, [a.astype(np.float32) for a in c.inputs], c.attrs))
        assert np.array_equal(r, r32.astype(np.float16)), c.op


def test_compile_kirin990_runs_f16_kernels():
    from compiler import compile

    x = image()
    g0 = small_cnn(with_layer_norm=True)
    m = compile(g0, target="kirin990", progress=False)
    summary = m.summary()
    print(summary["nodes_per_device"], [f["op"] for f in summary["fallbacks"]])
    assert summary["nodes_per_device"]["npu"] > summary["nodes_per_device"]["cpu"]
    outs = m.run(x)
    low = interpret(m.graph, x)
    ref = interpret(g0, x)
    host = compile(g0, target="host", progress=False).run(x)
    for y, lo, r, h in zip(outs, low, ref, host, strict=True):
        assert rel_l2(y, lo) < 2e-3
        assert cosine(y, r) > 0.999
        assert np.abs(y - h).max() > 10 * np.abs(h - r).max()   # fp16 path, not f32
    assert any(n.outputs[0].dtype == "f16" for n in m.graph.nodes if n.op == "conv2d")


@pytest.mark.parametrize("target", ["rk3588"])
def test_other_npu_target_pipeline_has_npu_numerics(target):
    from targets.description import load_target

    assert "npu-numerics" in load_target(target).default_pipeline
