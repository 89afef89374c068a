"""Calibration: run the float graph on samples, keep per-tensor statistics, choose ranges.

``calibrate(graph, samples, values, method)`` runs ``compiler.ir.interpret`` with an observer
on every sample (a rich progress bar on a terminal) and returns ``{value name: (lo, hi)}``
for the requested values. Each :class:`TensorStats` keeps the running min/max and a
histogram (``BINS`` bins) whose range grows as samples arrive (old counts are re-binned).

Range selection (``method``):

- ``minmax``: the observed min and max;
- ``percentile``: the ``(100 - p)`` and ``p`` percentiles of the histogram (p = 99.99);
- ``entropy``: TensorRT / onnxruntime KL calibration: the threshold ``t`` on |x| whose
  128-level quantized distribution is closest (KL divergence) to the clipped reference one;
  the range is the observed one clipped to ``[-t, t]``;
- ``mse``: the range ``[a*lo, a*hi]`` (a in (0, 1]) minimising the expected squared error of
  256-level asymmetric quantization over the histogram.

Every range contains 0 (zero must be exactly representable).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret

__all__ = ["TensorStats", "collect_stats", "calibrate", "select_range", "METHODS",
           "entropy_threshold"]

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048


@dataclass
class TensorStats:
    """Running statistics of one tensor over the calibration samples."""

    lo: float = np.inf
    hi: float = -np.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    edges: tuple[float, float] = (0.0, 0.0)
    count: int = 0
    ch_min: np.ndarray | None = None   # per channel of the last axis (activation smoothing)
    ch_max: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if x.ndim >= 1 and x.size:
            rows = x.reshape(-1, x.shape[-1])
            lo_c, hi_c = rows.min(axis=0), rows.max(axis=0)
            if self.ch_min is None:
                self.ch_min, self.ch_max = lo_c, hi_c
            elif self.ch_min.shape == lo_c.shape:
                self.ch_min = np.minimum(self.ch_min, lo_c)
                self.ch_max = np.maximum(self.ch_max, hi_c)
        x = x.ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        nlo, nhi = min(self.lo, lo, 0.0), max(self.hi, hi, 0.0)
        if nhi <= nlo:
            nhi = nlo + 1e-8
        if self.count == 0:
            self.edges = (nlo, nhi)
        elif nlo < self.edges[0] or nhi > self.edges[1]:
            self._rebin(min(nlo, self.edges[0]), max(nhi, self.edges[1]))
        h, _ = np.histogram(x, bins=BINS, range=self.edges)
        self.hist += h
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.size

    def _rebin(self, lo: float, hi: float) -> None:
        # grow the range by 1.5x at least, so a slowly growing tensor does not rebin often
        olo, ohi = self.edges
        width = ohi - olo
        lo = min(lo, olo - 0.25 * width) if lo < olo else lo
        hi = max(hi, ohi + 0.25 * width) if hi > ohi else hi
        centres = olo + (np.arange(BINS) + 0.5) * (width / BINS)
        h, _ = np.histogram(centres, bins=BINS, range=(lo, hi), weights=self.hist)
        self.hist = h
        self.edges = (lo, hi)

    def centres(self) -> np.ndarray:
        lo, hi = self.edges
        return lo + (np.arange(BINS) + 0.5) * ((hi - lo) / BINS)


def collect_stats(graph: Graph, samples: Sequence[Mapping[str, np.ndarray]],
                  values: Iterable[str], *, progress: bool | None = None
                  ) -> dict[str, TensorStats]:
    """Run ``graph`` on every sample and gather statistics of the named values."""

    wanted = set(values)
    stats = {name: TensorStats() for name in wanted}
    inputs = {v.name for v in graph.inputs} & wanted

    def observe(node, results):
        for v, r in zip(node.outputs, results, strict=True):
            if v.name in wanted:
                stats[v.name].update(r)

    samples = list(samples)
    if not samples:
        raise NpuccError("calibration needs at least one sample input (calibration=[...])")
    show = sys.stderr.isatty() if progress is None else progress
    from rich.progress import Progress

    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task("calibrating", total=len(samples))
        for i, sample in enumerate(samples):
            _check_finite(sample, i)
            interpret(graph, dict(sample), observe=observe)
            for name in inputs:
                stats[name].update(sample[name])
            bar.advance(task)
    return stats


def _check_finite(sample: Mapping[str, np.ndarray], index: int) -> None:
    """A NaN or inf in a calibration sample would make every range it reaches NaN/inf, and
    the quantized model silently wrong: refuse it, naming the sample and the input."""
    for name, value in sample.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise NpuccError(f"calibration sample {index}, input {name!r}: {bad} value(s) are "
                             f"NaN or inf; calibration needs finite data (clean or drop that "
                             f"sample)")


def entropy_threshold(stats: TensorStats, levels: int = 128, step: int = 4) -> float:
    """KL-optimal clipping threshold on |x| (TensorRT's algorithm on an |x| histogram)."""
    c = stats.centres()
    amax = max(abs(stats.lo), abs(stats.hi))
    if amax <= 0:
        return 0.0
    nb = BINS
    hist, _ = np.histogram(np.abs(c), bins=nb, range=(0.0, amax), weights=stats.hist)
    best, best_i = np.inf, nb
    for i in range(levels, nb + 1, step):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        nz = p > 0
        if not nz.any():
            continue
        # quantize the i bins into `levels` groups, spread each group's mass over its
        # non-empty bins
        idx = (np.arange(i) * levels) // i
        sums = np.bincount(idx, weights=hist[:i], minlength=levels)
        cnts = np.bincount(idx, weights=(hist[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(hist[:i] > 0, sums[idx] / np.maximum(cnts[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs <= 0:
            continue
        pn, qn = p / ps, q / qs
        mask = nz & (qn > 0)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        kl += float(pn[nz & (qn <= 0)].sum()) * 1e3  # mass Q cannot represent
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * (amax / nb)


def _percentile_range(stats: TensorStats, p: float) -> tuple[float, float]:
    cdf = np.cumsum(stats.hist)
    total = cdf[-1]
    if total <= 0:
        return stats.lo, stats.hi
    c = stats.centres()
    lo_i = int(np.searchsorted(cdf, total * (100.0 - p) / 100.0))
    hi_i = int(np.searchsorted(cdf, total * p / 100.0))
    lo, hi = float(c[min(lo_i, BINS - 1)]), float(c[min(hi_i, BINS - 1)])
    return max(lo, stats.lo), min(hi, stats.hi)


def _mse_range(stats: TensorStats, levels: int = 256) -> tuple[float, float]:
    c, w = stats.centres(), stats.hist
    lo0, hi0 = min(stats.lo, 0.0), max(stats.hi, 0.0)
    best, best_r = np.inf, (lo0, hi0)
    for a in np.linspace(0.05, 1.0, 96):
        lo, hi = lo0 * a, hi0 * a
        s = (hi - lo) / (levels - 1)
        if s <= 0:
            continue
        z = np.round(-lo / s)
        q = (np.clip(np.round(c / s) + z, 0, levels - 1) - z) * s
        err = float(np.sum(w * (c - q) ** 2))
        if err < best:
            best, best_r = err, (lo, hi)
    return best_r


def select_range(stats: TensorStats, method: str = "minmax", percentile: float = 99.99
                 ) -> tuple[float, float]:
    """The (lo, hi) quantization range of one tensor; always contains 0."""
    if stats.count == 0:
        return 0.0, 0.0
    if method == "minmax":
        lo, hi = stats.lo, stats.hi
    elif method == "percentile":
        lo, hi = _percentile_range(stats, percentile)
    elif method == "entropy":
        t = entropy_threshold(stats)
        lo, hi = max(stats.lo, -t), min(stats.hi, t)
    elif method == "mse":
        lo, hi = _mse_range(stats)
    else:
        raise NpuccError(f"calibration_method={method!r} is not one of {', '.join(METHODS)}")
    return min(float(lo), 0.0), max(float(hi), 0.0)


def calibrate(graph: Graph, samples: Sequence[Mapping[str, np.ndarray]], values: Iterable[str],
              method: str = "minmax", *, percentile: float = 99.99,
              progress: bool | None = None) -> dict[str, tuple[float, float]]:
    """``{value name: (lo, hi)}`` for ``values`` of ``graph`` over ``samples``."""
    if method not in METHODS:
        raise NpuccError(f"calibration_method={method!r} is not one of {', '.join(METHODS)}")
    stats = collect_stats(graph, samples, values, progress=progress)
    return {name: select_range(s, method, percentile) for name, s in stats.items()}
