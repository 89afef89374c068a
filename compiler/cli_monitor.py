"""``npucc monitor``: run a load on a package and write a self-contained dashboard.html.

    npucc monitor PKG --input [NAME=]X.npy | --random [--duration 30] [--threads N]
                  [--budget-ms B] [--window 50] [-o dashboard.html]

``--threads`` callers run the model back to back for ``--duration`` seconds (after one
warm-up run per mode, not counted). With ``--budget-ms`` and a package with modes, the
automatic mode policy is on (``m.auto_mode``; ``--no-auto`` turns it off); the budget is
drawn either way. Per-kernel times are recorded (profiling on) unless ``--no-profile``.
``--random`` feeds the same random inputs every run: floats from N(0, 1), integers and
booleans from {0, 1} (valid token ids, masks and indices for any model).

Prints the per-mode latency figures and the switches, and writes the dashboard
(``compiler/dashboard.py``) atomically, only over a dashboard of ours. :func:`monitor` is the
same from Python.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import timeit
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["configure_monitor", "monitor", "random_inputs", "read_inputs"]


def random_inputs(specs: list[tuple[str, tuple[int, ...], Any]], seed: int = 0
                  ) -> dict[str, Any]:
    """One input dict for ``(name, shape, numpy dtype)`` specs (``m.input_specs``; see the
    module docstring for the values)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, dtype in specs:
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iub":
            out[name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            raise NpuccError(f"--random: no random values for input {name!r} of dtype "
                             f"{dtype}; give it with --input")
    return out


def read_inputs(specs: list[tuple[str | None, str]], names: list[str]) -> dict[str, Any]:
    """``--input [NAME=]FILE`` arguments (.npy; an .npz gives every array it holds by name)."""
    import numpy as np

    feeds: dict[str, Any] = {}
    for name, path in specs:
        try:
            data = np.load(path)
        except (OSError, ValueError) as e:
            raise NpuccError(f"cannot read input {name or path!r} from {path}: {e}") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            feeds.update({k: data[k] for k in data.files})
            continue
        if name is None:
            if len(names) != 1:
                raise NpuccError(f"the model has inputs {', '.join(names)}: write --input "
                                 f"NAME=FILE.npy for each (or one .npz holding them)")
            name = names[0]
        feeds[name] = data
    return feeds


def _record_cost_us(n: int = 20000) -> float:
    """What recording one run costs (µs): ``Metrics.record`` on a scratch recorder."""
    from runtime.metrics import Metrics

    m = Metrics(window=1000)
    return timeit.timeit(lambda: m.record(1e-3, "x"), number=n) / n * 1e6


def _load(m: Any, feeds: dict[str, Any], duration: float, threads: int) -> list[BaseException]:
    end = time.perf_counter() + duration
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            while time.perf_counter() < end and not errors:
                m.run(feeds)
        except BaseException as e:  # reported by monitor()
            errors.append(e)

    workers = [threading.Thread(target=caller, name=f"monitor-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def monitor(package: str | os.PathLike, feeds: dict[str, Any] | None = None, *,
            duration: float = 30.0, threads: int = 2, budget_ms: float | None = None,
            window: int = 50, headroom: float = 0.7, auto: bool = True, profile: bool = True,
            mode: str | None = None, fast: str = "performance", accurate: str = "accuracy",
            trusted_keys: Any = None, output: str | os.PathLike | None = None
            ) -> dict[str, Any]:
    """Run the load (module docstring) and return what the dashboard draws; with ``output``
    also write the dashboard there."""
    import runtime
    from runtime.cpu import cpu_brand
    from runtime.modal import ModalExecutor
    from runtime.modes import mode_report

    if duration <= 0 or threads < 1:
        raise NpuccError(f"--duration must be > 0 and --threads >= 1 (got {duration}, "
                         f"{threads})")
    m = runtime.load(package, trusted_keys=trusted_keys, mode=mode)
    modal = isinstance(m, ModalExecutor)
    feeds = feeds if feeds is not None else random_inputs(m.input_specs)
    modes = m.modes if modal else ["(single)"]
    for name in (m.modes if modal else []):   # warm-up: every mode's first run
        m.executor(name).run(feeds)
    if not modal:
        m.run(feeds)
    m.recorder.clear()
    m.recorder.set_window(1_000_000)
    m.profiling = profile
    if modal and budget_ms and auto:
        m.auto_mode(budget_ms, window=window, headroom=headroom, fast=fast, accurate=accurate)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    errors = _load(m, feeds, duration, threads)
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if modal:
        m.auto_mode(None)
    if errors:
        raise NpuccError(f"a run failed during the load: {errors[0]}") from errors[0]
    metrics = m.metrics()
    runs = [r._asdict() for r in m.recorder.runs()]
    if not modal:
        for r in runs:
            r["mode"] = "(single)"
        metrics["latency_ms_by_mode"] = {"(single)": metrics["latency_ms"]}
        metrics["runs_per_mode"] = {"(single)": metrics["runs"]}
        metrics["kernels"] = {"(single)": metrics["kernels"].get(None, [])} \
            if metrics["kernels"] else {}
    reports = {n: mode_report(m.package.manifest, n) for n in m.modes} if modal else {}
    measured: dict[str, dict[str, float]] = {}
    for name, rows in metrics["kernels"].items():
        devices = (reports.get(name) or {}).get("step_device")
        if devices and len(devices) == len(rows):
            per: dict[str, float] = {}
            for r, dev in zip(rows, devices, strict=True):
                per[dev] = per.get(dev, 0.0) + r["mean_ms"]
            measured[name] = per
    lat = [r["latency_ms"] for r in runs[-window:]]
    import numpy as np

    data = {
        "package": str(package), "modes": modes, "mode": m.mode if modal else "(single)",
        "duration_s": elapsed, "threads": threads, "budget_ms": budget_ms, "window": window,
        "headroom": headroom, "auto": bool(modal and budget_ms and auto),
        "cpu": cpu_brand(), "cores": len(os.sched_getaffinity(0)), "loadavg": (load0, load1),
        "metrics": metrics, "runs": runs, "switches": metrics["mode_switches"],
        "kernels": metrics["kernels"], "reports": reports, "measured_by_device": measured,
        "estimate_target": next((r.get("target") for r in reports.values() if r), None),
        "p90_last_ms": float(np.percentile(lat, 90)) if lat else 0.0,
        "record_overhead_us": _record_cost_us(),
    }
    if output is not None:
        from compiler.dashboard import write_dashboard

        data["output"] = str(write_dashboard(data, output))
    return data


def _input_names(package: str) -> list[str]:
    """The input names in the package's manifest (read without loading any kernel; the load
    that follows verifies everything)."""
    import json

    try:
        manifest = json.loads((Path(package) / "manifest.json").read_bytes()[:64 << 20])
        return [str(t["name"]) for t in manifest["inputs"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NpuccError(f"{package}: cannot read the inputs from its manifest.json: {e}"
                         ) from None


def _input_arg(text: str) -> tuple[str | None, str]:
    name, eq, path = text.partition("=")
    return (name, path) if eq else (None, text)


def configure_monitor(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="a package folder (npucc compile, or compile_modes)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", type=_input_arg, default=None,
                     metavar="[NAME=]FILE", help="an input array .npy (repeatable), or an "
                     ".npz holding every input by name")
    src.add_argument("--random", action="store_true", help="random inputs (floats N(0,1), "
                     "integers and booleans 0/1)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    p.add_argument("--threads", type=int, default=2, help="concurrent callers (2)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="latency budget: drawn on the gauge; with modes, the automatic policy")
    p.add_argument("--window", type=int, default=50, help="runs in the moving p90 (50)")
    p.add_argument("--headroom", type=float, default=0.7,
                   help="back to the accurate mode when p90 <= headroom x budget (0.7)")
    p.add_argument("--mode", default=None, help="the mode to start in (packages with modes)")
    p.add_argument("--fast", default="performance", help="the fast mode's name")
    p.add_argument("--accurate", default="accuracy", help="the accurate mode's name")
    p.add_argument("--no-auto", action="store_true", help="no automatic mode switching")
    p.add_argument("--no-profile", action="store_true", help="no per-kernel times")
    p.add_argument("--trusted-key", action="append", default=None, metavar="PUB",
                   help="load only if signed by this public key (repeatable)")
    p.add_argument("-o", "--output", default="dashboard.html",
                   help="the dashboard to write (default dashboard.html)")
    p.set_defaults(func=_cmd_monitor)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from compiler.dashboard import check_ours

    check_ours(Path(os.path.abspath(args.output)))   # refuse before a 30 s load, not after
    feeds = None
    if args.input:
        feeds = read_inputs(args.input, _input_names(args.package))
    data = monitor(args.package, feeds, duration=args.duration, threads=args.threads,
                   budget_ms=args.budget_ms, window=args.window, headroom=args.headroom,
                   auto=not args.no_auto, profile=not args.no_profile, mode=args.mode,
                   fast=args.fast, accurate=args.accurate, trusted_keys=args.trusted_key,
                   output=args.output)
    m = data["metrics"]
    print(f"{m['runs']} runs in {data['duration_s']:.1f} s from {data['threads']} threads on "
          f"{data['cpu']} (load average {data['loadavg'][0]:.2f} -> {data['loadavg'][1]:.2f})")
    for mode, s in m["latency_ms_by_mode"].items():
        print(f"  {mode}: {m['runs_per_mode'].get(mode, 0)} runs, mean {s['mean']:.3f} ms, "
              f"p50 {s['p50']:.3f}, p90 {s['p90']:.3f}, p99 {s['p99']:.3f}")
    for sw in data["switches"]:
        print(f"  {sw['t']:.2f} s: {sw['from']} -> {sw['to']} ({sw['by']}: {sw['reason']})")
    print(f"peak RSS {m['peak_rss_bytes'] / 2**20:.1f} MiB; metrics cost "
          f"{data['record_overhead_us']:.2f} us per run")
    print(f"wrote {data['output']}", file=sys.stderr)
    return 0
