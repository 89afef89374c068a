"""A model with several modes (plans) loaded at once, switched at run time.

``runtime.load(path)`` on a package with modes (``runtime/modes.py``) returns a
:class:`ModalExecutor`: one :class:`~runtime.executor.Executor` per mode, all built at load
(libraries loaded, weights copied, the loading thread's arenas allocated), one of them
active. A run reads the active executor **once**, at its start, and runs entirely on it, so
no run mixes modes; ``set_mode`` only replaces that reference (no reload, no lock held by
runs, no pause). Runs already under way finish in the mode they started in.

``auto_mode(latency_budget_ms=B, window=W)`` attaches :class:`AutoMode`: after every run it
looks at the p90 latency of the last ``W`` runs *in the current mode*; over ``B`` in the
accurate mode it switches to the fast one, and in the fast mode at or under ``headroom x B``
it switches back (hysteresis: between the two thresholds nothing changes, and after a switch
the window starts empty, so the next decision waits for ``W`` runs of the new mode). Every
switch is logged (logger ``npucc.modes``, INFO) and recorded in ``metrics()``.

All modes record into one :class:`~runtime.metrics.Metrics`; each record names its mode.
Weights are packed once for all modes (``executor.pack_weights``): a tensor the modes share
(embeddings, norms) is in memory once, as it is in the file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

import numpy as np

from .errors import PackageError
from .executor import Executor, Profile, pack_weights
from .metrics import Metrics, RunRecord
from .modes import has_modes, mode_packages, mode_report
from .package import Package

__all__ = ["ModalExecutor", "AutoMode", "load_model"]

log = logging.getLogger("npucc.modes")


class AutoMode:
    """The automatic policy of :meth:`ModalExecutor.auto_mode` (see the module docstring)."""

    def __init__(self, model: ModalExecutor, latency_budget_ms: float, window: int = 50,
                 headroom: float = 0.7, fast: str = "performance", accurate: str = "accuracy"):
        if latency_budget_ms <= 0:
            raise ValueError(f"latency_budget_ms must be positive, got {latency_budget_ms}")
        if window < 2:
            raise ValueError(f"window must be at least 2 runs, got {window}")
        if not 0 < headroom < 1:
            raise ValueError(f"headroom must be in (0, 1) (back to {accurate!r} when p90 <= "
                             f"headroom x budget), got {headroom}")
        for name in (fast, accurate):
            if name not in model.modes:
                raise ValueError(f"auto_mode: no mode {name!r}; the package's modes are "
                                 f"{model.modes} (name them with fast=..., accurate=...)")
        self.model = model
        self.budget_ms = float(latency_budget_ms)
        self.window = int(window)
        self.headroom = float(headroom)
        self.fast, self.accurate = fast, accurate
        self._lat: deque[float] = deque(maxlen=self.window)
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._lat.clear()

    def __call__(self, rec: RunRecord) -> None:
        model = self.model
        with self._lock:
            if rec.mode != model.mode:
                return   # a run that started before the last switch
            self._lat.append(rec.latency_ms)
            if len(self._lat) < self.window:
                return
            p90 = float(np.percentile(np.fromiter(self._lat, float, len(self._lat)), 90))
            if rec.mode == self.accurate and p90 > self.budget_ms:
                new, why = self.fast, f"p90 {p90:.3f} ms over the budget {self.budget_ms:g} ms"
            elif rec.mode == self.fast and p90 <= self.headroom * self.budget_ms:
                new, why = self.accurate, (f"p90 {p90:.3f} ms within {self.headroom:g} x the "
                                           f"budget {self.budget_ms:g} ms")
            else:
                return
            self._lat.clear()
        model._switch(new, "auto", why, p90)


class ModalExecutor:
    """Runs a package with several modes; see the module docstring."""

    def __init__(self, package: Package, mode: str | None = None,
                 metrics: Metrics | None = None):
        from .modes import default_mode

        self.package = package
        packages = mode_packages(package)
        self.recorder = metrics or Metrics()
        # every mode's weights packed once: a tensor the modes share is in memory once
        keys = {t["weight"] for p in packages.values() for t in p.manifest["tensors"]
                if t["kind"] == "weight"}
        shared = pack_weights(package.weights(), keys)
        self.weight_bytes = sum(v.nbytes for v in shared.values())
        self._executors: dict[str, Executor] = {}
        for name, pkg in packages.items():
            ex = Executor(pkg, weights=shared)
            ex.mode_name = name
            ex.recorder = self.recorder
            self._executors[name] = ex
        self.recorder.arena_bytes = self.arena_bytes_held
        first = next(iter(self._executors.values()))
        for name, ex in self._executors.items():
            if (ex.input_names, ex.output_names) != (first.input_names, first.output_names):
                raise PackageError(f"mode {name!r} has inputs {ex.input_names} and outputs "
                                   f"{ex.output_names}, unlike the other modes")
        start = mode if mode is not None else default_mode(package.manifest)
        if start not in self._executors:
            raise PackageError(f"no mode {start!r} in the package; its modes are {self.modes}")
        self._active = self._executors[start]
        self._switch_lock = threading.Lock()
        self._auto: AutoMode | None = None

    # -- modes ------------------------------------------------------------------------------
    @property
    def modes(self) -> list[str]:
        return list(self._executors)

    @property
    def mode(self) -> str:
        """The mode the next run will use."""
        return self._active.mode_name  # type: ignore[return-value]

    def set_mode(self, mode: str) -> None:
        """Make ``mode`` the active one: the next run uses it; runs under way finish in the
        mode they started in. Logged and recorded in ``metrics()["mode_switches"]``."""
        if mode not in self._executors:
            raise ValueError(f"no mode {mode!r}; the package's modes are {self.modes}")
        self._switch(mode, "user", "set_mode", None)

    def _switch(self, mode: str, by: str, reason: str, p90: float | None) -> None:
        with self._switch_lock:
            old = self._active.mode_name
            if old == mode:
                return
            self._active = self._executors[mode]
        self.recorder.record_switch(old, mode, by, reason, p90)
        log.info("mode %s -> %s (%s: %s)", old, mode, by, reason)
        if self._auto is not None:
            self._auto.reset()

    def auto_mode(self, latency_budget_ms: float | None, window: int = 50,
                  headroom: float = 0.7, fast: str = "performance",
                  accurate: str = "accuracy") -> AutoMode | None:
        """Switch automatically on the moving p90 latency (module docstring); ``None`` as the
        budget turns the policy off. Returns the policy."""
        if self._auto is not None:
            self.recorder.remove_listener(self._auto)
            self._auto = None
        if latency_budget_ms is None:
            return None
        self._auto = AutoMode(self, latency_budget_ms, window, headroom, fast, accurate)
        self.recorder.add_listener(self._auto)
        return self._auto

    def executor(self, mode: str) -> Executor:
        """The executor of one mode (e.g. to run it regardless of the active mode)."""
        if mode not in self._executors:
            raise ValueError(f"no mode {mode!r}; the package's modes are {self.modes}")
        return self._executors[mode]

    def report(self, mode: str | None = None) -> dict[str, Any]:
        """What the compiler recorded about a mode (estimate, NPU/CPU split), or ``{}``."""
        return mode_report(self.package.manifest, mode or self.mode)

    # -- running ----------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return self._active.input_names

    @property
    def output_names(self) -> list[str]:
        return self._active.output_names

    @property
    def input_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return self._active.input_specs

    def run(self, inputs: Any, check_finite: bool = False) -> list[np.ndarray]:
        """Run once in the active mode (read once, at the start: see the module docstring)."""
        return self._active.run(inputs, check_finite=check_finite)

    def run_with_mode(self, inputs: Any, check_finite: bool = False
                      ) -> tuple[list[np.ndarray], str]:
        """``run``, also returning the mode the whole run used."""
        ex = self._active
        return ex.run(inputs, check_finite=check_finite), ex.mode_name  # type: ignore

    def __call__(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        return self._active(*args, **kwargs)

    def profile(self, inputs: Any, repeat: int = 10, warmup: int = 1,
                mode: str | None = None) -> Profile:
        """Per-kernel profile of ``mode`` (default: the active one)."""
        ex = self.executor(mode) if mode is not None else self._active
        return ex.profile(inputs, repeat=repeat, warmup=warmup)

    # -- metrics ----------------------------------------------------------------------------
    @property
    def profiling(self) -> bool:
        return self.recorder.profiling

    @profiling.setter
    def profiling(self, on: bool) -> None:
        self.recorder.profiling = bool(on)

    def arena_bytes_held(self) -> int:
        return sum(ex.arena_bytes_held() for ex in self._executors.values())

    def metrics(self) -> dict[str, Any]:
        """``Executor.metrics()`` over every mode, plus the current mode and the switches."""
        out = self.recorder.summary()
        out["mode"] = self.mode
        out["modes"] = self.modes
        return out

    def stats(self) -> dict[str, Any]:
        """The active mode's ``stats()``, with every mode's under ``"modes"``."""
        per = {name: ex.stats() for name, ex in self._executors.items()}
        out = dict(per[self.mode])
        out["mode"] = self.mode
        out["modes"] = per
        out["weight_bytes_all_modes"] = self.weight_bytes   # shared tensors counted once
        out["allocated_bytes"] = self.arena_bytes_held() + self.weight_bytes
        return out

    def __repr__(self) -> str:
        return (f"<ModalExecutor {self.input_names} -> {self.output_names}: modes "
                f"{self.modes}, active {self.mode!r}>")


def load_model(path: str | os.PathLike, trusted_keys: Any = None,
               mode: str | None = None) -> Executor | ModalExecutor:
    """``runtime.load``: an :class:`Executor`, or a :class:`ModalExecutor` for a package with
    modes (starting in ``mode``, default: the package's default mode)."""
    pkg = Package.load(path, trusted_keys=trusted_keys)
    if has_modes(pkg.manifest):
        return ModalExecutor(pkg, mode=mode)
    if mode is not None:
        raise PackageError(f"{path} holds a single plan, not modes; load it without mode= "
                           f"(mode={mode!r} was asked for)")
    return Executor(pkg)
