"""Shapes past int32 indexing or the memory budget are refused before codegen with an
NpuccError naming the value (issue 12, point 6), not a raw TVM error deep in codegen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from onnx import TensorProto as T
from onnx import helper as h

REPO = Path(__file__).resolve().parents[1]


def _relu(shape):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, shape)],
                     [h.make_tensor_value_info("y", T.FLOAT, shape)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_int32_index_limit():
    from compiler import compile as compile_model
    from compiler.errors import NpuccError

    with pytest.raises(NpuccError, match=r"%x: f32\[1000000,1000000\] has 1000000000000 "
                                         r"elements > 2147483647"):
        compile_model(_relu([10**6, 10**6]), "host", progress=False)
    with pytest.raises(NpuccError, match=r"dimension 3000000000 > 2147483647"):
        compile_model(_relu([3 * 10**9]), "host", progress=False)


def test_tensor_over_the_budget(tmp_path):
    from compiler import compile as compile_model
    from compiler.errors import NpuccError

    toml = re.sub(r"(?m)^budget_mb = .*$", "budget_mb = 1",
                  (REPO / "targets" / "host.toml").read_text())
    (tmp_path / "small.toml").write_text(toml)
    with pytest.raises(NpuccError, match=r"%x: f32\[1,1000000\] needs 4000000 bytes, over "
                                         r"the memory budget of 1048576 bytes"):
        compile_model(_relu([1, 10**6]), str(tmp_path / "small.toml"), progress=False)
