"""Measurement files: measured latencies, each with the cost-model terms it is fitted against.

```json
{"format": "npucc-measurements/1", "target": "host", "device": "<brand> (<LLVM cpu>, 2 threads)",
 "cpu": "<the same>", "date": "2026-12-07", "source": "m.profile(), median of 20 runs",
 "measurements": [
   {"name": "resnet18", "kind": "model", "ms": 21.4, "weight": 1.0, "group": "resnet18",
    "terms": {"cpu": {"conv": 3.1, "elementwise": 0.2, "launches": 31}, "fixed_ms": 0.0}},
   {"name": "resnet18/%12", "kind": "kernel", "op": "conv2d", "ms": 0.9, "weight": 0.04, ...}
 ]}
```

``terms`` are :func:`targets.cost_model.cost_terms` of the target named by ``target`` (the
uncalibrated roofline ms per device and op class, kernel launches, NPU regions), so a fit
needs no graph. Per-model entries may carry where the figure came from (``source`` URL,
``library``, ``threads``, ``precision``, ``device``). ``weight`` scales an entry's squared
log error in the fit: a model's per-kernel entries share weight 1 in proportion to their
time, as one per-model entry has weight 1.

:func:`profile_measurements` makes the entries of one compiled model from ``m.profile()``;
:func:`write_measurements` writes a file atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["FORMAT", "profile_measurements", "write_measurements", "read_measurements",
           "graph_measurement"]

FORMAT = "npucc-measurements/1"
_KINDS = ("model", "kernel")


def graph_measurement(graph: Any, target: Any, name: str, ms: float, **extra: Any
                      ) -> dict[str, Any]:
    """A per-model entry: ``ms`` measured (or published) for ``graph`` on ``target``."""
    from targets.cost_model import cost_terms, estimate

    est = estimate(graph, target)
    return {"name": name, "kind": "model", "ms": float(ms), "weight": 1.0, "group": name,
            "terms": cost_terms(est), **extra}


def profile_measurements(m: Any, inputs: Any, name: str, repeat: int = 20, warmup: int = 2,
                         kernels: bool = True, whole_run: bool = False
                         ) -> list[dict[str, Any]]:
    """Profile the compiled model ``m`` (``m.profile``) and return its per-model entry and,
    with ``kernels``, one entry per kernel (its median call time).

    The per-model time is the sum of the per-kernel medians (``Profile.kernel_ms``), which a
    process preempted by other jobs inflates far less than the median whole run; with
    ``whole_run`` it is the median whole run (``Profile.total_ms``: also the input copy and
    the Python loop), the right choice on a quiet machine. Both are recorded."""
    from targets.cost_model import cost_terms, estimate

    prof = m.profile(inputs, repeat=repeat, warmup=warmup)
    est = estimate(m.graph, m.target)
    out = [{"name": name, "kind": "model", "ms": prof.total_ms if whole_run else prof.kernel_ms,
            "weight": 1.0, "group": name, "terms": cost_terms(est), "repeat": repeat,
            "total_ms": prof.total_ms, "kernel_ms": prof.kernel_ms,
            "ms_is": "total_ms" if whole_run else "kernel_ms"}]
    if not kernels:
        return out
    rows = {r["node"]: r for r in est["nodes"]}
    timed = [(s, rows[s.node]) for s in prof.steps
             if s.node in rows and rows[s.node]["class"] is not None and s.median_ms > 0]
    total = sum(s.median_ms for s, _ in timed) or 1.0
    for s, r in timed:
        one = {"nodes": [r], "npu_regions": 0, "transfer_ms": 0.0,
               "cpu_threads": est["cpu_threads"]}
        out.append({"name": f"{name}/{s.node}", "kind": "kernel", "op": s.op, "ms": s.median_ms,
                    "weight": s.median_ms / total, "group": name, "terms": cost_terms(one)})
    return out


def write_measurements(path: str | os.PathLike, entries: Sequence[dict[str, Any]],
                       target: Any, *, device: str = "", source: str = "",
                       date: str | None = None) -> Path:
    """Write a measurement file atomically (a temporary file renamed over ``path``)."""
    from targets.cost_desc import cpu_key
    from targets.description import load_target

    desc = load_target(target)
    doc = {"format": FORMAT, "target": desc.name,
           "device": device or cpu_key(desc.cpu) or desc.description,
           "cpu": cpu_key(desc.cpu) or "",
           "date": date or datetime.date.today().isoformat(), "source": source,
           "measurements": list(entries)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would make a shared data file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_measurements(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a measurement file; errors name the file and the entry at fault."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise NpuccError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise NpuccError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise NpuccError(f"{path}: not a measurement file (format {got!r}, expected {FORMAT!r};"
                         f" write one with targets.measurements.write_measurements)")
    entries = doc.get("measurements")
    if not isinstance(entries, list) or not entries:
        raise NpuccError(f"{path}: 'measurements' must be a non-empty list")
    for i, e in enumerate(entries):
        where = f"{path}: measurements[{i}] ({e.get('name', '?') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict):
            raise NpuccError(f"{where}: must be an object")
        ms = e.get("ms")
        if not isinstance(ms, int | float) or isinstance(ms, bool) or not ms > 0:
            raise NpuccError(f"{where}: 'ms' must be a positive number, got {ms!r}")
        if e.get("kind", "model") not in _KINDS:
            raise NpuccError(f"{where}: 'kind' must be one of {', '.join(_KINDS)}, got "
                             f"{e.get('kind')!r}")
        terms = e.get("terms")
        if not isinstance(terms, dict) or not any(k in terms for k in ("cpu", "npu")):
            raise NpuccError(f"{where}: 'terms' must hold the cost-model terms of a 'cpu' or "
                             f"'npu' device (targets.cost_model.cost_terms)")
        e.setdefault("kind", "model")
        e.setdefault("weight", 1.0)
        e.setdefault("group", e.get("name", str(i)))
    doc["file"] = str(path)
    return doc
