"""The IR core: building, printing, parsing, verification errors, files."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import NpuccError, ParseError, VerificationError
from compiler.ir import Graph, TensorType, interpret, load, parse, save, verify
from compiler.ir.graph import Node, Value


def small_graph() -> Graph:
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 3), "f32"))
    w = g.add_weight("w.1", np.arange(6, dtype=np.float32).reshape(2, 3))
    c = g.add_const(np.array([1.5, -2], np.float32).reshape(2, 1))
    y = g.add("add", x, w, name="add1")
    z = g.add("mul", y, c)
    g.outputs = [g.add("clip", g.add("relu", z), max=6.0)]
    return g


def test_print_parse_roundtrip_and_interpret():
    g = small_graph()
    verify(g)
    text = str(g)
    assert 'const "w.1" : f32[2,3]' in text
    assert "clip(%3) {max=6.0}" in text  # defaults are not printed
    g2 = parse(text, g.weights)
    assert str(g2) == text
    verify(g2)
    x = np.ones((2, 3), np.float32)
    (a,) = interpret(g, {"x": x})
    (b,) = interpret(g2, {"x": x})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, np.clip(np.maximum((x + g.weights["w.1"]) *
                                                     np.array([[1.5], [-2]]), 0), None, 6))


def test_save_load(tmp_path):
    g = small_graph()
    p = save(g, tmp_path / "m.ir")
    assert (tmp_path / "m.safetensors").exists()
    g2 = load(p)
    assert str(g2) == str(g)
    np.testing.assert_array_equal(g2.weights["w.1"], g.weights["w.1"])


def test_odd_names_roundtrip():
    g = Graph("odd name")
    x = g.add_input("input:0", TensorType((1,), "f32"))
    y = g.make_node("relu", [x], name="/layer.0/Relu", out_names=["onnx::Relu 1"]).output
    g.outputs = [y]
    text = str(g)
    assert str(parse(text)) == text


@pytest.mark.parametrize("text, where, what", [
    ("graph @t(%x: f32[2]) -> (f32[2]) {\n  %0 = relu(%x : f32[2]\n  return %0\n}", "2:16",
     "expected"),
    ("graph @t(%x: f32[2]) -> (f32[2]) {\n  %0 = relux(%x) : f32[2]\n  return %0\n}", "2:8",
     "unknown op 'relux'"),
    ("graph @t(%x: f32[2]) -> (f32[2]) {\n  %0 = relu(%y) : f32[2]\n  return %0\n}", "2:13",
     "%y is used before it is defined"),
    ("graph @t(%x: f32[2]) -> (f32[2]) {\n  %0 = clip(%x) {max=\"a\"} : f32[2]\n  return %0\n}",
     "2:8", "should be of kind float"),
    ("graph @t(%x: f32[2]) -> (f32[2]) {\n  %0 = relu(%x) : f32[2]\n", "3:1", "end of input"),
    ("graph @t(%x: q32[2]) -> (f32[2]) {\n  return %x\n}", "1:14", "expected"),
])
def test_parse_errors_name_line_and_column(text, where, what):
    with pytest.raises(ParseError) as e:
        parse(text)
    assert f":{where}:" in str(e.value)
    assert what in str(e.value)


def _g(nodes_text: str) -> Graph:
    return parse("graph @t(%x: f32[2]) -> (f32[2]) {\n" + nodes_text + "}\n")


def test_verify_type_mismatch_names_node():
    g = _g("  %0 = relu(%x) : f32[3]\n  return %x\n")
    with pytest.raises(VerificationError, match=r"relu %0: result 0 is declared f32\[3\]"):
        verify(g)


def test_verify_use_before_def_cycle_dangling_and_bad_attr():
    g = Graph("t")
    x = g.add_input("x", TensorType((2,), "f32"))
    a = g.add("relu", x)
    b = g.add("neg", a)
    g.outputs = [b]
    # use before definition: swap the two nodes
    g.nodes.reverse()
    with pytest.raises(VerificationError, match="uses %0, which is defined later"):
        verify(g)
    g.nodes.reverse()
    # cycle: make relu read neg's output
    g.nodes[0].set_input(0, b)
    with pytest.raises(VerificationError, match="cycle"):
        verify(g)
    g.nodes[0].set_input(0, x)
    # dangling output
    g.outputs = [Value("ghost", TensorType((2,), "f32"))]
    with pytest.raises(VerificationError, match="dangling"):
        verify(g)
    g.outputs = [b]
    # wrong attribute
    g.nodes[1].attrs["alpha"] = 1.0
    with pytest.raises(VerificationError, match="neg %1: neg: unknown attribute"):
        verify(g)


def test_verify_lists_every_problem():
    g = _g("  %0 = relu(%x) : f32[3]\n  %1 = neg(%x) : i32[2]\n  return %x\n")
    with pytest.raises(VerificationError) as e:
        verify(g)
    assert len(e.value.problems) == 2


def test_errors_are_ours():
    assert issubclass(ParseError, NpuccError)
    with pytest.raises(NpuccError):
        Node("relu", [], [], {})  # fine to build; verification catches it
        g = Graph()
        g.make_node("relu", [])
