"""Mutated IR texts: each is either accepted and verifies, or refused with our own error."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.errors import NpuccError
from compiler.ir import Graph, TensorType, parse, verify


def _seed_texts() -> list[str]:
    g = Graph("seed")
    x = g.add_input("x", TensorType((1, 4), "f32"))
    m = g.add_input("mask", TensorType((1, 4), "bool"))
    c = g.add_const(np.array([0.5, -1.0, 2.0, 1e-7], np.float32))
    a = g.add("add", x, c, name="/layer.0/Add")
    b = g.add("gelu", a, approximate="tanh")
    s = g.add("where", m, b, x)
    k = g.add("cast", s, to="i32")
    g.outputs = [g.add("clip", s, min=-1.0, max=1.0), k]
    return [str(g)]


SEEDS = _seed_texts()
ALPHABET = list("%@{}[](),:=\"-._ \n0123456789abcdefxyz") + ["f32", "i64", "relu", "//",
                                                             "const", "return", "inf", "nan"]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "dup_line",
                                     "swap_lines"]))
        n = len(text)
        i = draw(st.integers(0, max(n - 1, 0)))
        if kind == "delete":
            j = draw(st.integers(i, min(n, i + 8)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(ALPHABET)) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(ALPHABET)) + text[i + 1:]
        elif kind == "truncate":
            text = text[:i]
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if kind == "dup_line":
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutated_ir_is_accepted_or_refused_with_our_error(text):
    try:
        g = parse(text)
        verify(g)
    except NpuccError:
        return
    # accepted: it must print and re-parse identically
    assert str(parse(str(g))) == str(g)
