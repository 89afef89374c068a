"""``compile_modes``: one package holding a model compiled several ways ("modes").

```python
from compiler.modes import compile_modes
mm = compile_modes("minilm.onnx", "kirin990", calibration=samples)   # performance + accuracy
mm.save("minilm.npkg", sign_key="key.pem")
m = runtime.load("minilm.npkg", mode="accuracy")
m.set_mode("performance")                        # next run; no reload, no pause
m.auto_mode(latency_budget_ms=20, window=50)     # p90 over 20 ms -> performance, and back
```

Each mode is an ordinary ``compile()`` of the model with that mode's options (the public API,
nothing else), so each mode's outputs are exactly those of its single-mode compile. The
packages are then merged by ``runtime.modes.merge_packages``: the default mode's plan is the
package's own, the others' plans and kernel libraries ride along, and every tensor whose bytes
are equal in two modes (embedding tables, norms, biases...) is stored once.

The default modes are the seed recipe:

- ``performance``: attention projections int4 (weight-only, group 128), the other linear
  layers (dense, matmul) static int8, embedding tables int8 (``w8``);
- ``accuracy``: attention int8 (static: projections and the attention matmuls), the other
  linear layers **fp32**, embeddings int8 as in ``performance`` (so they are shared).

Why fp32 and not int16 or fp16 for the accuracy mode's linears: npucc's quantizer has no
int16 or fp16 kernel for ``dense`` / ``matmul`` (int16 applies to embedding gathers, fp16 to
norms: ``passes/quantization/config.py``); fp32 is the precise choice that exists, and on the
Kirin NPU a float layer runs in fp16 anyway (``npu-numerics``), which the kirin990 estimate
models.

A mode is given as compile options (``{"quantize": ..., "prune": ..., ...}``), or directly as
a ``quantize=`` value (a preset string or a config mapping); options outside the mode apply
to every mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["DEFAULT_MODES", "compile_modes", "CompiledModes", "mode_options", "device_report"]

DEFAULT_MODES: dict[str, dict[str, Any]] = {
    "performance": {"quantize": {"attention": {"precision": "int4", "group_size": 128},
                                 "dense": "int8", "matmul": "int8", "gather": "w8"}},
    "accuracy": {"quantize": {"attention": "int8", "dense": "float", "matmul": "float",
                              "gather": "w8"}},
}


def _option_names() -> set[str]:
    from compiler.driver import CompileOptions

    return {f for f in CompileOptions.__dataclass_fields__ if f != "extra"}


def mode_options(name: str, spec: Any) -> dict[str, Any]:
    """A mode's compile options: ``spec`` as options, or as a ``quantize=`` value."""
    if isinstance(spec, str):
        return {"quantize": spec}
    if not isinstance(spec, Mapping):
        raise NpuccError(f"mode {name!r}: expected compile options (a dict such as "
                         f"{{'quantize': ...}}) or a quantize preset/config, got "
                         f"{type(spec).__name__}")
    known = _option_names()
    if "quantize" in spec or (spec and set(spec) <= known):
        bad = sorted(set(spec) - known)
        if bad:
            raise NpuccError(f"mode {name!r}: unknown compile option(s) {bad}; known: "
                             f"{', '.join(sorted(known))}")
        return dict(spec)
    return {"quantize": dict(spec)}


def device_report(cm: Any) -> dict[str, Any]:
    """What the compiler knows about a compiled mode, small enough for the manifest: the
    target's latency estimate (total, per device, NPU regions, transfers), nodes per device,
    and per plan step its device and estimated ms (``npucc monitor`` draws these)."""
    est = cm.estimate()
    split = cm.summary()
    rows = {r["node"]: r for r in est["nodes"]}
    devices = {n.label: n.device for n in cm.graph.nodes}
    steps = cm.package.steps
    return {
        "target": est["target"],
        "estimate_ms": float(est["latency_ms"]),
        "ms_per_device": {k: float(v) for k, v in est["ms_per_device"].items()},
        "npu_regions": int(est["npu_regions"]),
        "transfer_ms": float(est["transfer_ms"]),
        "nodes_per_device": dict(split["nodes_per_device"]),
        "step_device": [devices.get(s.node) or "cpu" for s in steps],
        "step_estimate_ms": [float(rows[s.node]["ms"]) if s.node in rows else 0.0
                             for s in steps],
    }


class CompiledModes:
    """The result of :func:`compile_modes`: every mode's :class:`CompiledModel`, the merged
    package, and a runnable :class:`runtime.modal.ModalExecutor` over it."""

    def __init__(self, models: Mapping[str, Any], default: str,
                 reports: Mapping[str, dict[str, Any]]):
        from runtime.modes import merge_packages

        self.models = dict(models)
        self.default = default
        self.reports = dict(reports)
        self.package = merge_packages({n: m.package for n, m in self.models.items()},
                                      default, self.reports)
        self._executor = None

    @property
    def modes(self) -> list[str]:
        return list(self.package.manifest["modes"]["order"])

    @property
    def executor(self):
        if self._executor is None:
            from runtime.modal import ModalExecutor

            self._executor = ModalExecutor(self.package)
        return self._executor

    def run(self, inputs: Any, check_finite: bool = False) -> list:
        return self.executor.run(inputs, check_finite=check_finite)

    def __call__(self, *args: Any, **kwargs: Any) -> list:
        return self.executor(*args, **kwargs)

    def set_mode(self, mode: str) -> None:
        self.executor.set_mode(mode)

    @property
    def mode(self) -> str:
        return self.executor.mode

    def save(self, path: str | os.PathLike, sign_key: Any = None,
             device_libraries: bool = True) -> Path:
        """Write the two-mode package (atomically; ``runtime.load`` reads it). Signed with
        ``sign_key`` (default: ``compile_modes(..., sign_key=)``). With ``device_libraries``
        each mode's target-CPU kernel library is included as ``CompiledModel.save`` does
        (cross-compiled on first use; left out with a warning without the cross compiler)."""
        from compiler.device import DEVICE_LIBRARY, needs_device_library
        from runtime.modes import merge_packages

        pkg = self.package
        if device_libraries and any(needs_device_library(m.target)
                                    for m in self.models.values()):
            import warnings

            for m in self.models.values():
                if not needs_device_library(m.target):
                    continue
                name = DEVICE_LIBRARY.format(arch=m.target.cpu.arch)
                try:
                    m.package.extra_files[name] = m.device_library.lib_path
                except NpuccError as e:
                    warnings.warn(f"{name} not written: {e}", stacklevel=2)
            pkg = self.package = merge_packages({n: m.package for n, m in self.models.items()},
                                                self.default, self.reports)
        key = sign_key if sign_key is not None else next(
            iter(self.models.values())).package.sign_key
        return pkg.save(path, sign_key=key)

    def __repr__(self) -> str:
        return f"<CompiledModes {self.modes}, default {self.default!r}>"


def compile_modes(model: Any, target: Any = "host", modes: Mapping[str, Any] | None = None,
                  default: str | None = None, pipeline: str | None = None, debug: Any = None,
                  **options: Any) -> CompiledModes:
    """Compile ``model`` once per mode and merge the packages (see the module docstring).

    ``modes``: ``{name: compile options or quantize value}`` (default :data:`DEFAULT_MODES`);
    ``default``: the mode a plain ``runtime.load`` starts in (default: the first); other
    keyword arguments are ``compile()`` options shared by every mode (``calibration=``,
    ``example_inputs=``, ``sign_key=``...).
    """
    from compiler.driver import compile as compile_one
    from runtime.errors import PackageError
    from runtime.modes import check_mode_name

    modes = DEFAULT_MODES if modes is None else modes
    if not isinstance(modes, Mapping) or not modes:
        raise NpuccError("modes= must be a non-empty dict {mode name: options}")
    try:
        for name in modes:
            check_mode_name(name)
    except PackageError as e:
        raise NpuccError(str(e)) from None
    default = default or next(iter(modes))
    if default not in modes:
        raise NpuccError(f"default mode {default!r} is not one of {list(modes)}")
    models, reports = {}, {}
    for name, spec in modes.items():
        kw = {**options, **mode_options(name, spec)}
        models[name] = compile_one(model, target, pipeline, debug, **kw)
        reports[name] = device_report(models[name])
        reports[name]["options"] = _describe(kw)
    return CompiledModes(models, default, reports)


def _describe(options: Mapping[str, Any]) -> dict[str, str]:
    """The mode-defining options as short text (for the manifest's report)."""
    keep = ("quantize", "prune", "size_budget_mb", "calibration_method", "cpu")
    return {k: str(options[k])[:400] for k in keep if options.get(k) is not None}
