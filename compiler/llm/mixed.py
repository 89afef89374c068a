"""Mixed precision for LLM weights: a scheme per matrix, from a named preset or chosen by a
solver to fit a size budget with the least predicted loss.

The solver is an exact **multiple-choice knapsack by dynamic programming** over the bytes of
each matrix (``l{i}.q/k/v/o/gate/up/down`` from :data:`sensitivity.CANDIDATES`: int8 rows,
int4 g32/g128 (symmetric, and g32 asymmetric), int3 g32/g128, int2 g32/g64/g128; the
embedding, which a tied model's output projection reads too, from
:data:`sensitivity.TABLE_CANDIDATES`: int16 or int8 rows, or groups of int4 / int3 / int2 like
a projection, read by ``embed_wq`` and ``dense_wq``): minimise the sum of predicted losses
(:mod:`compiler.llm.sensitivity`: ``lambda_m * NSR(m, scheme)``, KL nats per token, taken as
additive over matrices) subject to the bytes fitting. Bytes are counted in bins of
``budget / 20000`` rounded *up*, so the plan's exact byte total never exceeds the budget.

The budget is the package's weights file (``weights.bin``) in MB (10^6 bytes): the matrices'
codes, scales and offsets, padded to 32 rows (the kernels' panels), plus what is not a
matrix (norms, biases, RoPE tables, a zero bias per matrix the GEMV kernels read, 64-byte
alignment per tensor). Norms, biases and RoPE tables stay f32 (a fraction of a percent).
An untied ``lm_head`` stays int8 per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.hf_import import LlmSpec
from compiler.llm.quantize import (
    PROJECTIONS,
    Scheme,
    matrix_bytes,
    parse_scheme,
    scheme_label,
    table_bytes,
)

__all__ = ["Plan", "PRESETS", "candidates", "label_of", "matrix_shapes", "fixed_bytes", "solve", "preset_plan",
           "plan_for_budget", "smallest_bytes", "is_mixed", "quantize_mixed", "plan_bytes",
           "transfer_by_depth", "shape_spec", "plan_of", "quantize_plan"]

MB = 1_000_000
PANEL = 32          # rows are padded to the kernels' panel width (2 x f32 lanes, <= 32)
ALIGN = 64          # weights.bin aligns every tensor
BINS = 20_000

#: named recipes: kind of matrix -> scheme label ("norm" is informational)
PRESETS: dict[str, dict[str, str]] = {
    # the seed's 2B recipe: attention int4 groups of 64, embedding int16, other linears int8
    "seed-2b": {"q": "int4-g64", "k": "int4-g64", "v": "int4-g64", "o": "int4-g64",
                "gate": "int8", "up": "int8", "down": "int8", "embed": "int16"},
}


@dataclass
class Plan:
    """A scheme per matrix, with its bytes and predicted loss."""
    name: str
    schemes: dict[str, Scheme]
    bytes: dict[str, int]
    fixed: int
    budget: int | None = None
    loss: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.fixed + sum(self.bytes.values())

    def bits_per_weight(self) -> float:
        return 8 * sum(self.bytes.values()) / max(sum(self.params.values()), 1)

    def table(self) -> str:
        """Per kind of matrix: how many matrices take each scheme, and the totals."""
        lines = [f"precision plan {self.name!r}: {self.total / MB:.2f} MB of weights"
                 + (f" (budget {self.budget / MB:.2f} MB)" if self.budget else "")
                 + f", {self.bits_per_weight():.2f} bits/weight over the matrices"
                 + (f", predicted KL {sum(self.loss.values()):.4f} nats/token"
                    if self.loss else "")]
        kinds: dict[str, dict[str, int]] = {}
        for m, s in self.schemes.items():
            row = kinds.setdefault(m.split(".")[-1], {})
            lab = label_of(s)
            row[lab] = row.get(lab, 0) + 1
        for kind in (*PROJECTIONS, "embed", "lm_head"):
            if kind in kinds:
                lines.append(f"  {kind:6} " + ", ".join(f"{lab} x{c}" for lab, c in
                                                        sorted(kinds[kind].items())))
        lines.append(f"  fixed  {self.fixed / MB:.2f} MB (norms, biases, RoPE tables, "
                     f"alignment) in f32")
        return "\n".join(lines)

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "solver": "multiple-choice knapsack (dynamic programming)"
                if self.budget else "preset",
                "budget_bytes": self.budget, "weights_bytes": self.total,
                "fixed_bytes": self.fixed, "bits_per_weight": round(self.bits_per_weight(), 4),
                "predicted_kl": round(sum(self.loss.values()), 6) if self.loss else None,
                "matrices": {m: label_of(s) for m, s in self.schemes.items()}}


def label_of(s: Scheme) -> str:
    return f"int{s.bits}" if s.bits == 16 else scheme_label(s)


def matrix_shapes(spec: LlmSpec) -> dict[str, tuple[int, int]]:
    """The matrices a plan covers: projections and the embedding table."""
    out = {f"l{i}.{p}": tuple(spec.weights[f"l{i}.{p}.w"].shape)
           for i in range(spec.layers) for p in PROJECTIONS if f"l{i}.{p}.w" in spec.weights}
    out["embed"] = tuple(spec.weights["embed"].shape)
    return out


def _padded(n: int) -> int:
    return -(-n // PANEL) * PANEL


def plan_bytes(name: str, shape: tuple[int, int], scheme: Scheme) -> int:
    """Bytes one matrix takes in weights.bin (padded rows, alignment, a zero bias). The
    embedding in int8 / int16 rows is a table with row scales; in groups (int4/3/2) it is
    stored as a projection (the tied output projection's GEMV adds its zero bias)."""
    n, k = shape
    if name == "embed" and scheme.group is None:
        return table_bytes(_padded(n), k, scheme.bits) + 2 * ALIGN
    return matrix_bytes(_padded(n), k, scheme) + 4 * n + 4 * ALIGN


def fixed_bytes(spec: LlmSpec, max_context: int) -> int:
    """weights.bin bytes that are not a planned matrix: norms, biases, other f32 tensors,
    the RoPE tables (cos and sin, ``max_context x head_dim/2`` f32 each), an untied int8
    ``lm_head``."""
    shapes = matrix_shapes(spec)
    planned = {f"{m}.w" for m in shapes if m != "embed"} | {"embed", "lm_head"}
    rest = sum(a.nbytes + ALIGN for k, a in spec.weights.items() if k not in planned)
    rope = 2 * max_context * (spec.head_dim // 2) * 4 + 2 * ALIGN
    head = 0
    if not spec.tied:
        n, k = spec.weights["lm_head"].shape
        head = matrix_bytes(_padded(n), k, Scheme(8, None, "rtn")) + 4 * n + 4 * ALIGN
    return rest + rope + head


def candidates(name: str) -> tuple[Scheme, ...]:
    """The schemes the solver may give matrix ``name``."""
    from compiler.llm.sensitivity import CANDIDATES, TABLE_CANDIDATES

    return TABLE_CANDIDATES if name == "embed" else CANDIDATES


def solve(shapes: Mapping[str, tuple[int, int]], loss: Mapping[str, Mapping[str, float]],
          budget: int, fixed: int, name: str = "solver") -> Plan:
    """The least-loss scheme per matrix whose bytes fit ``budget - fixed`` (module
    docstring). ``loss[m][label]`` for every candidate label of ``m``; raises naming the
    smallest achievable size when nothing fits."""
    items = list(shapes)
    opts = [[(s, plan_bytes(m, shapes[m], s), float(loss[m][label_of(s)]))
             for s in candidates(m) if label_of(s) in loss[m]] for m in items]
    smallest = fixed + sum(min(b for _, b, _ in o) for o in opts)
    room = budget - fixed
    if smallest > budget:
        raise NpuccError(f"a size budget of {budget / MB:.2f} MB cannot be met: the smallest "
                         f"plan (every matrix at its fewest bits) is {smallest / MB:.2f} MB "
                         f"({fixed / MB:.2f} MB of it norms, RoPE tables and alignment); "
                         f"give at least {math.ceil(smallest / MB * 100) / 100:.2f} MB")
    unit = max(1, room // BINS)
    nb = room // unit
    inf = np.inf
    dp = np.zeros(nb + 1)                       # least loss with at most b bins used
    picks = np.zeros((len(items), nb + 1), np.int16)
    for i, o in enumerate(opts):
        new = np.full(nb + 1, inf)
        for j, (_, b, lo) in enumerate(o):
            c = -(-b // unit)
            if c > nb:
                continue
            cand = np.full(nb + 1, inf)
            cand[c:] = dp[:nb + 1 - c] + lo
            better = cand < new
            new[better], picks[i, better] = cand[better], j
        dp = new
    if not np.isfinite(dp[nb]):
        raise NpuccError(f"a size budget of {budget / MB:.2f} MB cannot be met once bytes are "
                         f"rounded to {unit}-byte bins; give a slightly larger budget")
    b, schemes, nbytes, losses = nb, {}, {}, {}
    for i in range(len(items) - 1, -1, -1):
        s, by, lo = opts[i][picks[i, b]]
        schemes[items[i]], nbytes[items[i]], losses[items[i]] = s, by, lo
        b -= -(-by // unit)
    order = {m: i for i, m in enumerate(items)}
    schemes = dict(sorted(schemes.items(), key=lambda kv: order[kv[0]]))
    return Plan(name, schemes, nbytes, fixed, budget, losses,
                {m: shapes[m][0] * shapes[m][1] for m in items})


def preset_plan(name: str, spec: LlmSpec, max_context: int) -> Plan:
    """The named recipe of :data:`PRESETS` for ``spec``."""
    if name not in PRESETS:
        raise NpuccError(f"unknown precision preset {name!r}; presets: {', '.join(PRESETS)}")
    schemes = {}
    for m in matrix_shapes(spec):
        lab = PRESETS[name][m.split(".")[-1]]
        schemes[m] = Scheme(16, None, "rtn") if lab == "int16" else parse_scheme(lab)
    return plan_of(name, spec, schemes, max_context)


def smallest_bytes(spec: LlmSpec, max_context: int) -> int:
    """weights.bin bytes of the smallest plan: every matrix at its fewest bytes."""
    shapes = matrix_shapes(spec)
    return fixed_bytes(spec, max_context) + sum(
        min(plan_bytes(m, shapes[m], s) for s in candidates(m)) for m in shapes)


def shape_spec(vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
               kv_heads: int, tied: bool = True, name: str = "shape") -> LlmSpec:
    """A Llama spec whose weights are zero-strided f32 arrays of the right shapes (no memory):
    enough for :func:`matrix_shapes`, :func:`fixed_bytes`, :func:`plan_bytes` and
    :func:`solve` on a model that is not in memory (a 1.7B plan's bytes)."""
    d, hd = hidden, hidden // heads

    def z(*shape: int) -> np.ndarray:
        return np.broadcast_to(np.float32(0), shape)

    w = {"embed": z(vocab, d), "norm.w": z(d)}
    if not tied:
        w["lm_head"] = z(vocab, d)
    for i in range(layers):
        w.update({f"l{i}.attn_norm.w": z(d), f"l{i}.mlp_norm.w": z(d),
                  f"l{i}.q.w": z(heads * hd, d), f"l{i}.k.w": z(kv_heads * hd, d),
                  f"l{i}.v.w": z(kv_heads * hd, d), f"l{i}.o.w": z(d, heads * hd),
                  f"l{i}.gate.w": z(intermediate, d), f"l{i}.up.w": z(intermediate, d),
                  f"l{i}.down.w": z(d, intermediate)})
    return LlmSpec("llama", vocab, d, layers, heads, kv_heads, hd, intermediate, 1e-5,
                   tied=tied, weights=w, name=name)


def transfer_by_depth(values: Mapping[str, Any], layers_from: int,
                      shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """Per-matrix ``values`` of one model (``layers_from`` layers) carried to another of the
    same family (its ``shapes``): matrix ``l{i}.{kind}`` takes the same kind at the same
    relative depth, the embedding the embedding's. For predicted losses (plan a model that
    is not measured here: random weights have no meaningful sensitivity, and a 1.7B float copy
    does not fit the memory a plan is made in) and for schemes (a plan's recipe applied to
    another model)."""
    layers_to = 1 + max(int(m.split(".")[0][1:]) for m in shapes if m != "embed")
    out = {}
    for m in shapes:
        if m == "embed":
            out[m] = values["embed"]
            continue
        i, kind = int(m.split(".")[0][1:]), m.split(".")[1]
        out[m] = values[f"l{round(i * (layers_from - 1) / max(layers_to - 1, 1))}.{kind}"]
    return out


def plan_of(name: str, spec: LlmSpec, schemes: Mapping[str, Scheme], max_context: int
            ) -> Plan:
    """The plan that stores ``spec``'s matrices as ``schemes`` say (bytes as
    :func:`plan_bytes` counts them)."""
    shapes = matrix_shapes(spec)
    return Plan(name, dict(schemes), {m: plan_bytes(m, shapes[m], s) for m, s in schemes.items()},
                fixed_bytes(spec, max_context),
                params={m: shapes[m][0] * shapes[m][1] for m in shapes})


def plan_for_budget(spec: LlmSpec, budget_mb: float, *, max_context: int,
                    calibration: Any = None, sensitivity: Any = None, progress=None) -> Plan:
    """Sensitivity (measured unless given) and the knapsack for ``budget_mb`` MB."""
    from compiler.llm.sensitivity import measure_sensitivity

    budget = int(budget_mb * MB)
    fixed = fixed_bytes(spec, max_context)
    shapes = matrix_shapes(spec)
    if smallest_bytes(spec, max_context) > budget:   # refuse before measuring anything
        solve(shapes, {m: {label_of(s): 0.0 for s in candidates(m)} for m in shapes},
              budget, fixed)
    sens = sensitivity or measure_sensitivity(spec, calibration, progress=progress)
    return solve(shapes, sens.loss, budget, fixed, name=f"budget-{budget_mb:g}MB")


def is_mixed(quantize: str | None, size_budget_mb: float | None) -> bool:
    """Whether ``compile_llm`` takes the mixed-precision path (a preset or a budget)."""
    if size_budget_mb is not None and quantize is not None and quantize not in PRESETS:
        raise NpuccError(f"size_budget_mb chooses the schemes itself; drop quantize="
                         f"{quantize!r} (or give only quantize)")
    if size_budget_mb is not None and size_budget_mb <= 0:
        raise NpuccError(f"size_budget_mb must be positive, got {size_budget_mb}")
    return size_budget_mb is not None or quantize in PRESETS


def quantize_mixed(spec: LlmSpec, quantize: str | None, size_budget_mb: float | None, *,
                   max_context: int, calibration: Any = None, sensitivity: Any = None,
                   progress=None) -> LlmSpec:
    """The spec quantized by a preset or a budget's plan; the plan is printed (``progress``)
    and kept in ``spec.precision`` for the package manifest."""
    say = progress or (lambda msg: None)
    if size_budget_mb is not None:
        plan = plan_for_budget(spec, size_budget_mb, max_context=max_context,
                               calibration=calibration, sensitivity=sensitivity,
                               progress=say)
    else:
        plan = preset_plan(quantize, spec, max_context)
    say(plan.table())
    return quantize_plan(spec, plan, max_context)


def quantize_plan(spec: LlmSpec, plan: Plan, max_context: int) -> LlmSpec:
    """``spec`` quantized as ``plan`` says, the plan in ``spec.precision`` (the manifest's
    ``precision_plan``); ``compile_llm`` compiles the result as it is."""
    from dataclasses import replace

    from compiler.llm.quantize import quantize_spec

    out = quantize_spec(spec, Scheme(8, None, "rtn"), plan=plan.schemes, label=plan.name,
                        max_context=max_context)
    return replace(out, precision=plan.manifest())
