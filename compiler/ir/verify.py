"""Graph verification: structure, then types. Every problem names the node at fault.

Checks, in order: cycles, use before definition, values defined twice, dangling outputs
(a returned value no node or input defines), unknown ops, operand counts, attributes
against the op's schema, declared result types against the op's type inference, and
weights referenced by ``const`` nodes against their arrays.
"""

from __future__ import annotations

from collections.abc import Callable

from compiler.errors import NpuccError, OpError, VerificationError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from runtime.bulk import bulk_work

__all__ = ["verify", "verify_node", "node_signature"]


def _find_cycle(graph: Graph) -> list[Node] | None:
    state: dict[int, int] = {}  # 1 = on stack, 2 = done
    in_graph = {id(n) for n in graph.nodes}
    for root in graph.nodes:
        if id(root) in state:
            continue
        stack: list[tuple[Node, int]] = [(root, 0)]
        path: list[Node] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[id(node)] = 1
                path.append(node)
            preds = [v.producer for v in node.inputs if v.producer is not None
                     and id(v.producer) in in_graph]
            if i < len(preds):
                stack.append((node, i + 1))
                p = preds[i]
                s = state.get(id(p))
                if s == 1:
                    return path[path.index(p):]
                if s is None:
                    stack.append((p, 0))
            else:
                state[id(node)] = 2
                path.pop()
    return None


def verify_node(graph: Graph, node: Node) -> None:
    """Check one node's op, arity, attributes and declared types; raises OpError."""
    opdef = get_op(node.op)  # an unknown op raises, listing the known ops
    opdef.check_arity(len(node.inputs))
    normalized = opdef.normalize_attrs(node.attrs)
    if normalized.keys() != node.attrs.keys():
        missing = sorted(set(normalized) - set(node.attrs))
        raise OpError(f"attributes not normalised (missing {', '.join(missing)})")
    if node.op == "const":
        (out,) = node.outputs
        arr = graph.const_value(out)
        if node.attrs["ref"] and node.attrs["ref"] not in graph.weights:
            if graph.weights:  # a graph parsed without its weights file has none at all
                raise OpError(f"weight {node.attrs['ref']!r} is missing")
            return
        if arr is not None and TensorType.of(arr) != out.type:
            raise OpError(f"constant is {TensorType.of(arr)} but declared {out.type}")
        return
    inferred = opdef.infer([v.type for v in node.inputs], node.attrs)
    declared = [v.type for v in node.outputs]
    if len(inferred) != len(declared):
        raise OpError(f"has {len(declared)} result(s), the op produces {len(inferred)}")
    for i, (d, t) in enumerate(zip(declared, inferred, strict=True)):
        if d != t:
            raise OpError(f"result {i} is declared {d} but the op infers {t}")


def node_signature(graph: Graph, node: Node) -> tuple:
    """What the per-node checks of ``node`` depend on, by identity: op, attribute values,
    operands and their types, result types, and a const's weight array. Equal signatures
    before and after a pass mean the pass did not touch the node (attribute values are
    replaced, not mutated in place, by the passes). One flat tuple, the groups separated by
    None (computed for every node after every pass: nested tuples cost twice as much)."""
    attrs, inputs = node.attrs, node.inputs
    weight = graph.weights.get(attrs.get("ref") or "") if node.op == "const" else None
    return (node.op, id(weight), *map(id, attrs.values()), None, *inputs, None,
            *[v.type for v in inputs], None, *[v.type for v in node.outputs])


def verify(graph: Graph, recheck: Callable[[Node], bool] | None = None) -> None:
    """Raise VerificationError listing every problem found (each names its node).

    ``recheck``: when given, only nodes it accepts get the per-node checks (op, attributes,
    type inference, weights); the structure (order, definitions, outputs) is always checked
    whole. The pass manager passes the nodes a pass created or changed."""
    with bulk_work():
        _verify(graph, recheck)


def _verify(graph: Graph, recheck: Callable[[Node], bool] | None) -> None:
    problems: list[str] = []
    out_of_order = False   # a cycle shows as a use before definition: searched only then
    defined: set[Value] = set(graph.inputs)   # Values hash by identity
    names: set[str] = set()
    for v in graph.inputs:
        if v.name in names:
            problems.append(f"input %{v.name} is defined twice")
        names.add(v.name)
    for node in graph.nodes:
        for v in node.inputs:
            if v not in defined:
                out_of_order |= v.producer is not None
                where = "is never defined" if v.producer is None else \
                    f"is defined later, by {v.producer.label}"
                problems.append(f"{node.label}: uses %{v.name}, which {where}")
        for v in node.outputs:
            if v.producer is not node:
                problems.append(f"{node.label}: result %{v.name} names another producer")
            if v.name in names:
                problems.append(f"{node.label}: redefines %{v.name}")
            names.add(v.name)
            defined.add(v)
        if recheck is not None and not recheck(node):
            continue
        try:
            verify_node(graph, node)
        except NpuccError as e:
            problems.append(f"{node.label}: {e}")
    cycle = _find_cycle(graph) if out_of_order else None
    if cycle:
        raise VerificationError("cycle: " + " -> ".join(n.label for n in cycle + cycle[:1]))
    for i, v in enumerate(graph.outputs):
        if v not in defined:
            problems.append(f"output {i} (%{v.name}) is dangling: no node or input defines it")
    if not graph.outputs:
        problems.append("the graph returns nothing")
    if problems:
        raise VerificationError(problems)
