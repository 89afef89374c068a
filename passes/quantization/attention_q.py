"""``quantize`` rule: an ``attention`` whose precision is int8 becomes ``qattention``.

The precision plan (``config.plan_precisions``: the ``quantize=`` preset or mapping) gives
every node a precision; an ``attention`` node planned ``int8`` (the ``"int8"`` preset's
``default``, or a ``{"attention": "int8"}`` / name-pattern entry) is replaced by a
``qattention`` with the same operands, attributes, name and result name
(:mod:`compiler.ir.ops.attention_q`: q, k, v and the softmax weights quantized to 8 bits per
call, from the data; no calibration, so the rule needs no samples). ``{"attention": "float"}``
(or any precision but int8 for it) keeps the f32 ``attention``.

The QDQ graph the ``quantize`` pass leaves then already computes the int8 attention in the
reference interpreter (the quant report measures it as a layer), and ``lower-quantized``'s
``merge-qkv`` rule merges the three qdense a ``qattention`` reads as it does for
``attention``. Counted in the pass stats as ``qattention``.
"""

from __future__ import annotations

from collections.abc import Mapping

from compiler.ir.graph import Graph, Node
from passes.quantization.config import PrecisionSpec

__all__ = ["quantize_attention", "INT8_ATTENTION"]

RULE = "quantize-attention"
INT8_ATTENTION = {"attention": "qattention"}   # float op -> its int8 op


def quantize_attention(graph: Graph, plan: Mapping[Node, PrecisionSpec]) -> int:
    """Replace every attention node ``plan`` makes int8 by its int8 op; returns how many."""
    done = 0
    for node, spec in list(plan.items()):
        if node.op not in INT8_ATTENTION or spec.precision != "int8" \
                or node not in graph.nodes:
            continue
        new = graph.make_node(INT8_ATTENTION[node.op], list(node.inputs), dict(node.attrs),
                              name=node.name or RULE, before=node, device=node.device)
        name = node.output.name
        graph.replace_all_uses(node.output, new.output)
        graph.remove_node(node)
        new.output.name = name      # the quant report matches layers by result name
        done += 1
    return done
