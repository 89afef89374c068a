"""Numeric debugging of a pipeline: per-pass error against the unoptimised graph, and
bisection to the first pass that breaks the numerics.

Both run the reference interpreter (``compiler.ir.interpret``) on sample inputs: given, or
generated from the input types with a fixed seed (floats standard normal; integers uniform in
``int_range``, half-open, or per input name with ``"*"`` for the rest, which the user sets because e.g. token ids must be < vocab; bools
fair coins).

Figures, compared with the unoptimised graph's outputs (aggregated over outputs and input
sets):
- ``max_abs``: the largest ``|ref - out|``;
- ``max_rel``: ``max_abs`` divided by the largest ``|ref|`` of that output (normalised, so
  outputs near zero do not blow it up);
- ``cosine``: cosine similarity of the flattened outputs (the smallest one).
A shape mismatch or a NaN where the reference has none counts as infinite error.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from compiler.errors import NpuccError, NumericCheckError
from compiler.instruments import Instrument, PassRun, render_table

if TYPE_CHECKING:
    from compiler.ir.graph import Graph
    from compiler.pass_base import Pass, PassContext, PassResult

__all__ = ["Figures", "NumericCheck", "NumericRecord", "BisectResult", "make_sample_inputs",
           "compare_outputs", "bisect", "METRICS"]

InputSets = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]
IntRange = tuple[int, int] | Mapping[str, tuple[int, int]]
METRICS = ("max_abs", "max_rel", "cosine")


@dataclass(frozen=True)
class Figures:
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0

    def error(self, metric: str) -> float:
        """The figure a tolerance is compared with (for cosine: ``1 - cosine``)."""
        if metric == "cosine":
            return 1.0 - self.cosine
        return getattr(self, metric)

    def __str__(self) -> str:
        return (f"max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}, "
                f"cosine {self.cosine:.6f}")


def make_sample_inputs(graph: Graph, seed: int = 0, int_range: IntRange = (0, 100)
                       ) -> dict[str, np.ndarray]:
    """Random inputs for ``graph`` from its input types, reproducible from ``seed``."""
    import ml_dtypes

    from compiler.ir.types import is_float

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        dt = v.type.np_dtype
        shape = v.type.shape
        if v.type.dtype == "bool":
            out[v.name] = rng.random(shape) < 0.5
        elif is_float(v.type.dtype):
            out[v.name] = rng.standard_normal(shape).astype(dt)
        else:
            lo, hi = (int_range.get(v.name, int_range.get("*", (0, 100)))
                      if isinstance(int_range, Mapping) else int_range)
            info = ml_dtypes.iinfo(dt)
            lo, hi = max(lo, int(info.min)), min(hi, int(info.max) + 1)
            if hi <= lo:
                raise NpuccError(f"input {v.name!r} ({v.type}): integer range [{lo}, {hi}) is "
                                 "empty for its dtype")
            out[v.name] = rng.integers(lo, hi, size=shape, dtype=np.int64).astype(dt)
    return out


def _as_sets(inputs: InputSets | None, graph: Graph, seed: int, int_range: IntRange
             ) -> list[dict[str, np.ndarray]]:
    if inputs is None:
        return [make_sample_inputs(graph, seed, int_range)]
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    return [dict(x) for x in inputs]


def _run(graph: Graph, sets: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from compiler.ir.interpreter import interpret

    return [interpret(graph, x) for x in sets]


def compare_outputs(ref: Sequence[Sequence[np.ndarray]], out: Sequence[Sequence[np.ndarray]]
                    ) -> Figures:
    """Figures of ``out`` against ``ref`` (lists of output lists, one per input set)."""
    max_abs, max_rel, cos = 0.0, 0.0, 1.0
    for rs, os_ in zip(ref, out, strict=True):
        if len(rs) != len(os_):
            return Figures(np.inf, np.inf, 0.0)
        for r, o in zip(rs, os_, strict=True):
            r = np.asarray(r, dtype=np.float64)
            o = np.asarray(o, dtype=np.float64)
            if r.shape != o.shape:
                return Figures(np.inf, np.inf, 0.0)
            if r.size == 0:
                continue
            both_nan = np.isnan(r) & np.isnan(o)
            diff = np.where(both_nan, 0.0, np.abs(r - o))
            diff = np.where(np.isnan(diff), np.inf, diff)
            a = float(diff.max())
            finite = np.where(np.isfinite(r), np.abs(r), 0.0)
            scale = float(finite.max())
            rel = a / scale if scale > 0 else (0.0 if a == 0 else np.inf)
            rf = np.where(np.isfinite(r), r, 0.0).ravel()
            of = np.where(np.isfinite(o), o, 0.0).ravel()
            nr, no = float(np.linalg.norm(rf)), float(np.linalg.norm(of))
            if nr == 0 and no == 0:
                c = 1.0
            elif nr == 0 or no == 0:
                c = 0.0
            else:
                c = float(np.dot(rf, of) / (nr * no))
            if a == np.inf:
                c = min(c, 0.0)
            max_abs, max_rel, cos = max(max_abs, a), max(max_rel, rel), min(cos, c)
    return Figures(max_abs, max_rel, cos)


@dataclass
class NumericRecord:
    index: int
    pass_text: str
    changed: bool
    figures: Figures


class NumericCheck(Instrument):
    """Interpret the unoptimised graph once and the graph after every pass; record the
    figures per pass (``records``), render them as a table at the end (to ``stream``, unless
    it is False), and raise :class:`NumericCheckError` naming the first pass whose
    ``metric`` exceeds ``tolerance``. A pass that reports ``changed=False`` is not
    re-interpreted."""

    def __init__(self, inputs: InputSets | None = None, *, seed: int = 0,
                 int_range: IntRange = (0, 100), tolerance: float | None = None,
                 metric: str = "max_abs", stream: TextIO | bool | None = None):
        if metric not in METRICS:
            raise NpuccError(f"unknown numeric metric {metric!r}; known: {', '.join(METRICS)}")
        self.inputs, self.seed, self.int_range = inputs, seed, int_range
        self.tolerance, self.metric, self.stream = tolerance, metric, stream
        self.records: list[NumericRecord] = []
        self.sets: list[dict[str, np.ndarray]] = []
        self.reference: list[list[np.ndarray]] = []
        self._last = Figures()

    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        self.records, self._last = [], Figures()
        self.sets = _as_sets(self.inputs, graph, self.seed, self.int_range)
        try:
            self.reference = _run(graph, self.sets)
        except NpuccError as e:
            raise NpuccError(f"numeric check: cannot run the unoptimised graph: {e}") from None

    def after(self, run: PassRun, result: PassResult) -> None:
        if result.changed or not self.records:
            try:
                outs = _run(result.graph, self.sets)
            except NpuccError as e:
                raise NumericCheckError(run.text, run.index,
                                        f"left a graph the interpreter cannot run: {e}") from e
            self._last = compare_outputs(self.reference, outs)
        self.records.append(NumericRecord(run.index, run.text, bool(result.changed), self._last))
        if self.tolerance is not None and not self._last.error(self.metric) <= self.tolerance:
            raise NumericCheckError(
                run.text, run.index,
                f"changed the outputs beyond the tolerance: {self.metric} "
                f"{self._last.error(self.metric):.3g} > {self.tolerance:g} ({self._last})")

    def report(self) -> str:
        rows = [[str(r.index + 1), r.pass_text, f"{r.figures.max_abs:.3g}",
                 f"{r.figures.max_rel:.3g}", f"{r.figures.cosine:.6f}",
                 "yes" if r.changed else "no"] for r in self.records]
        title = (f"Numeric check vs the unoptimised graph ({len(self.sets)} input set(s)"
                 + (f", tolerance {self.metric} {self.tolerance:g}" if self.tolerance is not None
                    else "") + ")")
        return render_table(title, ["#", "pass", "max abs err", "max rel err", "cosine",
                                    "changed"], rows, right=(0, 2, 3, 4))

    def on_error(self, run: PassRun, graph: Graph, error: BaseException) -> str | None:
        if isinstance(error, NumericCheckError) and self.records:
            self.finish(graph)  # the table up to the failing pass
        return None

    def finish(self, graph: Graph) -> None:
        if self.stream is False:
            return
        out = self.stream if self.stream not in (None, True) else sys.stdout
        out.write(self.report())
        out.flush()


@dataclass
class BisectResult:
    """Where a pipeline first breaks the numerics. ``index`` is None if it never does."""

    index: int | None
    pass_text: str | None
    figures: Figures  # after the bad pass (or after the whole pipeline if none is bad)
    previous: Figures  # after the pass before it
    tolerance: float
    metric: str
    probes: int  # how many pipeline prefixes were interpreted

    @property
    def found(self) -> bool:
        return self.index is not None

    def __str__(self) -> str:
        if self.index is None:
            return (f"no pass exceeds {self.metric} {self.tolerance:g}: after the whole "
                    f"pipeline {self.figures} ({self.probes} probe(s))")
        return (f"first pass exceeding {self.metric} {self.tolerance:g}: "
                f"#{self.index + 1} {self.pass_text}\n  after it:  {self.figures}\n"
                f"  before it: {self.previous}\n  ({self.probes} probe(s))")


def bisect(graph: Graph, pipeline: Any, inputs: InputSets | None = None, tol: float = 1e-4,
           *, metric: str = "max_abs", ctx: PassContext | None = None, seed: int = 0,
           int_range: IntRange = (0, 100), verify_each: bool = True) -> BisectResult:
    """Find the first pass after which ``metric`` exceeds ``tol``, by bisection over
    pipeline prefixes (about log2(n) interpretations; each pass runs at most twice).

    Assumes that once the numerics are broken later passes keep them broken; the per-pass
    table of :class:`NumericCheck` shows every pass when that does not hold. ``graph`` is
    not modified (prefixes run on copies).
    """
    from compiler.pass_manager import PassManager
    from compiler.pipeline import as_passes

    if metric not in METRICS:
        raise NpuccError(f"unknown numeric metric {metric!r}; known: {', '.join(METRICS)}")
    passes = as_passes(pipeline)
    sets = _as_sets(inputs, graph, seed, int_range)
    try:
        ref = _run(graph, sets)
    except NpuccError as e:
        raise NpuccError(f"bisect: cannot run the unoptimised graph: {e}") from None
    probes = 0

    def advance(g: Graph, start: int, stop: int) -> tuple[Graph, Figures]:
        nonlocal probes
        probes += 1
        pm = PassManager(passes[start:stop], verify_each=verify_each)
        pm.index_offset = start
        out = pm.run(g.copy(), ctx)
        try:
            fig = compare_outputs(ref, _run(out, sets))
        except NpuccError as e:
            raise NumericCheckError(passes[stop - 1].pipeline_text, stop - 1,
                                    f"left a graph the interpreter cannot run: {e}") from e
        return out, fig

    # lo: a prefix known good (graph after it kept), hi: a prefix known bad.
    good_graph, good_fig = graph, Figures()
    _, end_fig = advance(graph, 0, len(passes))
    if end_fig.error(metric) <= tol:
        return BisectResult(None, None, end_fig, end_fig, tol, metric, probes)
    lo, hi, bad_fig = 0, len(passes), end_fig
    while hi - lo > 1:
        mid = (lo + hi) // 2
        g, fig = advance(good_graph, lo, mid)
        if fig.error(metric) <= tol:
            lo, good_graph, good_fig = mid, g, fig
        else:
            hi, bad_fig = mid, fig
    return BisectResult(hi - 1, passes[hi - 1].pipeline_text, bad_fig, good_fig, tol, metric,
                        probes)
