"""targets.tvm_codegen.build_library: graph -> one kernel library + plan + weights.

The library is run here step by step (as the runtime does, without it) and compared with the
reference interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.ir.interpreter import interpret
from compiler.ir.parser import parse

TEXT = """
graph @enc(%x: f32[2,8,32], %e: f32[0,4]) -> (f32[2,8,32], f32[2,8,32], f32[0,4], f32[]) {
  %w1 = const "l1.weight" : f32[64,32]
  %b1 = const "l1.bias" : f32[64]
  %w2 = const "l2.weight" : f32[32,64]
  %g = const "ln.weight" : f32[32]
  %bt = const "ln.bias" : f32[32]
  %two = const [2.0] : f32[]
  %0 = dense(%x, %w1, %b1) {activation="gelu"} : f32[2,8,64]
  %1 = dense(%0, %w2) : f32[2,8,32]
  %2 = add(%1, %x) : f32[2,8,32]
  %3 = layer_norm(%2, %g, %bt) : f32[2,8,32]
  %4 = dense(%3, %w1, %b1) {activation="gelu"} : f32[2,8,64]
  %5 = dense(%4, %w2) : f32[2,8,32]
  %6 = mul(%5, %two) : f32[2,8,32]
  %7 = softmax(%6) : f32[2,8,32]
  %8 = relu(%e) : f32[0,4]
  %9 = reduce_sum(%7) {axes=[], keepdims=false} : f32[]
  return %3, %7, %8, %9
}
"""


def _graph():
    rng = np.random.default_rng(0)
    w = {"l1.weight": rng.standard_normal((64, 32)).astype(np.float32) * 0.2,
         "l1.bias": rng.standard_normal(64).astype(np.float32),
         "l2.weight": rng.standard_normal((32, 64)).astype(np.float32) * 0.2,
         "ln.weight": rng.standard_normal(32).astype(np.float32),
         "ln.bias": rng.standard_normal(32).astype(np.float32)}
    return parse(TEXT, w)


def run_library(graph, lib, feeds):
    """A minimal executor: numpy buffers per value, kernels called in plan order."""
    import tvm

    mod = tvm.runtime.load_module(str(lib.lib_path))
    env = {k: np.asarray(v) for k, v in feeds.items()}
    env.update(lib.weights)
    types = {v.name: v.type for n in graph.nodes for v in n.outputs}
    for step in lib.steps:
        outs = [np.zeros(types[o].shape, types[o].np_dtype) for o in step.outputs]
        args = [tvm.runtime.tensor(env[a]) for a in [*step.inputs, *step.extra_consts]]
        touts = [tvm.runtime.tensor(o) for o in outs]
        mod[step.symbol](*args, *touts)
        for name, t in zip(step.outputs, touts, strict=True):
            env[name] = t.numpy()
    return [env[v.name] for v in graph.outputs]


def test_build_library_matches_interpreter(tmp_path):
    from targets.tvm_codegen import build_library, host_cpu

    g = _graph()
    messages = []
    lib = build_library(g, host_cpu(), tmp_path, progress=messages.append)
    assert lib.lib_path == tmp_path / "kernels.so" and lib.lib_path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kernels-")]
    # one step per non-const node, in graph order
    assert [s.op for s in lib.steps] == [n.op for n in g.nodes if n.op != "const"]
    # the two identical dense+gelu and dense nodes share kernels
    syms = [s.symbol for s in lib.steps]
    assert syms[0] == syms[4] and syms[1] == syms[5]
    assert syms[0].startswith("k000_dense_gelu")
    assert len(lib.kernels) == len(set(syms)) and set(lib.reused) == {syms[0], syms[1]}
    assert all(k.build_seconds >= 0 for k in lib.kernels.values())
    # packed weights replace the graph's weight in the steps; biases and inline consts stay
    d0 = lib.steps[0]
    assert d0.inputs[1] != "w1" and d0.packed == {1: d0.inputs[1]}
    assert lib.weights[d0.inputs[1]].shape == (2, 32, 32)  # [N/nb, K, nb]
    assert d0.inputs[2] == "b1" and "b1" in lib.weights
    assert lib.steps[6].inputs[1] == "two" and lib.weights["two"].shape == ()
    assert "w1" not in lib.weights  # only the packed form is read
    assert messages

    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 8, 32)).astype(np.float32),
             "e": np.zeros((0, 4), np.float32)}
    got = run_library(g, lib, feeds)
    want = interpret(g, feeds)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_missing_kernels_are_listed_together(tmp_path):
    from compiler.ir.ops._util import same_type
    from compiler.ir.registry import OpDef, has_op, register_op
    from targets.tvm_codegen import CodegenError, build_library, host_cpu

    if not has_op("test_no_kernel"):
        register_op(OpDef("test_no_kernel", (1, 1), {}, same_type, lambda xs, a: [xs[0]]))
    g = parse("""
graph @g(%x: f32[4]) -> (f32[4]) {
  %0 = test_no_kernel(%x) : f32[4]
  %1 = relu(%0) : f32[4]
  %2 = test_no_kernel(%1) : f32[4]
  return %2
}
""")
    with pytest.raises(CodegenError) as err:
        build_library(g, host_cpu(), tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, NpuccError)
    assert "2 node(s)" in msg and "%0" in msg and "%2" in msg and "relu" in msg
