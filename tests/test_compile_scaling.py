"""Compile time linear in graph size: the node list, the fast text path, the memory planner.

``bench/compile_scaling.py`` prints the figures (10k to 1M nodes); these tests pin the pieces
that made it quadratic, and that the fast path builds exactly what lark's parser builds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.compile_scaling import synthetic
from compiler.ir import parse
from compiler.ir.fastparse import NotFast, parse_fast
from compiler.ir.graph import Graph, Node, NodeList, Value
from compiler.ir.printer import print_graph
from compiler.ir.types import TensorType
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from runtime.memory_pool import PlanStep, PlanTensor, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _node(i: int) -> Node:
    return Node("relu", [], [Value(f"v{i}", TensorType((1,), "f32"))])


# -- NodeList behaves as the list it replaces -------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "before", "remove", "index", "get"]),
                          st.integers(0, 1000)), max_size=60))
def test_node_list_matches_a_python_list(ops):
    nl, ref, made = NodeList(), [], 0
    for op, k in ops:
        if op == "append" or (op == "before" and not ref):
            n = _node(made)
            made += 1
            nl.append(n)
            ref.append(n)
        elif op == "before":
            anchor = ref[k % len(ref)]
            n = _node(made)
            made += 1
            nl.insert_before(anchor, n)
            ref.insert(ref.index(anchor), n)
        elif op == "remove" and ref:
            n = ref.pop(k % len(ref))
            nl.remove(n)
            assert n not in nl
        elif op == "index" and ref:
            n = ref[k % len(ref)]
            assert nl.index(n) == ref.index(n)
        elif op == "get" and ref:
            i = k % len(ref)
            assert nl[i] is ref[i] and nl[0] is ref[0] and nl[-1] is ref[-1]
        assert len(nl) == len(ref) and list(nl) == ref
        assert all(n in nl for n in ref)


def test_iteration_survives_removing_the_current_node():
    g = Graph()
    x = g.add_input("x", TensorType((2,), "f32"))
    vals = [x]
    for _ in range(6):
        vals.append(g.add("relu", vals[-1]))
    g.outputs = [vals[-1]]
    seen = []
    for n in g.nodes:
        seen.append(n.output.name)
        if len(seen) == 2:   # drop the node we stand on: bypass it
            g.replace_all_uses(n.output, n.inputs[0])
            g.remove_node(n)
    assert len(seen) == 6 and len(g.nodes) == 5


def test_a_reassigned_node_list_takes_the_nodes_over():
    g = Graph()
    x = g.add_input("x", TensorType((2,), "f32"))
    a = g.add("relu", x)
    b = g.add("neg", x)
    g.outputs = [a, b]
    g.nodes = [b.producer, a.producer]     # a reordering, as toposort and dce do
    assert [n.op for n in g.nodes] == ["neg", "relu"] and len(g.nodes) == 2


# -- the fast text path builds what lark builds -----------------------------------------------
def _graphs() -> list[tuple[str, str, dict]]:
    out = []
    for p in sorted((ROOT / "tests" / "filecheck").glob("*.ir")):
        for i, part in enumerate(p.read_text().split("// -----")):
            text = "\n".join(ln for ln in part.splitlines() if not ln.lstrip().startswith("//"))
            if "graph @" in text:
                out.append((f"{p.stem}-{i}", text, None))
    text, weights = synthetic(300)
    out.append(("synthetic", text, weights))
    return out


@pytest.mark.parametrize("name, text, weights", _graphs(), ids=[g[0] for g in _graphs()])
def test_fast_path_builds_the_same_graph_as_lark(name, text, weights):
    from compiler.ir.parser import parse_with_lark

    want = parse_with_lark(text, weights)
    printed = print_graph(want)
    fast = parse_fast(printed, weights)
    assert print_graph(fast) == printed
    assert [(n.op, n.attrs.keys(), n.name, n.device) for n in fast.nodes] == \
        [(n.op, n.attrs.keys(), n.name, n.device) for n in want.nodes]
    if weights:
        assert fast.weights.keys() == want.weights.keys()


@pytest.mark.parametrize("text, error", [
    # a comment and a quoted name: valid, but lark's business
    ('graph @g(%x: f32[2]) -> (f32[2]) {\n  // hi\n  %0 = relu(%x) : f32[2]\n  return %0\n}\n',
     None),
    ('graph @g(%"x y": f32[2]) -> (f32[2]) {\n  %0 = relu(%"x y") : f32[2]\n  return %0\n}\n',
     None),
    # errors: the fast path gives up, lark reports them with line and column
    ('graph @g(%x: f32[2]) -> (f32[2]) {\n  %0 = relu(%y) : f32[2]\n  return %0\n}\n',
     r"<text>:2:13: %y is used before it is defined"),
    ('graph @g(%x: f32[2]) -> (f32[3]) {\n  %0 = relu(%x) : f32[2]\n  return %0\n}\n',
     r"<text>:1:26: result 0 is declared f32\[3\] but %0 is f32\[2\]"),
    ('graph @g(%x: f32[2]) -> (f32[2]) {\n  %0 = relu(%x) {alpha=1} : f32[2]\n  return %0\n}\n',
     r"<text>:2:8: relu: unknown attribute\(s\) alpha"),
])
def test_what_the_fast_path_does_not_take_goes_to_lark(text, error):
    from compiler.errors import ParseError

    with pytest.raises(NotFast):
        parse_fast(text)
    if error is None:
        g = parse(text)
        assert [n.op for n in g.nodes] == ["relu"] and len(g.inputs) == 1
    else:
        with pytest.raises(ParseError, match=error):
            parse(text)


# -- planning and checking a plan are not quadratic -------------------------------------------
def test_plan_of_a_long_chain_places_each_buffer_once_and_checks_fast():
    n = 20000
    tensors = [PlanTensor("x", 256, "input")]
    steps = []
    for i in range(n):
        src = "x" if i == 0 else f"t{i - 1}"
        tensors.append(PlanTensor(f"t{i}", 256, "output" if i == n - 1 else "intermediate"))
        steps.append(PlanStep((src,), (f"t{i}",)))
    t = time.perf_counter()
    plan = plan_memory(tensors, steps)
    plan.check()
    assert time.perf_counter() - t < 30      # quadratic: 4 x 2e8 overlap tests
    assert plan.arena_bytes == plan.lower_bound_bytes == 512


def _pipeline_seconds(n: int) -> float:
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    desc = load_target("host")
    best = float("inf")
    for _ in range(2):
        text, weights = synthetic(n)
        g = parse(text, weights)
        t = time.perf_counter()
        run_pipeline(g, desc.default_pipeline, ctx=PassContext(target=desc))
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.slow
def test_default_pipeline_grows_linearly():
    """8x the nodes: linear is 8x the time, quadratic 64x; allow 20x for noise."""
    small, big = _pipeline_seconds(2000), _pipeline_seconds(16000)
    assert big / small < 20, (small, big)


def test_synthetic_graph_is_valid_and_computes():
    from compiler.ir.interpreter import interpret

    text, weights = synthetic(130)
    g = parse(text, weights)
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    (y,) = interpret(g, {"x": x})
    assert y.shape == (1, 8) and np.isfinite(y).all()


# -- verification stays whole in what it catches ----------------------------------------------
@register_pass
@dataclass(frozen=True)
class SilentCorrupt(Pass):
    """Declare a wrong result type on the last node, and report no change."""

    name: ClassVar[str] = "test-silent-corrupt"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        v = graph.nodes[-1].outputs[0]
        v.type = TensorType((*v.type.shape, 1), v.type.dtype)
        return PassResult(graph, False)


def test_the_final_verification_catches_a_pass_that_hid_its_change():
    from compiler.errors import VerificationError
    from compiler.pass_manager import run_pipeline

    g = parse("graph @g(%x: f32[2,3]) -> (f32[2,3]) {\n  %0 = relu(%x) : f32[2,3]\n"
              "  %1 = neg(%0) : f32[2,3]\n  return %1\n}\n")
    with pytest.raises(VerificationError, match=r"the pipeline's result: neg %1: result 0 is "
                       r"declared f32\[2,3,1\] but the op infers f32\[2,3\]"):
        run_pipeline(g, "canonicalize,test-silent-corrupt,fuse-dense-act")


# -- the pieces made faster compute what they computed ----------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 2, 3]), max_size=4).map(tuple),
                min_size=1, max_size=3))
def test_broadcast_shapes_agrees_with_numpy(shapes):
    from compiler.errors import OpError
    from compiler.ir.ops._util import broadcast_shapes

    try:
        want = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        with pytest.raises(OpError, match="do not broadcast"):
            broadcast_shapes(*shapes)
    else:
        assert broadcast_shapes(*shapes) == want


def test_simplify_reshapes_reaches_its_fixed_point():
    """A chain the old pass needed several sweeps for: each rewrite makes the next one."""
    from compiler.pass_base import PassContext
    from passes.canonicalize import SimplifyReshapes

    lines = ["graph @g(%x: f32[1,8]) -> (f32[1,8]) {", "  %v0 = relu(%x) : f32[1,8]"]
    for i in range(1, 7):
        shape = "f32[8,1]" if i % 2 else "f32[1,8]"
        lines.append(f"  %v{i} = transpose(%v{i - 1}) {{perm=[1,0]}} : {shape}")
    lines += ["  %y = neg(%v6) : f32[1,8]", "  return %y", "}"]
    g = parse("\n".join(lines) + "\n")
    r = SimplifyReshapes().run(g, PassContext())
    assert r.changed and [n.op for n in g.nodes] == ["relu", "neg"]
    again = SimplifyReshapes().run(g, PassContext())
    assert not again.changed and not again.stats
