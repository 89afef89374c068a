"""The result of ``compile``: a package plus what the compiler knows about it.

Running goes through the runtime's Executor (the same code a deployed package uses); the
compiler-side extras are the lowered graph, the partition summary, the cost-model estimate and
the phase times.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["CompiledModel"]


class CompiledModel:
    """A compiled, runnable model.

    ``run(inputs)`` / ``m(x)`` return outputs as numpy arrays in graph order; ``profile``
    gives per-kernel times; ``stats`` memory figures; ``save(path)`` writes the package that
    ``runtime.load`` reads. Thread safety is the runtime Executor's (see its docstring).
    """

    def __init__(self, package, *, graph, source, target, library, phase_seconds,
                 pass_context=None, work_dir=None):
        self.package = package
        self.graph = graph            # the lowered graph the kernels were built from
        self.source = source          # the imported graph, before any pass
        self.target = target          # the TargetDescription
        self.library = library        # targets.tvm_codegen.KernelLibrary
        self.phase_seconds = dict(phase_seconds)
        self.pass_context = pass_context
        self.work_dir = Path(work_dir) if work_dir is not None else library.lib_path.parent
        self._executor = None
        self._device_library = None
        if self.prune_plan is not None:
            package.sparse_weights = True   # pruned weights stored bitmask/CSR when saved

    @property
    def executor(self):
        if self._executor is None:
            self._executor = self.package.executor()
        return self._executor

    # -- running ---------------------------------------------------------------------
    def run(self, inputs: Any, check_finite: bool = False) -> list:
        return self.executor.run(inputs, check_finite=check_finite)

    def __call__(self, *args: Any, **kwargs: Any) -> list:
        return self.executor(*args, **kwargs)

    def profile(self, inputs: Any, repeat: int = 10, warmup: int = 1):
        return self.executor.profile(inputs, repeat=repeat, warmup=warmup)

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.package.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.package.outputs]

    # -- reports ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Memory plan and sizes: arena_bytes, lower_bound_bytes, naive_bytes, weight_bytes,
        plus kernel counts and compile phase times."""
        mem = dict(self.package.memory)
        return {
            "arena_bytes": mem["arena_bytes"],
            "lower_bound_bytes": mem["lower_bound_bytes"],
            "naive_bytes": mem["naive_bytes"],
            "weight_bytes": mem["weight_bytes"],
            "weight_bytes_stored": self.package.stored_weight_bytes(),
            "steps": len(self.package.steps),
            "kernels": len(self.library.kernels),
            "kernels_reused": len(self.library.reused),
            "compile_seconds": dict(self.phase_seconds),
        }

    def summary(self) -> dict[str, Any]:
        """Where every node runs: nodes per device and every CPU fallback with its reason."""
        from passes.partition import partition_summary

        return partition_summary(self.graph, self.target)

    def estimate(self) -> dict[str, Any]:
        """The target's latency estimate, per node and in total (``latency_ms``): a roofline
        scaled by the target's ``[cost]`` calibration, with that calibration's error band
        (``band``; ``summary`` says it in words, e.g. "6.1 ms, typically within x1.13 ...").
        An uncalibrated target says so in ``summary``."""
        from targets.cost_model import estimate

        return estimate(self.graph, self.target)

    # -- device outputs (compiler/device.py) ---------------------------------------------
    @property
    def device_library(self):
        """The lowered graph's kernels for the target's own CPU (a ``KernelLibrary``).

        For a target whose CPU is this machine's, the runnable library itself; otherwise built
        on first use with the description's cross compiler (an AArch64 library for kirin990).
        """
        from compiler.device import build_device_library, needs_device_library

        if not needs_device_library(self.target):
            return self.library
        if self._device_library is None:
            self._device_library = build_device_library(self.graph, self.target,
                                                        self.work_dir / "device")
        return self._device_library

    def export_device(self, path: str | os.PathLike, *, calibration: Any = None,
                      num_random_samples: int = 4) -> dict[str, Any]:
        """Write the device outputs to folder ``path``: ``device.npkg/`` (runtime package with
        the target CPU's kernels), ``npu/region<id>.onnx`` (each NPU region as QDQ ONNX,
        calibrated on ``calibration`` input dicts or random inputs), ``export.json``."""
        from compiler.device import export_device

        return export_device(self, path, calibration=calibration,
                             num_random_samples=num_random_samples)

    def quant_report(self, samples: Any = None, out_dir: str | os.PathLike | None = None
                     ) -> dict[str, Any]:
        """Per-layer and output error of this (quantized) model against its float version on
        ``samples`` (default: the calibration samples, else random), and weight bytes; with
        ``out_dir``, also JSON + HTML + heatmap PNG there
        (:mod:`passes.quantization.report`)."""
        from passes.quantization.report import model_report, write_report

        ctx = self.pass_context
        samples = samples if samples is not None else self.calibration
        plan = ctx.options.get("mixed_plan") if ctx is not None else None
        rep = model_report(self.source, self.graph, self.target, samples, plan=plan)
        if out_dir is not None:
            rep["files"] = {k: str(v) for k, v in write_report(rep, out_dir).items()}
        return rep

    @property
    def calibration(self) -> list[dict[str, Any]] | None:
        """The calibration samples ``compile`` was given (bound as ``@calibration``)."""
        ctx = self.pass_context
        return ctx.resources.get("calibration") if ctx is not None else None

    @property
    def prune_plan(self) -> dict[str, Any] | None:
        """What the ``prune`` pass did (method, options, per-layer record), if it ran."""
        ctx = self.pass_context
        return ctx.options.get("prune_plan") if ctx is not None else None

    def prune_report(self, samples: Any = None, show: bool = True) -> dict[str, Any]:
        """Per-layer sparsity, parameters before/after and the output error (cosine, max abs,
        relative) of this compiled model against the unpruned imported model on ``samples``
        (default: the calibration samples); prints a table when ``show``
        (:mod:`passes.pruning.report`)."""
        from passes.pruning.report import print_report, prune_report

        samples = samples if samples is not None else self.calibration
        rep = prune_report(self.source, self.graph, self.prune_plan, self.run,
                           list(samples) if samples is not None else None,
                           stored_bytes=self.package.stored_weight_bytes(),
                           dense_bytes=self.package.memory["weight_bytes"])
        if show:
            print_report(rep)
        return rep

    # -- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, sign_key: Any = None) -> Path:
        """Write the package (atomically); ``runtime.load(path)`` reads it back. Signed with
        ``sign_key`` (default: ``compile(..., sign_key=)``), see ``runtime/signing.py``.

        For a target whose CPU is not this machine's, the package also holds the target CPU's
        kernel library as ``device/kernels.<arch>.so`` (hash in the manifest); the runnable
        ``kernels.so`` stays the host build. Without the cross compiler that file is left out
        with a warning.
        """
        from compiler.device import DEVICE_LIBRARY, needs_device_library

        if needs_device_library(self.target):
            name = DEVICE_LIBRARY.format(arch=self.target.cpu.arch)
            try:
                self.package.extra_files[name] = self.device_library.lib_path
            except NpuccError as e:
                import warnings

                warnings.warn(f"{name} not written: {e}", stacklevel=2)
        return self.package.save(path, sign_key=sign_key)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<CompiledModel {self.graph.name} for {self.target.name}: "
                f"{s['steps']} steps, {s['kernels']} kernels, arena {s['arena_bytes']} B, "
                f"weights {s['weight_bytes']} B>")
