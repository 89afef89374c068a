"""Attention-head pruning: find attention blocks in the IR and remove whole heads.

The pattern (what torch.export / the ONNX exporters give for BERT/MiniLM and GPT-2 after
fusion)::

    q = dense(x, Wq) | split(dense(x, Wqkv))[0]      (same for k, v)
    qh = transpose(reshape(q, [B,S,H,D]), [0,2,1,3])
    kt = transpose(reshape(k, [B,S,H,D]), [0,2,3,1])   (or [0,2,1,3] then [0,1,3,2])
    p  = softmax(elementwise...(matmul(qh, kt)))       (scale, mask: mul/add/where)
    o  = reshape(transpose(matmul(p, vh), [0,2,1,3]), [B,S,H*D])
    y  = dense(o, Wo)

Removing head h removes rows h*D..(h+1)*D of Wq/Wk/Wv (and their biases; for a fused QKV
dense, the rows inside each part, and the split sizes shrink), changes H to H' in the
reshapes, and removes the same columns of Wo. Biases of Wo stay.

Head importance (no autograd here, so not Michel et al.'s |dL/dmask|):

- ``"contribution"`` (default): the mean L2 norm, on the calibration samples, of the head's
  contribution to the output projection, ``o_h @ Wo[:, h]^T`` — one interpreter run.
- ``"output-error"``: for each head, the relative error of the model's outputs when that head
  alone is removed (its Wo columns zeroed) — L x H interpreter runs; exact but slow.
- ``"weight"``: ``||Wo[:, h]||_2 * ||Wv[h]||_2``, no samples needed.

Padding positions (where the ``attention_mask`` input is 0) do not count. With calibration
samples, ``bias_correction=True`` adds the removed heads' mean contribution (over the
calibration tokens) to the output projection's bias. It is off by default: on MiniLM with the
three calibration sentences it lowered the embedding cosine on other sentences (0.949 ->
0.938 with ``"contribution"``), the means of three sentences do not carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.interpreter import interpret
from passes.pruning.common import PruneError, layer_name, reinfer_types, set_const

__all__ = ["Attention", "find_attention", "head_importance", "prune_heads"]

_PASS = frozenset({"mul", "add", "sub", "div", "where"})


@dataclass
class Source:
    dense: Node
    split: Node | None     # the split the part comes out of (fused QKV), else None
    part: int              # which split result


@dataclass
class Attention:
    q: Source
    k: Source
    v: Source
    reshapes: list[Node]   # the three [B,S,H,D] reshapes
    merge: Node            # reshape [B,S,H*D]
    out: Node              # the output projection dense
    score_nodes: list[Node]
    heads: int
    dim: int

    @property
    def name(self) -> str:
        return layer_name(self.out)


def _single_user(v: Value) -> Node | None:
    users = v.users()
    return users[0] if len(users) == 1 else None


def _source(graph: Graph, v: Value) -> Source | None:
    p = v.producer
    if p is None:
        return None
    if p.op == "dense" and graph.const_value(p.inputs[1]) is not None:
        return Source(p, None, 0)
    if p.op == "split" and p.attrs["axis"] % len(v.shape) == len(v.shape) - 1:
        d = p.inputs[0].producer
        if d is not None and d.op == "dense" and graph.const_value(d.inputs[1]) is not None \
                and _single_user(d.outputs[0]) is p:
            return Source(d, p, p.outputs.index(v))
    return None


def _heads_of(v: Value, perms: tuple[tuple[int, ...], ...]) -> tuple[Node, Value] | None:
    """Undo ``transpose(s) ∘ reshape [B,S,H,D]``: the reshape and its input."""
    for perm in perms:
        node, cur = v.producer, v
        ok = True
        for want in perm_chain(perm):
            if node is None or node.op != "transpose" or tuple(node.attrs["perm"]) != want:
                ok = False
                break
            cur = node.inputs[0]
            node = cur.producer
        if ok and node is not None and node.op == "reshape" and len(cur.shape) == 4:
            return node, node.inputs[0]
    return None


def perm_chain(perm: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [perm] if perm != (0, 1, 3, 2) else [(0, 1, 3, 2), (0, 2, 1, 3)]


def find_attention(graph: Graph) -> list[Attention]:
    """Every attention block matching the module docstring's pattern, in graph order."""
    found = []
    for sm in graph.find("softmax"):
        if sm.attrs.get("axis", -1) % 4 != 3 or len(sm.outputs[0].shape) != 4:
            continue
        chain, cur = [], sm.inputs[0]
        while cur.producer is not None and cur.producer.op in _PASS:
            n = cur.producer
            chain.append(n)
            full = [v for v in n.inputs if v.shape == cur.shape and graph.const_value(v) is None]
            if len(full) != 1:
                break
            cur = full[0]
        mm = cur.producer
        if mm is None or mm.op != "matmul":
            continue
        qh = _heads_of(mm.inputs[0], ((0, 2, 1, 3),))
        kt = _heads_of(mm.inputs[1], ((0, 2, 3, 1), (0, 1, 3, 2)))
        pv = _single_user(sm.outputs[0])
        if qh is None or kt is None or pv is None or pv.op != "matmul" or pv.inputs[0] is not \
                sm.outputs[0]:
            continue
        vh = _heads_of(pv.inputs[1], ((0, 2, 1, 3),))
        tr = _single_user(pv.outputs[0])
        if vh is None or tr is None or tr.op != "transpose" or \
                tuple(tr.attrs["perm"]) != (0, 2, 1, 3):
            continue
        merge = _single_user(tr.outputs[0])
        if merge is None or merge.op != "reshape" or len(merge.outputs[0].shape) != 3:
            continue
        out = _single_user(merge.outputs[0])
        if out is None or out.op != "dense" or graph.const_value(out.inputs[1]) is None:
            continue
        srcs = [_source(graph, qh[1]), _source(graph, kt[1]), _source(graph, vh[1])]
        if any(s is None for s in srcs):
            continue
        b, s, h, d = qh[0].outputs[0].shape
        # other computed operands of the score chain must not vary per head
        if any(len(v.shape) == 4 and v.shape[1] == h and h > 1 and v is not cur
               and graph.const_value(v) is None and v.producer not in chain
               for n in chain for v in n.inputs):
            continue
        found.append(Attention(*srcs, [qh[0], kt[0], vh[0]], merge, out, chain, h, d))
    return found


def _token_weights(smp: dict[str, np.ndarray], mask_input: str | None, shape: tuple[int, ...]
                   ) -> np.ndarray | None:
    """Weights of the [B, S] positions: the padding mask input when there is one."""
    if mask_input is None or mask_input not in smp:
        return None
    m = np.asarray(smp[mask_input], dtype=np.float64)
    return m if m.shape == tuple(shape[:2]) and m.sum() > 0 else None


def _contrib(graph: Graph, blocks: list[Attention], samples, mask_input: str | None = None,
             means: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Mean norm of each head's contribution to its output projection; with ``means``, also
    fills ``means[block]`` with each head's mean contribution vector ``[H, N]``."""

    where = {id(a.merge): i for i, a in enumerate(blocks)}
    acc: dict[int, np.ndarray] = {i: np.zeros(a.heads) for i, a in enumerate(blocks)}
    if means is not None:
        for i, a in enumerate(blocks):
            means[i] = np.zeros((a.heads, a.out.outputs[0].shape[-1]))
    current: dict[str, np.ndarray] = {}

    def observe(node: Node, results: list[np.ndarray]) -> None:
        i = where.get(id(node))
        if i is None:
            return
        a = blocks[i]
        o = results[0].astype(np.float64)                       # [B, S, H*D]
        wo = graph.const_value(a.out.inputs[1]).astype(np.float64)   # [N, H*D]
        for h in range(a.heads):
            sl = slice(h * a.dim, (h + 1) * a.dim)
            y = o[..., sl] @ wo[:, sl].T
            norms = np.linalg.norm(y, axis=-1)                              # [B, S]
            tw = _token_weights(current, mask_input, norms.shape)
            acc[i][h] += norms.mean() if tw is None else (norms * tw).sum() / tw.sum()
            if means is not None:
                y2 = y.reshape(-1, y.shape[-1])
                w = np.ones(len(y2)) if tw is None else tw.reshape(-1)
                means[i][h] += (y2 * w[:, None]).sum(0) / w.sum() / len(samples)

    for smp in samples:
        current.clear()
        current.update(smp)
        interpret(graph, smp, observe=observe)
    return {i: v / len(samples) for i, v in acc.items()}


def _err(got: list[np.ndarray], ref: list[np.ndarray], tw: Any) -> float:
    total = 0.0
    for g, r in zip(got, ref, strict=True):
        d = (g.astype(np.float64) - r) ** 2
        rr = r.astype(np.float64) ** 2
        if tw is not None and d.shape[:2] == tw.shape:
            w = tw.reshape(tw.shape + (1,) * (d.ndim - 2))
            d, rr = d * w, rr * w
        total += float(np.sqrt(d.sum() / (rr.sum() + 1e-30)))
    return total


def _ablation(graph: Graph, blocks: list[Attention], samples, mask_input: str | None = None,
              outputs: list[int] | None = None, executor: Any = "serial"
              ) -> dict[int, np.ndarray]:
    from compiler.parallel import map_tasks

    base = [_run_outputs(graph, s, outputs) for s in samples]
    tws = [_token_weights(s, mask_input, np.asarray(s[mask_input]).shape)
           if mask_input in s else None for s in samples]
    tasks = [(i, h) for i, a in enumerate(blocks) for h in range(a.heads)]
    shared = (graph, blocks, samples, base, tws, outputs)
    errs = map_tasks(_head_error, shared, tasks, executor=executor)
    out = {i: np.zeros(a.heads) for i, a in enumerate(blocks)}
    for (i, h), e in zip(tasks, errs, strict=True):
        out[i][h] = e
    return {i: v / len(samples) for i, v in out.items()}


def _run_outputs(graph: Graph, s: dict[str, np.ndarray], outputs: list[int] | None):
    from compiler.ir.interpreter import interpret

    res = interpret(graph, s)
    return res if outputs is None else [res[i] for i in outputs]


def _head_error(shared: tuple, task: tuple[int, int]) -> float:
    """The summed output error over the samples with head ``task = (block, head)`` removed
    (its Wo columns zeroed); one task of :func:`_ablation`, here or on a Ray worker."""
    graph, blocks, samples, base, tws, outputs = shared
    i, h = task
    a = blocks[i]
    wo_v = a.out.inputs[1]
    wo = graph.const_value(wo_v)
    w2 = np.array(wo, copy=True)
    w2[:, h * a.dim:(h + 1) * a.dim] = 0
    _swap(graph, wo_v, w2)
    err = 0.0
    try:
        for b, s, tw in zip(base, samples, tws, strict=True):
            err += _err(_run_outputs(graph, s, outputs), b, tw)
    finally:
        _swap(graph, wo_v, wo)
    return err


def _swap(graph: Graph, v: Value, arr: np.ndarray) -> None:
    node = v.producer
    if "ref" in node.attrs:
        graph.weights[node.attrs["ref"]] = arr
    else:
        node.attrs["value"] = arr


def head_importance(graph: Graph, blocks: list[Attention], kind: str = "contribution",
                    samples=None, mask_input: str | None = None,
                    outputs: list[int] | None = None, executor: Any = "serial"
                    ) -> dict[int, np.ndarray]:
    """Importance per head of each block (index into ``blocks``); see the module docstring.
    ``mask_input``: the name of a ``[B, S]`` padding-mask input; positions where it is 0 do
    not count (padded calibration sentences would otherwise be mostly padding). ``outputs``:
    which graph outputs ``"output-error"`` measures (default all). ``executor``: ``"serial"``
    or ``"ray"`` (``compiler.parallel``): the L x H ablations of ``"output-error"`` as Ray
    tasks, with results identical to the serial loop."""
    if kind in ("contribution", "output-error") and not samples:
        raise PruneError(f"head importance {kind!r} needs calibration samples: "
                         "compile(..., calibration=[{input: array}, ...]); or use "
                         "importance='weight'")
    if kind == "contribution":
        return _contrib(graph, blocks, samples, mask_input)
    if kind == "output-error":
        return _ablation(graph, blocks, samples, mask_input, outputs, executor)
    if kind == "weight":
        out = {}
        for i, a in enumerate(blocks):
            wo = graph.const_value(a.out.inputs[1])
            wv = _rows(graph, a.v)
            out[i] = np.array([np.linalg.norm(wo[:, h * a.dim:(h + 1) * a.dim]) *
                               np.linalg.norm(wv[h * a.dim:(h + 1) * a.dim])
                               for h in range(a.heads)])
        return out
    raise PruneError(f"head importance {kind!r} is not known; accepted: contribution, "
                     "output-error, weight")


def _rows(graph: Graph, s: Source) -> np.ndarray:
    w = graph.const_value(s.dense.inputs[1])
    if s.split is None:
        return w
    off = sum(s.split.attrs["sizes"][:s.part])
    return w[off:off + s.split.attrs["sizes"][s.part]]


def _choose(blocks: list[Attention], imp: dict[int, np.ndarray], sparsity: float,
            scope: str, normalise: bool = True) -> dict[int, np.ndarray]:
    if scope == "layer":
        keep = {}
        for i, a in enumerate(blocks):
            n = max(1, a.heads - int(round(sparsity * a.heads)))
            keep[i] = np.sort(np.argsort(-imp[i], kind="stable")[:n])
        return keep
    # global: importance normalised per block (sum 1) unless it is already on one scale
    # (output-error), lowest removed, one head kept per block
    cand = [(float(imp[i][h] / (imp[i].sum() + 1e-12) if normalise else imp[i][h]), i, h)
            for i, a in enumerate(blocks) for h in range(a.heads)]
    total = sum(a.heads for a in blocks)
    n_drop = int(round(sparsity * total))
    drop: dict[int, set[int]] = {i: set() for i in range(len(blocks))}
    for _, i, h in sorted(cand):
        if n_drop == 0:
            break
        if len(drop[i]) < blocks[i].heads - 1:
            drop[i].add(h)
            n_drop -= 1
    return {i: np.array([h for h in range(a.heads) if h not in drop[i]])
            for i, a in enumerate(blocks)}


def prune_heads(graph: Graph, opts: dict[str, Any], plan, samples=None) -> int:
    """Remove ``sparsity`` of the heads (per block with ``scope="layer"``, or ranked over all
    blocks with ``scope="global"``) by ``importance``. ``mask_input`` names the padding-mask
    input (default: an input called ``attention_mask``). Returns the number of blocks
    changed."""
    blocks = find_attention(graph)
    if not blocks:
        raise PruneError("method 'head': no attention block found (expected dense -> reshape "
                         "[B,S,H,D] -> transpose -> matmul -> softmax -> matmul -> transpose -> "
                         "reshape -> dense)")
    scope = opts.get("scope", "layer")
    if scope not in ("layer", "global"):
        raise PruneError(f"prune scope {scope!r} is not known; accepted: 'layer', 'global'")
    mask_input = opts.get("mask_input")
    if mask_input is None and any(v.name == "attention_mask" for v in graph.inputs):
        mask_input = "attention_mask"
    kind = opts.get("importance", "contribution")
    outs = opts.get("outputs")
    imp = head_importance(graph, blocks, kind, samples, mask_input,
                          [int(i) for i in outs] if outs is not None else None,
                          executor=opts.get("executor", "serial"))
    keeps = _choose(blocks, imp, float(opts.get("sparsity", 0.25)), scope,
                    normalise=kind != "output-error")
    means: dict[int, np.ndarray] | None = None
    if samples and opts.get("bias_correction", False):
        means = {}
        _contrib(graph, blocks, samples, mask_input, means)
    changed = 0
    for i, a in enumerate(blocks):
        k = keeps[i]
        plan.layers[a.name] = {"op": "attention", "heads_before": a.heads,
                               "heads_after": int(len(k)), "keep": k.tolist(),
                               "importance": [float(x) for x in imp[i]],
                               "sparsity": 1.0 - len(k) / a.heads}
        if len(k) < a.heads:
            drop = np.setdiff1d(np.arange(a.heads), k)
            shift = means[i][drop].sum(0) if means is not None else None
            _apply(graph, a, k, shift)
            plan.layers[a.name]["bias_correction"] = shift is not None
            changed += 1
    reinfer_types(graph)
    graph.remove_dead()
    return changed


def _apply(graph: Graph, a: Attention, keep: np.ndarray, shift: np.ndarray | None = None
           ) -> None:
    idx = (keep[:, None] * a.dim + np.arange(a.dim)[None, :]).reshape(-1)
    hn = len(keep)
    by_dense: dict[int, list[Source]] = {}
    for s in (a.q, a.k, a.v):
        by_dense.setdefault(id(s.dense), []).append(s)
    for srcs in by_dense.values():
        d = srcs[0].dense
        split = srcs[0].split
        w = graph.const_value(d.inputs[1])
        b = graph.const_value(d.inputs[2]) if len(d.inputs) > 2 else None
        if split is None:
            rows = idx
        else:
            parts, rows_l, off = list(split.attrs["sizes"]), [], 0
            mine = {s.part for s in srcs}
            for j, size in enumerate(split.attrs["sizes"]):
                r = off + (idx if j in mine else np.arange(size))
                rows_l.append(r)
                parts[j] = len(r)
                off += size
            rows = np.concatenate(rows_l)
            split.attrs["sizes"] = [int(p) for p in parts]
        set_const(graph, d, 1, w[rows])
        if b is not None:
            set_const(graph, d, 2, b[rows])
    for r in a.reshapes:
        bb, s, _, dd = r.attrs["shape"]
        r.attrs["shape"] = [bb, s, hn, dd]
    bb, s, _ = a.merge.attrs["shape"]
    a.merge.attrs["shape"] = [bb, s, hn * a.dim]
    for n in a.score_nodes:
        for j, v in enumerate(n.inputs):
            c = graph.const_value(v)
            if c is not None and c.ndim == 4 and c.shape[1] == a.heads and a.heads > 1:
                set_const(graph, n, j, c[:, keep])
    wo = graph.const_value(a.out.inputs[1])
    set_const(graph, a.out, 1, wo[:, idx])
    if shift is not None:
        # bias correction: the removed heads' mean contribution moves into the bias
        if len(a.out.inputs) > 2:
            b = graph.const_value(a.out.inputs[2])
            set_const(graph, a.out, 2, (b + shift).astype(b.dtype))
        else:
            a.out.set_inputs([*a.out.inputs, graph.add_const(shift.astype(wo.dtype),
                                                             before=a.out)])
