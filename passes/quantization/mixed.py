"""Mixed precision by sensitivity under a model-size budget (``compile(..., size_budget_mb=)``).

1. **Layers**: the nodes that can take a weight precision (dense, constant-weight matmul),
   grouped by node name (a config can only address names); a layer's candidates are
   ``int4``, ``w8``, ``int8`` (static, when the node has an integer kernel) and ``float``.
2. **Sensitivity**: each layer is quantized *alone* to each candidate (through the same
   ``quantize`` pass and handlers the final graph uses, with the plan's method and group
   size), the model runs in the reference interpreter on the calibration samples, and the
   output is compared with the float model's: ``noise = sum|y - y_q|^2 / sum|y|^2`` (so
   ``SNR dB = -10 log10 noise``) and the cosine. ``float`` has noise 0.
3. **Choice** (a multiple-choice knapsack, solved greedily): start with every layer at its
   cheapest candidate; while some upgrade fits the budget, take the one that removes the most
   noise per byte added (``(noise_now - noise_next) / (bytes_next - bytes_now)``, over every
   more precise candidate of every layer). Noise is treated as additive over layers (the usual
   first-order assumption). Layers with low sensitivity per byte therefore keep the lowest
   precision. If even the cheapest plan exceeds the budget, :class:`BudgetError` says the
   smallest size reachable.
4. The plan is a ``quantize=`` mapping (``"^name$"`` keys) merged over the user's config,
   printed as a table (rich) and applied by the ``quantize`` pass like any config.

Sizes are the bytes of every weight of the graph (``MB`` = 2^20 bytes): layers at their
candidate's size (int4: K/2 + 2K/g bytes per row; w8: K + 2K/g; int8: K + 5; float: 4K;
biases f32), everything else as the rest of the plan leaves it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node
from compiler.ir.interpreter import interpret
from compiler.numeric import make_sample_inputs
from compiler.pass_base import PassContext
from passes.quantization.config import PrecisionSpec, plan_precisions
from passes.quantization.weight_only import (
    HESSIAN_KEY,
    dense_weight,
    effective_group,
    quantize_graph,
)

__all__ = ["plan_budget", "Layer", "measure_sensitivity", "choose", "BudgetError",
           "plan_table", "layer_bytes", "CANDIDATES", "output_error"]

CANDIDATES = ("int4", "w8", "int8", "float")
MIB = 2**20


class BudgetError(NpuccError):
    """The size budget cannot be met by any plan."""


@dataclass
class Layer:
    name: str
    nodes: list[Node]
    params: int                                  # weight elements (N*K summed)
    bytes: dict[str, int] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    choice: str = "float"


def output_error(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> tuple[float, float]:
    """(noise power ratio, cosine) of ``out`` against ``ref`` over all outputs."""
    num = den = dot = na = nb = 0.0
    for r, o in zip(ref, out, strict=True):
        r64, o64 = np.asarray(r, np.float64).ravel(), np.asarray(o, np.float64).ravel()
        num += float(np.sum((r64 - o64) ** 2))
        den += float(np.sum(r64 ** 2))
        dot += float(r64 @ o64)
        na += float(r64 @ r64)
        nb += float(o64 @ o64)
    noise = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 1.0
    return noise, cos


def snr_db(noise: float) -> float:
    return math.inf if noise <= 0 else -10.0 * math.log10(noise)


def layer_bytes(graph: Graph, node: Node, precision: str, group: int) -> int:

    w = dense_weight(graph, node)
    n, k = w.shape
    bias = 4 * n if node.op == "dense" and len(node.inputs) > 2 else 0
    if precision == "float":
        return 4 * n * k + bias
    if precision == "int8":  # i8 weights, f32 scale and i8 zero point per channel
        return n * k + 5 * n + bias
    bits = 4 if precision == "int4" else 8
    g = effective_group(k, group, bits) or k
    return n * k * bits // 8 + 2 * n * (k // g) + bias


def _int8_ok(graph: Graph, node: Node) -> bool:
    try:
        from passes.quantization.insert import int8_reason
    except ImportError:
        return False
    return int8_reason(graph, node) is None


def find_layers(graph: Graph, plan: Mapping[Node, PrecisionSpec],
                candidates: Sequence[str] = CANDIDATES) -> list[Layer]:

    groups: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node in plan and node.name and dense_weight(graph, node) is not None:
            groups.setdefault(node.name, []).append(node)
    layers = []
    for name, nodes in groups.items():
        spec = plan[nodes[0]]
        cands = [c for c in candidates
                 if c != "int8" or all(_int8_ok(graph, n) for n in nodes)]
        layer = Layer(name, nodes, sum(dense_weight(graph, n).size for n in nodes))
        for c in cands:
            layer.bytes[c] = sum(layer_bytes(graph, n, c, spec.group_size) for n in nodes)
        layers.append(layer)
    return layers


def _config_for(plan: Mapping[Node, PrecisionSpec], layers: Sequence[Layer],
                choice: Mapping[str, str]) -> dict[str, Any]:
    """A ``quantize=`` mapping: every node's planned spec, layers overridden by ``choice``."""
    cfg: dict[str, Any] = {"default": "float"}
    layer_names = {ly.name for ly in layers}
    for node, spec in plan.items():
        if node.name and node.name not in layer_names and spec.precision != "float":
            cfg[f"^{re.escape(node.name)}$"] = _spec_dict(spec)
    for ly in layers:
        spec = plan[ly.nodes[0]]
        cfg[f"^{re.escape(ly.name)}$"] = _spec_dict(replace(spec, precision=choice[ly.name]))
    return cfg


def _spec_dict(spec: PrecisionSpec) -> dict[str, Any]:
    return {"precision": spec.precision, "group_size": spec.group_size, "method": spec.method,
            "activations": spec.activations, "weights": spec.weights}


def measure_sensitivity(graph: Graph, plan: Mapping[Node, PrecisionSpec],
                        layers: Sequence[Layer], samples: Sequence[Mapping[str, np.ndarray]],
                        ctx: Any = None, executor: Any = "serial") -> None:
    """Fill ``layer.noise`` / ``layer.cosine`` per candidate (each layer quantized alone).
    ``executor``: ``"serial"`` or ``"ray"`` (``compiler.parallel``: one task per layer and
    candidate; GPTQ Hessians a task computes are merged back; results identical)."""
    from compiler.parallel import map_tasks

    refs = [interpret(graph, s) for s in samples]
    hess = dict(ctx.options.get(HESSIAN_KEY, {})) if ctx is not None else {}
    tasks = [(j, cand) for j, ly in enumerate(layers) for cand in ly.bytes if cand != "float"]
    if executor in (None, "serial"):
        # serial: one task after the other, each reusing the Hessians the previous computed
        results = []
        for t in tasks:
            r = _candidate_error((graph, plan, layers, samples, refs, hess), t)
            hess.update(r[3])
            results.append(r)
    else:
        results = map_tasks(_candidate_error, (graph, plan, layers, samples, refs, hess),
                            tasks, executor=executor)
        for r in results:
            hess.update(r[3])
    for ly in layers:
        ly.noise["float"], ly.cosine["float"] = 0.0, 1.0
    for (j, cand), (noise, cos, err, _) in zip(tasks, results, strict=True):
        ly = layers[j]
        if err is not None:   # a candidate that cannot be measured is not chosen
            del ly.bytes[cand]
            if ctx is not None:
                ctx.remark(f"quantize: mixed precision: {cand} for layer {ly.name!r} "
                           f"dropped, it failed: {err}")
            continue
        ly.noise[cand], ly.cosine[cand] = noise, cos
    if ctx is not None and hess:
        ctx.options[HESSIAN_KEY] = hess


def _candidate_error(shared: tuple, task: tuple[int, str]
                     ) -> tuple[float | None, float | None, str | None, dict[str, Any]]:
    """Layer ``task[0]`` alone at precision ``task[1]``: (noise, mean cosine, error message or
    None, the GPTQ Hessians known afterwards)."""
    graph, plan, layers, samples, refs, hess = shared
    j, cand = task
    ly = layers[j]
    all_float = {x.name: "float" for x in layers}
    cfg = _config_for({n: s for n, s in plan.items() if n.name == ly.name}, [ly],
                      {**all_float, ly.name: cand})
    sub = PassContext(sample_inputs=list(samples), options={HESSIAN_KEY: dict(hess)})
    try:
        q = quantize_graph(graph, cfg, ctx=sub)
        outs = [interpret(q, s) for s in samples]
    except NpuccError as e:
        return None, None, str(e), {}
    num = den = 0.0
    cos = []
    for r, o in zip(refs, outs, strict=True):
        nz, c = output_error(r, o)
        d = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in r)
        num += nz * d
        den += d
        cos.append(c)
    return (num / den if den > 0 else 0.0, float(np.mean(cos)), None,
            sub.options.get(HESSIAN_KEY, {}))


def choose(layers: Sequence[Layer], fixed_bytes: int, budget_bytes: int) -> int:
    """Set ``layer.choice`` greedily (see the module docstring); returns the total bytes."""
    for ly in layers:
        ly.choice = min(ly.bytes, key=lambda c: (ly.bytes[c], ly.noise.get(c, 0.0)))
    total = fixed_bytes + sum(ly.bytes[ly.choice] for ly in layers)
    if total > budget_bytes:
        raise BudgetError(
            f"size_budget_mb={budget_bytes / MIB:.3f} cannot be met: the smallest plan (every "
            f"weight layer at its cheapest precision) needs {total / MIB:.3f} MB "
            f"({fixed_bytes / MIB:.3f} MB of it outside the quantizable layers); raise the "
            f"budget to at least {math.ceil(total / MIB * 1000) / 1000:.3f}")
    while True:
        best = None
        for ly in layers:
            cur_b, cur_n = ly.bytes[ly.choice], ly.noise[ly.choice]
            for c, b in ly.bytes.items():
                gain = cur_n - ly.noise[c]
                if b <= cur_b or gain <= 0 or total - cur_b + b > budget_bytes:
                    continue
                ratio = gain / (b - cur_b)
                if best is None or ratio > best[0]:
                    best = (ratio, ly, c)
        if best is None:
            return total
        _, ly, c = best
        total += ly.bytes[c] - ly.bytes[ly.choice]
        ly.choice = c


def plan_table(layers: Sequence[Layer], total: int, budget: int, float_total: int) -> Any:
    from rich.table import Table

    t = Table(title=f"mixed precision: {total / MIB:.3f} MB of {budget / MIB:.3f} MB budget "
                    f"(float {float_total / MIB:.3f} MB)")
    for col in ("layer", "params", "choice", "bytes", "SNR dB int4", "SNR dB w8", "SNR dB int8"):
        t.add_column(col, justify="left" if col in ("layer", "choice") else "right",
                     no_wrap=True)
    for ly in layers:
        def db(c: str, ly: Layer = ly) -> str:
            return f"{snr_db(ly.noise[c]):.1f}" if c in ly.noise else "-"
        t.add_row(ly.name, str(ly.params), ly.choice, str(ly.bytes[ly.choice]), db("int4"),
                  db("w8"), db("int8"))
    return t


def plan_budget(graph: Graph, plan: dict[Node, PrecisionSpec], budget_mb: float, ctx: Any,
                candidates: Sequence[str] = CANDIDATES, show: bool = True,
                executor: Any = "serial") -> dict[Node, PrecisionSpec]:
    """The ``quantize`` pass's hook: ``plan`` with each weight layer's precision chosen to fit
    ``budget_mb`` (MB = 2^20 bytes) with the least total sensitivity."""

    samples = list(getattr(ctx, "sample_inputs", None) or [])
    if not samples:
        samples = [make_sample_inputs(graph, seed=i) for i in range(4)]
        if ctx is not None:
            ctx.remark("quantize: mixed precision measured on 4 random inputs (no calibration "
                       "samples given)")
    layers = find_layers(graph, plan, candidates)
    if not layers:
        raise BudgetError("size_budget_mb: the model has no weight layer (dense / matmul with a "
                          "constant weight) whose precision could be chosen")
    layer_nodes = {id(n) for ly in layers for n in ly.nodes}
    rest = _weights_outside(graph, plan, layer_nodes, samples, ctx)
    measure_sensitivity(graph, plan, layers, samples, ctx, executor=executor)
    budget = int(budget_mb * MIB)
    total = choose(layers, rest, budget)
    float_total = sum(int(a.nbytes) for a in graph.weights.values())
    if show:
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=160)
        console.print(plan_table(layers, total, budget, float_total))
    cfg = _config_for(plan, layers, {ly.name: ly.choice for ly in layers})
    if ctx is not None:
        ctx.options["mixed_plan"] = {
            "budget_bytes": budget, "total_bytes": total, "config": cfg,
            "layers": [{"name": ly.name, "choice": ly.choice, "bytes": ly.bytes,
                        "snr_db": {c: snr_db(v) for c, v in ly.noise.items()},
                        "cosine": ly.cosine} for ly in layers]}
        ctx.remark(f"quantize: mixed precision plan {total / MIB:.3f} MB <= "
                   f"{budget_mb:g} MB: " + ", ".join(f"{ly.name}={ly.choice}" for ly in layers))
    return plan_precisions(graph, cfg)


def _weights_outside(graph: Graph, plan: Mapping[Node, PrecisionSpec], layer_nodes: set[int],
                     samples: Sequence[Mapping[str, np.ndarray]], ctx: Any) -> int:
    """Bytes of the weights not read by the chosen layers, after the rest of the plan."""

    cfg = _config_for({n: s for n, s in plan.items() if id(n) not in layer_nodes}, [], {})
    g = graph.copy()
    keep = {n.name for n in graph.nodes if id(n) in layer_nodes}
    q = quantize_graph(g, cfg, ctx=PassContext(sample_inputs=list(samples)))
    skip = set()
    for n in q.find("const"):
        users = n.output.users() if n.outputs else []
        if users and all(u.name in keep and u.op in ("dense", "matmul") for u in users):
            skip.add(n.attrs.get("ref"))
    refs = {n.attrs.get("ref") for n in q.find("const")}
    return sum(int(a.nbytes) for r, a in q.weights.items() if r in refs and r not in skip)
