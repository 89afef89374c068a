"""Run metrics, always on: a bounded window of what every run of a model cost.

Every :class:`~runtime.executor.Executor` (and every mode of a two-mode model,
``runtime/modes.py``) records each ``run`` into a :class:`Metrics`: its wall latency as the
caller saw it (waiting for a runner thread included), the mode it ran in, the arena bytes the
model holds, and the process's resident set size. Records live in a ring buffer of ``window``
runs (``collections.deque(maxlen=...)``), so memory stays bounded however long the process
serves. With ``profiling`` on, each run also times every kernel; those per-step times are kept
for the last ``kernel_window`` runs per mode. Mode switches (``set_mode`` and the automatic
policy) are kept too, with the reason and the p90 that triggered them.

Cost per run (the point of "always on"): two ``perf_counter`` calls, one small tuple appended
to a deque, and a resident-set read at most every ``rss_interval_s`` (``pread`` of
``/proc/self/statm`` on an open descriptor, a few microseconds; elsewhere ``psutil``).
``bench/metrics_overhead.py`` measures it against runs with recording off.

``summary()`` (``m.metrics()``) computes on demand: moving average and p50 / p90 / p99 of the
window, runs per mode, peak arena and RSS, the mode switches and per-kernel statistics.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Metrics", "RunRecord", "ModeSwitch", "RssReader", "latency_stats"]


class RunRecord(NamedTuple):
    """One run: seconds since the metrics started, latency (ms), mode, arena and RSS bytes."""

    t: float
    latency_ms: float
    mode: str | None
    arena_bytes: int
    rss_bytes: int


@dataclass(frozen=True)
class ModeSwitch:
    """A change of the active mode: when, from, to, who asked (``"user"`` / ``"auto"``), why."""

    t: float
    old: str | None
    new: str
    by: str
    reason: str
    p90_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "from": self.old, "to": self.new, "by": self.by,
                "reason": self.reason, "p90_ms": self.p90_ms}


class RssReader:
    """The process's resident set size in bytes, cheaply: ``pread`` of ``/proc/self/statm`` on
    a descriptor kept open (reopened after a fork), else ``psutil``."""

    def __init__(self) -> None:
        self._pid = -1
        self._fd: int | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._lock = threading.Lock()

    def __call__(self) -> int:
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    try:
                        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                    except OSError:
                        self._fd = None
                    self._pid = os.getpid()
        if self._fd is not None:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        import psutil

        return int(psutil.Process().memory_info().rss)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def latency_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99, min, max of ``values`` (ms); zeros for an empty window."""
    if not len(values):
        return {k: 0.0 for k in ("mean", "p50", "p90", "p99", "min", "max")}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, (50, 90, 99))
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(a.min()), "max": float(a.max())}


class Metrics:
    """The bounded per-model record of runs; thread-safe (see the module docstring).

    ``arena_bytes``: a callable giving the arena bytes the model holds now (set by the owner:
    an executor counts its live arenas, a two-mode model sums its modes').
    """

    def __init__(self, window: int = 1000, kernel_window: int = 100,
                 rss_interval_s: float = 0.01,
                 arena_bytes: Callable[[], int] | None = None):
        if window < 1 or kernel_window < 1:
            raise ValueError(f"metrics windows must be at least 1 run (window={window}, "
                             f"kernel_window={kernel_window})")
        self.window = window
        self.kernel_window = kernel_window
        self.rss_interval_s = rss_interval_s
        self.arena_bytes = arena_bytes or (lambda: 0)
        self.enabled = True
        self.profiling = False
        self.start = time.perf_counter()
        self._runs: deque[RunRecord] = deque(maxlen=window)
        self._kernels: dict[str | None, deque[np.ndarray]] = {}
        self._kernel_steps: dict[str | None, list[tuple[str, str, str]]] = {}
        self._switches: deque[ModeSwitch] = deque(maxlen=max(window, 1000))
        self._listeners: list[Callable[[RunRecord], None]] = []
        self._lock = threading.Lock()
        self._rss = RssReader()
        self._rss_at = -1.0
        self._rss_last = 0
        self.total_runs = 0
        self.runs_per_mode: dict[str | None, int] = {}
        self.peak_rss_bytes = 0
        self.peak_arena_bytes = 0

    # -- recording (hot path) ----------------------------------------------------------------
    def record(self, latency_s: float, mode: str | None) -> RunRecord | None:
        """Record one finished run; returns the record (None when recording is off)."""
        if not self.enabled:
            return None
        now = time.perf_counter()
        if now - self._rss_at >= self.rss_interval_s:
            self._rss_at = now
            self._rss_last = rss = self._rss()
            if rss > self.peak_rss_bytes:
                self.peak_rss_bytes = rss
        arena = self.arena_bytes()
        rec = RunRecord(now - self.start, latency_s * 1e3, mode, arena, self._rss_last)
        with self._lock:
            self._runs.append(rec)
            self.total_runs += 1
            self.runs_per_mode[mode] = self.runs_per_mode.get(mode, 0) + 1
            if arena > self.peak_arena_bytes:
                self.peak_arena_bytes = arena
            listeners = self._listeners
        for fn in listeners:
            fn(rec)
        return rec

    def record_kernels(self, mode: str | None, steps: Sequence[tuple[str, str, str]],
                       seconds: np.ndarray) -> None:
        """Per-step kernel seconds of one profiled run; ``steps``: (node, op, kernel) each."""
        with self._lock:
            q = self._kernels.get(mode)
            if q is None:
                q = self._kernels[mode] = deque(maxlen=self.kernel_window)
                self._kernel_steps[mode] = list(steps)
            q.append(np.asarray(seconds, dtype=np.float64) * 1e3)

    def record_switch(self, old: str | None, new: str, by: str, reason: str,
                      p90_ms: float | None = None) -> ModeSwitch:
        sw = ModeSwitch(time.perf_counter() - self.start, old, new, by, reason, p90_ms)
        with self._lock:
            self._switches.append(sw)
        return sw

    def add_listener(self, fn: Callable[[RunRecord], None]) -> None:
        """Call ``fn(record)`` after every recorded run (in the thread that ran)."""
        with self._lock:
            self._listeners = [*self._listeners, fn]

    def remove_listener(self, fn: Callable[[RunRecord], None]) -> None:
        with self._lock:
            self._listeners = [f for f in self._listeners if f is not fn]

    def set_window(self, window: int) -> None:
        """Keep the last ``window`` runs from now on (the newest kept ones stay)."""
        if window < 1:
            raise ValueError(f"metrics window must be at least 1 run, got {window}")
        with self._lock:
            self._runs = deque(self._runs, maxlen=window)
            self.window = window

    def clear(self) -> None:
        """Forget every run, kernel time and switch; restart the clock (e.g. after warm-up)."""
        with self._lock:
            self._runs.clear()
            self._kernels.clear()
            self._kernel_steps.clear()
            self._switches.clear()
            self.total_runs = 0
            self.runs_per_mode = {}
            self.peak_rss_bytes = self.peak_arena_bytes = 0
            self._rss_at = -1.0
            self.start = time.perf_counter()

    # -- reading -----------------------------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        """The window of run records, oldest first (a copy)."""
        with self._lock:
            return list(self._runs)

    def switches(self) -> list[ModeSwitch]:
        with self._lock:
            return list(self._switches)

    def kernel_stats(self) -> dict[str | None, list[dict[str, Any]]]:
        """Per mode, per step: node, op, kernel, mean / p50 ms over the profiled runs kept."""
        with self._lock:
            data = {m: (self._kernel_steps[m], np.stack(list(q))) for m, q in
                    self._kernels.items() if q}
        out: dict[str | None, list[dict[str, Any]]] = {}
        for mode, (steps, times) in data.items():
            mean, p50 = times.mean(axis=0), np.median(times, axis=0)
            out[mode] = [{"index": i, "node": node, "op": op, "kernel": kernel,
                          "mean_ms": float(mean[i]), "p50_ms": float(p50[i]),
                          "runs": int(times.shape[0])}
                         for i, (node, op, kernel) in enumerate(steps)]
        return out

    def summary(self) -> dict[str, Any]:
        """The figures ``m.metrics()`` returns (see the module docstring)."""
        runs = self.runs()
        lat = [r.latency_ms for r in runs]
        by_mode: dict[str | None, list[float]] = {}
        for r in runs:
            by_mode.setdefault(r.mode, []).append(r.latency_ms)
        span = runs[-1].t - runs[0].t if len(runs) > 1 else 0.0
        return {
            "runs": self.total_runs,
            "window": len(runs),
            "window_seconds": span,
            "runs_per_second": (len(runs) - 1) / span if span > 0 else 0.0,
            "latency_ms": latency_stats(lat),
            "latency_ms_by_mode": {m: latency_stats(v) for m, v in by_mode.items()},
            "runs_per_mode": dict(self.runs_per_mode),
            "arena_bytes": runs[-1].arena_bytes if runs else self.arena_bytes(),
            "peak_arena_bytes": self.peak_arena_bytes,
            "rss_bytes": runs[-1].rss_bytes if runs else self._rss(),
            "peak_rss_bytes": self.peak_rss_bytes,
            "mode_switches": [s.to_dict() for s in self.switches()],
            "kernels": self.kernel_stats(),
            "profiling": self.profiling,
        }
