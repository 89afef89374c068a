"""``fuse-attention``: the exported attention chain becomes one ``attention`` node.

Before (what the ONNX exporters give for BERT/MiniLM, ViT/DeiT and GPT-2, after the dense
fusions)::

    q4 = views(xq)       [B, H, S, D]   views: reshape / transpose / split / scalar mul
    kt = views(xk)       [B, H, D, Sk]  (or k4 [B, H, Sk, D] transposed once more)
    v4 = views(xv)       [B, H, Sk, D]
    s  = matmul(q4, kt)  then scalar mul/div (scale), then at most one add of a
                         [Bm, Hm, Sm, Sk] f32 mask and one where(triangle, -inf, .) (causal)
    o  = reshape(transpose(matmul(softmax(s, -1), v4), [0, 2, 1, 3]), [B, S, H * D])

After: ``o = attention(xq, xk, xv[, mask]){heads, head_dim, scale, causal, *_offset}`` where
``xq, xk, xv`` are the 3-D ``[B, S, N]`` tensors the views start from (one fused QKV dense
gives the same value three times at different column offsets). Each operand's views are
checked by pushing an index array through them (numpy): the head split must be exactly
"head h, position s, column d of x[b, s, off + h*D + d]", whatever mix of reshapes, transposes
and splits the exporter wrote. Scalar factors on q, k and the scores multiply into ``scale``.

Anything else is left exactly as it was; ``verbose=true`` prints, for each softmax not fused,
why (also counted in the pass's stats as ``skipped.<reason>``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._rewrite import const_array, only_user, replace_node

__all__ = ["FuseAttention", "match_attention"]

_VIEWS = frozenset({"reshape", "transpose", "split"})
_FILL_MAX = -1e30     # a causal where's fill: -inf or a float32 minimum


@dataclass
class AttentionMatch:
    inputs: list[Value]           # xq, xk, xv[, mask]
    attrs: dict
    merge: Node                   # the final reshape [B, S, H*D], replaced


class NoMatch(Exception):
    """Why a softmax is not the centre of a fusable attention chain."""


def _scalar(graph: Graph, node: Node, x: Value) -> float | None:
    """The factor of ``mul(x, c)`` / ``mul(c, x)`` / ``div(x, c)`` with ``c`` a scalar
    constant, else None."""
    if node.op not in ("mul", "div") or x not in node.inputs or x.shape != node.output.shape:
        return None
    other = [v for v in node.inputs if v is not x]
    if len(other) != 1 or node.inputs.index(x) != 0 and node.op == "div":
        return None
    c = const_array(graph, other[0])
    if c is None or c.size != 1:
        return None
    f = float(c.reshape(()))
    return f if node.op == "mul" else 1.0 / f


def _view_input(graph: Graph, node: Node) -> tuple[Value, float] | None:
    """The input a view-like node reads and the scalar it multiplies by."""
    if node.op in _VIEWS:
        return node.inputs[0], 1.0
    for x in node.inputs:
        f = _scalar(graph, node, x)
        if f is not None:
            return x, f
    return None


def _apply(node: Node, out: Value, idx: np.ndarray) -> np.ndarray:
    if node.op == "reshape":
        return idx.reshape(node.attrs["shape"])
    if node.op == "transpose":
        return idx.transpose(node.attrs["perm"])
    if node.op == "split":
        cuts = np.cumsum(node.attrs["sizes"])[:-1]
        return np.split(idx, cuts, axis=node.attrs["axis"])[node.outputs.index(out)]
    return idx


def _heads(graph: Graph, v: Value, transposed: bool, scaled: bool, what: str
           ) -> tuple[Value, int, float]:
    """Trace ``v`` ([B, H, S, D], or [B, H, D, S] when ``transposed``) back through views to a
    3-D tensor ``x[B, S, N]`` it reads as heads of D columns at some offset: ``(x, offset,
    scale)``."""
    vals, nodes, factors = [v], [], []   # nodes[j] computes vals[j] from vals[j + 1]
    while vals[-1].producer is not None:
        step = _view_input(graph, vals[-1].producer)
        if step is None:
            break
        if step[1] != 1.0 and not scaled:
            raise NoMatch(f"{what}_scaled")
        nodes.append(vals[-1].producer)
        vals.append(step[0])
        factors.append(step[1])
    b, h = v.shape[:2]
    s, d = (v.shape[3], v.shape[2]) if transposed else (v.shape[2], v.shape[3])
    pos, col = np.arange(s)[:, None], np.arange(d)[None, :]
    # candidates from the furthest back: one fused QKV dense rather than its split parts
    for i in range(len(vals) - 1, -1, -1):
        base = vals[i]
        if len(base.shape) != 3 or base.dtype != "f32" or base.shape[:2] != (b, s):
            continue
        n = base.shape[2]
        idx = np.arange(int(np.prod(base.shape)), dtype=np.int64).reshape(base.shape)
        for j in range(i - 1, -1, -1):
            idx = _apply(nodes[j], vals[j], idx)
        if idx.shape != v.shape:
            continue
        off = int(idx.flat[0])
        inner = (col.T + pos.T * n) if transposed else (pos * n + col)
        want = (np.arange(b)[:, None, None, None] * s * n + off
                + np.arange(h)[None, :, None, None] * d + inner[None, None])
        if off + h * d <= n and np.array_equal(idx, want):
            return base, off, float(np.prod(factors[:i]))
    raise NoMatch(f"{what}_not_heads_of_a_3d_tensor")


def _causal(graph: Graph, node: Node, x: Value, s: int, sk: int) -> bool:
    """``where(c, fill, x)`` with c the strict upper triangle (``where(c, x, fill)``: the lower
    one) and fill -inf or a float minimum."""
    if node.op != "where" or node.inputs[0] is x:
        return False
    cond = const_array(graph, node.inputs[0])
    fill_at = 1 if node.inputs[2] is x else 2
    fill = const_array(graph, node.inputs[fill_at])
    if cond is None or fill is None or fill.size != 1 or not float(fill.reshape(())) <= _FILL_MAX:
        return False
    try:
        c = np.broadcast_to(cond, node.output.shape)
    except ValueError:
        return False
    upper = np.triu(np.ones((s, sk), bool), k=sk - s + 1)
    return bool(np.all(c == (upper if fill_at == 1 else ~upper)))


def _mask(node: Node, x: Value, shape: tuple[int, ...]) -> Value | None:
    if node.op != "add" or x not in node.inputs or node.output.shape != x.shape:
        return None
    m = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    if m is x or m.dtype != "f32" or len(m.shape) != 4 or m.shape[3] != shape[3] or any(
            a not in (1, f) for a, f in zip(m.shape[:3], shape[:3], strict=True)):
        return None
    return m


def _scores(graph: Graph, sm: Node) -> tuple[Node, float, Value | None, bool]:
    """Walk back from the softmax to the q.k matmul: (matmul, scale, mask, causal)."""
    cur, scale, mask, causal, seen_scale = sm.inputs[0], 1.0, None, False, False
    b, h, s, sk = cur.shape
    while True:
        node = cur.producer
        if node is None:
            raise NoMatch("no_matmul_before_softmax")
        if node.op == "matmul":
            break
        if only_user(graph, cur) is None:
            raise NoMatch("scores_read_elsewhere")
        srcs = [x for x in node.inputs if x.shape == cur.shape and x.dtype == "f32"
                and const_array(graph, x) is None]
        if len(srcs) != 1:
            raise NoMatch(f"unknown_score_op_{node.op}" if not srcs else "ambiguous_scores")
        src = srcs[0]
        f = _scalar(graph, node, src)
        if f is not None:
            scale, seen_scale = scale * f, True
        elif node.op in ("add", "where") and seen_scale:
            raise NoMatch("mask_before_scale")
        elif node.op == "add" and mask is None and _mask(node, src, cur.shape) is not None:
            mask = _mask(node, src, cur.shape)
        elif node.op == "where" and not causal and _causal(graph, node, src, s, sk):
            causal = True
        else:
            raise NoMatch({"add": "mask_not_additive_f32_b_h_s_sk", "where":
                           "where_not_a_causal_triangle"}.get(node.op, f"score_op_{node.op}"))
        cur = src
    if only_user(graph, cur) is None:
        raise NoMatch("scores_read_elsewhere")
    return node, scale, mask, causal


def match_attention(graph: Graph, sm: Node) -> AttentionMatch:
    """The fusable chain around softmax ``sm``; raises :class:`NoMatch` with the reason."""
    x = sm.inputs[0]
    if len(x.shape) != 4 or x.dtype != "f32" or sm.attrs["axis"] % 4 != 3:
        raise NoMatch("softmax_not_last_axis_of_4d_f32")
    mm, scale, mask, causal = _scores(graph, sm)
    pv = only_user(graph, sm.output)
    if pv is None or pv.op != "matmul" or pv.inputs[0] is not sm.output:
        raise NoMatch("probabilities_not_only_read_by_matmul")
    tr = only_user(graph, pv.output)
    if tr is None or tr.op != "transpose" or tuple(tr.attrs["perm"]) != (0, 2, 1, 3):
        raise NoMatch("output_not_transposed_back")
    merge = only_user(graph, tr.output)
    b, h, s, d = pv.output.shape
    if merge is None or merge.op != "reshape" or merge.output.shape != (b, s, h * d):
        raise NoMatch("output_not_merged_to_b_s_hd")
    q4, k4, v4 = mm.inputs[0], mm.inputs[1], pv.inputs[1]
    if q4.shape[3] != d or k4.shape[2] != d:
        raise NoMatch("query_key_dims_differ_from_value")
    xq, oq, fq = _heads(graph, q4, False, True, "query")
    xk, ok, fk = _heads(graph, k4, True, True, "key")
    xv, ov, _ = _heads(graph, v4, False, False, "value")
    attrs = {"heads": h, "head_dim": d, "scale": scale * fq * fk, "causal": causal,
             "q_offset": oq, "k_offset": ok, "v_offset": ov}
    return AttentionMatch([xq, xk, xv] + ([mask] if mask is not None else []), attrs, merge)


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Multi-head attention chains (module docstring) become one ``attention`` node reading
    the 3-D tensors the projections write and writing the ``[B, S, H*D]`` the output
    projection reads. Before: softmax-centred chains of matmul / views / scale / mask; after:
    ``attention`` nodes, every unmatched chain untouched. ``verbose=true`` says, for each
    softmax left alone, why."""

    name: ClassVar[str] = "fuse-attention"
    verbose: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for sm in graph.find("softmax"):
            try:
                m = match_attention(graph, sm)
            except NoMatch as why:
                key = f"skipped.{why}"
                stats[key] = stats.get(key, 0) + 1
                if self.verbose:
                    text = f"fuse-attention: left {sm.label} as it was: {why}"
                    ctx.remark(text)
                    print(text, file=sys.stderr)
                continue
            replace_node(graph, m.merge, "attention", m.inputs, m.attrs, rule=self.name,
                         name_from=sm)
            stats["fused"] = stats.get("fused", 0) + 1
        return PassResult(graph, stats.get("fused", 0) > 0, stats)
