"""Unstructured magnitude pruning and N:M (2:4) semi-structured sparsity.

Weights stay dense tensors with zeros in the graph (the package stores them compactly, see
``runtime/sparse.py``). A weight shared by several readers (GPT-2's tied embedding / lm_head)
is pruned once, for all of them: that is what pruning the torch parameter would do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Value
from passes.pruning.common import Layer, PruneError, layers

__all__ = ["magnitude_mask", "global_threshold", "nm_mask", "nm_groups_view", "replace_weight",
           "prune_unstructured", "prune_nm"]


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the ``round(sparsity * size)`` smallest-magnitude entries (ties broken by
    position, so exactly that many go)."""
    k = int(round(sparsity * w.size))
    mask = np.ones(w.size, dtype=bool)
    if k > 0:
        order = np.argsort(np.abs(w).reshape(-1), kind="stable")
        mask[order[:k]] = False
    return mask.reshape(w.shape)


def global_threshold(weights: list[np.ndarray], sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all the weights' entries fall."""
    allw = np.concatenate([np.abs(w).reshape(-1) for w in weights])
    k = int(round(sparsity * allw.size))
    if k <= 0:
        return -1.0
    return float(np.partition(allw, k - 1)[k - 1])


def nm_groups_view(w: np.ndarray, op: str, m: int) -> tuple[np.ndarray, Any] | None:
    """``w`` as ``[groups, m]`` along the reduction axis, and the function mapping such an array
    back to ``w``'s shape; None when the reduction axis is not a multiple of ``m``.

    dense ``w[N, K]``: groups of ``m`` consecutive K. conv2d OIHW: groups along the input
    channels at each (o, kh, kw) — the contiguous axis of the OHWI layout the kernels read
    after ``to-nhwc`` (NVIDIA ASP's choice); when I is not a multiple of ``m`` but I*KH*KW is,
    consecutive entries of the flattened I*KH*KW reduction."""
    if op == "conv2d" and w.ndim == 4:
        o, i, kh, kw = w.shape
        if i % m == 0:
            t = w.transpose(0, 2, 3, 1)
            return t.reshape(-1, m), lambda g: g.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
        if (i * kh * kw) % m == 0:
            return w.reshape(-1, m), lambda g: g.reshape(w.shape)
        return None
    if w.shape[-1] % m:
        return None
    return w.reshape(-1, m), lambda g: g.reshape(w.shape)


def nm_mask(w: np.ndarray, op: str, n: int, m: int) -> np.ndarray | None:
    """Keep-mask keeping the ``m - n`` largest of every ``m`` along the reduction axis (``n`` zero
    per group: 2:4 keeps 2 of 4), or None when the shape does not allow it."""
    view = nm_groups_view(w, op, m)
    if view is None:
        return None
    groups, back = view
    order = np.argsort(np.abs(groups), axis=1, kind="stable")
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], False, axis=1)
    return np.ascontiguousarray(back(keep))


def replace_weight(graph: Graph, value: Value, array: np.ndarray) -> None:
    """Give the constant ``value`` new contents (same shape) for every reader of it."""
    node = value.producer
    assert node is not None and node.op == "const"
    if "ref" in node.attrs and node.attrs["ref"] in graph.weights:
        graph.weights[node.attrs["ref"]] = array
    else:
        node.attrs["value"] = array


def selected_layers(graph: Graph, opts: dict[str, Any]) -> list[Layer]:
    exclude = tuple(opts.get("exclude") or ())
    out, seen = [], set()
    for lay in layers(graph):
        c = id(lay.node.inputs[1].producer)
        if c in seen or any(e and e in lay.name for e in exclude):
            continue
        if lay.weight.size < int(opts.get("min_params", 0)):
            continue
        seen.add(c)
        out.append(lay)
    return out


def _record(plan, lay: Layer, before: np.ndarray, after: np.ndarray, **extra: Any) -> None:
    plan.layers[lay.name] = {"op": lay.node.op, "shape": list(before.shape),
                             "params_before": int(np.count_nonzero(before)),
                             "params_after": int(np.count_nonzero(after)),
                             "size": int(before.size),
                             "sparsity": float(1.0 - np.count_nonzero(after) / before.size),
                             **extra}


def prune_unstructured(graph: Graph, opts: dict[str, Any], plan) -> int:
    """Zero the smallest weights: per layer (``scope="layer"``, each layer at ``sparsity``, or
    at ``sparsities[name]`` when given) or globally (``scope="global"``: one magnitude threshold
    over all selected layers). Returns the number of layers changed."""
    sparsity = float(opts.get("sparsity", 0.5))
    per = dict(opts.get("sparsities") or {})
    scope = opts.get("scope", "layer")
    if scope not in ("layer", "global"):
        raise PruneError(f"prune scope {scope!r} is not known; accepted: 'layer', 'global'")
    sel = selected_layers(graph, opts)
    thr = global_threshold([lay.weight for lay in sel], sparsity) if scope == "global" else None
    changed = 0
    for lay in sel:
        w = lay.weight
        if thr is not None:
            mask = np.abs(w) > thr
        else:
            mask = magnitude_mask(w, float(per.get(lay.name, sparsity)))
        new = np.where(mask, w, np.float32(0)).astype(np.float32)
        replace_weight(graph, lay.node.inputs[1], new)
        _record(plan, lay, w, new, pattern="unstructured", mask=mask)
        changed += int(not mask.all())
    return changed


def prune_nm(graph: Graph, opts: dict[str, Any], plan, n: int = 2, m: int = 4) -> int:
    """N:M sparsity (``n`` of every ``m`` zero along the reduction axis). Layers whose reduction
    axis is not a multiple of ``m`` are left dense and listed in the plan as ``skipped``."""
    changed = 0
    for lay in selected_layers(graph, opts):
        mask = nm_mask(lay.weight, lay.node.op, n, m)
        if mask is None:
            plan.layers[lay.name] = {"op": lay.node.op, "shape": list(lay.weight.shape),
                                     "skipped": f"reduction axis not a multiple of {m}",
                                     "params_before": int(np.count_nonzero(lay.weight)),
                                     "params_after": int(np.count_nonzero(lay.weight)),
                                     "size": int(lay.weight.size), "sparsity": 0.0}
            continue
        new = np.where(mask, lay.weight, np.float32(0)).astype(np.float32)
        replace_weight(graph, lay.node.inputs[1], new)
        _record(plan, lay, lay.weight, new, pattern=f"{m - n}:{m}", mask=mask)
        changed += 1
    return changed


def check_nm(w: np.ndarray, op: str, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` along the reduction axis has at least ``n`` zeros."""
    view = nm_groups_view(w, op, m)
    return view is not None and bool(((view[0] == 0).sum(axis=1) >= n).all())
