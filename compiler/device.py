"""Device outputs of a compiled model: the target CPU's own kernel library and the NPU regions.

A target whose CPU is not this machine's (kirin990, rk3588: aarch64) runs here on host kernels
built from the lowered graph (``driver.runnable_cpu``). What goes to the device is built here
from the *same* lowered graph:

- :func:`build_device_library`: every node's kernel compiled for the target's CPU
  (``desc.cpu_info()``: cortex-a76, +neon,+dotprod,+fullfp16) and linked by the description's
  cross compiler (``tvm.support.cc.cross_compiler``) into an AArch64 shared library.
- :func:`device_package`: a runtime Package around that library (its weights packed for the
  device's vector width), which ``runtime.load`` runs on an aarch64 machine (or under
  qemu-aarch64: bench/setup_qemu_aarch64.sh).
- :func:`export_device`: a folder with the device package and one QDQ ONNX model per NPU
  region (targets/export_onnx.py), the input of the vendor's NPU converter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["DEVICE_LIBRARY", "needs_device_library", "cross_compiler_for",
           "build_device_library", "device_package", "export_device"]

# where CompiledModel.save puts the target CPU's library inside the (host-runnable) package
DEVICE_LIBRARY = "device/kernels.{arch}.so"


def needs_device_library(desc) -> bool:
    """True when the target's CPU is not this machine's (the runnable package is a host build)."""
    from runtime.cpu import host_arch

    return host_arch() != desc.cpu.arch


def cross_compiler_for(desc) -> Callable | None:
    """``tvm.support.cc.cross_compiler`` for the description's ``[cpu] cross_compiler``.

    None when the target's CPU is this machine's architecture and no cross compiler is named;
    :class:`NpuccError` when one is needed but missing.
    """
    import platform

    name = desc.cpu.cross_compiler
    here = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    if not name:
        if desc.cpu.arch == here:
            return None
        raise NpuccError(f"target {desc.name} ({desc.file}): its CPU is {desc.cpu.arch}, this "
                         f"machine is {here}; name a cross compiler in [cpu] cross_compiler")
    if shutil.which(name) is None:
        hint = (" (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
                if "aarch64-linux-gnu" in name else "")
        raise NpuccError(f"target {desc.name}: the cross compiler {name!r} ([cpu] "
                         f"cross_compiler in {desc.file}) is not on PATH{hint}")
    from tvm.support import cc

    return cc.cross_compiler(name)


def build_device_library(graph, desc, out_dir: str | os.PathLike,
                         progress: Callable[[str], None] | None = None):
    """The lowered ``graph``'s kernels for the target's own CPU: a ``KernelLibrary`` whose
    ``lib_path`` (``out_dir/kernels.so``) is a shared library for ``desc.cpu.arch``."""
    from targets.tvm_codegen import build_library

    return build_library(graph, desc.cpu_info(), out_dir, progress=progress,
                         cross_compiler=cross_compiler_for(desc))


def device_package(graph, desc, lib):
    """A runtime Package (not yet saved) running ``lib`` (from :func:`build_device_library`)."""
    from compiler.driver import inplace_steps, value_tensors
    from runtime import build_package

    cpu = desc.cpu_info()
    return build_package(
        {"name": desc.name, "tvm": cpu.tvm_target, "arch": cpu.arch},
        [v.name for v in graph.inputs], [v.name for v in graph.outputs], lib.steps,
        value_tensors(graph, lib.weights), lib.weights, lib.lib_path,
        inplace_steps(lib.steps))


def export_device(model, out_dir: str | os.PathLike, *,
                  calibration: Iterable[Mapping[str, Any]] | None = None,
                  num_random_samples: int = 4) -> dict[str, Any]:
    """Write what goes to the device for a :class:`compiler.compiled.CompiledModel`.

    ``out_dir/``:

    - ``device.npkg/``: the runtime package with the target CPU's kernels (every node, NPU
      regions included, as CPU code: the device's CPU fallback), runnable by ``runtime.load``
      on the target's CPU architecture;
    - ``npu/region<id>.onnx``: each NPU region as a QDQ ONNX model (int8 per-channel weights,
      per-tensor activations), calibrated on ``calibration`` (input dicts of the whole model)
      or, without it, on ``num_random_samples`` random inputs (the model's doc_string says
      which);
    - ``export.json``: what was written, with each region's inputs/outputs.

    Returns the content of ``export.json``.
    """
    from targets.export_onnx import export_regions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = model.device_library
    pkg_dir = device_package(model.graph, model.target, lib).save(out / "device.npkg")
    regions = export_regions(model.graph, out / "npu", target=model.target,
                             calibration=calibration, num_random_samples=num_random_samples,
                             seed=0)
    info = {
        "target": model.target.name,
        "cpu": {"arch": model.target.cpu.arch, "tvm": model.target.cpu_info().tvm_target,
                "package": str(pkg_dir.relative_to(out))},
        "npu_regions": [r.to_json(out) for r in regions],
    }
    (out / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
