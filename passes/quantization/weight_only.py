"""Weight-only precisions, applied one node at a time by the ``quantize`` pass.

``apply(graph, node, spec, ctx) -> bool`` is the handler ``config.HANDLERS`` names for

- ``"int4"`` / ``"w8"``: ``dense`` (constant 2-D weight) and ``matmul`` with a constant 2-D
  right operand become ``dense_wq{bits=4|8, group_size}`` (see
  :mod:`compiler.ir.ops.quant_weight`), weights rounded to nearest (``spec.method="rtn"``) or
  by GPTQ (``"gptq"``: per-layer Hessians from ``ctx.sample_inputs``, captured once per pass
  and cached in ``ctx.options`` by value name);
- ``"int16"`` (and ``"w8"``): ``gather`` from a constant 2-D table on axis 0 (embeddings)
  becomes ``gather_q`` from an i16 (i8) table with per-row scales ``max|row| / 32767``
  (``/ 127``);
- ``"fp16"``: ``layer_norm``, ``instance_norm`` and ``batch_norm`` with constant parameters
  become ``norm_f16`` (batch norm folded into an f16 scale and shift at compile time).

Anything else returns False (the node stays as it is). The replacing node keeps the node's
name, device and the name of its result value, so a float graph and its quantized version
can be compared value by value (:mod:`passes.quantization.report`). The group size falls
back to the largest power of two (>= 8) dividing K when K is not a multiple of it, or to K.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.ops.quant_weight import pack_int4
from compiler.pass_base import PassContext
from passes.quantization.config import PrecisionSpec
from passes.quantization.gptq import capture_hessians, gptq_quantize, quantize_rtn
from passes.quantization.insert import InsertQuantize, precision_text

__all__ = ["apply", "dense_weight", "effective_group", "quantize_graph", "WEIGHT_ONLY_OPS",
           "HESSIAN_KEY"]

WEIGHT_ONLY_OPS = {"int4": ("dense", "matmul"), "w8": ("dense", "matmul", "gather"),
                   "int16": ("gather",), "fp16": ("layer_norm", "instance_norm", "batch_norm")}
HESSIAN_KEY = "_gptq_hessians"
BITS = {"int4": 4, "w8": 8}


def apply(graph: Graph, node: Node, spec: PrecisionSpec, ctx: Any) -> bool:
    """Rewrite ``node`` to ``spec.precision``; False when it does not apply to this node."""
    if node not in graph.nodes or node.op not in WEIGHT_ONLY_OPS.get(spec.precision, ()):
        return False
    if node.op == "gather":
        return _gather(graph, node, 16 if spec.precision == "int16" else 8)
    if spec.precision in BITS:
        return _dense(graph, node, spec, ctx)
    return _norm(graph, node)


def dense_weight(graph: Graph, node: Node) -> np.ndarray | None:
    """The ``[N, K]`` float weight of a dense / constant-matmul node, else None."""
    if node.op not in ("dense", "matmul") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    arr = graph.const_value(w)
    if arr is None or arr.ndim != 2 or x.dtype != "f32" or w.dtype != "f32" or x.type.rank < 1:
        return None
    if node.op == "matmul":  # x[..., K] @ w[K, N] is dense with w^T
        return np.asarray(arr).T
    return np.asarray(arr)


def effective_group(k: int, group: int, bits: int) -> int | None:
    """The group size used for K inputs (None: int4 needs an even K)."""
    if bits == 4 and k % 2:
        return None
    if k % group == 0:
        return group
    g = 1 << (min(group, k).bit_length() - 1)
    while g >= 8:
        if k % g == 0:
            return g
        g //= 2
    return k


def _dense(graph: Graph, node: Node, spec: PrecisionSpec, ctx: Any) -> bool:
    w = dense_weight(graph, node)
    if w is None:
        return False
    bits = BITS[spec.precision]
    n, k = w.shape
    g = effective_group(k, spec.group_size, bits)
    if g is None:
        return False
    if g != spec.group_size and ctx is not None and hasattr(ctx, "remark"):
        ctx.remark(f"quantize: {node.label}: K={k} is not a multiple of group_size="
                   f"{spec.group_size}; using groups of {g}")
    x = node.inputs[0]
    if spec.method == "gptq":
        H = _hessian(graph, x, ctx)
        q, scales = gptq_quantize(w, H, bits, g)
    else:
        q, scales = quantize_rtn(w, bits, g)
    ref = _ref_name(node.inputs[1])
    suffix = "q4" if bits == 4 else "q8"
    wq = graph.add_weight(f"{ref}.{suffix}", pack_int4(q) if bits == 4 else q, before=node)
    sv = graph.add_weight(f"{ref}.scales", scales, before=node)
    ins = [x, wq, sv]
    attrs: dict[str, Any] = {"bits": bits, "group_size": g}
    if node.op == "dense":
        ins += node.inputs[2:3]
        for key in ("activation", "clip_min", "clip_max"):
            attrs[key] = node.attrs[key]
    new = graph.make_node("dense_wq", ins, attrs, name=node.name, before=node,
                          device=node.device)
    _replace(graph, node, new)
    return True


def _hessian(graph: Graph, x: Value, ctx: Any) -> np.ndarray:
    cache: dict[str, np.ndarray] = ctx.options.setdefault(HESSIAN_KEY, {}) if ctx is not None \
        else {}
    if x.name not in cache:
        samples = getattr(ctx, "sample_inputs", None) if ctx is not None else None
        if not samples:
            raise NpuccError("GPTQ (method='gptq') needs calibration inputs: pass "
                             "compile(..., calibration=[{input: array}, ...]) or use "
                             "method='rtn'")
        wanted = {n.inputs[0].name for n in graph.nodes if dense_weight(graph, n) is not None}
        wanted.add(x.name)
        cache.update(capture_hessians(graph, samples, wanted - set(cache)))
    return cache[x.name]


def _gather(graph: Graph, node: Node, bits: int) -> bool:
    table = graph.const_value(node.inputs[0])
    if table is None or table.ndim != 2 or node.inputs[0].dtype != "f32" \
            or node.attrs["axis"] % 2 != 0:
        return False
    t = np.asarray(table, np.float32)
    amax = np.abs(t).max(axis=1)
    top = 32767 if bits == 16 else 127
    scales = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    q = np.clip(np.rint(t / scales[:, None]), -top, top).astype(np.int16 if bits == 16
                                                                 else np.int8)
    ref = _ref_name(node.inputs[0])
    tq = graph.add_weight(f"{ref}.q{bits}", q, before=node)
    sv = graph.add_weight(f"{ref}.row_scales", scales, before=node)
    new = graph.make_node("gather_q", [tq, sv, node.inputs[1]], {}, name=node.name,
                          before=node, device=node.device)
    _replace(graph, node, new)
    return True


def _norm(graph: Graph, node: Node) -> bool:
    x = node.inputs[0]
    if x.dtype != "f32":
        return False
    params = [graph.const_value(v) for v in node.inputs[1:]]
    if any(p is None for p in params):
        return False
    rank = x.type.rank
    params = [np.asarray(p, np.float64) for p in params]
    if node.op == "layer_norm":
        axis = node.attrs["axis"] % rank
        axes = list(range(axis, rank))
        scale = params[0]
        bias = params[1] if len(params) > 1 else np.zeros_like(scale)
        eps = node.attrs["epsilon"]
    elif node.op == "instance_norm":
        nchw = node.attrs["layout"] == "NCHW"
        axes = list(range(2, rank)) if nchw else list(range(1, rank - 1))
        tail = (1,) * (rank - 2) if nchw else ()
        scale, bias = (p.reshape(p.shape + tail) for p in params)
        eps = node.attrs["epsilon"]
    else:  # batch_norm: fold the statistics into scale and shift
        axis = node.attrs["axis"] % rank
        s, b, mean, var = params
        inv = s / np.sqrt(var + node.attrs["epsilon"])
        tail = (1,) * (rank - 1 - axis)
        scale, bias = (inv.reshape(inv.shape + tail),
                       (b - mean * inv).reshape(inv.shape + tail))
        axes, eps = [], node.attrs["epsilon"]
    ref = _ref_name(node.inputs[1])
    bref = _ref_name(node.inputs[2]) if len(node.inputs) > 2 else f"{ref}.bias"
    sv = graph.add_weight(f"{ref}.f16", scale.astype(np.float16), before=node)
    bv = graph.add_weight(f"{bref}.f16", bias.astype(np.float16), before=node)
    new = graph.make_node("norm_f16", [x, sv, bv], {"axes": axes, "epsilon": float(eps)},
                          name=node.name, before=node, device=node.device)
    _replace(graph, node, new)
    return True


def _ref_name(v: Value) -> str:
    p = v.producer
    return (p.attrs.get("ref") if p is not None and p.op == "const" else None) or v.name


def _replace(graph: Graph, old: Node, new: Node) -> None:
    """``new`` takes ``old``'s place, result name included; constants left unused go."""
    out = old.output
    name = out.name
    inputs = list(old.inputs)
    graph.replace_all_uses(out, new.output)
    graph.remove_node(old)
    new.output.name = name
    for v in inputs:
        p = v.producer
        if p is not None and p.op == "const" and not v.uses and p in graph.nodes \
                and not any(o is v for o in graph.outputs):
            graph.remove_node(p)
            ref = p.attrs.get("ref")
            if ref is not None and not any(n.op == "const" and n.attrs.get("ref") == ref
                                           for n in graph.nodes):
                graph.weights.pop(ref, None)


def quantize_graph(graph: Graph, config: Any, samples: Sequence[Mapping[str, np.ndarray]]
                   | None = None, *, ctx: Any = None) -> Graph:
    """A quantized copy of ``graph`` through the ``quantize`` pass with ``config`` (the
    ``quantize=`` value of ``compile``) and calibration ``samples``."""

    if ctx is None:
        ctx = PassContext(sample_inputs=list(samples) if samples else None)
    return InsertQuantize(precision=precision_text(config)).run(graph.copy(), ctx).graph
