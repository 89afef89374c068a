"""Checks a package must pass before any kernel is loaded: architecture, instruction set and
plan consistency.

File integrity (sha256) and the format version are checked by ``Package.load`` itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from . import _dtypes
from ._elf import host_arch, library_arch
from .cpu import cpu_brand, missing_features, target_features
from .errors import ArchitectureError, IsaError, PackageError, PlanError
from .memory_pool import MemoryPlan, PlanStep, PlanTensor, plan_memory

__all__ = ["check_arch", "check_isa", "check_manifest", "isa_record"]


def isa_record(tvm_target: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says about the instruction set: triple, CPU name, and the exact ISA
    features (LLVM names) the kernels were built with."""
    return {"triple": str(tvm_target.get("mtriple", "")) or f"{host_arch()}-unknown",
            "cpu": str(tvm_target.get("mcpu", "generic")),
            "features": sorted(target_features(tvm_target))}


def check_arch(lib: Path, manifest: dict[str, Any], where: Path | str | None = None) -> None:
    """The library's ELF machine is this machine's, agrees with the manifest, and its ISA
    features are all this CPU's. ``lib`` is read (a sealed copy may sit at
    /proc/self/fd/N); ``where`` is how errors name it (default ``lib``)."""
    arch = library_arch(lib)
    here = host_arch()
    name = where or lib
    if arch != here:
        raise ArchitectureError(f"{name} is an {arch} library; this machine is {here}. Compile "
                                f"the model for an {here} target to run it here")
    stated = manifest.get("target", {}).get("arch")
    if stated is not None and stated != arch:
        raise PackageError(f"{name} is an {arch} library but the manifest's target says "
                           f"{stated!r}")
    check_isa(manifest, name)


def check_isa(manifest: dict[str, Any], lib: Path | str) -> None:
    """Refuse a library built for ISA features this CPU lacks: loading it would end in SIGILL
    at the first such instruction. Runs before the library is dlopened."""
    target = manifest.get("target")
    if not isinstance(target, dict):
        raise PackageError(f"{lib}: the manifest has no target table")
    isa = target.get("isa")
    if isa is None:   # a package from before ISA records: derive them from its TVM target
        tvm_target = target.get("tvm")
        if not isinstance(tvm_target, dict):
            raise PackageError(f"{lib}: the manifest records neither target.isa nor target.tvm")
        try:
            isa = isa_record(tvm_target)
        except Exception as e:  # the runtime-only TVM library has no LLVM
            raise IsaError(f"{lib}: the manifest does not record the CPU features its kernels "
                           f"need and they cannot be derived here ({e}); recompile the "
                           f"package") from None
    feats = isa.get("features") if isinstance(isa, dict) else None
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        raise PackageError(f"{lib}: manifest target.isa.features must be a list of names")
    try:
        missing = missing_features(feats)
    except LookupError as e:
        warnings.warn(f"{lib}: {e}; loading without checking its instruction set",
                      stacklevel=3)
        return
    if missing:
        built = isa.get("cpu", "?")
        raise IsaError(
            f"{lib} was built for CPU {built!r} and needs instructions this CPU "
            f"({cpu_brand()}) does not have: {', '.join(missing)}. Recompile with "
            f"target=\"host\" on this machine, or with a portable level such as "
            f"cpu=\"x86-64-v3\" (npucc compile --cpu x86-64-v3) for packages that must run on "
            f"several machines", missing=missing)


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose plan is inconsistent: unknown tensors, overlapping live tensors."""
    try:
        tensors = {t["name"]: t for t in m["tensors"]}
        steps = m["steps"]
        mem = m["memory"]
        for io in m["inputs"] + m["outputs"]:
            if io["name"] not in tensors:
                raise PackageError(f"graph input/output {io['name']!r} has no tensor entry")
        for t in tensors.values():
            need = _dtypes.nbytes(t["shape"], t["dtype"])
            exact = _dtypes.dlpack_native(t["dtype"])
            if not isinstance(t["nbytes"], int) or (
                    t["nbytes"] != need if exact else t["nbytes"] < need):
                raise PackageError(f"tensor {t['name']!r} ({t['dtype']}{t['shape']}) has nbytes "
                                   f"{t['nbytes']!r}; expected {need}")
            if t["kind"] == "weight" and not t.get("weight"):
                raise PackageError(f"weight tensor {t['name']!r} names no safetensors key")
        io_names = {t["name"] for t in m["inputs"]} & {t["name"] for t in m["outputs"]}
        plan_steps = [PlanStep(tuple(s["inputs"]), tuple(s["outputs"])) for s in steps]
        plan_tensors = [PlanTensor(t["name"], int(t["nbytes"]), t["kind"])
                        for t in tensors.values()]
        replay = plan_memory(plan_tensors, plan_steps, [p[0] for p in mem["inplace"]],
                             inputs_also_outputs=io_names, orderings=["size"])
        if [list(p) for p in replay.inplace] != [list(p) for p in mem["inplace"]]:
            raise PackageError(f"in-place pairs {mem['inplace']} are not the ones the plan "
                               f"allows ({[list(p) for p in replay.inplace]})")
        offsets = {}
        for name in replay.offsets:
            off = tensors[name].get("offset")
            if not isinstance(off, int):
                raise PackageError(f"tensor {name!r} has no arena offset")
            offsets[name] = off
        MemoryPlan(offsets=offsets, sizes=replay.sizes, lifetimes=replay.lifetimes,
                   inplace=[tuple(p) for p in mem["inplace"]], arena_bytes=mem["arena_bytes"],
                   lower_bound_bytes=0, naive_bytes=0, alignment=mem["alignment"]).check()
    except (KeyError, TypeError, ValueError) as e:
        raise PackageError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
    except PlanError as e:
        raise PackageError(f"{where}: inconsistent plan: {e}") from e
