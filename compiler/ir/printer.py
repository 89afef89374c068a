"""The text form of a graph. ``parse(print_graph(g))`` prints identically.

```
graph @tiny(%x: f32[1,3,32,32]) -> (f32[1,10]) {
  %w0 = const "conv1.weight" : f32[16,3,3,3]
  %0 = conv2d(%x, %w0) {pads=[1,1,1,1], activation="relu"} : f32[1,16,32,32] loc("conv1")
  ...
  return %5
}
```
Attributes equal to their schema default are not printed; the parser fills them in.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node

__all__ = ["print_graph", "format_value_name", "format_attr"]

_BARE = re.compile(r"[A-Za-z0-9_.\-/]+\Z")


def format_value_name(name: str) -> str:
    return "%" + (name if _BARE.match(name) else json.dumps(name))


def _fmt_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    s = repr(float(x))
    return s


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return _fmt_float(float(v))
    return json.dumps(v)


def format_attr(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ",".join(_fmt_scalar(x) for x in v) + "]"
    return _fmt_scalar(v)


def _fmt_array(arr: np.ndarray) -> str:
    flat = arr.reshape(-1)
    if arr.dtype == np.bool_:
        items = ["1" if x else "0" for x in flat]
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype.kind in "iu":
        items = [str(int(x)) for x in flat]
    else:
        # shortest text that reads back to the same value in this dtype
        items = []
        for x in flat:
            xf = float(x)
            if math.isnan(xf) or math.isinf(xf):
                items.append(_fmt_float(xf))
            else:
                items.append(str(x) if arr.dtype.itemsize < 8 else repr(xf))
    return "[" + ", ".join(items) + "]"


def _node_line(node: Node, graph: Graph) -> str:
    from compiler.ir.registry import get_op

    res = ", ".join(format_value_name(v.name) for v in node.outputs)
    types = ", ".join(str(v.type) for v in node.outputs)
    if node.op == "const":
        if node.attrs.get("value") is not None:
            body = _fmt_array(np.asarray(node.attrs["value"]))
        else:
            body = json.dumps(node.attrs["ref"])
        line = f"{res} = const {body} : {types}"
    else:
        ops = ", ".join(format_value_name(v.name) for v in node.inputs)
        opdef = get_op(node.op)
        shown = [(k, v) for k, v in node.attrs.items()
                 if k in opdef.attrs and not opdef.is_default(k, v)]
        attrs = ""
        if shown:
            attrs = " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in shown) + "}"
        line = f"{res} = {node.op}({ops}){attrs} : {types}"
    if node.name:
        line += f" loc({json.dumps(node.name)})"
    if node.device:
        line += f" on {json.dumps(node.device)}"
    return line


def print_graph(graph: Graph) -> str:
    params = ", ".join(f"{format_value_name(v.name)}: {v.type}" for v in graph.inputs)
    rets = ", ".join(str(v.type) for v in graph.outputs)
    name = graph.name if _BARE.match(graph.name) else json.dumps(graph.name)
    lines = [f"graph @{name}({params}) -> ({rets}) {{"]
    lines.extend("  " + _node_line(n, graph) for n in graph.nodes)
    lines.append("  return " + ", ".join(format_value_name(v.name) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
