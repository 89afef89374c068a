"""Graph passes on small graphs, checked against the reference interpreter.

The FileCheck files (tests/filecheck/<pass>.ir) pin the rewritten IR; these tests pin the
numbers, the options and the registry entries.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.ir import Graph, interpret, parse, verify
from compiler.ir.types import TensorType
from compiler.pass_base import PassContext, lookup_pass
from compiler.pass_manager import run_pipeline
from compiler.pipeline import format_pipeline, parse_pipeline
from passes import DEFAULT_PIPELINE, PASS_MODULES


def _run(graph: Graph, pipeline: str) -> Graph:
    return run_pipeline(graph, pipeline)


def _net(seed: int = 0, bn_stats: bool = True) -> tuple[Graph, dict[str, np.ndarray]]:
    """A small NCHW conv net exercising every to-nhwc rule: strided/grouped/depthwise convs,
    pools, a BN between convs, residual add, concat, pad, reduce_mean, LRN, flatten."""
    rng = np.random.default_rng(seed)
    g = Graph("net")
    x = g.add_input("x", TensorType((2, 3, 12, 12), "f32"))

    def w(*shape: int) -> object:
        return g.add_weight("w", (rng.standard_normal(shape) * 0.4).astype(np.float32))

    c1 = g.add("conv2d", x, w(8, 3, 3, 3), w(8), pads=[1, 1, 1, 1], strides=[2, 2])
    if bn_stats:
        c1 = g.add("batch_norm", c1, *(g.add_weight("bn", a.astype(np.float32)) for a in (
            rng.uniform(0.5, 1.5, 8), rng.uniform(-0.2, 0.2, 8), rng.uniform(-0.2, 0.2, 8),
            rng.uniform(0.5, 1.5, 8))))
    bn = g.add("relu", c1)
    c2 = g.add("conv2d", bn, w(8, 1, 3, 3), pads=[1, 1, 1, 1], groups=8)
    c3 = g.add("clip", g.add("conv2d", bn, w(8, 4, 1, 1), groups=2), min=0.0, max=6.0)
    s = g.add("add", c2, c3)
    lrn = g.add("lrn", s, size=3, alpha=1e-3, beta=0.75, bias=2.0)
    p = g.add("max_pool2d", lrn, kernel=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cat = g.add("concat", p, g.add("avg_pool2d", s, kernel=[2, 2], strides=[2, 2]), axis=1)
    padded = g.add("pad", cat, pads=[0, 0, 1, 1, 0, 0, 0, 0])
    c4 = g.add("conv2d", padded, w(6, 16, 2, 2))
    m = g.add("reduce_mean", c4, axes=[2, 3], keepdims=False)
    gp = g.add("reshape", g.add("global_max_pool", c4), shape=[2, 6])
    sm = g.add("softmax", g.add("reduce_max", c4, axes=[3], keepdims=True), axis=1)
    g.outputs = [g.add("add", m, gp), g.add("sigmoid", c4), g.add("reshape", sm, shape=[2, 18])]
    verify(g)
    return g, {"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)}


def _close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= tol * max(1.0, np.abs(x).max())


@pytest.mark.parametrize("kernel_layout", ["OHWI", "HWIO"])
def test_to_nhwc_numerics_and_transposes(kernel_layout):
    g, inputs = _net()
    ref = interpret(g, inputs)
    out = _run(g.copy(), f"to-nhwc{{kernel-layout={kernel_layout}}}")
    _close(ref, interpret(out, inputs))
    for c in out.find("conv2d"):
        assert (c.attrs["layout"], c.attrs["kernel_layout"]) == ("NHWC", kernel_layout)
    # one transpose for the input; the sigmoid and softmax outputs need NCHW back
    assert len(out.find("transpose")) == 3
    assert not out.find("lrn")
    # then the whole default pipeline: BN (pushed to axis 3) folds into the NHWC conv
    full = _run(g.copy(), DEFAULT_PIPELINE.replace("to-nhwc",
                                                   f"to-nhwc{{kernel-layout={kernel_layout}}}"))
    _close(ref, interpret(full, inputs), 1e-4)
    assert not full.find("batch_norm")


def test_fold_batchnorm_into_nhwc_conv():
    g, inputs = _net()
    ref = interpret(g, inputs)
    out = _run(g.copy(), "to-nhwc{kernel-layout=HWIO}")
    assert out.find("batch_norm")[0].attrs["axis"] == 3  # pushed through, axis remapped
    r = lookup_pass("fold-batchnorm")().run(out, PassContext())
    assert r.stats == {"folded_into_conv": 1, "to_mul_add": 0}
    _close(ref, interpret(out, inputs), 1e-5)


def test_to_nhwc_stats_and_idempotence():
    g, _ = _net(bn_stats=False)
    ctx = PassContext()
    p = lookup_pass("to-nhwc")()
    r = p.run(g, ctx)
    assert r.changed and r.stats["converged"] and r.stats["transposes_left"] == 3
    again = p.run(r.graph, ctx)
    assert not again.changed


def test_fold_constants_max_bytes():
    g = parse("""
graph @big(%x: f32[64,64]) -> (f32[64,64], f32[4]) {
  %0 = fill() {shape=[64,64], value=1.0, dtype="f32"} : f32[64,64]
  %1 = add(%x, %0) : f32[64,64]
  %2 = arange() {start=0.0, limit=4.0, dtype="f32"} : f32[4]
  return %1, %2
}""")
    ctx = PassContext()
    r = lookup_pass("fold-constants")(max_bytes=1024).run(g, ctx)
    assert r.stats == {"folded": 1, "skipped_big": 1}
    assert g.find("fill") and not g.find("arange") and ctx.remarks
    r = lookup_pass("fold-constants")().run(g, PassContext())
    assert not g.find("fill") and len(g.weights) == 1  # 16 KiB: a weight, not inline


def test_canonicalize_reports_non_convergence():
    text = """
graph @g(%x: f32[4]) -> (f32[4]) {
  %a = const [1.0, 2.0, 3.0, 4.0] : f32[4]
  %b = neg(%a) : f32[4]
  %0 = add(%x, %b) : f32[4]
  return %0
}"""
    ctx = PassContext()
    r = lookup_pass("canonicalize")(max_iterations=1).run(parse(text), ctx)
    assert r.stats["converged"] is False and any("converge" in m for m in ctx.remarks)
    r = lookup_pass("canonicalize")().run(parse(text), PassContext())
    assert r.stats["converged"] is True and r.stats["iterations"] == 2


def test_fusions_without_loaded_weights_stay_correct():
    """A graph parsed without its weights: transposing a weight becomes a node, which
    fold-constants removes once the weights are attached."""
    text = """
graph @g(%x: f32[2,3], %i: f32[1,2,4,4]) -> (f32[2,4], f32[1,3,4,4]) {
  %w = const "w" : f32[3,4]
  %b = const "b" : f32[4]
  %k = const "k" : f32[3,2,1,1]
  %0 = matmul(%x, %w) : f32[2,4]
  %1 = add(%b, %0) : f32[2,4]
  %2 = conv2d(%i, %k) : f32[1,3,4,4]
  return %1, %2
}"""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal(4).astype(np.float32),
               "k": rng.standard_normal((3, 2, 1, 1)).astype(np.float32)}
    inputs = {"x": rng.standard_normal((2, 3)).astype(np.float32),
              "i": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    ref = interpret(parse(text, weights), inputs)
    g = _run(parse(text), "fuse-matmul-add,to-nhwc")
    # W^T, the kernel (a 1x1 kernel's transpose is a reshape), the conv's input and output
    assert len(g.find("transpose")) + len(g.find("reshape")) == 4
    g2 = parse(str(g), weights)
    _close(ref, interpret(g2, inputs))
    g3 = _run(g2, "canonicalize")
    assert len(g3.find("transpose")) == 2
    _close(ref, interpret(g3, inputs))


def test_cse_keeps_different_inline_values_apart():
    g = parse("""
graph @g(%x: f32[2]) -> (f32[2], f32[2]) {
  %a = const [1.0, 2.0] : f32[2]
  %b = const [1, 2] : i32[2]
  %c = cast(%b) {to="f32"} : f32[2]
  %0 = add(%x, %a) : f32[2]
  %1 = add(%x, %c) : f32[2]
  return %0, %1
}""")
    r = lookup_pass("cse")().run(g, PassContext())
    assert not r.changed  # equal bytes would be a bug here: f32 vs i32 differ anyway


def test_registry_and_default_pipeline():
    for name, module in PASS_MODULES.items():
        cls = lookup_pass(name)
        assert cls is not None and cls.name == name and cls.__module__ == module
        assert cls.__doc__  # states what holds before and after
    assert issubclass(lookup_pass("fuse-conv-relu"), lookup_pass("fuse-conv-act"))
    passes = parse_pipeline(DEFAULT_PIPELINE)
    assert format_pipeline(passes) == DEFAULT_PIPELINE
    assert "fuse-conv-relu" in [p.name for p in passes]
    p = parse_pipeline("to-nhwc{kernel-layout=HWIO}")[0]
    assert p.kernel_layout == "HWIO" and p.pipeline_text == "to-nhwc{kernel-layout=HWIO}"


@pytest.mark.parametrize("spelling", [
    "%a = div(%0, %s2) ; %e = erf(%a) ; %p = add(%e, %one) ; %m = mul(%0, %p) ; %y = mul(%m, %half)",
    "%a = mul(%r, %0) ; %e = erf(%a) ; %p = add(%one, %e) ; %m = mul(%half, %0) ; %y = mul(%p, %m)",
    "%a = div(%0, %s2) ; %e = erf(%a) ; %p = add(%e, %one) ; %m = mul(%p, %half) ; %y = mul(%0, %m)",
])
def test_erf_gelu_fuses_into_dense(spelling):
    body = "\n".join(f"  {s.strip()} : f32[4,5]" for s in spelling.split(";"))
    text = f"""
graph @g(%x: f32[4,3]) -> (f32[4,5]) {{
  %w = const "w" : f32[5,3]
  %0 = dense(%x, %w) : f32[4,5]
  %s2 = const [1.4142135] : f32[]
  %r = const [0.70710677] : f32[]
  %one = const [1.0] : f32[]
  %half = const [0.5] : f32[]
{body}
  return %y
}}"""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    x = rng.standard_normal((4, 3)).astype(np.float32)
    ref = interpret(parse(text, weights), [x])
    g = _run(parse(text, weights), "fuse-dense-act,dce")
    assert [n.op for n in g.nodes] == ["const", "dense"]
    assert g.find("dense")[0].attrs["activation"] == "gelu"
    _close(ref, interpret(g, [x]))


def test_fold_per_channel_affine_numerics():
    """conv -> mul -> add -> relu (per-channel constants) becomes one conv{relu};
    div/sub by per-channel constants after a dense fold too."""
    rng = np.random.default_rng(3)
    g = Graph("affine")
    x = g.add_input("x", TensorType((1, 3, 5, 5), "f32"))
    y = g.add_input("y", TensorType((2, 4), "f32"))

    def c(*shape: int, lo: float = -1.0, hi: float = 1.0) -> object:
        return g.add_weight("c", rng.uniform(lo, hi, shape).astype(np.float32))

    conv = g.add("conv2d", x, c(4, 3, 3, 3), c(4), pads=[1, 1, 1, 1])
    out1 = g.add("relu", g.add("add", g.add("mul", conv, c(4, 1, 1)), c(1, 4, 1, 1)))
    d = g.add("dense", y, c(6, 4))
    out2 = g.add("sub", g.add("div", d, c(6, lo=0.5, hi=2.0)), c(1, 6))
    g.outputs = [out1, out2]
    inputs = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32),
              "y": rng.standard_normal((2, 4)).astype(np.float32)}
    ref = interpret(g, inputs)
    out = _run(g.copy(), "fold-batchnorm,fuse-conv-act,dce")
    assert out.op_counts() == {"const": 4, "conv2d": 1, "dense": 1}
    _close(ref, interpret(out, inputs))
