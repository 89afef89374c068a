"""The result of ``compile``: a package plus what the compiler knows about it.

Running goes through the runtime's Executor (the same code a deployed package uses); the
compiler-side extras are the lowered graph, the partition summary, the cost-model estimate and
the phase times.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["CompiledModel"]


class CompiledModel:
    """A compiled, runnable model.

    ``run(inputs)`` / ``m(x)`` return outputs as numpy arrays in graph order; ``profile``
    gives per-kernel times; ``stats`` memory figures; ``save(path)`` writes the package that
    ``runtime.load`` reads. Thread safety is the runtime Executor's (see its docstring).
    """

    def __init__(self, package, *, graph, source, target, library, phase_seconds,
                 pass_context=None):
        self.package = package
        self.graph = graph            # the lowered graph the kernels were built from
        self.source = source          # the imported graph, before any pass
        self.target = target          # the TargetDescription
        self.library = library        # targets.tvm_codegen.KernelLibrary
        self.phase_seconds = dict(phase_seconds)
        self.pass_context = pass_context
        self._executor = None

    @property
    def executor(self):
        if self._executor is None:
            self._executor = self.package.executor()
        return self._executor

    # -- running ---------------------------------------------------------------------
    def run(self, inputs: Any) -> list:
        return self.executor.run(inputs)

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
        """Roofline estimate of device latency per node and in total (``latency_ms``)."""
        from targets.cost_model import estimate

        return estimate(self.graph, self.target)

    # -- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the package (atomically); ``runtime.load(path)`` reads it back."""
        return self.package.save(path)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<CompiledModel {self.graph.name} for {self.target.name}: "
                f"{s['steps']} steps, {s['kernels']} kernels, arena {s['arena_bytes']} B, "
                f"weights {s['weight_bytes']} B>")
