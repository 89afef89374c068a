"""``to-nhwc``: NCHW convolutions and pools become NHWC; transposes move to the edges.

1. Convert: every NCHW conv2d / max_pool2d / avg_pool2d / global pool becomes NHWC between an
   entry transpose (NCHW→NHWC) and an exit transpose (NHWC→NCHW); conv weights are
   transposed at compile time to ``kernel_layout``. ``lrn`` (channels on axis 1 only) is
   decomposed into NHWC-friendly ops: x * (bias + alpha * mean_window(x²))^-beta, the
   window mean being an NHWC avg_pool2d over a [N, H*W, C, 1] view (channels as width).
2. Push: a transpose feeding a layout-agnostic op moves below it (elementwise ops, n-ary
   broadcasting ops whose other operands are transposed the same way or constants, concat,
   softmax / batch_norm / reductions / pad with their axes remapped).
3. Cancel: transpose(transpose(x, p), q) is one transpose, or x when p∘q is the identity.
4. Clean up: a transpose moving only size-1 dimensions (an NHWC global pool's exit) is a
   reshape and merges with a following reshape/flatten.

After: between two NHWC convs there is no transpose unless an op that cannot change layout
sits between them; ``stats["transposes_left"]`` says how many remain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from compiler.errors import PipelineError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op, ops_with
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._rewrite import (
    compose_perm,
    const_array,
    erase_dead,
    inverse_perm,
    is_identity_perm,
    new_const,
    tag,
)
from passes.canonicalize import SimplifyReshapes

__all__ = ["ToNHWC", "TO_NHWC", "TO_NCHW"]

TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]
# op categories come from the registry's traits (compiler/ir/ops/traits.py)
_POOLS = tuple(sorted(ops_with("pool")))
_BROADCAST = ops_with("broadcast")
_UNARY = frozenset({"cast"}) | ops_with("view") - {"reshape"}
_AXIS_OPS = ops_with("axis")
_REDUCE = frozenset(o for o in ops_with("reduction") if "axes" in get_op(o).attrs)
RULE = "to-nhwc"


def _perm_of(v: Value) -> list[int] | None:
    n = v.producer
    return list(n.attrs["perm"]) if n is not None and n.op == "transpose" else None


def _transpose(graph: Graph, x: Value, perm: list[int], before: Node) -> Value:
    return graph.add("transpose", x, perm=perm, name=RULE, before=before)


def _replace(graph: Graph, node: Node, inputs: list[Value], attrs: dict[str, Any],
             out_perm: list[int] | None, op: str | None = None) -> Node:
    """``node`` recomputed from ``inputs`` (before it), its result transposed by ``out_perm``."""
    new = graph.make_node(op or node.op, inputs, attrs, name=tag(node, RULE), before=node,
                          device=node.device)
    out = new.output
    if out_perm is not None and not is_identity_perm(out_perm):
        out = _transpose(graph, out, out_perm, node)
    graph.replace_all_uses(node.output, out)
    erase_dead(graph, [node])
    return new


# -- 1. convert --------------------------------------------------------------------------
def _kernel(graph: Graph, w: Value, src: str, dst: str, before: Node,
            cache: dict[tuple[int, str], Value]) -> Value:
    """``w`` in layout ``dst``; computed once per weight (placed first in the graph)."""
    key = (id(w), src)
    if key in cache:
        return cache[key]
    perm = [src.index(c) for c in dst]
    arr = const_array(graph, w)
    if arr is None:  # weights not loaded: keep it correct, fold-constants finishes the job
        out = graph.add("transpose", w, perm=perm, name=RULE, before=before)
    else:
        ref = w.producer.attrs.get("ref") if w.producer is not None else None
        out = new_const(graph, np.ascontiguousarray(arr.transpose(perm)),
                        name=f"{ref or w.name}.{dst.lower()}", before=graph.nodes[0])
    cache[key] = out
    return out


def _convert(graph: Graph, node: Node, kernel_layout: str,
             cache: dict[tuple[int, str], Value]) -> None:
    x = node.inputs[0]
    inputs = [_transpose(graph, x, TO_NHWC, node)] + list(node.inputs[1:])
    attrs = dict(node.attrs, layout="NHWC")
    if node.op == "conv2d":
        inputs[1] = _kernel(graph, node.inputs[1], node.attrs["kernel_layout"], kernel_layout,
                            node, cache)
        attrs["kernel_layout"] = kernel_layout
    _replace(graph, node, inputs, attrs, TO_NCHW)


def _decompose_lrn(graph: Graph, node: Node) -> None:
    x = node.inputs[0]
    n, c, h, w = x.shape
    size, a = node.attrs["size"], node.attrs
    lo = (size - 1) // 2
    dt = x.type.np_dtype
    name = tag(node, RULE)

    def add(op: str, *args: Value, **attrs: Any) -> Value:
        return graph.add(op, *args, name=name, before=node, **attrs)

    def scalar(v: float) -> Value:
        return graph.add_const(np.asarray([v], dt), before=node)

    t = _transpose(graph, x, TO_NHWC, node)
    # the NHWC view [N, H*W, C, 1]: its "width" axis is the channels, pooled over a window
    sq = add("reshape", add("mul", t, t), shape=[n, h * w, c, 1])
    mean = add("avg_pool2d", sq, kernel=[1, size], pads=[0, lo, 0, size - 1 - lo],
               count_include_pad=True, layout="NHWC")
    mean = add("reshape", mean, shape=[n, h, w, c])
    base = add("add", add("mul", mean, scalar(a["alpha"])), scalar(a["bias"]))
    y = add("mul", t, add("pow", base, scalar(-a["beta"])))
    graph.replace_all_uses(node.output, _transpose(graph, y, TO_NCHW, node))
    erase_dead(graph, [node])


# -- 2. push -----------------------------------------------------------------------------
def _push_broadcast(graph: Graph, node: Node) -> bool:
    perms = [_perm_of(v) for v in node.inputs]
    p = next((q for q in perms if q is not None), None)
    if p is None:
        return False
    r, pinv = len(p), inverse_perm(p)
    inputs: list[Value] = []
    for v, q in zip(node.inputs, perms, strict=True):
        if q is not None:
            if q != p:
                return False
            inputs.append(v.producer.inputs[0])
        elif v.type.rank <= r and all(d == 1 for d in v.shape):
            inputs.append(v)
        else:
            arr = const_array(graph, v)
            if arr is None or arr.ndim > r:
                return False
            arr = arr.reshape((1,) * (r - arr.ndim) + arr.shape).transpose(pinv)
            inputs.append(new_const(graph, np.ascontiguousarray(arr),
                                    name=f"{tag(node, RULE)}.const", before=node))
    _replace(graph, node, inputs, dict(node.attrs), p)
    return True


def _push_concat(graph: Graph, node: Node) -> bool:
    perms = [_perm_of(v) for v in node.inputs]
    p = perms[0]
    if p is None or any(q != p for q in perms):
        return False
    axis = p[node.attrs["axis"] % len(p)]
    _replace(graph, node, [v.producer.inputs[0] for v in node.inputs],
             dict(node.attrs, axis=axis), p)
    return True


def _push_unary(graph: Graph, node: Node) -> bool:
    p = _perm_of(node.inputs[0])
    if p is None:
        return False
    r = len(p)
    attrs = dict(node.attrs)
    out_perm: list[int] | None = p
    op = node.op
    if op in _AXIS_OPS:
        attrs["axis"] = p[attrs["axis"] % r]
    elif op == "pad":
        pads = attrs["pads"]
        new = [0] * (2 * r)
        for k in range(r):
            new[p[k]], new[r + p[k]] = pads[k], pads[r + k]
        attrs["pads"] = new
    elif op in _REDUCE:
        axes = [a % r for a in attrs["axes"]] or list(range(r))
        attrs["axes"] = sorted(p[a] for a in axes)
        if not attrs["keepdims"]:
            kept = [k for k in range(r) if k not in axes]
            rem = sorted(p[k] for k in kept)
            out_perm = [rem.index(p[k]) for k in kept]
    elif not ((get_op(op).elementwise and len(node.inputs) == 1
               and not any("axis" in k or "axes" in k for k in attrs)) or op in _UNARY):
        return False  # an op whose attributes name axes would need them remapped
    _replace(graph, node, [node.inputs[0].producer.inputs[0]] + list(node.inputs[1:]), attrs,
             out_perm)
    return True


def _cancel(graph: Graph, node: Node) -> bool:
    perm = list(node.attrs["perm"])
    inner = node.inputs[0].producer
    if is_identity_perm(perm):
        graph.replace_all_uses(node.output, node.inputs[0])
    elif inner is not None and inner.op == "transpose":
        p = compose_perm(list(inner.attrs["perm"]), perm)
        if is_identity_perm(p):
            graph.replace_all_uses(node.output, inner.inputs[0])
        else:
            _replace(graph, node, [inner.inputs[0]], {"perm": p}, None)
            return True
    else:
        return False
    erase_dead(graph, [node])
    return True


def _step(graph: Graph, node: Node) -> str | None:
    if len(node.outputs) != 1 or not node.inputs:
        return None
    if node.op == "transpose":
        return "cancelled" if _cancel(graph, node) else None
    if node.op in _BROADCAST:
        ok = _push_broadcast(graph, node)
    elif node.op == "concat":
        ok = _push_concat(graph, node)
    else:
        ok = _push_unary(graph, node)
    return "pushed" if ok else None


# -- the pass ----------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class ToNHWC(Pass):
    """Convert NCHW conv2d / pools to NHWC, push the layout transposes through
    layout-agnostic ops and cancel them (see the module docstring).

    Before: any graph. After: no NCHW conv2d or pool; weights in ``kernel_layout``;
    graph inputs and outputs keep their layout (a transpose at an edge where needed).
    """

    name: ClassVar[str] = "to-nhwc"
    kernel_layout: Literal["OHWI", "HWIO"] = "OHWI"
    decompose_lrn: bool = True
    max_iterations: int = 100

    def __post_init__(self) -> None:
        if self.kernel_layout not in ("OHWI", "HWIO"):

            raise PipelineError(f"to-nhwc: kernel-layout={self.kernel_layout!r} is not "
                                "one of OHWI, HWIO")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {"converted": 0, "pushed": 0, "cancelled": 0}
        kernels: dict[tuple[int, str], Value] = {}
        for node in list(graph.nodes):
            if node.inputs and node.inputs[0].type.rank == 4:
                if node.op in ("conv2d", *_POOLS) and node.attrs.get("layout") == "NCHW":
                    _convert(graph, node, self.kernel_layout, kernels)
                    stats["converted"] += 1
                elif node.op == "lrn" and self.decompose_lrn:
                    _decompose_lrn(graph, node)
                    stats["converted"] += 1
        # every push and cancellation starts at a transpose: none, nothing to move
        converged = not any(n.op == "transpose" for n in graph.nodes)
        for _ in range(0 if converged else self.max_iterations):
            changed = False
            for node in list(graph.nodes):
                if node.outputs and not any(v.uses or v in graph.outputs
                                            for v in node.outputs):
                    continue  # erased already, or dead
                what = _step(graph, node)
                if what:
                    stats[what] += 1
                    changed = True
            if not changed:
                converged = True
                break
        if not converged:
            ctx.remark(f"to-nhwc: transposes still moving after {self.max_iterations} rounds")
        SimplifyReshapes().run(graph, ctx)
        stats["transposes_left"] = len(graph.find("transpose"))
        stats["converged"] = converged
        return PassResult(graph, stats["converted"] + stats["pushed"] + stats["cancelled"] > 0,
                          stats)
