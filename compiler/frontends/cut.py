"""Choosing a graph's outputs by name: ``compile(model, outputs=[...])``.

An imported Graph (.ir files) is cut with :func:`select_outputs`; ONNX models
(:func:`compiler.frontends.onnx_model.cut_outputs`) and torch programs (:func:`fx_needed`)
are cut before conversion, so nodes past the cut (post-processing whose shapes depend on
the data, :func:`fx_data_dependent`) are never imported."""

from __future__ import annotations

from typing import Any

from compiler.errors import ImportError_
from compiler.ir.graph import Graph

__all__ = ["select_outputs", "fx_needed", "fx_data_dependent", "data_dependent_error"]


def select_outputs(graph: Graph, names: list[str]) -> Graph:
    """``graph`` returning the values ``names`` (in order); nodes and inputs that none of
    them needs are removed. Unknown names are refused, all at once."""
    by_name = {v.name: v for v in graph.values()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        sample = ", ".join(repr(v.name) for n in graph.nodes[-6:] for v in n.outputs)
        raise ImportError_(f"outputs= names {', '.join(map(repr, unknown))}, which the graph "
                           f"does not define (its last nodes write {sample})")
    if [v.name for v in graph.outputs] == list(names):
        return graph
    graph.outputs = [by_name[n] for n in names]
    graph.remove_dead()
    kept = {id(v) for v in graph.outputs}
    graph.inputs = [v for v in graph.inputs if v.uses or id(v) in kept]
    return graph


def fx_needed(fx_graph: Any, names: list[str]) -> set[str]:
    """The fx nodes (by name) that the nodes ``names`` depend on, themselves included;
    ImportError_ naming unknown ones and the last call nodes."""
    nodes = {n.name: n for n in fx_graph.nodes}
    unknown = [n for n in names if n not in nodes]
    if unknown:
        calls = [n.name for n in fx_graph.nodes if n.op == "call_function"]
        raise ImportError_(f"outputs= names {', '.join(map(repr, unknown))}, which the "
                           f"exported program does not compute (its last nodes: "
                           f"{', '.join(calls[-6:])})")
    needed: set[str] = set()
    todo = [nodes[n] for n in names]
    while todo:
        node = todo.pop()
        if node.name not in needed:
            needed.add(node.name)
            todo.extend(node.all_input_nodes)
    return needed


def fx_data_dependent(node: Any) -> bool:
    """Whether torch.export gave ``node`` a shape (or value) that depends on tensor values:
    an unbacked symbolic size such as ``nonzero``'s row count, or arithmetic on one."""
    val = node.meta.get("val")
    if val is None:
        return False
    vals = val if isinstance(val, list | tuple) else [val]
    for v in vals:
        if hasattr(v, "shape"):
            if any(not isinstance(d, int) for d in v.shape):
                return True
        elif type(v).__name__ in ("SymInt", "SymBool", "SymFloat"):
            return True
    return False


def data_dependent_error(nodes: list[str], inputs: list[str]) -> ImportError_:
    """One error for the nodes of a model whose shapes depend on tensor values."""
    listed = ", ".join(nodes[:6]) + (f" and {len(nodes) - 6} more" if len(nodes) > 6 else "")
    return ImportError_(
        f"{len(nodes)} node(s) have data-dependent output shapes (npucc compiles static shapes "
        f"only): {listed}. Cut the graph before this post-processing: compile(model, "
        f"outputs=[...]) with the values to return instead (the first of these nodes reads "
        f"{', '.join(map(repr, inputs)) or 'constants'}), and run the post-processing on the "
        "results")
