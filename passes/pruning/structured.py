"""Structured channel pruning: output channels of conv2d / dense really removed.

Analysis (one forward walk in graph order) gives every value that carries pruned channels a
*segment list* along its channel axis: ``[(group, size), ...]`` — a plain producer output is
one segment, a concat's output is its inputs' segments one after the other, a constant or
unprunable input is a segment with group ``None``. A group is a set of producers whose
channels must be kept alike: the producers feeding the two sides of a residual ``add`` (or
``mul``/``sub``/... between two computed tensors) are unioned into one group and pruned jointly
by summed importance. What a channel-carrying value may flow through:

- unary elementwise ops, pools (NCHW), depthwise conv2d (its groups shrink), binary ops with a
  per-channel (or scalar) constant (the constant is sliced), concat on the channel axis
  (channel offsets), a reshape ``[N,C,H,W] -> [N,C*H*W]`` (flatten) into a dense (column
  blocks of H*W removed);
- and it ends in a conv2d (input channels removed) or a dense (K columns removed).

Anything else — the graph outputs, a softmax or layer_norm over channels, a split, a reshape
that is not a flatten — freezes every group in the value's segments: their channels are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.interpreter import interpret
from compiler.ir.registry import get_op, ops_with
from passes.pruning.common import PruneError, layer_name, reinfer_types, set_const

__all__ = ["ChannelAnalysis", "analyse_channels", "channel_importance", "prune_channels"]

POOLS = ops_with("pool")
# broadcasting ops whose result keeps a pruned channel's meaning (not comparisons, where...)
BINARY = ops_with("broadcast") & frozenset({"add", "sub", "mul", "div", "max", "min"})


@dataclass
class Seg:
    axis: int
    parts: list[tuple[int | None, int]]    # (group id or None, channels)
    flat: int | None = None                # H*W block when flattened for a dense

    @property
    def channels(self) -> int:
        return sum(s for _, s in self.parts)


@dataclass
class ChannelAnalysis:
    producers: list[Node] = field(default_factory=list)     # group id = index
    parent: list[int] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    seg: dict[int, Seg] = field(default_factory=dict)       # id(value) -> Seg
    reasons: dict[int, str] = field(default_factory=dict)   # group -> why it is frozen

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def freeze(self, s: Seg | None, why: str) -> None:
        if s is None:
            return
        for g, _ in s.parts:
            if g is not None:
                self.frozen.add(g)
                self.reasons.setdefault(g, why)

    def is_frozen(self, g: int) -> bool:
        root = self.find(g)
        return any(self.find(f) == root for f in self.frozen)

    def groups(self) -> dict[int, list[Node]]:
        """Unfrozen groups: root -> producers."""
        out: dict[int, list[Node]] = {}
        for g, node in enumerate(self.producers):
            if not self.is_frozen(g):
                out.setdefault(self.find(g), []).append(node)
        return out


def _is_producer(graph: Graph, n: Node, ops: tuple[str, ...]) -> bool:
    if n.op not in ops or len(n.inputs) < 2:
        return False
    w = graph.const_value(n.inputs[1])
    if w is None or w.dtype != np.float32:
        return False
    if len(n.inputs) > 2 and graph.const_value(n.inputs[2]) is None:
        return False
    if n.op == "conv2d":
        return n.attrs.get("groups", 1) == 1 and n.attrs.get("layout", "NCHW") == "NCHW" \
            and n.attrs.get("kernel_layout", "OIHW") == "OIHW"
    return True


def _is_depthwise(graph: Graph, n: Node) -> bool:
    if n.op != "conv2d" or n.attrs.get("layout", "NCHW") != "NCHW":
        return False
    w = graph.const_value(n.inputs[1])
    g = n.attrs.get("groups", 1)
    c = n.inputs[0].shape[1]
    return (w is not None and g > 1 and g == c and w.shape[0] == c and w.shape[1] == 1
            and n.attrs.get("kernel_layout", "OIHW") == "OIHW")


def _const_axis(value: Value, seg: Seg, other: Value) -> int | None:
    """The axis of constant ``other`` that lines up with ``seg``'s channel axis (broadcasting
    from the right), or None when the constant does not vary along it."""
    r, rc = len(value.shape), len(other.shape)
    ax = seg.axis - (r - rc)
    if ax < 0 or other.shape[ax] == 1:
        return None
    return ax


def analyse_channels(graph: Graph, ops: tuple[str, ...] = ("conv2d", "dense")
                     ) -> ChannelAnalysis:
    """Groups of producers and how their channels flow (see the module docstring)."""
    a = ChannelAnalysis()
    S = a.seg
    for n in graph.nodes:
        if n.op == "const":
            continue
        ins = [S.get(id(v)) for v in n.inputs]
        x = ins[0] if ins else None
        out = n.outputs[0] if n.outputs else None
        why = f"read by {n.label}"
        if _is_producer(graph, n, ops):
            if x is not None:
                ok = (x.axis == 1 and x.flat is None) if n.op == "conv2d" else \
                    (x.axis == len(n.inputs[0].shape) - 1)
                if not ok:
                    a.freeze(x, why)
            g = len(a.producers)
            a.producers.append(n)
            a.parent.append(g)
            axis = 1 if n.op == "conv2d" else len(out.shape) - 1
            S[id(out)] = Seg(axis, [(g, out.shape[axis])])
            continue
        carrying = [s for s in ins if s is not None]
        if not carrying:
            continue
        if n.op in ("conv2d", "dense") and all(s is None for s in ins[1:]):
            if n.op == "conv2d" and _is_depthwise(graph, n) and x.axis == 1 and x.flat is None:
                S[id(out)] = x
                continue
            if n.op == "conv2d" and n.attrs.get("groups", 1) == 1 and x.axis == 1 \
                    and x.flat is None and graph.const_value(n.inputs[1]) is not None:
                continue   # a conv not pruned itself (not in ops) still loses input channels
            if n.op == "dense" and x.axis == len(n.inputs[0].shape) - 1 \
                    and graph.const_value(n.inputs[1]) is not None:
                continue
        elif len(n.inputs) == 1 and x is not None and x.flat is None and (
                (get_op(n.op).elementwise and n.op not in ("cast",)) or
                (n.op in POOLS and n.attrs.get("layout", "NCHW") == "NCHW" and x.axis == 1)):
            S[id(out)] = x
            continue
        elif n.op in BINARY and len(n.inputs) == 2:
            sa, sb = ins
            va, vb = n.inputs
            if sa is not None and sb is not None and sa.flat is None and sb.flat is None \
                    and va.shape == vb.shape == out.shape and sa.axis == sb.axis \
                    and [s for _, s in sa.parts] == [s for _, s in sb.parts]:
                for (ga, _), (gb, _) in zip(sa.parts, sb.parts, strict=True):
                    if ga is not None and gb is not None:
                        a.union(ga, gb)
                    elif ga is not None or gb is not None:
                        a.freeze(Seg(0, [(ga if ga is not None else gb, 0)]), why)
                S[id(out)] = sa
                continue
            s, v, other = (sa, va, vb) if sa is not None else (sb, vb, va)
            if (sa is None or sb is None) and s.flat is None and v.shape == out.shape \
                    and graph.const_value(other) is not None \
                    and len(other.shape) <= len(v.shape):
                ax = _const_axis(v, s, other)
                if ax is None or other.shape[ax] == s.channels:
                    S[id(out)] = s
                    continue
        elif n.op == "concat" and x is not None:
            axis = n.attrs["axis"] % len(out.shape)
            if all(s is None or (s.axis == axis and s.flat is None) for s in ins):
                parts: list[tuple[int | None, int]] = []
                for v, s in zip(n.inputs, ins, strict=True):
                    parts += s.parts if s is not None else [(None, v.shape[axis])]
                S[id(out)] = Seg(axis, parts)
                continue
        elif n.op == "reshape" and x is not None and x.flat is None and x.axis == 1 \
                and len(n.inputs[0].shape) == 4 and len(out.shape) == 2 \
                and out.shape[0] == n.inputs[0].shape[0]:
            nb, c, h, w = n.inputs[0].shape
            S[id(out)] = Seg(1, x.parts, flat=h * w)
            continue
        for s in carrying:
            a.freeze(s, why)
    for v in graph.outputs:
        a.freeze(S.get(id(v)), "a graph output")
    return a


def channel_importance(graph: Graph, a: ChannelAnalysis, norm: str = "l1",
                       samples: list[dict[str, np.ndarray]] | None = None
                       ) -> dict[int, np.ndarray]:
    """Per-producer channel importance: the L1/L2 norm of each output channel's weights; with
    ``samples`` (calibrated), times the mean |activation| of that channel on them."""
    out: dict[int, np.ndarray] = {}
    for g, n in enumerate(a.producers):
        w = graph.const_value(n.inputs[1])
        flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
        out[g] = flat.sum(1) if norm == "l1" else np.sqrt((flat ** 2).sum(1))
    if samples:

        where = {id(n): g for g, n in enumerate(a.producers)}
        acc: dict[int, np.ndarray] = {}

        def observe(node: Node, results: list[np.ndarray]) -> None:
            g = where.get(id(node))
            if g is None:
                return
            r = np.abs(results[0].astype(np.float64))
            axis = 1 if node.op == "conv2d" else r.ndim - 1
            m = r.mean(axis=tuple(i for i in range(r.ndim) if i != axis))
            acc[g] = acc.get(g, 0) + m

        for s in samples:
            interpret(graph, s, observe=observe)
        for g, m in acc.items():
            out[g] = out[g] * (m / len(samples))
    return out


def _select(imp: np.ndarray, sparsity: float, multiple: int) -> np.ndarray:
    c = len(imp)
    keep = max(1, c - int(round(sparsity * c)))
    if multiple > 1:
        keep = min(c, -(-keep // multiple) * multiple)
    order = np.argsort(-imp, kind="stable")[:keep]
    return np.sort(order)


def _index(a: ChannelAnalysis, s: Seg, keeps: dict[int, np.ndarray]) -> np.ndarray:
    idx, off = [], 0
    for g, size in s.parts:
        k = keeps.get(a.find(g)) if g is not None else None
        idx.append(off + (k if k is not None else np.arange(size)))
        off += size
    return np.concatenate(idx) if idx else np.arange(0)


def prune_channels(graph: Graph, opts: dict[str, Any], plan, samples=None) -> int:
    """Remove ``sparsity`` of the output channels of every unfrozen group (see module doc).

    Options: ``sparsity`` (0.5), ``ops`` (which producers: ``["conv2d", "dense"]``),
    ``importance`` (``"l1"`` | ``"l2"`` | ``"calibrated"``: mean |activation| x L2 norm on the
    calibration samples), ``multiple`` (round kept channels up to a multiple, e.g. the NPU's
    channel alignment), ``sparsities`` (per-layer overrides by producer name), ``exclude``
    (names whose groups are kept). Returns the number of groups pruned."""
    ops = tuple(opts.get("ops") or ("conv2d", "dense"))
    bad = [o for o in ops if o not in ("conv2d", "dense")]
    if bad:
        raise PruneError(f"channel pruning ops {bad} not supported; accepted: conv2d, dense")
    sparsity = float(opts.get("sparsity", 0.5))
    per = dict(opts.get("sparsities") or {})
    exclude = tuple(opts.get("exclude") or ())
    a = analyse_channels(graph, ops)
    kind = opts.get("importance", "l1")
    if kind not in ("l1", "l2", "calibrated"):
        raise PruneError(f"channel importance {kind!r} is not known; accepted: l1, l2, "
                         "calibrated")
    if kind == "calibrated" and not samples:
        raise PruneError("importance='calibrated' needs calibration samples: "
                         "compile(..., calibration=[{input: array}, ...])")
    imp = channel_importance(graph, a, "l1" if kind == "l1" else "l2",
                             samples if kind == "calibrated" else None)
    keeps: dict[int, np.ndarray] = {}
    for root, prods in a.groups().items():
        names = [layer_name(p) for p in prods]
        if any(e and e in nm for e in exclude for nm in names):
            continue
        sp = max((float(per[nm]) for nm in names if nm in per), default=sparsity)
        total = sum(imp[g] for g, p in enumerate(a.producers) if a.find(g) == root)
        keeps[root] = _select(total, sp, int(opts.get("multiple", 1)))
    for g, n in enumerate(a.producers):
        w = graph.const_value(n.inputs[1])
        entry = {"op": n.op, "channels_before": int(w.shape[0]),
                 "params_before": int(w.size), "group": layer_name(a.producers[a.find(g)])}
        k = keeps.get(a.find(g))
        entry["channels_after"] = int(len(k)) if k is not None else int(w.shape[0])
        if k is not None:
            entry["keep"] = k.tolist()
        elif a.is_frozen(g):
            entry["kept_because"] = a.reasons.get(g) or next(
                (a.reasons[f] for f in a.frozen if a.find(f) == a.find(g)), "")
        plan.layers[layer_name(n)] = entry
    if not keeps:
        return 0
    _apply(graph, a, keeps)
    for n in a.producers:
        e = plan.layers[layer_name(n)]
        e["params_after"] = int(graph.const_value(n.inputs[1]).size)
        e["shape"] = list(graph.const_value(n.inputs[1]).shape)
        e["sparsity"] = 1.0 - e["channels_after"] / e["channels_before"]
    return len(keeps)


def _apply(graph: Graph, a: ChannelAnalysis, keeps: dict[int, np.ndarray]) -> None:
    S = a.seg
    prod = {id(n): g for g, n in enumerate(a.producers)}
    for n in list(graph.nodes):
        if n.op == "const":
            continue
        ins = [S.get(id(v)) for v in n.inputs]
        x = ins[0] if ins else None
        g = prod.get(id(n))
        if n.op in ("conv2d", "dense") and x is not None and not _is_depthwise(graph, n):
            idx = _index(a, x, keeps)
            if x.flat is not None:
                idx = (idx[:, None] * x.flat + np.arange(x.flat)[None, :]).reshape(-1)
            w = graph.const_value(n.inputs[1])
            if len(idx) != w.shape[1]:
                set_const(graph, n, 1, np.take(w, idx, axis=1))
        if g is not None and a.find(g) in keeps:
            k = keeps[a.find(g)]
            set_const(graph, n, 1, np.take(graph.const_value(n.inputs[1]), k, axis=0))
            if len(n.inputs) > 2:
                set_const(graph, n, 2, np.take(graph.const_value(n.inputs[2]), k, axis=0))
            continue
        if x is None and not any(ins):
            continue
        if _is_depthwise(graph, n) and x is not None:
            idx = _index(a, x, keeps)
            if len(idx) != x.channels:
                set_const(graph, n, 1, np.take(graph.const_value(n.inputs[1]), idx, axis=0))
                if len(n.inputs) > 2:
                    set_const(graph, n, 2, np.take(graph.const_value(n.inputs[2]), idx, axis=0))
                n.attrs["groups"] = int(len(idx))
        elif n.op in BINARY:
            for i, (v, s) in enumerate(zip(n.inputs, ins, strict=True)):
                other = n.inputs[1 - i]
                if s is None or ins[1 - i] is not None:
                    continue
                ax = _const_axis(v, s, other)
                if ax is not None:
                    idx = _index(a, s, keeps)
                    if len(idx) != s.channels:
                        set_const(graph, n, 1 - i,
                                  np.take(graph.const_value(other), idx, axis=ax))
        elif n.op == "reshape" and x is not None and S.get(id(n.outputs[0])) is not None \
                and S[id(n.outputs[0])].flat is not None:
            idx = _index(a, x, keeps)
            n.attrs["shape"] = [int(n.inputs[0].shape[0]), int(len(idx) * S[id(n.outputs[0])].flat)]
    reinfer_types(graph)
    graph.remove_dead()
