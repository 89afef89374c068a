"""Per-layer sparsity by sensitivity: prune each layer alone at a few sparsities, measure the
output error on calibration samples with the reference interpreter, then choose per-layer
sparsities that reach a global target with the least total error.

The choice is greedy on error per removed parameter: every layer starts dense; the step taken
next is the one (a layer moving to its next measured sparsity) that adds the least error per
parameter it removes, until the removed parameters reach ``target`` of all selected layers'
parameters. Insensitive layers thus go high (up to ``max_sparsity``), sensitive ones stay low
— the rule of thumb (low-sensitivity ~70%, sensitive ~20%) comes out of the measurement rather
than being imposed. Errors of layers pruned together are assumed to add (first order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret
from passes.pruning.magnitude import magnitude_mask, replace_weight, selected_layers

__all__ = ["STEPS", "layer_sensitivity", "choose_sparsities", "sensitivity_plan",
           "print_plan"]

STEPS = (0.3, 0.5, 0.7, 0.9)


def _rel(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    num = den = 0.0
    for rs, gs in zip(ref, got, strict=True):
        for r, g in zip(rs, gs, strict=True):
            r = np.asarray(r, np.float64)
            num += float(((np.asarray(g, np.float64) - r) ** 2).sum())
            den += float((r ** 2).sum())
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def layer_sensitivity(graph: Graph, samples: list[dict[str, np.ndarray]],
                      steps: tuple[float, ...] = STEPS, opts: dict[str, Any] | None = None,
                      executor: Any = "serial") -> dict[str, dict[str, Any]]:
    """``{layer: {"size": n, "errors": {sparsity: relative output error}}}``, each layer
    pruned alone (magnitude) and the others untouched. ``executor``: ``"serial"`` or
    ``"ray"`` (``compiler.parallel``: one task per layer and sparsity, identical results)."""
    from compiler.parallel import map_tasks

    base = [interpret(graph, s) for s in samples]
    layers = list(selected_layers(graph, opts or {}))
    tasks = [(j, s) for j in range(len(layers)) for s in steps]
    errs = map_tasks(_pruned_error, (graph, layers, samples, base), tasks, executor=executor)
    out: dict[str, dict[str, Any]] = {}
    for (j, s), e in zip(tasks, errs, strict=True):
        lay = layers[j]
        out.setdefault(lay.name, {"size": int(lay.weight.size), "errors": {}})["errors"][s] = e
    return out


def _pruned_error(shared: tuple, task: tuple[int, float]) -> float:
    """Relative output error with layer ``task[0]`` alone pruned to sparsity ``task[1]``."""
    graph, layers, samples, base = shared
    j, s = task
    lay = layers[j]
    v, w = lay.node.inputs[1], lay.weight
    try:
        replace_weight(graph, v, np.where(magnitude_mask(w, s), w, np.float32(0)))
        return _rel(base, [interpret(graph, x) for x in samples])
    finally:
        replace_weight(graph, v, w)


def choose_sparsities(sens: dict[str, dict[str, Any]], target: float,
                      max_sparsity: float = 0.9) -> dict[str, float]:
    """Greedy choice (module docstring) reaching ``target`` of all parameters removed."""
    total = sum(e["size"] for e in sens.values())
    level = {k: 0.0 for k in sens}
    removed = 0.0
    while removed < target * total - 0.5:
        best = None
        for k, e in sens.items():
            nxt = [s for s in sorted(e["errors"]) if s > level[k] and s <= max_sparsity + 1e-9]
            if not nxt:
                continue
            s = nxt[0]
            gain = (s - level[k]) * e["size"]
            cost = e["errors"][s] - (e["errors"].get(level[k], 0.0) if level[k] else 0.0)
            score = max(cost, 0.0) / gain
            if best is None or score < best[0]:
                best = (score, k, s, gain)
        if best is None:
            break
        _, k, s, gain = best
        level[k] = s
        removed += gain
    return level


def sensitivity_plan(graph: Graph, samples: list[dict[str, np.ndarray]], target: float, *,
                     steps: tuple[float, ...] = STEPS, max_sparsity: float = 0.9,
                     verbose: bool = False, opts: dict[str, Any] | None = None,
                     executor: Any = "serial") -> dict[str, Any]:
    """Measure, choose, and (``verbose``) print the plan; returns ``{"sparsities": {layer: s},
    "sensitivity": {layer: {size, errors}}, "target": target}``."""
    sens = layer_sensitivity(graph, samples, steps, opts, executor=executor)
    chosen = choose_sparsities(sens, target, max_sparsity)
    plan = {"sparsities": chosen, "target": target,
            "sensitivity": {k: {"size": e["size"],
                                "errors": {str(s): v for s, v in e["errors"].items()}}
                            for k, e in sens.items()}}
    if verbose:
        print_plan(plan)
    return plan


def print_plan(plan: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    sens = plan["sensitivity"]
    steps = sorted({s for e in sens.values() for s in e["errors"]}, key=float)
    t = Table(title=f"sensitivity plan (target {100 * plan['target']:.0f}% of parameters)")
    t.add_column("layer")
    t.add_column("params", justify="right")
    for s in steps:
        t.add_column(f"err@{100 * float(s):.0f}%", justify="right")
    t.add_column("chosen", justify="right")
    for k, e in sens.items():
        t.add_row(k, str(e["size"]), *[f"{e['errors'][s]:.4f}" for s in steps],
                  f"{100 * plan['sparsities'][k]:.0f}%")
    console.print(t)
