"""The ``host`` target: the machine ``compile`` runs on, detected each time, never written down.

Our machines change CPU from one day to the next (a Sapphire Rapids Xeon with avx512_fp16 and
AMX one day, a Zen EPYC without either the next), so nothing about "this machine" may be a
constant in code or in ``host.toml``. :func:`detect_host` asks:

- LLVM (through TVM) for the CPU model's name and that model's features
  (``llvm_get_system_cpu``, ``llvm_get_cpu_features``);
- the CPU itself (CPUID on x86, hwcaps on aarch64: ``runtime.cpu``) which ISA features it
  really has. A hypervisor can make LLVM name a model the guest does not fully match (a
  Sapphire Rapids guest reported as a Rocket Lake), so, like clang's ``-march=native``, the
  model's list is corrected with ``mattr``: ``+f`` for what the CPU has beyond it, ``-f`` for
  what the model claims and the CPU lacks;
- the OS for the cores this process may use (affinity mask and cgroup quota), the cache
  sizes (sysfs) and the clock.

``detect_host("x86-64-v3")`` instead describes a named portable level (:data:`PORTABLE_LEVELS
<runtime.cpu.PORTABLE_LEVELS>`), for packages meant to run on other machines: its features
are LLVM's for that CPU name, not this machine's. The environment variable ``NPUCC_HOST_CPU``
forces a level for every host build in the process (how the tests exercise an AVX2-only
build on an AVX-512 machine).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError
from runtime.cpu import (
    PORTABLE_LEVELS,
    cpu_brand,
    host_arch,
    running_features,
    target_features,
)
from targets.kernels.base import CpuInfo

__all__ = ["HostCpu", "detect_host", "cpu_info_for", "HOST_CPU_ENV"]

HOST_CPU_ENV = "NPUCC_HOST_CPU"


def cpu_info_for(tvm_target: Mapping[str, Any], *, arch: str | None = None,
                 num_cores: int | None = None, **extra: Any) -> CpuInfo:
    """The kernel builders' :class:`CpuInfo` for a TVM target dict: features from LLVM,
    vector width from the features (512 with AVX-512, 256 with AVX, 128 on NEON)."""
    target = dict(tvm_target)
    triple = str(target.get("mtriple", ""))
    arch = arch or ("aarch64" if triple.startswith("aarch64") else
                    "x86_64" if triple.startswith("x86_64") or not triple else host_arch())
    feats = target_features(target)
    cores = num_cores or int(target.get("num-cores", 1))
    return CpuInfo(tvm_target=target, arch=arch, simd_bits=_simd_bits(arch, feats),
                   num_cores=cores, features=feats, **extra)


def _simd_bits(arch: str, feats: frozenset[str]) -> int:
    if arch == "x86_64":
        return 512 if "avx512f" in feats else 256 if "avx" in feats else 128
    return 128   # NEON (SVE is vector-length agnostic; our schedules use NEON widths)


@dataclass(frozen=True)
class HostCpu:
    """What was detected (or named): everything a host build needs to know."""

    arch: str
    mcpu: str                    # LLVM CPU name
    mattr: tuple[str, ...]       # corrections of the model's features (native builds only)
    features: frozenset[str]     # ISA features the kernels may use (LLVM names)
    cores: int                   # usable cores (affinity mask, cgroup quota)
    brand: str                   # CPUID brand string / /proc/cpuinfo model name
    level: str | None = None     # None: this machine; else the portable level asked for
    l1d_bytes: int | None = None
    l2_bytes: int | None = None
    l3_bytes: int | None = None
    ghz: float | None = None

    def tvm_target(self) -> dict[str, Any]:
        t: dict[str, Any] = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.cores}
        if self.mattr:
            t["mattr"] = list(self.mattr)
        return t

    def cpu_info(self) -> CpuInfo:
        extra = {k: v for k, v in (("l1d_bytes", self.l1d_bytes), ("l2_bytes", self.l2_bytes))
                 if v}
        return CpuInfo(tvm_target=self.tvm_target(), arch=self.arch,
                       simd_bits=_simd_bits(self.arch, self.features), num_cores=self.cores,
                       features=self.features, **extra)

    def summary(self) -> str:
        """One line for logs and bench headers: name, cores, vector ISA, capabilities."""
        info = self.cpu_info()
        what = f"portable level {self.level}" if self.level else f"LLVM {self.mcpu}"
        caps = [f"{info.simd_bits}-bit SIMD"]
        caps += [f"{name} {'yes' if on else 'no'}" for name, on in
                 (("fp16_arith", info.fp16_arith), ("int8_dot", info.int8_dot),
                  ("amx", info.amx))]
        return f"{self.brand} ({what}), {self.cores} cores; " + ", ".join(caps)


def detect_host(cpu: str | None = None) -> HostCpu:
    """This machine (``cpu`` None or ``"native"``), or the portable level ``cpu`` names.

    ``NPUCC_HOST_CPU`` in the environment stands in for ``cpu`` when it is None."""
    cpu = cpu or os.environ.get(HOST_CPU_ENV) or "native"
    return _detect(cpu)


@functools.cache
def _detect(cpu: str) -> HostCpu:
    arch = host_arch()
    if arch not in ("x86_64", "aarch64"):
        raise NpuccError(f"this machine is {arch}; npucc builds host kernels for x86_64 and "
                         f"aarch64 only")
    common = dict(arch=arch, cores=_usable_cores(), brand=cpu_brand(), ghz=_clock_ghz(),
                  **_cache_sizes())
    if cpu != "native":
        _check_level(cpu, arch)
        return HostCpu(mcpu=cpu, mattr=(), features=target_features({"mcpu": cpu}), level=cpu,
                       **common)
    from tvm.target import codegen

    mcpu = str(codegen.llvm_get_system_cpu())
    model = target_features({"mcpu": mcpu})
    have = running_features()
    if have is None:   # no way to ask this CPU: trust LLVM's model
        return HostCpu(mcpu=mcpu, mattr=(), features=model, **common)
    mattr = tuple([f"+{f}" for f in sorted(have - model)] +
                  [f"-{f}" for f in sorted(model - have)])
    feats = target_features({"mcpu": mcpu, "mattr": mattr})
    extra = feats - have   # implied by a +f LLVM knows more about: never build for it
    if extra:
        mattr += tuple(f"-{f}" for f in sorted(extra))
        feats = target_features({"mcpu": mcpu, "mattr": mattr})
    return HostCpu(mcpu=mcpu, mattr=mattr, features=feats, **common)


def _check_level(cpu: str, arch: str) -> None:
    from tvm.target import codegen

    triple = "x86_64-unknown-linux-gnu" if arch == "x86_64" else "aarch64-unknown-linux-gnu"
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        levels = [lv for lv in PORTABLE_LEVELS if codegen.llvm_is_valid_cpu(lv, triple)]
        raise NpuccError(f"cpu {cpu!r} is not an LLVM CPU name for this {arch} machine; host "
                         f"builds take 'native' or one of: {', '.join(levels)} (or any LLVM "
                         f"{arch} CPU name); for another architecture use its target file "
                         f"(e.g. target='kirin990')")


def _usable_cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:   # a cgroup v2 CPU quota ("max 100000" = none)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cache_sizes() -> dict[str, int]:
    """Per-core L1d and L2 and the L3 from sysfs (Linux); absent elsewhere."""
    found: dict[str, int] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(root.glob("index*")):
        try:
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
            size = _parse_size((d / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        key = {(1, "Data"): "l1d_bytes", (2, "Unified"): "l2_bytes",
               (3, "Unified"): "l3_bytes"}.get((level, kind))
        if key:
            found[key] = size
    return found


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _clock_ghz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
                   .read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.partition(":")[2]) / 1000
    except (OSError, ValueError):
        pass
    return None
