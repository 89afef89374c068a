"""``lower-quantized``'s last rule: residual add -> layer_norm (-> quantize) -> add_layer_norm.

A transformer block ends with ``layer_norm(add(x, residual))`` whose result is both the next
block's residual (f32) and, quantized, the input of the next integer dense. The rule makes
one ``add_layer_norm`` of the pair (the add and the statistics read each row once, in one
kernel) and, where a reader of the result is a ``quantize`` to u8/i8 with constant
parameters per tensor or per channel of the last axis (SmoothQuant's folded divide), gives it
that quantize's result as its second result, so the quantize goes.

Matches only where the add has no other reader and is no graph output, and both addends have
the result's type (no broadcasting). ``match`` returns why a pair does not match.
"""

from __future__ import annotations

import numpy as np

from compiler.ir.graph import Graph, Node
from passes._rewrite import erase_dead, only_user

__all__ = ["fuse_add_layer_norm", "match"]

RULE = "add_layer_norm"


def match(graph: Graph, ln: Node) -> tuple[Node | None, str]:
    """(the add feeding ``ln``, "") or (None, why not)."""
    if ln.op != "layer_norm" or ln.output.dtype != "f32":
        return None, "not an f32 layer_norm"
    add = ln.inputs[0].producer
    if add is None or add.op != "add":
        return None, "its input is not an add"
    if only_user(graph, add.output) is not ln:
        return None, "the add's result has other readers"
    if not all(v.type == add.output.type for v in add.inputs):
        return None, "the add broadcasts"
    return add, ""


def _quantize_reader(graph: Graph, ln: Node) -> Node | None:
    for q in ln.output.users():
        if q.op != "quantize" or q.inputs[0] is not ln.output \
                or q.attrs["dtype"] not in ("u8", "i8"):
            continue
        s, z = graph.const_value(q.inputs[1]), graph.const_value(q.inputs[2])
        if s is None or z is None:
            continue
        rank = ln.output.type.rank
        last = q.attrs["axis"] % max(rank, 1) == rank - 1
        if np.ndim(s) == 0 or (last and np.shape(s) == (ln.output.shape[-1],)):
            return q
    return None


def fuse_add_layer_norm(graph: Graph, stats: dict[str, int]) -> bool:
    """Apply the rule to every layer_norm of ``graph``; counts ``add_layer_norm`` and
    ``quantize_into_norm`` in ``stats``."""
    changed = False
    for ln in [n for n in graph.nodes if n.op == "layer_norm"]:
        add, _why = match(graph, ln)
        if add is None:
            continue
        q = _quantize_reader(graph, ln)
        ins = [*add.inputs, *ln.inputs[1:]]
        if q is not None:
            ins += q.inputs[1:]
        new = graph.make_node("add_layer_norm", ins, dict(ln.attrs), name=ln.name or RULE,
                              before=ln, device=ln.device)
        graph.replace_all_uses(ln.output, new.outputs[0])
        dead = [ln]
        if q is not None:
            graph.replace_all_uses(q.output, new.outputs[1])
            dead.append(q)
            stats["quantize_into_norm"] = stats.get("quantize_into_norm", 0) + 1
        erase_dead(graph, dead)
        stats[RULE] = stats.get(RULE, 0) + 1
        changed = True
    return changed
