"""Fusions: MatMul(+Add) and Gemm → ``dense``; conv2d/dense + activation → one node.

Each rule is a pattern (the anchor op), a check that returns why it does not apply (counted
in the pass stats as ``skipped.<reason>``), and a rewrite. No fusion crosses a value that is
read elsewhere: the fused intermediate has exactly one reader and is not a graph output.
Fused nodes keep the name of the node they grew from, else the rule's name.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from compiler.errors import PipelineError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.ops.nn import ACTIVATIONS
from compiler.ir.types import TensorType, is_float
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._rewrite import const_array, erase_dead, is_const, new_const, only_user, replace_node

__all__ = ["FuseMatmulAdd", "FuseGemm", "FuseConvAct", "FuseConvRelu", "FuseDenseAct",
           "Activation", "activation_of", "erf_gelu_tail", "fuse_activation", "check_activations"]

_ALL_ACTS = tuple(a for a in ACTIVATIONS if a != "none")   # the fused-activation attribute
Activation = Literal[_ALL_ACTS]  # type: ignore[valid-type]  (one list: ir/ops/nn.py)
# Fused by default. silu, hard_swish and hard_sigmoid are asked for by name (the host
# pipeline does): an NPU target whose conv takes only these keeps e.g. conv -> hard_swish as
# two nodes it can both run, instead of one conv that falls back to the CPU.
_DEFAULT_ACTS = ("relu", "relu6", "clip", "sigmoid", "gelu", "gelu_tanh")


def _count(stats: dict[str, int], key: str) -> None:
    stats[key] = stats.get(key, 0) + 1


def _hoisted_const(graph: Graph, array: np.ndarray, name: str) -> Value:
    """A constant placed first in the graph, so any node may read it."""
    return new_const(graph, array, name=name, before=graph.nodes[0])


def _weight_name(v: Value, suffix: str) -> str:
    ref = v.producer.attrs.get("ref") if v.producer is not None else None
    return (ref or v.name) + suffix


def _content_key(arr: np.ndarray) -> tuple:
    digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).digest()
    return arr.shape, arr.dtype.str, digest


class _TransposedWeights:
    """``w`` [K, N] → a const [N, K], computed once per weight; when the weight's array is not
    loaded (a graph parsed without weights) a ``transpose`` node is used instead."""

    def __init__(self, graph: Graph, rule: str):
        self.graph, self.rule = graph, rule
        self.cache: dict[int, Value] = {}
        self.by_content: dict[tuple, str] | None = None

    def get(self, w: Value, at: Node, scale: float = 1.0) -> Value | None:
        key = id(w)
        if scale == 1.0 and key in self.cache:
            return self.cache[key]
        arr = const_array(self.graph, w)
        if arr is None:
            if scale != 1.0:
                return None
            out = self.graph.add("transpose", w, perm=[1, 0], name=self.rule, before=at)
        else:
            t = arr.T * np.asarray(scale, arr.dtype) if scale != 1.0 else arr.T
            out = self._existing(t)
            if out is None:
                t = np.ascontiguousarray(t)
                out = _hoisted_const(self.graph, t, _weight_name(w, ".T"))
                ref = out.producer.attrs.get("ref") if out.producer is not None else None
                if ref and self.by_content is not None:
                    self.by_content.setdefault(_content_key(t), ref)
        if scale == 1.0:
            self.cache[key] = out
        return out

    def _existing(self, t: np.ndarray) -> Value | None:
        """A const of a weight equal to ``t`` when the graph has one: a tied embedding that
        the exporter stored again transposed for the output projection (ONNX exports of
        tied LMs) becomes one weight again instead of two copies. Weights are indexed by
        shape, dtype and a digest of their bytes once, so each lookup is O(1)."""
        if self.by_content is None:
            self.by_content = {}
            for ref, arr in self.graph.weights.items():
                if isinstance(arr, np.ndarray):
                    self.by_content.setdefault(_content_key(arr), ref)
        ref = self.by_content.get(_content_key(t))
        arr = self.graph.weights.get(ref) if ref is not None else None
        if arr is None or not np.array_equal(arr, t):
            return None
        return self.graph.make_node("const", [], {"ref": ref}, types=[
            TensorType.of(np.asarray(arr))], before=self.graph.nodes[0]).output


def _as_bias(arr: np.ndarray | None, n: int, out_rank: int) -> np.ndarray | None:
    """``arr`` as a [n] bias if adding it to a [..., n] result only broadcasts along n."""
    if arr is None or arr.ndim > out_rank:
        return None
    if any(d != 1 for d in arr.shape[:-1]) or (arr.ndim and arr.shape[-1] not in (1, n)):
        return None
    return np.ascontiguousarray(np.broadcast_to(arr.reshape(-1), (n,)))


# -- fuse-matmul-add -----------------------------------------------------------------
def _matmul_check(graph: Graph, mm: Node) -> str | None:
    x, w = mm.inputs
    if not is_const(w):
        return "weight_not_constant"
    if w.type.rank != 2:
        return "weight_not_2d"
    if x.dtype != w.dtype:
        return "dtype_mismatch"
    return None


def _bias_add(graph: Graph, mm: Node) -> tuple[Node, np.ndarray] | None:
    """The Add reading only this matmul's result with a constant [N] bias (either order)."""
    user = only_user(graph, mm.output)
    if user is None or user.op != "add":
        return None
    a, b = user.inputs
    other = b if a is mm.output else a
    if other is mm.output:
        return None
    arr = const_array(graph, other)
    if arr is None or arr.dtype != mm.output.type.np_dtype:
        return None
    bias = _as_bias(arr, mm.output.shape[-1], mm.output.type.rank)
    return None if bias is None else (user, bias)


@register_pass
@dataclass(frozen=True)
class FuseMatmulAdd(Pass):
    """``matmul(x, W)`` with W a constant [K, N], and the ``add`` of a constant bias [N] that
    is its only reader (either operand order: ONNX exports write ``Add(bias, MatMul)`` too),
    become ``dense(x, W^T, b)``; W is transposed at compile time. A matmul with a constant
    weight and no such add becomes ``dense(x, W^T)``. Matmuls of two activations stay.
    """

    name: ClassVar[str] = "fuse-matmul-add"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        wts = _TransposedWeights(graph, self.name)
        for mm in graph.find("matmul"):
            reason = _matmul_check(graph, mm)
            if reason:
                _count(stats, f"skipped.{reason}")
                continue
            x, w = mm.inputs
            found = _bias_add(graph, mm)
            wt = wts.get(w, mm)
            if found is None:
                replace_node(graph, mm, "dense", [x, wt], rule=self.name)
                _count(stats, "dense")
                continue
            add, bias = found
            bvalue = add.inputs[0] if add.inputs[1] is mm.output else add.inputs[1]
            if bvalue.shape != bias.shape:  # else read the bias as it is, by reference
                bvalue = _hoisted_const(graph, bias, _weight_name(bvalue, ".bias"))
            # the dense goes where the add was: x, W^T and the bias are all defined by then
            replace_node(graph, add, "dense", [x, wt, bvalue], rule=self.name, name_from=mm)
            erase_dead(graph, [mm])
            _count(stats, "dense_bias")
        return PassResult(graph, bool(stats.get("dense") or stats.get("dense_bias")), stats)


# -- fuse-gemm -----------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class FuseGemm(Pass):
    """``gemm(a, B, c?)`` with B constant becomes ``dense``: trans_b, alpha and beta are
    folded into the weight and bias at compile time, trans_a becomes a transpose of a.
    c must be constant and broadcast along N only (a per-output bias).
    """

    name: ClassVar[str] = "fuse-gemm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        wts = _TransposedWeights(graph, self.name)
        for gemm in graph.find("gemm"):
            reason = self._rewrite(graph, gemm, wts)
            _count(stats, f"skipped.{reason}" if reason else "fused")
        return PassResult(graph, stats.get("fused", 0) > 0, stats)

    def _rewrite(self, graph: Graph, gemm: Node, wts: _TransposedWeights) -> str | None:
        a, b = gemm.inputs[:2]
        at = gemm.attrs
        alpha, beta = at["alpha"], at["beta"]
        if not is_const(b):
            return "weight_not_constant"
        n = gemm.output.shape[1]
        bias = None
        if len(gemm.inputs) == 3 and beta != 0.0:
            carr = const_array(graph, gemm.inputs[2])
            if carr is None:
                return "bias_not_constant"
            bias = _as_bias(carr, n, 2)
            if bias is None:
                return "bias_not_per_column"
        barr = const_array(graph, b)
        if at["trans_b"] and alpha == 1.0:
            w = b
        elif at["trans_b"]:
            if barr is None:
                return "weight_not_loaded"
            w = _hoisted_const(graph, (barr * np.asarray(alpha, barr.dtype)).astype(barr.dtype),
                               _weight_name(b, ".alpha"))
        else:
            w = wts.get(b, gemm, alpha)
            if w is None:
                return "weight_not_loaded"
        x = a
        if at["trans_a"]:
            x = graph.add("transpose", a, perm=[1, 0], name=gemm.name or self.name, before=gemm)
        inputs = [x, w]
        if bias is not None:
            dt = gemm.output.type.np_dtype
            c = gemm.inputs[2]
            if beta == 1.0 and c.shape == bias.shape:
                inputs.append(c)  # by reference
            else:
                scaled = (bias.astype(np.float64) * beta).astype(dt)
                inputs.append(_hoisted_const(graph, scaled, _weight_name(c, ".bias")))
        replace_node(graph, gemm, "dense", inputs, rule=self.name)
        return None


# -- activation fusion ---------------------------------------------------------------
def activation_of(node: Node) -> dict[str, Any] | None:
    """The fused-activation attributes equivalent to ``node``, or None."""
    op = node.op
    if op == "relu":
        return {"activation": "relu"}
    if op == "sigmoid":
        return {"activation": "sigmoid"}
    if op == "hard_swish":
        return {"activation": "hard_swish"}
    if op == "hard_sigmoid":  # torch's hardsigmoid only (alpha 1/6, beta 1/2)
        a, b = node.attrs["alpha"], node.attrs["beta"]
        if math.isclose(a, 1.0 / 6.0, rel_tol=1e-6) and math.isclose(b, 0.5, rel_tol=1e-6):
            return {"activation": "hard_sigmoid"}
        return None
    if op == "gelu":
        return {"activation": "gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu"}
    if op == "clip":
        lo, hi = node.attrs["min"], node.attrs["max"]
        if lo == 0.0 and hi == 6.0:
            return {"activation": "relu6"}
        if lo == 0.0 and hi == math.inf:
            return {"activation": "relu"}
        return {"activation": "clip", "clip_min": lo, "clip_max": hi}
    return None


def _scalar(graph: Graph, v: Value, target: float) -> bool:
    arr = const_array(graph, v)
    return arr is not None and arr.size == 1 and bool(np.isclose(float(arr.reshape(-1)[0]),
                                                                 target, rtol=1e-5))


def _other(node: Node, v: Value) -> Value | None:
    """The other operand of a binary ``node`` that reads ``v`` once."""
    a, b = node.inputs
    if a is v and b is not v:
        return b
    if b is v and a is not v:
        return a
    return None


def _single(graph: Graph, v: Value, op: str) -> Node | None:
    user = only_user(graph, v)
    return user if user is not None and user.op == op else None


def erf_gelu_tail(graph: Graph, v: Value) -> Node | None:
    """The last node of ``0.5 * v * (1 + erf(v / sqrt(2)))`` written out (ONNX before opset
    20 has no Gelu; torch and transformers export it so), when every intermediate has one
    reader. Accepts div by sqrt(2) or mul by 1/sqrt(2), any operand order, and the 0.5
    applied to v, to the (1 + erf) factor or to the product."""
    users = v.users()
    if len(users) != 2 or len(v.uses) != 2 or any(o is v for o in graph.outputs):
        return None
    for scale, rest in (users, users[::-1]):
        c = _other(scale, v) if scale.op in ("div", "mul") and len(scale.inputs) == 2 else None
        if c is None or (scale.op == "div" and scale.inputs[0] is not v):
            continue
        if not _scalar(graph, c, math.sqrt(2.0) if scale.op == "div" else math.sqrt(0.5)):
            continue
        erf = _single(graph, scale.output, "erf")
        one = _single(graph, erf.output, "add") if erf is not None else None
        if one is None or not _scalar(graph, _other(one, erf.output), 1.0):
            continue
        if rest.op != "mul":
            return None
        rest_other = _other(rest, v)
        if rest_other is one.output:  # (v * (1 + erf)) * 0.5
            final = _single(graph, rest.output, "mul")
            ok = final is not None and _scalar(graph, _other(final, rest.output), 0.5)
        elif rest_other is not None and _scalar(graph, rest_other, 0.5):  # (0.5 v) * (1+erf)
            final = _single(graph, rest.output, "mul")
            ok = final is not None and _other(final, rest.output) is one.output
        else:  # v * (0.5 * (1 + erf))
            half = _single(graph, one.output, "mul")
            final = rest
            ok = half is not None and _scalar(graph, _other(half, one.output), 0.5) \
                and rest_other is half.output
        return final if ok else None
    return None


def silu_tail(graph: Graph, v: Value) -> Node | None:
    """The ``mul(v, sigmoid(v))`` (either operand order) when ``v`` has exactly these two
    readers, is not a graph output and the sigmoid's result is read only by the mul."""
    users = v.users()
    if len(users) != 2 or len(v.uses) != 2 or any(o is v for o in graph.outputs):
        return None
    sig = next((u for u in users if u.op == "sigmoid"), None)
    mul = next((u for u in users if u.op == "mul"), None)
    if sig is None or mul is None or _other(mul, v) is not sig.output:
        return None
    return mul if only_user(graph, sig.output) is mul else None


def _written_out_act(graph: Graph, v: Value, allowed: tuple[str, ...]
                     ) -> tuple[str, Node] | None:
    """(activation, last node) of a GELU or SiLU written out over ``v``, if enabled."""
    if not is_float(v.dtype):
        return None
    for kind, find_tail in (("gelu", erf_gelu_tail), ("silu", silu_tail)):
        tail = find_tail(graph, v) if kind in allowed else None
        if tail is not None:
            return kind, tail
    return None


def check_activations(name: str, acts: tuple[str, ...]) -> None:
    """Raise PipelineError naming every activation of ``acts`` that is not a fused one."""
    bad = [a for a in acts if a not in _ALL_ACTS]
    if bad:

        raise PipelineError(f"{name}: unknown activation(s) {', '.join(bad)}; "
                            f"known: {', '.join(_ALL_ACTS)}")


def fuse_activation(graph: Graph, anchor: str, allowed: tuple[str, ...], rule: str
                    ) -> PassResult:
    """Every ``anchor`` node without activation whose only reader is an activation in
    ``allowed`` (or a GELU / SiLU written out) takes it as its ``activation`` attribute."""
    stats: dict[str, int] = {}
    for node in graph.find(anchor):
        if node.attrs["activation"] != "none":
            continue
        found = _written_out_act(graph, node.output, allowed)
        if found is not None:
            kind, tail = found
            attrs = {**node.attrs, "activation": kind}
            replace_node(graph, tail, anchor, list(node.inputs), attrs, rule=rule,
                         name_from=node)
            erase_dead(graph, [node])
            _count(stats, "fused")
            continue
        user = only_user(graph, node.output)
        if user is None:
            _count(stats, "skipped.result_used_elsewhere")
            continue
        act = activation_of(user)
        if act is None:
            continue
        if act["activation"] not in allowed:
            _count(stats, f"skipped.{act['activation']}_not_enabled")
            continue
        if not is_float(node.output.dtype) and act["activation"] != "relu":
            _count(stats, "skipped.integer_activation")
            continue
        attrs = {**node.attrs, **act}
        replace_node(graph, user, anchor, list(node.inputs), attrs, rule=rule, name_from=node)
        erase_dead(graph, [node])
        _count(stats, "fused")
    return PassResult(graph, stats.get("fused", 0) > 0, stats)


@register_pass
@dataclass(frozen=True)
class FuseConvAct(Pass):
    """A relu / relu6 (clip 0..6) / clip / sigmoid / gelu that is the only reader of a
    conv2d without activation becomes the conv's ``activation`` (clip bounds in
    ``clip_min``/``clip_max``). Before: conv2d -> relu. After: conv2d{activation="relu"}.
    Conv+BN+ReLU fuses after ``fold-batchnorm`` has removed the BN. When enabled by name
    (``activations=...,silu,hard_swish,hard_sigmoid``): a hard_swish, a torch hardsigmoid
    (alpha 1/6, beta 1/2), and SiLU written out as ``mul(y, sigmoid(y))`` (the conv's only
    two readers) fuse too.
    """

    name: ClassVar[str] = "fuse-conv-act"
    activations: tuple[Activation, ...] = _DEFAULT_ACTS

    def __post_init__(self) -> None:
        check_activations(self.name, self.activations)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return fuse_activation(graph, "conv2d", self.activations, self.name)


@register_pass
@dataclass(frozen=True)
class FuseConvRelu(FuseConvAct):
    """The same pass as ``fuse-conv-act`` under its older name (all activations, not only
    relu, unless ``activations=`` says otherwise)."""

    name: ClassVar[str] = "fuse-conv-relu"


@register_pass
@dataclass(frozen=True)
class FuseDenseAct(Pass):
    """A relu / gelu (erf or tanh) / relu6 / clip / sigmoid that is the only reader of a
    dense without activation becomes the dense's ``activation``; so does GELU written out
    with erf (``0.5 * x * (1 + erf(x / sqrt 2))``, how ONNX exports before opset 20 carry
    it), when its intermediates are read by nothing else. silu / hard_swish / hard_sigmoid
    as in ``fuse-conv-act``, when named in ``activations``."""

    name: ClassVar[str] = "fuse-dense-act"
    activations: tuple[Activation, ...] = _DEFAULT_ACTS

    def __post_init__(self) -> None:
        check_activations(self.name, self.activations)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return fuse_activation(graph, "dense", self.activations, self.name)
