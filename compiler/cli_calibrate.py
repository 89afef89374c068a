"""``npucc calibrate``: fit a target's cost model to measured latencies.

    npucc calibrate TARGET --measurements FILE.json [--measurements ...] -o NEW.toml

``TARGET`` is a built-in name or a .toml path; each ``FILE.json`` is a measurement file
(targets/measurements.py: from ``m.profile()`` via ``profile_measurements``, or a table of
published per-model figures with their cost-model terms). The factors of ``[cost]`` are
fitted by least squares in log space (targets/calibration.py); the error band is the
leave-one-out error over the measured models (in-sample with fewer than three models).
``NEW.toml`` is a copy of the target file with the fitted ``[cost]`` section, written
atomically; it is never the target file itself, and an existing file is replaced only if an
earlier ``npucc calibrate`` wrote it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from compiler.errors import NpuccError

__all__ = ["configure_calibrate", "calibrate"]

_MARK = "written by `npucc calibrate`"


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="built-in target name or path of a target .toml")
    p.add_argument("--measurements", action="append", required=True, metavar="FILE.json",
                   help="a measurement file (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="NEW.toml",
                   help="where to write the calibrated copy of the target file")
    p.add_argument("--prior-sigma", type=float, default=None,
                   help="spread (log units) of a class's factor around its device's typical "
                   "factor (default: targets.calibration.PRIOR_SIGMA)")
    p.set_defaults(func=_cmd_calibrate)


def calibrate(target: str, measurements: list[str], output: str,
              prior_sigma: float | None = None, say=print) -> dict:
    """What ``npucc calibrate`` does; returns ``{"file", "cost", "errors", "band"}``."""
    from targets.calibration import (
        PRIOR_SIGMA,
        error_ratio,
        error_summary,
        fit_base,
        fit_cost,
        leave_one_out,
        render_cost_section,
        write_calibrated_target,
    )
    from targets.cost_desc import Calibration, cpu_key
    from targets.description import load_target
    from targets.measurements import read_measurements

    desc = load_target(target)
    out = Path(output)
    if out.exists():
        if out.resolve() == Path(desc.file).resolve():
            raise NpuccError(f"-o {output}: that is the target file being calibrated; write "
                             f"the calibrated copy to another path")
        if _MARK not in out.read_text(encoding="utf-8", errors="replace"):
            raise NpuccError(f"-o {output}: the file exists and was not written by npucc "
                             f"calibrate; choose another path (nothing of yours is replaced)")
    docs = [read_measurements(m) for m in measurements]
    for d in docs:
        if d.get("target") != desc.name:
            raise NpuccError(f"{d['file']}: its terms are the roofline of target "
                             f"{d.get('target')!r}, not {desc.name!r}; measure (or compute the "
                             f"terms) for {desc.name}")
    entries = [e for d in docs for e in d["measurements"]]
    sigma = PRIOR_SIGMA if prior_sigma is None else prior_sigma
    base = fit_base(desc)
    fit = fit_cost(entries, base, sigma)
    models = {e["group"] for e in entries if e["kind"] == "model"}
    if len(models) >= 3:
        rows, kind = leave_one_out(entries, base, sigma), "leave-one-out"
    else:
        rows = [r for r, e in zip(fit.in_sample, entries, strict=True) if e["kind"] == "model"]
        kind = "in-sample"
    if not rows:
        raise NpuccError("the measurements hold no per-model entry (kind 'model'): the error "
                         "band needs whole-model latencies")
    summary = error_summary([error_ratio(p, m) for _, p, m in rows])
    say(f"{'model':<28}{'predicted ms':>14}{'measured ms':>14}{'ratio':>8}   ({kind})")
    for name, p, m in rows:
        say(f"{name[:28]:<28}{p:>14.3f}{m:>14.3f}{error_ratio(p, m):>8.2f}")
    say(f"error: median x{summary['median']:.2f}, max x{summary['max']:.2f} over "
        f"{summary['n']} models")
    devices = sorted({d.get("device", "") for d in docs} - {""})
    cal = Calibration(
        source="; ".join(sorted({d.get("source", "") for d in docs} - {""})) or "measurements",
        date=datetime.date.today().isoformat(), device="; ".join(devices),
        measurements=", ".join(measurements), n=summary["n"], error_kind=kind,
        error_median=summary["median"], error_max=summary["max"],
        cpu=cpu_key(desc.cpu) or "")
    how = (f"fitted to {len(entries)} measurement(s) of {summary['n']} model(s) from "
           f"{', '.join(Path(m).name for m in measurements)}")
    section = render_cost_section(fit, cal, how)
    path = write_calibrated_target(desc.file, out, section)
    new = load_target(path)
    say(f"wrote {path}: " + ", ".join(
        f"{d}: " + " ".join(f"{k}={v:.3g}" for k, v in new.cost.terms(d).as_dict().items()
                            if not (d == "cpu" and k == "region_us"))
        for d in sorted(fit.fitted)))
    say(f"estimates on it: {new.cost.band()}")
    return {"file": path, "cost": new.cost, "errors": summary, "band": new.cost.band()}


def _cmd_calibrate(args: argparse.Namespace) -> int:
    calibrate(args.target, args.measurements, args.output, args.prior_sigma,
              say=lambda s: print(s, file=sys.stdout))
    return 0
