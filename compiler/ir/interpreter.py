"""The reference interpreter: runs any graph with the ops' numpy implementations.

It is the numeric oracle for passes and for codegen. Inputs are checked by name, shape
and dtype (errors name the input and what was expected).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from compiler.errors import InputError, NpuccError, OpError
from compiler.ir.graph import Graph, Node
from compiler.ir.registry import get_op

__all__ = ["interpret", "check_inputs"]


def check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray] | np.ndarray | list,
                 ) -> dict[str, np.ndarray]:
    """Map user inputs onto graph inputs; a single array (or list) binds positionally."""
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    if isinstance(inputs, list | tuple):
        if len(inputs) != len(graph.inputs):
            raise InputError(f"the graph takes {len(graph.inputs)} input(s) "
                             f"({', '.join(v.name for v in graph.inputs)}), got {len(inputs)}")
        inputs = {v.name: a for v, a in zip(graph.inputs, inputs, strict=True)}
    expected = {v.name: v.type for v in graph.inputs}
    unknown = [k for k in inputs if k not in expected]
    missing = [k for k in expected if k not in inputs]
    if unknown or missing:
        raise InputError("inputs do not match: "
                         + (f"unknown {', '.join(unknown)}; " if unknown else "")
                         + (f"missing {', '.join(missing)}; " if missing else "")
                         + "expected " + ", ".join(f"{k}: {t}" for k, t in expected.items()))
    out = {}
    for name, ty in expected.items():
        arr = np.asarray(inputs[name])
        if tuple(arr.shape) != ty.shape:
            raise InputError(f"input {name!r} has shape {list(arr.shape)}, expected "
                             f"{list(ty.shape)} ({ty})")
        if arr.dtype != ty.np_dtype:
            raise InputError(f"input {name!r} has dtype {arr.dtype}, expected {ty.np_dtype} ({ty})")
        out[name] = arr
    return out


def run_node(graph: Graph, node: Node, args: list[np.ndarray]) -> list[np.ndarray]:
    """Run one node with the reference implementation; results cast to the declared types."""
    if node.op == "const":
        arr = graph.const_value(node.output)
        if arr is None:
            raise OpError(f"{node.label}: weight {node.attrs['ref']!r} is not loaded")
        return [arr]
    opdef = get_op(node.op)
    results = opdef.reference(args, node.attrs)
    out = []
    for v, r in zip(node.outputs, results, strict=True):
        r = np.asarray(r)
        if r.dtype != v.type.np_dtype:
            r = r.astype(v.type.np_dtype)
        if tuple(r.shape) != v.type.shape:
            raise OpError(f"{node.label}: reference produced shape {list(r.shape)}, "
                          f"declared {v.type}")
        out.append(r)
    return out


def interpret(graph: Graph, inputs: Mapping[str, np.ndarray] | np.ndarray | list,
              *, observe: Callable[[Node, list[np.ndarray]], None] | None = None,
              keep: bool = False) -> list[np.ndarray]:
    """Run ``graph`` on ``inputs``; returns the outputs in graph order.

    ``observe(node, results)`` is called after every node (calibration and per-layer
    error reports hook in here). Intermediate arrays are freed after their last use unless
    ``keep`` is set.
    """
    env: dict[int, np.ndarray] = {}
    for name, arr in check_inputs(graph, inputs).items():
        v = next(v for v in graph.inputs if v.name == name)
        env[id(v)] = arr
    last_use: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last_use[id(v)] = i
    pinned = {id(v) for v in graph.outputs}
    for i, node in enumerate(graph.nodes):
        try:
            args = [env[id(v)] for v in node.inputs]
        except KeyError:
            raise OpError(f"{node.label}: an operand is not computed yet "
                          "(the graph is not in topological order; run verify)") from None
        try:
            with np.errstate(all="ignore"):
                results = run_node(graph, node, args)
        except NpuccError:
            raise
        except Exception as e:  # a reference implementation failing is reported per node
            raise OpError(f"{node.label}: reference implementation failed: "
                          f"{type(e).__name__}: {e}") from e
        for v, r in zip(node.outputs, results, strict=True):
            env[id(v)] = r
        if observe is not None:
            observe(node, results)
        if not keep:
            for v in node.inputs:
                if last_use.get(id(v)) == i and id(v) not in pinned:
                    env.pop(id(v), None)
    return [env[id(v)] for v in graph.outputs]
