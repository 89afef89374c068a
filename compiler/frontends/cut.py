"""Choosing a graph's outputs by name: ``compile(model, outputs=[...])`` on an imported
Graph (torch modules, .ir files). ONNX models are cut before conversion instead
(:func:`compiler.frontends.onnx.cut_outputs`), so nodes past the cut are never imported."""

from __future__ import annotations

from compiler.errors import ImportError_
from compiler.ir.graph import Graph

__all__ = ["select_outputs"]


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
