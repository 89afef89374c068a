"""The ``lower-quantized`` pass: QDQ patterns -> integer ops.

Rules (each counted in the pass stats):

- ``dense`` / ``conv2d`` whose activation operand is ``dequantize(xq)`` (per tensor) and
  whose weight is ``dequantize(const i8)`` (zero point 0) become ``qdense`` / ``qconv2d``
  reading ``xq`` and the i8 weight directly (stored int8 in the package); the float bias
  becomes i32 at scale ``x_scale * w_scale``. ``matmul(dequantize(a), dequantize(b))``
  becomes ``qmatmul``.
- The result: when its only reader is a ``quantize`` to u8/i8 (per tensor, or for
  qdense/qconv2d NHWC per output channel), the integer op produces that quantize's result
  (``out_dtype`` u8/i8) and the quantize goes: requantized in fixed point with the
  activation none/relu/relu6/clip as a clamp, or (any other activation, e.g. gelu, or
  per-channel scales) the f32 result quantized in the epilogue; otherwise ``out_dtype=f32``
  (dequantized in the epilogue).
- ``quantize(dequantize(q, s, z), s, z)`` is ``q``; with other per-tensor parameters it is
  ``requantize``.
- ``quantize(reshape(x))`` / ``quantize(transpose(x))`` become ``reshape(quantize(x))`` first,
  so the op producing ``x`` can requantize in its epilogue.
- ``quantize(mul(x, c), s, z)`` with a per-channel constant ``c`` over the last axis (the
  ``quantize`` pass's SmoothQuant divide) is ``quantize{axis=-1}(x, s / c, z)`` (before the
  integer ops are formed, so a qdense/qconv2d producing x takes it into its epilogue).
- Then (option ``merge-qkv``, on by default): the three f32 qdense an ``attention`` reads as
  query, key and value become one qdense read at column offsets (``merge_qkv.py``).
- Last (option ``fuse-norm``, on by default): ``layer_norm(add(x, r))`` is ``add_layer_norm``,
  which also writes the result of a per-tensor ``quantize`` reading it (``fuse_norm.py``).

After: no dequantize feeds a dense/conv2d/matmul that could be lowered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._rewrite import erase_dead
from passes.quantization.fuse_norm import fuse_add_layer_norm
from passes.quantization.merge_qkv import merge_qkv

__all__ = ["LowerQuantized"]

RULE = "lower-quantized"


def _dq(graph: Graph, v: Value, per_tensor: bool = True) -> Node | None:
    n = v.producer
    if n is None or n.op != "dequantize":
        return None
    s = graph.const_value(n.inputs[1])
    z = graph.const_value(n.inputs[2])
    if s is None or z is None or (per_tensor and np.ndim(s) != 0):
        return None
    return n


def _only_quantize(graph: Graph, v: Value, channels: int = 0) -> Node | None:
    """v's only reader, if it is a quantize to u8/i8 with constant parameters per tensor (or,
    given ``channels``, per channel on v's last axis)."""
    if any(o is v for o in graph.outputs):
        return None
    users = v.users()
    if len(users) != 1 or len(v.uses) != 1:
        return None
    q = users[0]
    if q.op != "quantize" or q.inputs[0] is not v or q.attrs["dtype"] not in ("u8", "i8"):
        return None
    s, z = graph.const_value(q.inputs[1]), graph.const_value(q.inputs[2])
    if s is None or z is None:
        return None
    last = q.attrs["axis"] % max(v.type.rank, 1) == v.type.rank - 1
    if np.ndim(s) != 0 and not (channels and last and np.shape(s) == (channels,)):
        return None
    return q


def _lower(graph: Graph, node: Node, stats: dict[str, int]) -> bool:
    if node.op not in ("dense", "conv2d", "matmul") or node.output.dtype != "f32":
        return False
    x_dq = _dq(graph, node.inputs[0])
    if x_dq is None:
        return False
    if node.op == "matmul":
        b_dq = _dq(graph, node.inputs[1])
        if b_dq is None:
            return False
        ins = [x_dq.inputs[0], b_dq.inputs[0], *x_dq.inputs[1:], *b_dq.inputs[1:]]
        attrs: dict[str, Any] = {}
        channels = 0   # per-tensor result scales only
    else:
        w_dq = _dq(graph, node.inputs[1], per_tensor=False)
        if w_dq is None or w_dq.inputs[0].dtype != "i8" \
                or graph.const_value(w_dq.inputs[0]) is None:
            return False
        if np.any(graph.const_value(w_dq.inputs[2]) != 0):
            return False
        x_scale = np.float32(graph.const_value(x_dq.inputs[1]))
        w_scale = np.asarray(graph.const_value(w_dq.inputs[1]), np.float32)
        n_out = node.output.shape[-1] if node.op == "dense" or \
            node.attrs["layout"] == "NHWC" else node.output.shape[1]
        if len(node.inputs) > 2:
            b = graph.const_value(node.inputs[2])
            if b is None:
                return False
            bias = np.clip(np.rint(np.asarray(b, np.float64)
                                   / (np.float64(x_scale) * w_scale.astype(np.float64))),
                           -(2**31), 2**31 - 1).astype(np.int32)
            bias = np.broadcast_to(bias, (n_out,)).copy()
        else:
            bias = np.zeros(n_out, np.int32)
        name = (node.name or RULE) + ".bias_i32"
        bias_v = graph.add_weight(name, bias, before=graph.nodes[0]) if bias.size > 16 \
            else graph.add_const(bias, before=graph.nodes[0])
        ins = [x_dq.inputs[0], w_dq.inputs[0], bias_v, x_dq.inputs[1], x_dq.inputs[2],
               w_dq.inputs[1]]
        attrs = dict(node.attrs)
        # per-channel result scales on the last axis (the SmoothQuant-folded quantize)
        channels = n_out if node.op == "dense" or node.attrs["layout"] == "NHWC" else 0
    q = _only_quantize(graph, node.output, channels)
    if q is not None:
        ins += [q.inputs[1], q.inputs[2]]
        attrs["out_dtype"] = q.attrs["dtype"]
        replaced = q.output
    else:
        attrs["out_dtype"] = "f32"
        replaced = node.output
    op = {"dense": "qdense", "conv2d": "qconv2d", "matmul": "qmatmul"}[node.op]
    new = graph.make_node(op, ins, attrs, name=node.name or RULE, before=node,
                          device=node.device)
    if replaced is not node.output:
        # the quantize reading node's result sits after it; the new node is before node
        pass
    graph.replace_all_uses(replaced, new.output)
    erase_dead(graph, [q] if q is not None and replaced is q.output else [node])
    erase_dead(graph, [node])
    stats[op] = stats.get(op, 0) + 1
    if attrs["out_dtype"] != "f32":
        stats["requantized"] = stats.get("requantized", 0) + 1
    return True


def _fold_smoothing(graph: Graph, node: Node, stats: dict[str, int]) -> bool:
    """quantize(mul(x, c[K]), s, z) -> quantize{axis=-1}(x, s / c, z) (SmoothQuant's divide)."""
    if node.op != "quantize":
        return False
    m = node.inputs[0].producer
    if m is None or m.op != "mul" or len(m.output.uses) != 1 or \
            any(o is m.output for o in graph.outputs):
        return False
    x, c = m.inputs
    cv = graph.const_value(c)
    s, z = graph.const_value(node.inputs[1]), graph.const_value(node.inputs[2])
    if cv is None or s is None or z is None or np.ndim(s) != 0 or cv.ndim != 1 \
            or x.type.rank < 1 or cv.shape[0] != x.shape[-1] or x.dtype != "f32":
        return False
    k = cv.shape[0]
    first = graph.nodes[0]
    scale = graph.add_const((np.float32(s) / cv.astype(np.float32)).astype(np.float32),
                            before=first)
    zp = graph.add_const(np.full(k, z, z.dtype), before=first)
    new = graph.make_node("quantize", [x, scale, zp], {"axis": -1, "dtype": node.attrs["dtype"]},
                          name=node.name or RULE, before=node)
    graph.replace_all_uses(node.output, new.output)
    erase_dead(graph, [node])
    stats["smoothing_folded"] = stats.get("smoothing_folded", 0) + 1
    return True


_MOVABLE = ("reshape", "transpose")


def _hoist_quantize(graph: Graph, node: Node, stats: dict[str, int]) -> bool:
    """quantize(reshape(x)) -> reshape(quantize(x)) (per tensor; reshape/transpose only move
    elements), so the op producing x can requantize its result in its epilogue."""
    if node.op != "quantize" or np.ndim(graph.const_value(node.inputs[1])) != 0:
        return False
    mv = node.inputs[0].producer
    if mv is None or mv.op not in _MOVABLE or len(mv.output.uses) != 1 \
            or any(o is mv.output for o in graph.outputs):
        return False
    x = mv.inputs[0]
    q = graph.make_node("quantize", [x, *node.inputs[1:]], dict(node.attrs),
                        name=node.name or RULE, before=mv)
    moved = graph.make_node(mv.op, [q.output], dict(mv.attrs), name=mv.name, before=node,
                            device=mv.device)
    graph.replace_all_uses(node.output, moved.output)
    erase_dead(graph, [node])
    stats["quantize_hoisted"] = stats.get("quantize_hoisted", 0) + 1
    return True


def _same(graph: Graph, a: Value, b: Value) -> bool:
    x, y = graph.const_value(a), graph.const_value(b)
    return a is b or (x is not None and y is not None and np.shape(x) == np.shape(y)
                      and np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype)


def _fold_qdq(graph: Graph, node: Node, stats: dict[str, int]) -> bool:
    """quantize(dequantize(q)) -> q (same parameters) or requantize."""
    if node.op != "quantize":
        return False
    dq = node.inputs[0].producer
    if dq is None or dq.op != "dequantize":
        return False
    if _same(graph, dq.inputs[1], node.inputs[1]) and _same(graph, dq.inputs[2], node.inputs[2]) \
            and dq.attrs["axis"] == node.attrs["axis"] \
            and dq.inputs[0].dtype == node.attrs["dtype"]:
        graph.replace_all_uses(node.output, dq.inputs[0])
        erase_dead(graph, [node])
        stats["qdq_removed"] = stats.get("qdq_removed", 0) + 1
        return True
    scales = [graph.const_value(v) for v in (*dq.inputs[1:], *node.inputs[1:])]
    if any(s is None or np.ndim(s) != 0 for s in scales):
        return False
    new = graph.make_node("requantize", [dq.inputs[0], dq.inputs[1], dq.inputs[2],
                                         node.inputs[1], node.inputs[2]],
                          {"dtype": node.attrs["dtype"]}, name=node.name or RULE, before=node)
    graph.replace_all_uses(node.output, new.output)
    erase_dead(graph, [node])
    stats["requantize"] = stats.get("requantize", 0) + 1
    return True


@register_pass
@dataclass(frozen=True)
class LowerQuantized(Pass):
    """Fold dequantize -> dense/conv2d/matmul -> quantize into qdense/qconv2d/qmatmul; remove
    redundant quantize/dequantize pairs (see the module docstring).

    Before: a QDQ graph (the ``quantize`` pass's result). After: integer ops with i8 weights
    and i32 biases; float ops keep their dequantize/quantize edges; with ``merge_qkv``, no
    attention reads three qdense it could read as one; with ``fuse_norm``, no ``layer_norm``
    reads an add it could fuse."""

    name: ClassVar[str] = "lower-quantized"
    merge_qkv: bool = True
    fuse_norm: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        changed = False
        for _ in range(8):  # a quantize may climb several reshapes/transposes
            hoisted = [n for n in list(graph.nodes) if _hoist_quantize(graph, n, stats)]
            changed |= bool(hoisted)
            if not hoisted:
                break
        # smoothing first: the per-channel quantize it leaves may then fold into its producer
        for node in list(graph.nodes):
            if node in graph.nodes and _fold_smoothing(graph, node, stats):
                changed = True
        for node in list(graph.nodes):
            if node in graph.nodes and _lower(graph, node, stats):
                changed = True
        for node in list(graph.nodes):
            if node in graph.nodes and _fold_qdq(graph, node, stats):
                changed = True
        if self.merge_qkv:
            changed |= merge_qkv(graph, stats)
        if self.fuse_norm:
            changed |= fuse_add_layer_norm(graph, stats)
        graph.toposort()
        graph.remove_dead()
        return PassResult(graph, changed, stats)
