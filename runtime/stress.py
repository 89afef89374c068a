"""A concurrency stress test of a loaded model: ``npucc stress`` and :func:`stress`.

``stress(model, inputs, concurrency=100, runs=10000)`` runs the model ``runs`` times from
``concurrency`` caller threads at once (released together by a barrier) and checks every
output bit for bit against a single-threaded run of the same input, made first on the calling
thread. Several input *variants* take turns (run ``i`` uses variant ``i % V``), so a run that
read another thread's arena, or returned another call's result, shows up as a mismatch; the
variants are the given inputs rolled along their flattened elements, so values stay in the
set the model expects (token ids stay token ids).

Memory and threads (``psutil``): the process RSS and thread count are taken at the start, after
a warm-up phase (the first concurrent runs legitimately create the runtime's runner threads and
their arenas, ``runtime/runners.py``), and at the end once the callers have finished. The
report fails on any mismatch or error, on RSS growth from the warm-up to the end beyond
``max_rss_growth_mb``, or on more threads at the end than after the warm-up (beyond
``max_thread_growth``).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["StressReport", "stress", "input_variants", "random_inputs"]


@dataclass
class StressReport:
    """What :func:`stress` measured; ``ok`` is False when any check failed (``failures``)."""

    runs: int
    concurrency: int
    variants: int
    checked: int                   # runs compared, warm-up included
    seconds: float
    mismatches: int
    errors: int
    first_problem: str | None
    latency_ms: dict[str, float]
    rss: dict[str, int]            # start, warm, end (bytes)
    threads: dict[str, int]        # start, warm, end
    max_rss_growth: int
    max_thread_growth: int
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        mib = {k: v / 2**20 for k, v in self.rss.items()}
        lat = self.latency_ms
        lines = [
            f"{self.runs} runs from {self.concurrency} concurrent callers, {self.variants} "
            f"input variants, in {self.seconds:.1f} s ({self.runs / self.seconds:.1f} runs/s)",
            f"latency per call (ms, as callers saw it, queueing included): p50 {lat['p50']:.2f}"
            f", p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}, max {lat['max']:.2f}",
            f"outputs bit-identical to single-threaded runs: "
            f"{self.checked - self.mismatches - self.errors}/{self.checked} (warm-up included; "
            f"{self.mismatches} mismatches, {self.errors} errors)",
            f"RSS MiB: start {mib['start']:.1f}, after warm-up {mib['warm']:.1f}, end "
            f"{mib['end']:.1f} (growth after warm-up {mib['end'] - mib['warm']:+.1f}, limit "
            f"{self.max_rss_growth / 2**20:.0f})",
            f"threads: start {self.threads['start']}, after warm-up {self.threads['warm']}, "
            f"end {self.threads['end']} (growth limit {self.max_thread_growth})",
        ]
        if self.first_problem:
            lines.append(f"first problem: {self.first_problem}")
        lines.append("OK" if self.ok else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def random_inputs(specs: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for ``[{name, shape, dtype}]`` (a manifest's ``inputs``): floats from
    N(0, 1), integers and booleans 0 or 1 (valid token ids, masks and indices)."""
    from . import _dtypes

    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        dt = np.dtype(_dtypes.numpy_dtype(s["dtype"]))
        shape = tuple(s["shape"])
        if dt.kind == "f":
            out[s["name"]] = rng.standard_normal(shape).astype(dt)
        else:
            out[s["name"]] = rng.integers(0, 2, shape).astype(dt)
    return out


def input_variants(inputs: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """``count`` inputs: ``inputs`` itself, then each array's flattened elements rolled by
    ``7 k`` positions (same values, other places: other outputs)."""
    out = [dict(inputs)]
    for k in range(1, count):
        out.append({n: np.roll(np.asarray(a).ravel(), 7 * k).reshape(np.shape(a))
                    for n, a in inputs.items()})
    return out


def _process() -> Any:
    import psutil

    return psutil.Process()


def _snapshot(proc: Any) -> tuple[int, int]:
    gc.collect()
    return proc.memory_info().rss, proc.num_threads()


def _differs(got: Sequence[np.ndarray], want: Sequence[np.ndarray], names: Sequence[str]
             ) -> str | None:
    """Why ``got`` is not bit-identical to ``want`` (None when it is)."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for g, w, name in zip(got, want, names, strict=True):
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"output {name!r} is {g.dtype}{list(g.shape)}, not {w.dtype}{list(w.shape)}"
        if g.tobytes() != w.tobytes():
            bad = int(np.count_nonzero(g.view(np.uint8) != w.view(np.uint8)))
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            return (f"output {name!r}: {bad} bytes differ, max abs difference "
                    f"{float(np.nanmax(diff)) if diff.size else 0:.3g}")
    return None


class _Phase:
    """``runs`` runs from ``concurrency`` threads; counts mismatches and errors."""

    def __init__(self, model: Any, variants: list, refs: list, names: list[str]):
        self.model, self.variants, self.refs, self.names = model, variants, refs, names
        self.lock = threading.Lock()
        self.next = 0
        self.mismatches = self.errors = 0
        self.first: str | None = None
        self.latencies: list[float] = []

    def _problem(self, kind: str, text: str) -> None:
        with self.lock:
            if kind == "mismatch":
                self.mismatches += 1
            else:
                self.errors += 1
            if self.first is None:
                self.first = text

    def _caller(self, runs: int, barrier: threading.Barrier) -> None:
        mine: list[float] = []
        barrier.wait()
        while True:
            with self.lock:
                i, self.next = self.next, self.next + 1
            if i >= runs:
                break
            v = i % len(self.variants)
            t0 = time.perf_counter()
            try:
                out = self.model.run(self.variants[v])
            except Exception as e:  # every failure is counted and reported, none is lost
                self._problem("error", f"run {i} (variant {v}) raised {type(e).__name__}: {e}")
                continue
            mine.append(time.perf_counter() - t0)
            why = _differs(out, self.refs[v], self.names)
            if why:
                self._problem("mismatch", f"run {i} (variant {v}): {why}")
        with self.lock:
            self.latencies += mine

    def run(self, runs: int, concurrency: int) -> float:
        self.next = 0
        barrier = threading.Barrier(concurrency + 1)
        threads = [threading.Thread(target=self._caller, args=(runs, barrier),
                                    name=f"stress-{k}", daemon=True)
                   for k in range(concurrency)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def stress(model: Any, inputs: Mapping[str, np.ndarray] | None = None, concurrency: int = 100,
           runs: int = 10000, variants: int = 4, warmup: int | None = None,
           max_rss_growth_mb: float = 64.0, max_thread_growth: int = 0) -> StressReport:
    """Stress ``model`` (a loaded model: ``runtime.load``); see the module docstring.
    ``inputs``: one input dict (default: :func:`random_inputs` of the model's inputs);
    ``warmup``: concurrent runs before the memory baseline (default ``2 * concurrency``)."""
    if concurrency < 1 or runs < 1 or variants < 1:
        raise ValueError(f"concurrency, runs and variants must be >= 1 (got {concurrency}, "
                         f"{runs}, {variants})")
    proc = _process()
    rss0, th0 = _snapshot(proc)
    if inputs is None:
        inputs = random_inputs(model.package.manifest["inputs"])
    vs = input_variants(inputs, variants)
    names = list(model.output_names)
    refs = [model.run(v) for v in vs]          # single-threaded, on this thread
    failures = []
    again = [model.run(v) for v in vs]
    for k, (a, b) in enumerate(zip(again, refs, strict=True)):
        why = _differs(a, b, names)
        if why:
            failures.append(f"two single-threaded runs of variant {k} differ ({why}): the "
                            f"model is not deterministic, so nothing can be compared")
    phase = _Phase(model, vs, refs, names)
    warmup = warmup if warmup is not None else 2 * concurrency
    phase.run(warmup, concurrency)
    rss1, th1 = _snapshot(proc)
    warm = (phase.mismatches, phase.errors, phase.first)
    phase.mismatches = phase.errors = 0
    phase.first, phase.latencies = None, []
    seconds = phase.run(runs, concurrency)
    rss2, th2 = _snapshot(proc)
    lat = np.asarray(phase.latencies or [0.0]) * 1e3
    report = StressReport(
        runs=runs, concurrency=concurrency, variants=len(vs), checked=warmup + runs,
        seconds=seconds,
        mismatches=phase.mismatches + warm[0], errors=phase.errors + warm[1],
        first_problem=warm[2] or phase.first,
        latency_ms={"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                    "p99": float(np.percentile(lat, 99)), "max": float(lat.max())},
        rss={"start": rss0, "warm": rss1, "end": rss2},
        threads={"start": th0, "warm": th1, "end": th2},
        max_rss_growth=int(max_rss_growth_mb * 2**20), max_thread_growth=max_thread_growth,
        failures=failures)
    if report.mismatches:
        report.failures.append(f"{report.mismatches} outputs differ from the single-threaded "
                               f"run of the same input")
    if report.errors:
        report.failures.append(f"{report.errors} runs raised an error")
    if rss2 - rss1 > report.max_rss_growth:
        report.failures.append(f"RSS grew by {(rss2 - rss1) / 2**20:.1f} MiB after the warm-up "
                               f"(limit {max_rss_growth_mb:g} MiB): a leak?")
    if th2 - th1 > max_thread_growth:
        report.failures.append(f"{th2 - th1} more threads at the end than after the warm-up "
                               f"(limit {max_thread_growth})")
    return report
