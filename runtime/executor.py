"""The executor: runs a package's kernels in plan order on zero-copy views of one arena.

At construction the kernel library is loaded once, every step's function looked up once, the
weights copied once into one 64-byte aligned buffer, and — per arena — a TVM tensor view
(``tvm.runtime.from_dlpack`` on an aligned numpy view) made for every tensor and every step's
argument tuple bound, so ``run`` is: copy inputs in, ``f(*args)`` per step, copy outputs out.

Thread safety: **one arena per running thread**, created lazily the first time a thread runs
the model (the loading thread's arena is created at load). Kernels run only on long-lived
threads — the main thread and a small shared pool of runner threads (``runners.py``); ``run``
called from any other thread hands the work to a runner and waits, so short-lived calling
threads leave neither TVM thread pools nor arenas behind. Weights and the kernel library are
shared (read-only). Threads run concurrently without a lock; memory is ``arena_bytes`` per
thread that has run the model (``stats()["arenas"]`` counts the live ones, at most the runners
plus the main and loading threads) plus the weights once. An arena is freed when its thread ends.

Metrics are always on (``runtime/metrics.py``): every ``run`` records its latency, the arena
bytes held and the process RSS into a bounded window; ``metrics()`` summarises it, and with
``profiling = True`` every run also times each kernel.
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dtypes
from ._tvm import import_tvm
from ._verify import check_isa
from .errors import InputError, PackageError, RuntimeError_
from .memory_pool import ALIGN, align
from .metrics import Metrics
from .package import Package
from .runners import on_runner

__all__ = ["Executor", "Profile", "StepTime", "check_inputs", "load", "pack_weights"]


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer of ``nbytes`` whose data pointer is ALIGN-byte aligned."""
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


def pack_weights(stored: Mapping[str, np.ndarray], keys: Any) -> dict[str, np.ndarray]:
    """Copy the arrays ``keys`` names from ``stored`` into one ALIGN-aligned buffer; returns a
    uint8 view of each (the views keep the buffer alive). Executors of several modes of one
    package share such a dict, so a tensor the modes have in common is in memory once."""
    keys = sorted(set(keys))
    missing = [k for k in keys if k not in stored]
    if missing:
        raise PackageError(f"weight {missing[0]!r} is missing from the package's weights")
    offsets, total = {}, 0
    for k in keys:
        offsets[k] = total
        total += align(np.asarray(stored[k]).nbytes)
    buf = _aligned_bytes(max(total, ALIGN))
    out = {}
    for k in keys:
        data = np.ascontiguousarray(stored[k]).reshape(-1).view(np.uint8)
        out[k] = view = buf[offsets[k]:offsets[k] + data.nbytes]
        view[:] = data
    return out


@dataclass(frozen=True)
class StepTime:
    index: int
    node: str
    op: str
    kernel: str
    median_ms: float


@dataclass(frozen=True)
class Profile:
    """Per-step median kernel times and the median time of a whole ``run``."""

    steps: list[StepTime]
    total_ms: float    # median wall time of run(): copy in, every kernel, copy out
    kernel_ms: float   # sum of the per-step medians
    repeat: int

    def to_dict(self) -> dict[str, Any]:
        return {"total_ms": self.total_ms, "kernel_ms": self.kernel_ms, "repeat": self.repeat,
                "steps": [vars(s) for s in self.steps]}

    def table(self, top: int | None = None) -> str:
        rows = sorted(self.steps, key=lambda s: -s.median_ms)[:top] if top else self.steps
        lines = [f"{'#':>4}  {'node':<24} {'op':<16} {'kernel':<28} {'ms':>9}"]
        lines += [f"{s.index:>4}  {s.node[:24]:<24} {s.op[:16]:<16} {s.kernel[:28]:<28} "
                  f"{s.median_ms:>9.4f}" for s in rows]
        lines.append(f"kernels {self.kernel_ms:.4f} ms, run {self.total_ms:.4f} ms "
                     f"(median of {self.repeat})")
        return "\n".join(lines)

    __str__ = table


class _Arena:
    """One arena with its views and bound calls; used by one thread only."""

    __slots__ = ("buffer", "views", "calls", "__weakref__")

    def __init__(self, ex: Executor):
        self.buffer = _aligned_bytes(max(ex._arena_bytes, ALIGN))
        tvm_views: dict[str, Any] = dict(ex._weight_tvm)
        self.views: dict[str, np.ndarray] = dict(ex._weight_np)
        for t in ex._arena_tensors:
            raw = self.buffer[t["offset"]:t["offset"] + t["nbytes"]]
            tvm_views[t["name"]] = ex._tvm_view(raw, t)
            if t["name"] in ex._io_names:
                self.views[t["name"]] = raw.view(_dtypes.numpy_dtype(t["dtype"])).reshape(
                    t["shape"])
        self.calls = [(f, tuple(tvm_views[n] for n in (*s.inputs, *s.outputs)))
                      for f, s in zip(ex._funcs, ex._steps, strict=True)]


class Executor:
    """Runs a :class:`Package`. See the module docstring for memory and thread safety."""

    def __init__(self, package: Package, weights: Mapping[str, np.ndarray] | None = None):
        """``weights``: the package's weights already packed (:func:`pack_weights`), shared
        with other executors; default: this executor packs its own copy."""
        self.package = package
        m = package.manifest
        cores = (m.get("target") or {}).get("tvm", {}).get("num-cores")
        self._tvm = tvm = import_tvm(int(cores) if cores else None)
        self._steps = package.steps
        self._tensors = package.tensors
        self._inputs = [(t["name"], tuple(t["shape"]), _dtypes.numpy_dtype(t["dtype"]))
                        for t in m["inputs"]]
        self._outputs = [t["name"] for t in m["outputs"]]
        self._io_names = {n for n, _, _ in self._inputs} | set(self._outputs)
        for name in self._io_names:
            if _dtypes.bits(self._tensors[name]["dtype"]) < 8:
                raise PackageError(f"graph input/output {name!r} has sub-byte dtype "
                                   f"{self._tensors[name]['dtype']}; not supported at the "
                                   f"graph interface")
        self._arena_bytes = int(m["memory"]["arena_bytes"])
        self._arena_tensors = [t for t in self._tensors.values()
                               if t["kind"] != "weight" and t.get("offset") is not None]
        check_isa(m, package.lib_path)   # a missing ISA feature: refuse, never SIGILL
        try:
            self._lib = package.load_library(tvm)   # the verified bytes, never the path
        except Exception as e:  # TVM raises its own error types
            raise PackageError(f"cannot load kernel library {package.lib_path}: {e}") from e
        funcs: dict[str, Any] = {}
        for s in self._steps:
            if s.kernel not in funcs:
                try:
                    funcs[s.kernel] = self._lib[s.kernel]
                except Exception as e:
                    raise PackageError(f"kernel {s.kernel!r} (step {s.node}, {s.op}) is not in "
                                       f"{package.lib_path}") from e
        self._funcs = [funcs[s.kernel] for s in self._steps]
        self._load_weights(weights)
        package.release_weight_bytes()   # copied into our buffer: weights in memory once
        self._local = threading.local()
        self._arenas: weakref.WeakSet[_Arena] = weakref.WeakSet()
        self.mode_name: str | None = None   # which plan this is in a two-mode model (modes.py)
        self.recorder = Metrics(arena_bytes=self.arena_bytes_held)
        self._step_names = [(s.node, s.op, s.kernel) for s in self._steps]
        self._arena()  # the loading thread's arena, allocated now

    # -- construction helpers ----------------------------------------------------------------
    def _tvm_view(self, raw: np.ndarray, t: Mapping[str, Any]) -> Any:
        """A TVM tensor sharing ``raw``'s (aligned) bytes, typed as tensor ``t``."""
        from_dlpack = self._tvm.runtime.from_dlpack
        if _dtypes.dlpack_native(t["dtype"]):
            return from_dlpack(raw.view(_dtypes.numpy_dtype(t["dtype"])).reshape(t["shape"]))
        # bf16 / int4 / ...: numpy cannot export them through DLPack; retype a byte view.
        return from_dlpack(raw)._create_view(t["shape"], _dtypes.tvm_dtype(t["dtype"]))

    def _load_weights(self, packed: Mapping[str, np.ndarray] | None) -> None:
        wtensors = [t for t in self._tensors.values() if t["kind"] == "weight"]
        keys = sorted({t["weight"] for t in wtensors})
        if packed is None:
            packed = pack_weights(self.package.weights(), keys)
        missing = [k for k in keys if k not in packed]
        if missing:
            raise PackageError(f"weight {missing[0]!r} is missing from the package's weights")
        self._weights_packed = {k: packed[k] for k in keys}   # keeps the buffer(s) alive
        self._weight_bytes = sum(packed[k].nbytes for k in keys)
        self._weight_tvm: dict[str, Any] = {}
        self._weight_np: dict[str, np.ndarray] = {}
        for t in wtensors:
            raw = packed[t["weight"]][:t["nbytes"]]
            if raw.nbytes != t["nbytes"]:
                raise PackageError(f"weight {t['weight']!r} has {raw.nbytes} bytes; tensor "
                                   f"{t['name']!r} needs {t['nbytes']}")
            self._weight_tvm[t["name"]] = self._tvm_view(raw, t)
            if t["name"] in self._io_names:
                self._weight_np[t["name"]] = raw.view(_dtypes.numpy_dtype(t["dtype"])).reshape(
                    t["shape"])

    def _arena(self) -> _Arena:
        arena = getattr(self._local, "arena", None)
        if arena is None:
            arena = self._local.arena = _Arena(self)
            self._arenas.add(arena)
        return arena

    # -- running -----------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def input_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, numpy dtype) of every input, in graph order."""
        return [(n, s, np.dtype(d)) for n, s, d in self._inputs]

    def _feeds(self, inputs: Any) -> list[tuple[str, np.ndarray]]:
        return check_inputs(self._inputs, inputs)

    def run(self, inputs: Any, check_finite: bool = False) -> list[np.ndarray]:
        """Run once. ``inputs``: ``{name: array}``, a list in graph order, or the array itself
        for a single-input model. Returns the outputs (copies) in graph order.

        NaN and inf in an input propagate to the outputs as in onnxruntime (a NaN pixel gives
        NaN logits, never a plausible finite answer); ``check_finite=True`` refuses such an
        input instead, with an :class:`InputError` naming it."""
        feeds = self._feeds(inputs)
        if check_finite:
            _check_finite(feeds)
        t0 = time.perf_counter()
        out = on_runner(self._run_feeds, feeds)   # never on a short-lived thread (runners.py)
        self.recorder.record(time.perf_counter() - t0, self.mode_name)
        return out

    def _run_feeds(self, feeds: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        arena = self._arena()
        views = arena.views
        for name, x in feeds:
            np.copyto(views[name], x)
        i = 0
        try:
            if self.recorder.profiling:
                self._run_timed(arena.calls)
            else:
                for i, (f, args) in enumerate(arena.calls):  # noqa: B007
                    f(*args)
        except Exception as e:
            s = self._steps[i]
            raise RuntimeError_(f"kernel {s.kernel!r} failed at step {i} (node {s.node}, "
                                f"{s.op}): {e}") from e
        return [views[name].copy() for name in self._outputs]

    def _run_timed(self, calls: list) -> None:
        clock = time.perf_counter
        times = np.empty(len(calls))
        for j, (f, args) in enumerate(calls):
            t0 = clock()
            f(*args)
            times[j] = clock() - t0
        self.recorder.record_kernels(self.mode_name, self._step_names, times)

    # -- metrics ------------------------------------------------------------------------------
    @property
    def profiling(self) -> bool:
        """When True every run also records each kernel's time (``metrics()["kernels"]``)."""
        return self.recorder.profiling

    @profiling.setter
    def profiling(self, on: bool) -> None:
        self.recorder.profiling = bool(on)

    def arena_bytes_held(self) -> int:
        """Bytes of the arenas this executor holds now (one per thread that has run it)."""
        return len(self._arenas) * self._arena_bytes

    def metrics(self) -> dict[str, Any]:
        """Moving latency statistics (mean, p50/p90/p99) over the last runs, peak arena and
        RSS, per-kernel times when ``profiling`` is on (see ``runtime/metrics.py``)."""
        return self.recorder.summary()

    def __call__(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """``m(x)``, ``m(x1, x2)`` (graph order), ``m({"x": x})`` or ``m(x=x)``."""
        if kwargs:
            if args:
                raise InputError("pass inputs either positionally or by name, not both")
            return self.run(kwargs)
        if len(args) == 1 and (isinstance(args[0], Mapping) or len(self._inputs) == 1):
            return self.run(args[0])
        return self.run(list(args))

    def profile(self, inputs: Any, repeat: int = 10, warmup: int = 1) -> Profile:
        """Median time of every step over ``repeat`` runs, and of whole runs."""
        return on_runner(self._profile, inputs, repeat, warmup)

    def _profile(self, inputs: Any, repeat: int, warmup: int) -> Profile:
        feeds = self._feeds(inputs)
        for _ in range(warmup):
            self.run(dict(feeds))
        arena = self._arena()
        per_step: list[list[float]] = [[] for _ in arena.calls]
        clock = time.perf_counter
        for _ in range(repeat):
            for name, x in feeds:
                np.copyto(arena.views[name], x)
            for j, (f, args) in enumerate(arena.calls):
                t0 = clock()
                f(*args)
                per_step[j].append(clock() - t0)
        totals = []
        for _ in range(repeat):
            t0 = clock()
            self.run(dict(feeds))
            totals.append(clock() - t0)
        steps = [StepTime(j, s.node, s.op, s.kernel,
                          1e3 * statistics.median(per_step[j]) if per_step[j] else 0.0)
                 for j, s in enumerate(self._steps)]
        return Profile(steps, 1e3 * statistics.median(totals) if totals else 0.0,
                       sum(s.median_ms for s in steps), repeat)

    def stats(self) -> dict[str, Any]:
        mem = self.package.memory
        arenas = len(self._arenas)
        return {"arena_bytes": self._arena_bytes,
                "lower_bound_bytes": int(mem["lower_bound_bytes"]),
                "naive_bytes": int(mem["naive_bytes"]),
                "weight_bytes": self._weight_bytes,
                "arenas": arenas,
                "allocated_bytes": arenas * self._arena_bytes + self._weight_bytes,
                "steps": len(self._steps),
                "kernels": len({s.kernel for s in self._steps}),
                "inplace_steps": len(mem.get("inplace", [])),
                "target": self.package.target.get("name")}

    def __repr__(self) -> str:
        return (f"<Executor {self.input_names} -> {self.output_names}: {len(self._steps)} steps, "
                f"arena {self._arena_bytes} B>")


def check_inputs(spec: list[tuple[str, tuple[int, ...], Any]], inputs: Any
                 ) -> list[tuple[str, np.ndarray]]:
    """``inputs`` (a dict, a list in graph order, or the array of a one-input model) checked
    against ``spec`` (``(name, shape, numpy dtype)`` per input, graph order): ``[(name, array)]``
    in graph order, or :class:`InputError` naming the input at fault and what was expected."""
    names = [n for n, _, _ in spec]
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; the model's inputs are {names}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {names}")
        given = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise InputError(f"{len(inputs)} inputs given; the model takes {len(names)}: "
                             f"{names}")
        given = list(inputs)
    elif len(names) == 1:
        given = [inputs]
    else:
        raise InputError(f"the model takes {len(names)} inputs {names}: pass a dict or a list")
    feeds = []
    for (name, shape, dtype), x in zip(spec, given, strict=True):
        short = _dtypes.canonical(dtype)
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise InputError(f"input {name!r}: cannot convert {type(x).__name__} to "
                                 f"{short}{list(shape)}: {e}") from e
        if x.dtype != dtype:
            raise InputError(f"input {name!r} has dtype {x.dtype}; expected {dtype} "
                             f"({short}{list(shape)}) — convert with .astype(np.{dtype})")
        if x.shape != shape:
            raise InputError(f"input {name!r} has shape {list(x.shape)}; expected "
                             f"{list(shape)} ({short})")
        feeds.append((name, x))
    return feeds


def _check_finite(feeds: list[tuple[str, np.ndarray]]) -> None:
    for name, x in feeds:
        if x.dtype.kind in "fc" or x.dtype.name.startswith(("bfloat", "float")):  # ml_dtypes
            bad = ~np.isfinite(x)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise InputError(f"input {name!r} has {int(bad.sum())} non-finite value(s) "
                                 f"(NaN or inf), the first at index {list(first)}: "
                                 f"{x[first]!r}")


def load(path: Any, trusted_keys: Any = None) -> Executor:
    """Load and verify the package at ``path`` and return an executor for it."""
    return Executor(Package.load(path, trusted_keys=trusted_keys))

