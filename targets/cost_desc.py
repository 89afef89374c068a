"""The ``[cost]`` section of a target description: the cost model's calibration, as data.

```toml
[cost.cpu]                 # fraction of the roofline bound each op class achieves, and the
conv = 0.21                # fixed cost of one kernel call; each value commented with where
depthwise = 0.05           # it came from (written by `npucc calibrate`)
dense = 0.3
attention = 0.2
elementwise = 0.4
copy = 0.5
launch_us = 6.0
[cost.npu]                 # the same for the NPU, plus region_us: one region entry + exit
conv = 0.4
region_us = 300.0
[cost.calibration]         # what the values were fitted on, and how well they predict it
source = "..."             # free text: measurement file(s), published tables
date = "2026-12-07"
device = "..."
n = 12                     # measurements in the fit
error_kind = "leave-one-out"
error_median = 1.21        # typical ratio max(predicted/measured, measured/predicted)
error_max = 1.48
cpu = "..."                # detected-CPU targets only: the CPU the values were measured on
```

``[cost.cpu] cache_speedup``: memory-bound CPU kernels move activations that sit in the CPU's
last-level cache (detected for the host) this many times as fast as they stream weights.
``[cost.cpu] parallel``: the fraction of a core each thread beyond the first adds to
compute-bound work (1.0: linear scaling over ``[cpu] threads``).

A factor absent from the file is 1.0 (the plain roofline); ``launch_us`` defaults to the
device's ``node_overhead_us`` and ``region_us`` to ``[npu] region_overhead_us`` (giving both
for one device is refused: a fact has one home).

A target whose CPU is detected (``host``) cannot hold one CPU's figures as facts: its
``[cost] per_cpu = "data/host_cost"`` names a folder of calibrations (next to the file, else
among the built-in targets), each recorded with the CPU it was measured on (``[cost.calibration] cpu``); the one whose CPU is this machine's is
used, and with none the estimate is the uncalibrated roofline and says so.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["OP_CLASSES", "CostTerms", "Calibration", "CostDesc", "parse_cost", "cpu_key"]

# the classes the cost model tells apart (targets.cost_model): convolutions (conv, depthwise),
# compute-bound nodes by kind (dense/GEMM, attention, other element-wise work), and "memory":
# every other node whose roofline bound is DRAM bandwidth (copies, GEMV at batch 1, most
# element-wise ops)
OP_CLASSES = ("conv", "depthwise", "dense", "attention", "elementwise", "memory")
_TERM_KEYS = {**{c: float for c in OP_CLASSES}, "launch_us": float, "cache_speedup": float,
              "parallel": float}
_NPU_TERM_KEYS = {**{c: float for c in OP_CLASSES}, "launch_us": float, "region_us": float}
_CALIBRATION_KEYS = {"source": str, "date": str, "device": str, "measurements": str,
                     "n": int, "error_kind": str, "error_median": float, "error_max": float,
                     "cpu": str, "assumed": str}
ERROR_KINDS = ("leave-one-out", "held-out", "in-sample")


@dataclass(frozen=True)
class CostTerms:
    """One device's calibration: per-class efficiency (fraction of the roofline) and fixed
    costs in microseconds."""

    factors: Mapping[str, float]
    launch_us: float
    region_us: float = 0.0
    # memory-bound CPU kernels move cache-resident activations this many times as fast as
    # they stream weights (cost_model.node_cost; 1.0: no difference; fitted, may be < 1)
    cache_speedup: float = 1.0
    # what each thread beyond the first adds to compute-bound CPU work, as a fraction of a
    # core: T threads run it T / (1 + (T - 1) * parallel) times slower than the roofline's
    # T cores say (1.0: linear scaling)
    parallel: float = 1.0

    def thread_penalty(self, threads: int) -> float:
        return threads / (1 + (threads - 1) * self.parallel) if threads > 1 else 1.0

    def factor(self, op_class: str) -> float:
        return self.factors.get(op_class, 1.0)

    def as_dict(self) -> dict[str, float]:
        return {**{c: self.factor(c) for c in OP_CLASSES}, "launch_us": self.launch_us,
                "region_us": self.region_us, "cache_speedup": self.cache_speedup,
                "parallel": self.parallel}


@dataclass(frozen=True)
class Calibration:
    """What a ``[cost]`` section was fitted on and how well it predicts that set."""

    source: str = ""
    date: str = ""
    device: str = ""
    measurements: str = ""
    n: int = 0
    error_kind: str = ""
    error_median: float | None = None
    error_max: float | None = None
    cpu: str = ""
    assumed: str = ""

    def band(self) -> str:
        """``"typically within x1.21 (max x1.48) on this target's calibration set (12
        measurements, leave-one-out)"``, or why there is no band."""
        if self.error_median is None:
            return "no error band: the calibration records no prediction error"
        mx = f" (max x{self.error_max:.2f})" if self.error_max is not None else ""
        return (f"typically within x{self.error_median:.2f}{mx} on this target's calibration "
                f"set ({self.n} model latencies, {self.error_kind or 'in-sample'})")


@dataclass(frozen=True)
class CostDesc:
    cpu: CostTerms
    npu: CostTerms | None = None
    calibration: Calibration | None = None
    note: str = ""          # why there is no calibration (e.g. measured on another CPU)
    file: str = field(default="", compare=False)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def band(self) -> str:
        if self.calibration is None:
            return "uncalibrated roofline" + (f" ({self.note})" if self.note else "")
        return self.calibration.band()

    def terms(self, device: str) -> CostTerms:
        return self.npu if device == "npu" and self.npu is not None else self.cpu


def cpu_key(cpu: Any) -> str | None:
    """How a detected CPU is named in a calibration: brand, LLVM name, threads (None for a
    CPU written in the target file)."""
    host = getattr(cpu, "detected", None)
    if host is None:
        return None
    return f"{host.brand} ({host.mcpu}, {cpu.threads} threads)"


def _terms(r: Any, raw: Any, section: str, keys: dict[str, type], launch_default: float,
           region_default: float, legacy: dict[str, bool]) -> CostTerms:
    t = r.table(raw, section, keys)
    for k, v in t.items():
        r.positive(v, f"[{section}] {k}", allow_zero=k in ("launch_us", "region_us"))
    for k, given in legacy.items():
        if given and k in t:
            dev = section.split(".")[1]
            old = "node_overhead_us" if k == "launch_us" else "region_overhead_us"
            r.fail(f"[{section}] {k}", f"[{dev}] {old} is given too; give the fixed cost once "
                   f"(in [{section}])")
    factors = {c: t[c] for c in OP_CLASSES if c in t}
    return CostTerms(factors, t.get("launch_us", launch_default),
                     t.get("region_us", region_default), t.get("cache_speedup", 1.0),
                     t.get("parallel", 1.0))


def _calibration(r: Any, raw: Any, section: str) -> Calibration:
    t = r.table(raw, section, _CALIBRATION_KEYS)
    if "error_kind" in t:
        r.choice(t["error_kind"], ERROR_KINDS, f"[{section}] error_kind")
    for k in ("error_median", "error_max"):
        if k in t and not t[k] >= 1.0:
            r.fail(f"[{section}] {k}", f"is a ratio max(pred/meas, meas/pred), so >= 1; got "
                   f"{t[k]!r}")
    return Calibration(**t)


def _calibration_folder(base_dir: Path, rel: str) -> Path | None:
    """``rel`` next to the target file, else among the built-in targets (a copy of host.toml
    elsewhere keeps this machine's calibration)."""
    from targets.description import TARGETS_DIR

    for root in (base_dir, TARGETS_DIR):
        folder = (root / rel).resolve()
        if folder.is_dir():
            return folder
    return None


def parse_cost(r: Any, raw: Mapping[str, Any] | None, cpu: Any, npu: Any,
               raw_cpu: Mapping[str, Any], raw_npu: Mapping[str, Any] | None,
               base_dir: Path, _depth: int = 0) -> CostDesc:
    """The ``[cost]`` table (``raw``, None if absent) checked with the description reader
    ``r``; defaults from the parsed ``cpu`` / ``npu`` descriptions."""
    raw = raw if raw is not None else {}
    t = r.table(raw, "cost", {"cpu": dict, "npu": dict, "calibration": dict, "per_cpu": str})
    cpu_terms = _terms(r, t.get("cpu", {}), "cost.cpu", _TERM_KEYS, cpu.node_overhead_us, 0.0,
                       {"launch_us": "node_overhead_us" in raw_cpu})
    npu_terms = None
    if npu is not None:
        npu_terms = _terms(r, t.get("npu", {}), "cost.npu", _NPU_TERM_KEYS,
                           npu.node_overhead_us, npu.region_overhead_us,
                           {"launch_us": "node_overhead_us" in (raw_npu or {}),
                            "region_us": "region_overhead_us" in (raw_npu or {})})
    elif "npu" in t:
        r.fail("[cost.npu]", "this target has no [npu] section")
    cal = _calibration(r, t["calibration"], "cost.calibration") if "calibration" in t else None
    cost = CostDesc(cpu_terms, npu_terms, cal, file=r.file)
    key = cpu_key(cpu)
    if key is None:
        if "per_cpu" in t:
            r.fail("[cost] per_cpu", "only a target whose CPU is detected ([cpu] detect) keeps "
                   "calibrations per CPU; write the [cost.cpu] values here instead")
        return cost
    if cal is not None:   # a detected CPU: the values hold for the CPU they were measured on
        if not cal.cpu:
            r.fail("[cost.calibration] cpu", "a detected-CPU target's calibration must name "
                   "the CPU it was measured on (as `npucc calibrate` writes it)")
        if cal.cpu == key:
            return cost
        return CostDesc(CostTerms({}, cpu.node_overhead_us), npu_terms, None,
                        note=f"its calibration was measured on {cal.cpu}, this is {key}",
                        file=r.file)
    if "per_cpu" in t and _depth == 0:
        folder = _calibration_folder(base_dir, t["per_cpu"])
        if folder is None:
            return replace(cost, note=f"no calibration folder {t['per_cpu']!r} next to "
                           f"{r.file} or among the built-in targets")
        for path in sorted(folder.glob("*.toml")):
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            found = data.get("cost", {}).get("calibration", {}).get("cpu")
            if found == key:
                sub = type(r)(str(path))
                return replace(parse_cost(sub, data["cost"], cpu, npu, raw_cpu, raw_npu,
                                          path.parent, _depth + 1), file=str(path))
        return replace(cost, note=f"no calibration in {folder} for {key}")
    return cost
