"""Helpers shared by the graph passes: matching predicates and small rewrite steps.

Every mutation goes through the IR API (``Graph.make_node``/``add_weight``/``add_const``/
``replace_all_uses``/``remove_node``). A node a rule creates carries the name of the node it
replaces (so ``loc(...)`` survives a rewrite) or, when that has none, the rule's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node, Value

__all__ = ["is_output", "only_user", "const_array", "is_const", "replace_node", "erase_dead",
           "tag", "inverse_perm", "compose_perm", "is_identity_perm", "new_const"]


def is_output(graph: Graph, value: Value) -> bool:
    return any(o is value for o in graph.outputs)


def only_user(graph: Graph, value: Value) -> Node | None:
    """The single node reading ``value`` (once), if it has exactly one and is no graph output.

    Fusions use this so that they never cross a value something else also reads.
    """
    if len(value.uses) != 1 or is_output(graph, value):
        return None
    return value.uses[0]


def is_const(value: Value) -> bool:
    return value.producer is not None and value.producer.op == "const"


def const_array(graph: Graph, value: Value) -> np.ndarray | None:
    """The array behind a ``const`` value, or None (not a const, or its weight is not loaded)."""
    return graph.const_value(value)


def tag(old: Node | None, rule: str) -> str:
    """The name a node created by ``rule`` while rewriting ``old`` gets."""
    return old.name if old is not None and old.name else rule


def new_const(graph: Graph, array: np.ndarray, *, name: str, before: Node,
              inline_limit: int = 16) -> Value:
    """A constant for ``array``: inline when small, else a weight named after ``name``."""
    array = np.ascontiguousarray(array)
    if array.size <= inline_limit:
        return graph.add_const(array, before=before, inline_limit=inline_limit)
    return graph.add_weight(name, array, before=before)


def replace_node(graph: Graph, old: Node, op: str, inputs: Iterable[Value],
                 attrs: dict[str, Any] | None = None, *, rule: str,
                 replaces: Node | None = None, name_from: Node | None = None) -> Node:
    """Create ``op`` just before ``old``, make ``replaces``' (default ``old``) readers read it,
    and erase the nodes that became dead. The new node is named after ``name_from`` (default
    the replaced node), or ``rule`` when that has no name. Returns the new node."""
    target = replaces if replaces is not None else old
    named = name_from if name_from is not None else target
    node = graph.make_node(op, list(inputs), attrs, name=tag(named, rule), before=old,
                           device=target.device)
    for a, b in zip(target.outputs, node.outputs, strict=True):
        graph.replace_all_uses(a, b)
    erase_dead(graph, [target, old])
    return node


def erase_dead(graph: Graph, nodes: Iterable[Node]) -> int:
    """Remove the given nodes if nothing reads them, then their producers that became dead.

    Weights no ``const`` refers to any more are dropped from the store. Returns how many
    nodes went.
    """
    stack = list(nodes)
    removed = 0
    refs: list[str] = []
    while stack:
        n = stack.pop()
        if n not in graph.nodes:
            continue
        if any(v.uses or is_output(graph, v) for v in n.outputs):
            continue
        producers = [v.producer for v in n.inputs if v.producer is not None]
        if n.op == "const" and n.attrs.get("ref"):
            refs.append(n.attrs["ref"])
        graph.remove_node(n)
        removed += 1
        stack.extend(producers)
    for r in refs:
        if not graph.weight_in_use(r):
            graph.weights.pop(r, None)
    return removed


def inverse_perm(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def compose_perm(first: list[int], second: list[int]) -> list[int]:
    """The perm of ``transpose(transpose(x, first), second)`` as one transpose of x."""
    return [first[j] for j in second]


def is_identity_perm(perm: list[int]) -> bool:
    return all(i == p for i, p in enumerate(perm))
