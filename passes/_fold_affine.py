"""Per-channel affine maps (x * s + t) folded into the conv2d / dense that produces x.

Used by ``fold-batchnorm``: a batch_norm with constant statistics is such a map, and so is a
``mul``/``add``/``sub``/``div`` by a constant that varies along the output channels only
(the explicit scale-and-shift some exporters write after a BN).
"""

from __future__ import annotations

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.types import is_float
from passes._rewrite import const_array, erase_dead, new_const, only_user, replace_node, tag

__all__ = ["AFFINE_OPS", "bn_affine", "fold_affine", "bn_to_mul_add", "elementwise_affine"]

AFFINE_OPS = frozenset({"mul", "add", "sub", "div"})   # what elementwise_affine folds

RULE = "fold-batchnorm"
_KERNEL_OUT_AXIS = {"OIHW": 0, "OHWI": 0, "HWIO": 3}
_CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}


def bn_affine(graph: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with batch_norm(x) == x * s + t along the channel axis, in float64."""
    arrs = [const_array(graph, v) for v in bn.inputs[1:]]
    if any(a is None for a in arrs):
        return None
    scale, bias, mean, var = (np.asarray(a, np.float64) for a in arrs)
    s = scale / np.sqrt(var + bn.attrs["epsilon"])
    return s, bias - mean * s


def _channel_axis(producer: Node, x: Value) -> int:
    if producer.op == "conv2d":
        return _CHANNEL_AXIS[producer.attrs["layout"]]
    return len(x.shape) - 1


def _foldable_producer(graph: Graph, x: Value, reader: Node) -> Node | None:
    """The conv2d/dense computing ``x`` if ``reader`` may fold into it."""
    p = x.producer
    if p is None or p.op not in ("conv2d", "dense") or p.attrs["activation"] != "none":
        return None
    if only_user(graph, x) is not reader or not is_float(x.dtype):
        return None
    return p


def fold_affine(graph: Graph, node: Node, x: Value, axis: int, s: np.ndarray,
                t: np.ndarray) -> bool:
    """Replace ``node`` (computing x * s + t along ``axis``) by the conv2d/dense producing x
    with scaled weight and shifted bias. False (nothing changed) when that does not apply."""
    conv = _foldable_producer(graph, x, node)
    if conv is None or axis % len(x.shape) != _channel_axis(conv, x):
        return False
    w = const_array(graph, conv.inputs[1])
    b = const_array(graph, conv.inputs[2]) if len(conv.inputs) == 3 else None
    if w is None or (len(conv.inputs) == 3 and b is None):
        return False
    waxis = _KERNEL_OUT_AXIS[conv.attrs["kernel_layout"]] if conv.op == "conv2d" else 0
    shape = [1] * w.ndim
    shape[waxis] = -1
    new_w = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
    b64 = np.zeros_like(s) if b is None else b.astype(np.float64)
    new_b = (b64 * s + t).astype(w.dtype)
    wname = conv.inputs[1].producer.attrs.get("ref") or tag(conv, RULE) + ".weight"
    wv = new_const(graph, new_w, name=wname + ".bn", before=conv)
    bv = new_const(graph, new_b, name=tag(conv, RULE) + ".bias", before=conv)
    replace_node(graph, conv, conv.op, [conv.inputs[0], wv, bv], dict(conv.attrs), rule=RULE,
                 replaces=node, name_from=conv)
    erase_dead(graph, [conv])
    return True


def bn_to_mul_add(graph: Graph, bn: Node, s: np.ndarray, t: np.ndarray) -> None:
    x = bn.inputs[0]
    axis = bn.attrs["axis"] % len(x.shape)
    shape = (len(s),) + (1,) * (len(x.shape) - 1 - axis)
    dt = x.type.np_dtype
    name = tag(bn, RULE)
    sv = new_const(graph, s.reshape(shape).astype(dt), name=name + ".scale", before=bn)
    tv = new_const(graph, t.reshape(shape).astype(dt), name=name + ".shift", before=bn)
    mul = graph.add("mul", x, sv, name=name, before=bn)
    replace_node(graph, bn, "add", [mul, tv], rule=RULE)


def _per_channel(graph: Graph, c: Value, out: Value, axis: int) -> np.ndarray | None:
    """``c`` as a float64 [C] vector if broadcasting it onto ``out`` varies along ``axis``
    only (a scalar counts)."""
    arr = const_array(graph, c)
    if arr is None or arr.ndim > out.type.rank or arr.dtype != out.type.np_dtype:
        return None
    shape = (1,) * (out.type.rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return np.broadcast_to(arr.astype(np.float64).reshape(-1), (out.shape[axis],))


def elementwise_affine(graph: Graph, node: Node) -> tuple[Value, int, np.ndarray, np.ndarray
                                                          ] | None:
    """For ``mul``/``add``/``sub``/``div`` of a conv2d/dense result by a per-channel constant:
    (x, axis, s, t) with node(x) == x * s + t. None otherwise."""
    if node.op not in AFFINE_OPS or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for x, c in ((a, b), (b, a)):
        if node.op in ("sub", "div") and x is not a:
            continue
        p = _foldable_producer(graph, x, node)
        if p is None or x.shape != node.output.shape:
            continue
        axis = _channel_axis(p, x)
        v = _per_channel(graph, c, node.output, axis)
        if v is None:
            continue
        one, zero = np.ones_like(v), np.zeros_like(v)
        s, t = {"mul": (v, zero), "add": (one, v), "sub": (one, -v),
                "div": (1.0 / v, zero)}[node.op]
        if not (np.isfinite(s).all() and np.isfinite(t).all()):
            return None
        return x, axis, s, t
    return None
