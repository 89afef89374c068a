"""The ``quantize`` pass: plan precisions, calibrate, insert quantize/dequantize pairs.

For every node whose precision is ``int8`` and which has an integer kernel (``dense`` and
``conv2d`` with constant f32 weights, conv2d with groups=1; ``matmul`` of two activations):

- each activation operand ``x`` is read through ``dequantize(quantize(x, s, zp), s, zp)``
  (per tensor, u8 by default or i8, asymmetric, ``s``/``zp`` from calibration); one pair per
  value, shared by all its int8 readers;
- the weight becomes an i8 constant (symmetric, per output channel by default) read through
  ``dequantize{axis}``.

So after this pass the graph is the fake-quantized (QDQ) model: running it in the
interpreter shows the int8 accuracy; ``lower-quantized`` turns the patterns into integer ops.
Other precisions go to the handler ``config.HANDLERS[precision]``; until it exists they are
refused with an error naming the nodes. Ops without an integer kernel stay float.

Its options are everything it reads: ``precision`` (a preset, or the ``quantize=`` mapping
as a JSON object), ``method`` (calibration), ``calibration`` (``@name`` of a bound sample set
or an .npz path, ``compiler/samples.py``; empty: ``samples`` random inputs, with a remark) and
``budget-mb`` (mixed precision). ``compile(..., quantize=...)`` writes them into the pipeline
text, so ``npucc opt -p TEXT --calibration calib.npz`` replays it exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.ops.quant import qrange
from compiler.numeric import make_sample_inputs
from compiler.pass_base import Pass, PassContext, PassResult, json_option, register_pass
from compiler.samples import resolve_samples
from passes.quantization.attention_q import quantize_attention
from passes.quantization.calibrate import (
    METHODS,
    TensorStats,
    calibrate,
    collect_stats,
    select_range,
)
from passes.quantization.config import HANDLERS, INT8_OPS, PrecisionSpec, plan_precisions

__all__ = ["InsertQuantize", "precision_config", "precision_text", "int8_candidates", "activation_params", "quantize_weight",
           "weight_axis", "given_ranges"]

RULE = "quantize"
# smoothing applies to activations whose largest channel maximum is this many times the
# median one (transformer residual streams: 10-100x); flatter ones gain nothing from it
# (4: MiniLM mean cosine 0.9979 vs 0.9966 at 8; the digits CNN is not smoothed at either)
OUTLIER_RATIO = 4.0


def precision_config(text: str) -> Any:
    """``quantize{precision=...}`` -> the ``quantize=`` value: a preset name, or the mapping
    its JSON object text holds."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise NpuccError(f"quantize{{precision=...}}: not a preset name nor a JSON object: "
                         f"{e}") from None
    if not isinstance(value, dict):
        raise NpuccError("quantize{precision=...}: the JSON value must be an object")
    return value


def precision_text(config: Any) -> str:
    """The inverse of :func:`precision_config`: a ``quantize=`` value as option text."""
    if isinstance(config, str):
        return config
    if not isinstance(config, Mapping):
        raise NpuccError(f"quantize= takes a preset name or a mapping, got "
                         f"{type(config).__name__}")
    try:
        return json_option(config)
    except TypeError as e:
        raise NpuccError(f"quantize=: the mapping must hold only JSON values (strings, "
                         f"numbers, lists, dicts) so the pipeline text can carry it: {e}") \
            from None


def weight_axis(node: Node) -> int:
    """The output-channel axis of the node's weight (operand 1)."""
    if node.op == "conv2d" and node.attrs["kernel_layout"] == "HWIO":
        return 3
    return 0


def int8_reason(graph: Graph, node: Node) -> str | None:
    """Why ``node`` cannot take the int8 path (None: it can)."""
    if node.op not in INT8_OPS:
        return "no integer kernel"
    if any(v.dtype != "f32" for v in node.inputs[:2]):
        return "not f32"
    if node.op == "matmul":
        a, b = node.inputs
        if graph.const_value(b) is not None or a.type.rank < 2 or b.type.rank < 2:
            return "matmul with a constant or 1-D operand"
        return None
    if graph.const_value(node.inputs[1]) is None:
        return "weight is not a constant"
    if node.op == "conv2d" and node.attrs["groups"] != 1:
        return "grouped conv2d"
    return None


def int8_candidates(graph: Graph, plan: dict[Node, PrecisionSpec]) -> list[Node]:
    """The int8 nodes with an integer kernel. A matmul of two activations (attention) is
    quantized only when the config names it (op type or name pattern), not by ``default``:
    its operands change per input, so its error is the least predictable."""
    return [n for n, s in plan.items() if s.precision == "int8" and int8_reason(graph, n)
            is None and (n.op != "matmul" or s.source != "default")]


def activation_params(lo: float, hi: float, dtype: str) -> tuple[np.float32, int]:
    """Asymmetric (scale, zero point) for the range [lo, hi] (which contains 0)."""
    qlo, qhi = qrange(dtype)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / (qhi - qlo))
    if not scale > 0:
        return np.float32(1.0), (0 if dtype == "u8" else 0)
    zp = int(np.clip(np.rint(qlo - lo / float(scale)), qlo, qhi))
    return scale, zp


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (-127..127): (q i8, scale f32 per channel [C] or scalar)."""
    w = np.asarray(w, np.float32)
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red) if w.size else np.zeros(w.shape[axis], np.float32)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        return q, scale
    amax = float(np.abs(w).max()) if w.size else 0.0
    scale = np.float32(amax / 127.0 if amax > 0 else 1.0)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), np.asarray(scale)


def _first_user(graph: Graph, v: Value) -> Node:
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    return min(v.users(), key=lambda n: pos[id(n)])


def _call_handler(precision: str, graph: Graph, node: Node, spec: PrecisionSpec,
                  ctx: PassContext) -> bool:
    target = HANDLERS.get(precision)
    if target is None:
        raise NpuccError(f"{node.label}: precision {precision!r} has no handler")
    mod_name, _, fn_name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError):
        raise NpuccError(f"{node.label}: precision {precision!r} is not available yet "
                         f"({target} is missing); int8 and float are") from None
    return bool(fn(graph, node, spec, ctx))


@register_pass
@dataclass(frozen=True)
class InsertQuantize(Pass):
    """Quantize the graph as the ``quantize=`` config says (see the module docstring).

    Before: a float graph. After: int8 nodes read dequantize(quantize(x)) activations and
    dequantized i8 weights; other precisions as their handlers leave them."""

    name: ClassVar[str] = "quantize"
    precision: str = "int8"      # a preset ("int8", "int4", "w8", "fp16") or a JSON mapping
    method: str = "minmax"       # calibration method (calibrate.METHODS)
    calibration: str = ""        # "@name" | "file.npz"; "" = `samples` random inputs
    budget_mb: float | None = None   # mixed precision: fit the weights in this many MiB
    executor: str = "serial"     # mixed precision's sensitivity runs: "serial" | "ray"
    percentile: float = 99.99
    activations: str = ""        # "u8" | "i8"; "" = the config's (u8)
    samples: int = 8             # random calibration inputs when no calibration is named
    smooth: float = -1.0         # SmoothQuant strength for int8 dense; < 0: the config's
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of "
                             f"{', '.join(METHODS)}")

    @property
    def config(self) -> Any:
        """The precision as ``plan_precisions`` takes it: a preset name or the mapping."""
        return precision_config(self.precision)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        config = self.config
        samples = ctx.sample_inputs   # set by callers of the Python API (quantize_graph)
        if self.calibration:
            samples = resolve_samples(self.calibration, ctx.resources,
                                      "quantize{calibration=...}")
            # the precision handlers (GPTQ, mixed precision) read them from their context
            ctx = dataclasses.replace(ctx, sample_inputs=samples)
        plan = plan_precisions(graph, config)
        if self.budget_mb is not None:
            plan = _call_budget(graph, plan, float(self.budget_mb), ctx, self.executor)
        stats: dict[str, Any] = {"int8": 0, "float": 0, "other": 0}
        # other precisions first (weight-only rewrites keep the node's identity or replace it)
        for node, spec in list(plan.items()):
            if spec.precision not in ("int8", "float"):
                if _call_handler(spec.precision, graph, node, spec, ctx):
                    stats["other"] += 1
        # an int8 attention is qattention, quantized per call: no calibration (attention_q.py)
        stats["qattention"] = quantize_attention(graph, plan)
        stats["int8"] += stats["qattention"]
        nodes = int8_candidates(graph, {n: s for n, s in plan.items() if n in graph.nodes})
        if not nodes:
            stats["float"] = len(plan) - stats["int8"] - stats["other"]
            return PassResult(graph, stats["other"] + stats["int8"] > 0, stats)
        acts: dict[str, tuple[Value, str]] = {}
        for n in nodes:
            spec = plan[n]
            k = 2 if n.op == "matmul" else 1
            for v in n.inputs[:k]:
                acts.setdefault(v.name, (v, spec.activations if self.activations == ""
                                         else self.activations))
        given = given_ranges(nodes, acts, config)
        todo = {k: a for k, a in acts.items() if k not in given}
        if not samples and todo:

            samples = [make_sample_inputs(graph, seed=self.seed + i) for i in range(self.samples)]
            ctx.remark(f"quantize: no calibration samples given; calibrated on {self.samples} "
                       "random inputs")
        tstats = collect_stats(graph, samples, list(todo)) if todo else {}
        ranges = {k: select_range(st, self.method, self.percentile) for k, st in tstats.items()}
        ranges.update(given)
        smooth = _smooth(graph, nodes, plan, todo, tstats, self.smooth)
        if smooth:
            again = calibrate(graph, samples, [m.name for m, _ in smooth.values()],
                              self.method,
                              percentile=self.percentile)
            ranges.update({name: again[m.name] for name, (m, _) in smooth.items()})
            stats["smoothed"] = len(smooth)
        qdq = _activation_qdq(graph, acts, ranges, smooth)
        _read_quantized(graph, nodes, plan, qdq, smooth)
        stats["int8"] += len(nodes)
        graph.remove_dead()
        stats["float"] = len(plan) - stats["int8"] - stats["other"]
        return PassResult(graph, True, stats)


def _activation_qdq(graph: Graph, acts: dict[str, tuple[Value, str]],
                    ranges: dict[str, tuple[float, float]], smooth: dict[str, Any]
                    ) -> dict[int, Value]:
    """One quantize/dequantize pair per activation (after its SmoothQuant divide, if any):
    ``{id(value): the dequantized value its int8 readers read}``."""
    qdq: dict[int, Value] = {}
    for name, (v, dtype) in acts.items():
        src = smooth[name][0] if name in smooth else v
        lo, hi = ranges[name]
        scale, zp = activation_params(lo, hi, dtype)
        at = _first_user(graph, v) if src is v else \
            graph.nodes[graph.nodes.index(src.producer) + 1]
        s = graph.add_const(np.asarray(scale, np.float32), before=at)
        z = graph.add_const(np.asarray(zp, dtype=np.dtype("u1" if dtype == "u8" else "i1")),
                            before=at)
        q = graph.add("quantize", src, s, z, dtype=dtype, name=RULE, before=at)
        qdq[id(v)] = graph.add("dequantize", q, s, z, name=RULE, before=at)
    return qdq


def _read_quantized(graph: Graph, nodes: list[Node], plan: Mapping[Node, PrecisionSpec],
                    qdq: dict[int, Value], smooth: dict[str, Any]) -> None:
    """Point each int8 node at its dequantized activations and at its weight as an i8
    constant (scaled by SmoothQuant's factors when its input was smoothed), read through
    ``dequantize{axis}``; a weight shared by several nodes is quantized once."""
    weights: dict[tuple[int, int, str], Value] = {}
    for n in nodes:
        spec = plan[n]
        k = 2 if n.op == "matmul" else 1
        x_name = n.inputs[0].name
        for i, v in enumerate(list(n.inputs[:k])):
            n.set_input(i, qdq[id(v)])
        if n.op == "matmul":
            continue
        w = n.inputs[1]
        axis = weight_axis(n)
        alpha = smooth[x_name][1] if x_name in smooth else None
        key = (id(w), axis, x_name if alpha is not None else "")
        if key not in weights:
            arr = graph.const_value(w)
            if alpha is not None:
                arr = arr * alpha[None, :].astype(np.float32)
            q, scale = quantize_weight(arr, axis, spec.weights == "per_channel")
            ref = w.producer.attrs.get("ref") or w.name
            first = graph.nodes[0]
            wq = graph.add_weight(f"{ref}.i8", q, before=first)
            ws = graph.add_const(scale, before=first)
            wz = graph.add_const(np.zeros(scale.shape, np.int8), before=first)
            weights[key] = graph.add("dequantize", wq, ws, wz,
                                     axis=axis if scale.ndim else -1, name=RULE, before=first)
        n.set_input(1, weights[key])


def given_ranges(nodes: list[Node], acts: dict[str, tuple[Value, str]], config: Any
                 ) -> dict[str, tuple[float, float]]:
    """The config's ``activation_ranges`` as ``{activation value name: (lo, hi)}``.

    A key is a quantized node's name (its activation operand; ``"NAME:1"``: a matmul's second
    operand) or an activation value's name. A key that names neither is an error listing the
    names it could be, so a range learned for a layer is never silently dropped."""
    given = config.get("activation_ranges") if isinstance(config, Mapping) else None
    if not given:
        return {}
    by_key: dict[str, str] = {name: name for name in acts}
    for n in nodes:
        if n.name:
            by_key.setdefault(n.name, n.inputs[0].name)
            if n.op == "matmul":
                by_key.setdefault(f"{n.name}:1", n.inputs[1].name)
    bad = [k for k in given if k not in by_key]
    if bad:
        raise NpuccError(f"quantize: activation_ranges name(s) {', '.join(map(repr, bad))} "
                         f"are not int8 nodes or their activations; known: "
                         f"{', '.join(sorted(by_key))}")
    out: dict[str, tuple[float, float]] = {}
    for key, (lo, hi) in given.items():
        out[by_key[key]] = (min(float(lo), 0.0), max(float(hi), 0.0))
    return out


def _smooth(graph: Graph, nodes: list[Node], plan: dict[Node, PrecisionSpec],
            acts: dict[str, tuple[Value, str]], tstats: dict[str, TensorStats], option: float
            ) -> dict[str, tuple[Value, np.ndarray]]:
    """SmoothQuant: for an activation read only by int8 dense nodes, move per-channel range
    into the weights. ``x' = x / alpha`` (a ``mul`` by a constant, which lower-quantized folds
    into the quantize), ``w' = w * alpha`` over K, ``alpha_k = max|x_k|^s / max|w_k|^(1-s)``.
    Returns {activation name: (x' value, alpha)}."""
    out: dict[str, tuple[Value, np.ndarray]] = {}
    for name, (v, _dtype) in acts.items():
        readers = [n for n in nodes if n.inputs[0] is v]
        if not readers or any(n.op != "dense" for n in readers) or \
                any(n.op == "matmul" and v in n.inputs for n in nodes):
            continue
        s = option if option >= 0 else min(plan[n].smooth for n in readers)
        st = tstats[name]
        if s <= 0 or st.ch_max is None or st.ch_max.shape != (v.shape[-1],):
            continue
        xmax = np.maximum(np.abs(st.ch_min), np.abs(st.ch_max)).astype(np.float64)
        live = xmax[xmax > 0]
        if live.size == 0 or live.max() < OUTLIER_RATIO * np.median(live):
            continue  # no outlier channels: nothing to migrate, and the per-axis scale costs
        wmax = np.max([np.abs(graph.const_value(n.inputs[1])).max(axis=0) for n in readers],
                      axis=0).astype(np.float64)
        ok = (xmax > 0) & (wmax > 0)
        alpha = np.ones_like(xmax)
        alpha[ok] = xmax[ok] ** s / wmax[ok] ** (1 - s)
        alpha = np.clip(alpha, 1e-4, 1e4).astype(np.float32)
        at = _first_user(graph, v)
        c = graph.add_weight(f"{name}.smooth", (1.0 / alpha).astype(np.float32), before=at)
        out[name] = (graph.add("mul", v, c, name=RULE, before=at), alpha)
    return out


def _call_budget(graph: Graph, plan: dict[Node, PrecisionSpec], budget_mb: float,
                 ctx: PassContext, executor: str) -> dict[Node, PrecisionSpec]:
    from passes.quantization.mixed import plan_budget  # a cycle: mixed quantizes with this pass

    return plan_budget(graph, plan, budget_mb, ctx, executor=executor)
