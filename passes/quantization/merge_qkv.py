"""``lower-quantized`` rule: the query, key and value qdense of one attention become one.

Where an ``attention`` node reads three different f32 results of ``qdense`` nodes that share
the activation (the same value, scale and zero point), attributes and reduction size, whose
weights, biases and weight scales are constants, and that nothing else reads, the three
become one ``qdense`` over the concatenated output channels (weights ``[Nq + Nk + Nv, K]``,
biases and per-channel scales concatenated) and the attention reads that one result three
times at column offsets ``0, Nq, Nq + Nk`` (added to its own ``*_offset``). One kernel call
instead of three: wider N for the micro-kernel's parallel split, two launches fewer per layer.
The values are unchanged (each output channel is computed exactly as before).
"""

from __future__ import annotations

import numpy as np

from compiler.ir.graph import Graph, Node
from passes._rewrite import erase_dead, is_output

__all__ = ["merge_qkv", "match"]

RULE = "merge-qkv"
_OFFSETS = ("q_offset", "k_offset", "v_offset")


def _same(graph: Graph, a, b) -> bool:
    if a is b:
        return True
    x, y = graph.const_value(a), graph.const_value(b)
    return x is not None and y is not None and np.asarray(x).dtype == np.asarray(y).dtype \
        and np.array_equal(x, y)


def match(graph: Graph, att: Node) -> tuple[list[Node] | None, str]:
    """(the q, k, v qdense nodes, "") or (None, why not)."""
    vals = att.inputs[:3]
    if len({id(v) for v in vals}) != 3:
        return None, "q, k and v are already one value"
    nodes = [v.producer for v in vals]
    if any(n is None or n.op != "qdense" or n.attrs["out_dtype"] != "f32" for n in nodes):
        return None, "not three f32 qdense"
    first = nodes[0]
    for n in nodes:
        if len(n.output.uses) != 1 or is_output(graph, n.output):
            return None, "a qdense result has other readers"
        if len(n.inputs) != 6 or n.attrs != first.attrs or \
                not all(_same(graph, n.inputs[i], first.inputs[i]) for i in (0, 3, 4)):
            return None, "the qdense differ in activation, attributes or quantization"
        if n.inputs[1].shape[1] != first.inputs[1].shape[1] or \
                any(graph.const_value(n.inputs[i]) is None for i in (1, 2, 5)):
            return None, "weights, biases or scales are not constants of one K"
    return nodes, ""


def merge_qkv(graph: Graph, stats: dict[str, int]) -> bool:
    """Apply the rule to every attention of ``graph``; counts ``merge_qkv`` in ``stats``."""
    changed = False
    for att in [*graph.find("attention"), *graph.find("qattention")]:
        nodes, _why = match(graph, att)
        if nodes is None:
            continue
        ws = [graph.const_value(n.inputs[1]) for n in nodes]
        sizes = [w.shape[0] for w in ws]
        scales = [np.broadcast_to(np.asarray(graph.const_value(n.inputs[5]), np.float32),
                                  (w.shape[0],)) for n, w in zip(nodes, ws, strict=True)]
        name = (nodes[0].name or att.name or RULE) + ".qkv"
        first = graph.nodes[0]
        w = graph.add_weight(name + ".weight", np.concatenate(ws, axis=0), before=first)
        b = graph.add_weight(name + ".bias_i32", np.concatenate(
            [np.asarray(graph.const_value(n.inputs[2]), np.int32) for n in nodes]), before=first)
        s = graph.add_weight(name + ".w_scale", np.concatenate(scales), before=first)
        x, xs, xz = nodes[0].inputs[0], nodes[0].inputs[3], nodes[0].inputs[4]
        at = min(nodes, key=graph.nodes.index)
        qkv = graph.make_node("qdense", [x, w, b, xs, xz, s], dict(nodes[0].attrs),
                              name=name, before=at, device=nodes[0].device)
        attrs = dict(att.attrs)
        for key, base in zip(_OFFSETS, np.cumsum([0, *sizes[:-1]]), strict=True):
            attrs[key] = int(attrs[key] + base)
        new = graph.make_node(att.op, [qkv.output] * 3 + list(att.inputs[3:]), attrs,
                              name=att.name, before=att, device=att.device)
        graph.replace_all_uses(att.output, new.output)
        erase_dead(graph, [att])
        stats["merge_qkv"] = stats.get("merge_qkv", 0) + 1
        changed = True
    return changed
