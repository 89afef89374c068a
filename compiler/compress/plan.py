"""Device-aware compression: choose sparsity and precision from the target and the budgets,
apply them, measure.

```python
r = compress(model, data, device="kirin990", budget_mb=4, latency_ms=3,
             example_inputs=(x,))
r.plan          # the chosen Candidate (sparsity, precision) and its estimates
r.compiled      # the CompiledModel; r.measured: package bytes, estimated device latency
```

Planning (:func:`plan_compression`): for every channel sparsity in ``sparsities`` the model is
pruned by our channel pass (``prune={"method": "channel"}``, or ``prune_method="head"`` for
attention heads) and, for every precision in ``precisions``, quantized by our quantize pass
on the target's own pipeline — the graph ``compile`` would build, without its kernels. Each
candidate gets its weight bytes (what the package stores) and the target's cost-model
latency (``targets/cost_model.estimate``: the description's NPU/CPU throughput, bandwidth,
placement). Candidates are tried from the least to the most aggressive (``cost`` = sparsity +
0.1 for int8 + 0.3 for int4, ties to the smaller model); the first one within ``budget_mb``
(weight bytes, MiB) and ``latency_ms`` is the plan. When none is, :class:`BudgetError`
names the closest achievable numbers: the smallest model, the fastest one, and the candidate
nearest to both budgets.

``compress`` then compiles the plan with the calibration ``data`` (PTQ), prints the plan and
the measured result at each stage, and checks the budgets on the compiled package (the
weight bytes it holds, and ``estimate()`` of the compiled graph); a plan over budget once
compiled (kernels pack weights their own way) gives way to the next candidate.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["Candidate", "CompressResult", "BudgetError", "plan_compression", "compress",
           "PRECISION_COST", "quantize_config"]

PRECISION_COST = {"float": 0.0, "fp16": 0.05, "int8": 0.1, "int4": 0.3}
MIB = 2**20


class BudgetError(NpuccError):
    """No candidate meets the budgets; the message gives the closest achievable numbers."""


@dataclass
class Candidate:
    sparsity: float
    precision: str
    weight_bytes: int = 0
    latency_ms: float = 0.0
    peak_memory_bytes: int = 0
    unit: str = "channels"            # what the sparsity removes: "channels" | "heads"

    @property
    def cost(self) -> float:
        return self.sparsity + PRECISION_COST[self.precision]

    def describe(self) -> str:
        return (f"{100 * self.sparsity:.0f}% {self.unit} + {self.precision}: "
                f"{self.weight_bytes / MIB:.2f} MiB weights, {self.latency_ms:.3f} ms estimated")


@dataclass
class CompressResult:
    compiled: Any
    plan: Candidate
    candidates: list[Candidate]
    measured: dict[str, Any] = field(default_factory=dict)


def quantize_config(precision: str) -> Any:
    """The ``quantize=`` value of a precision (None: float)."""
    return {"float": None, "fp16": "fp16", "int8": "int8",
            "int4": {"default": "int8", "gather": "w8",   # int8 embeddings, as the int8 preset
                     "dense": {"precision": "int4", "group_size": 32},
                     "matmul": {"precision": "int4", "group_size": 32}}}[precision]


def _prune_config(sparsity: float, method: str, ops: Sequence[str] | None) -> dict | None:
    if sparsity <= 0:
        return None
    cfg: dict[str, Any] = {"method": method, "sparsity": sparsity}
    if ops:
        cfg["ops"] = list(ops)
    return cfg


def _weight_bytes(graph) -> int:
    """Bytes of every constant the package stores (named weights once, inline constants)."""
    total, refs = 0, set()
    for n in graph.find("const"):
        ref = n.attrs.get("ref")
        if ref is not None and ref in refs:
            continue
        refs.add(ref)
        total += int(graph.const_value(n.output).nbytes)
    return total


def _lowered(graph, desc, prune: dict | None, quantize: Any, samples: list) -> Any:
    from compiler.driver import CompileOptions, compile_pipeline
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline

    opts = CompileOptions(prune=prune, quantize=quantize, calibration=samples)
    ctx = PassContext(target=desc)
    text = compile_pipeline(desc.default_pipeline, opts, desc, ctx)
    return run_pipeline(graph.copy(), text, ctx=ctx)


def plan_compression(model: Any, data: Sequence[Mapping[str, Any]], device: Any = "host", *,
                     sparsities: Sequence[float] = (0.0, 0.3, 0.5, 0.7),
                     precisions: Sequence[str] = ("float", "int8", "int4"),
                     prune_method: str = "channel", prune_ops: Sequence[str] | None = None,
                     example_inputs: Any = None) -> list[Candidate]:
    """Every candidate with its estimated weight bytes and device latency, least aggressive
    first. ``data`` calibrates the planning graphs as it will the compiled one (the ranges
    decide SmoothQuant, which changes the graph and so the placement and latency)."""
    from compiler.driver import CompileOptions, import_model
    from targets.cost_model import estimate
    from targets.description import load_target

    bad = [p for p in precisions if p not in PRECISION_COST]
    if bad:
        raise NpuccError(f"precisions {bad} are not among {', '.join(PRECISION_COST)}")
    desc = load_target(device)
    graph = import_model(model, CompileOptions(example_inputs=example_inputs))
    samples = [dict(s) for s in data]
    out = []
    for s in sparsities:
        prune = _prune_config(s, prune_method, prune_ops)
        for p in precisions:
            g = _lowered(graph, desc, prune, quantize_config(p), samples)
            est = estimate(g, desc)
            out.append(Candidate(s, p, _weight_bytes(g), float(est["latency_ms"]),
                                 int(est["peak_memory_bytes"]),
                                 "heads" if prune_method == "head" else "channels"))
    return sorted(out, key=lambda c: (c.cost, c.weight_bytes))


def _fits(c: Candidate, budget_mb: float | None, latency_ms: float | None) -> bool:
    return (budget_mb is None or c.weight_bytes <= budget_mb * MIB) and \
        (latency_ms is None or c.latency_ms <= latency_ms)


def choose(candidates: list[Candidate], budget_mb: float | None, latency_ms: float | None,
           device_name: str) -> Candidate:
    for c in candidates:
        if _fits(c, budget_mb, latency_ms):
            return c
    small = min(candidates, key=lambda c: c.weight_bytes)
    fast = min(candidates, key=lambda c: c.latency_ms)

    def over(c: Candidate) -> float:
        a = c.weight_bytes / (budget_mb * MIB) if budget_mb else 0.0
        b = c.latency_ms / latency_ms if latency_ms else 0.0
        return max(a, b)

    near = min(candidates, key=over)
    want = " and ".join(x for x in (f"budget_mb={budget_mb:g}" if budget_mb else "",
                                    f"latency_ms={latency_ms:g}" if latency_ms else "") if x)
    raise BudgetError(
        f"no compression plan meets {want} on {device_name}: the smallest model is "
        f"{small.weight_bytes / MIB:.2f} MiB ({small.describe()}); the fastest is "
        f"{fast.latency_ms:.3f} ms ({fast.describe()}); the closest to both is "
        f"{near.describe()}. Raise the budget to at least "
        f"{small.weight_bytes / MIB:.2f} MiB / {fast.latency_ms:.3f} ms, or allow higher "
        f"sparsities / lower precisions")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compress(model: Any, data: Sequence[Mapping[str, Any]] | str, device: Any = "host", *,
             budget_mb: float | None = None, latency_ms: float | None = None,
             example_inputs: Any = None, sparsities: Sequence[float] = (0.0, 0.3, 0.5, 0.7),
             precisions: Sequence[str] = ("float", "int8", "int4"),
             prune_method: str = "channel", prune_ops: Sequence[str] | None = None,
             train: Sequence[tuple] | None = None, val: Sequence[tuple] | None = None,
             epochs: int = 2, verbose: bool = True) -> CompressResult:
    """Plan (see the module docstring), then prune → quantize → compile; prints each stage;
    returns the compiled model with the plan and measured figures.

    Without ``train``: pruning in the graph and PTQ calibrated on ``data``. With ``train``
    (``(inputs, labels)`` torch batches; ``val`` the same for the printed top-1): iterative
    pruning with distillation from the original model (``nn.Sequential`` CNNs; any other
    module is planned at sparsity 0), then QAT with distillation, ``epochs`` each
    (:mod:`compiler.compress.trained`).

    ``data`` a text (``str``): ``model`` is a decoder LLM and the route is
    :func:`compiler.compress.llm_plan.compress_llm` (PTQ at the precision the budget allows;
    call it directly for QAT steps and its other options); it returns an
    ``LlmCompressResult``."""
    from targets.description import load_target

    say = print if verbose else (lambda *a, **k: None)
    if isinstance(data, str):       # a text: the model is a decoder LLM
        from compiler.compress.llm_plan import compress_llm

        return compress_llm(model, data, device, budget_mb=budget_mb, say=say)
    data = [dict(s) for s in data]
    if train is not None and 0.0 in sparsities and not _sequential(model):
        say(f"compress(train=...): a {type(model).__name__} is not an nn.Sequential, which the "
            f"training route's pruning needs: QAT + distillation only (sparsity 0)")
        sparsities = (0.0,)
    if not data:
        raise NpuccError("compress needs sample inputs (data=[{input: array}, ...])")
    desc = load_target(device)
    cands = plan_compression(model, data, desc, sparsities=sparsities, precisions=precisions,
                             prune_method=prune_method, prune_ops=prune_ops,
                             example_inputs=example_inputs)
    say(f"compress for {desc.name}: budget_mb={budget_mb}, latency_ms={latency_ms}")
    for c in cands:
        say(f"  {'fits ' if _fits(c, budget_mb, latency_ms) else 'over '}{c.describe()}")
    choose(cands, budget_mb, latency_ms, desc.name)     # refuses when nothing can fit
    tried = []
    for plan in [c for c in cands if _fits(c, budget_mb, latency_ms)]:
        say(f"plan: {plan.describe()}")
        if train is not None:
            from compiler.compress.trained import train_route

            m = train_route(model, plan, desc, train, val or train, example_inputs,
                            epochs=epochs, prune_ops=prune_ops, say=say)
            measured = _measure(m)
        else:
            m, measured = _build(model, desc, plan, data, example_inputs, prune_method,
                                 prune_ops)
        if prune_method and plan.sparsity > 0 and m.prune_plan is not None:
            say(f"  pruned: {prune_method} {100 * plan.sparsity:.0f}% "
                f"({len(m.prune_plan.get('layers', {}))} layers)")
        say(f"  compiled: {measured['weight_bytes'] / MIB:.2f} MiB weights, package "
            f"{measured['package_bytes'] / MIB:.2f} MiB, {measured['latency_ms']:.3f} ms "
            f"estimated on {desc.name}")
        ok = (budget_mb is None or measured["weight_bytes"] <= budget_mb * MIB) and \
            (latency_ms is None or measured["latency_ms"] <= latency_ms)
        if ok:
            return CompressResult(m, plan, cands, measured)
        say("  over the budget once compiled (the plan is an estimate); next candidate")
        tried.append((plan, measured))
    plan, measured = min(tried, key=lambda t: t[1]["weight_bytes"])
    raise BudgetError(f"every plan the estimates allowed is over budget once compiled; the "
                      f"closest is {plan.describe()}, compiled to "
                      f"{measured['weight_bytes'] / MIB:.2f} MiB and "
                      f"{measured['latency_ms']:.3f} ms (budget_mb={budget_mb}, "
                      f"latency_ms={latency_ms})")


def _sequential(model: Any) -> bool:
    from torch import nn

    return isinstance(model, nn.Sequential)


def _build(model: Any, desc: Any, plan: Candidate, data: list, example_inputs: Any,
           prune_method: str, prune_ops: Sequence[str] | None) -> tuple[Any, dict[str, Any]]:
    from compiler.driver import compile as npucc_compile

    prune = _prune_config(plan.sparsity, prune_method, prune_ops)
    m = npucc_compile(model, desc, example_inputs=example_inputs, prune=prune,
                      quantize=quantize_config(plan.precision), calibration=data,
                      progress=False)
    return m, _measure(m)


def _measure(m: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="npucc-compress-"))
    try:
        pkg_bytes = _dir_bytes(m.save(tmp / "model.npkg"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"weight_bytes": int(m.stats()["weight_bytes"]), "package_bytes": pkg_bytes,
            "latency_ms": float(m.estimate()["latency_ms"])}
