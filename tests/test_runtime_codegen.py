"""IR graph -> targets.tvm_codegen.build_library -> runtime.build_package -> save -> load -> run,
checked against the reference interpreter (the path the compile driver takes)."""

from __future__ import annotations

import numpy as np

from compiler.ir.interpreter import interpret
from compiler.ir.parser import parse

ELEMENTWISE = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "gelu", "exp", "clip",
               "neg", "abs", "leaky_relu", "hard_swish", "hard_sigmoid", "cast"}

TEXT = """
graph @two(%x: f32[4,16], %img: f32[1,3,8,8]) -> (f32[4,16], f32[1,8,1,1]) {
  %w1 = const "fc1.weight" : f32[32,16]
  %b1 = const "fc1.bias" : f32[32]
  %w2 = const "fc2.weight" : f32[16,32]
  %wc = const "conv.weight" : f32[8,3,3,3]
  %0 = dense(%x, %w1, %b1) : f32[4,32]
  %1 = relu(%0) : f32[4,32]
  %2 = dense(%1, %w2) : f32[4,16]
  %3 = add(%2, %x) : f32[4,16]
  %4 = sigmoid(%3) : f32[4,16]
  %5 = conv2d(%img, %wc) {pads=[1,1,1,1]} : f32[1,8,8,8]
  %6 = relu(%5) : f32[1,8,8,8]
  %7 = global_avg_pool(%6) : f32[1,8,1,1]
  return %4, %7
}
"""


def _graph():
    rng = np.random.default_rng(0)
    weights = {"fc1.weight": rng.standard_normal((32, 16), dtype=np.float32) * 0.3,
               "fc1.bias": rng.standard_normal(32, dtype=np.float32),
               "fc2.weight": rng.standard_normal((16, 32), dtype=np.float32) * 0.3,
               "conv.weight": rng.standard_normal((8, 3, 3, 3), dtype=np.float32)}
    return parse(TEXT, weights)


def test_graph_through_codegen_and_runtime(tmp_path):
    from runtime import build_package, load
    from targets.tvm_codegen import build_library, host_cpu

    g = _graph()
    cpu = host_cpu()
    lib = build_library(g, cpu, tmp_path / "build")
    values = {v.name: v for n in g.nodes if n.op != "const" for v in (*n.inputs, *n.outputs)}
    values.update({v.name: v for v in g.inputs})
    tensors = [{"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}
               for v in values.values() if v.name not in lib.weights]
    elementwise = [i for i, s in enumerate(lib.steps) if s.op in ELEMENTWISE]
    pkg = build_package({"name": "host", "tvm": cpu.tvm_target, "arch": cpu.arch},
                        [v.name for v in g.inputs], [v.name for v in g.outputs], lib.steps,
                        tensors, lib.weights, lib.lib_path, elementwise)
    mem = pkg.memory
    assert mem["inplace"], "relu/add/sigmoid should run in place"
    assert mem["lower_bound_bytes"] <= mem["arena_bytes"] <= 1.10 * mem["lower_bound_bytes"]
    pkg.save(tmp_path / "two.npkg")

    m = load(tmp_path / "two.npkg")
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 16), dtype=np.float32),
             "img": rng.standard_normal((1, 3, 8, 8), dtype=np.float32)}
    got = m.run(feeds)
    want = interpret(g, feeds)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert m.run([feeds["x"], feeds["img"]])[1].shape == (1, 8, 1, 1)
    s = m.stats()
    used = {a for st in lib.steps for a in st.args if a in lib.weights}
    assert s["weight_bytes"] == sum(lib.weights[a].nbytes for a in used) > 0
    assert s["steps"] == 8


BIG = """
graph @big(%x: f32[64,256]) -> (f32[64,256]) {
  %w1 = const "w1" : f32[256,256]
  %w2 = const "w2" : f32[256,256]
  %0 = dense(%x, %w1) : f32[64,256]
  %1 = relu(%0) : f32[64,256]
  %2 = dense(%1, %w2) : f32[64,256]
  %3 = add(%2, %x) : f32[64,256]
  return %3
}
"""


def test_threads_with_parallel_kernels(tmp_path):
    """Kernels large enough to use TVM's parallel loops, called from two threads at once."""
    import threading

    from runtime import build_package
    from targets.tvm_codegen import build_library, host_cpu

    rng = np.random.default_rng(2)
    g = parse(BIG, {"w1": rng.standard_normal((256, 256), dtype=np.float32) * 0.1,
                    "w2": rng.standard_normal((256, 256), dtype=np.float32) * 0.1})
    cpu = host_cpu()
    lib = build_library(g, cpu, tmp_path)
    values = {v.name: v for n in g.nodes if n.op != "const" for v in (*n.inputs, *n.outputs)}
    tensors = [{"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}
               for v in values.values() if v.name not in lib.weights]
    m = build_package({"name": "host", "tvm": cpu.tvm_target}, ["x"], [g.outputs[0].name],
                      lib.steps, tensors, lib.weights, lib.lib_path,
                      [i for i, s in enumerate(lib.steps) if s.op in ELEMENTWISE]).executor()
    xs = [rng.standard_normal((64, 256), dtype=np.float32) for _ in range(4)]
    want = [interpret(g, {"x": x})[0] for x in xs]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                j = (i + k) % 4
                np.testing.assert_allclose(m(xs[j])[0], want[j], rtol=1e-4, atol=1e-4)
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
