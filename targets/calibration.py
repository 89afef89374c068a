"""Fitting a target's ``[cost]`` section to measured latencies (``npucc calibrate``).

The model (targets/cost_model.py) predicts a measurement from its terms as

    ms = sum over devices d and op classes c of  roofline_ms[d][c] / factor[d][c]
         + launches[d] * launch_us[d] + regions * region_us + fixed_ms

which is linear in the multipliers ``1 / factor`` and the fixed costs. The fit is least squares
in log space, ``sum_i w_i (log predicted_i - log measured_i)^2`` (so a 2x error counts the same
on a 1 ms kernel as on a 100 ms model), over the log of every parameter (so all stay
positive), with a weak prior: each class's log multiplier is pulled (sigma ``PRIOR_SIGMA``)
towards its device's mean log multiplier, a free parameter, and each fixed cost towards its
starting value (sigma ``PRIOR_FIXED_SIGMA``). A class that no measurement
exercises therefore takes the device's typical efficiency, and is reported as assumed.
``scipy.optimize.least_squares`` solves it.

The error of a calibration is the ratio ``max(pred / meas, meas / pred)`` per model, measured
out of sample: leave-one-out over models (:func:`leave_one_out`) or on a held-out set.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from targets.cost_desc import OP_CLASSES, Calibration, CostDesc, CostTerms
from targets.cost_model import predict_ms

__all__ = ["Fit", "fit_cost", "fit_base", "leave_one_out", "error_ratio", "error_summary",
           "render_cost_section", "replace_cost_section", "write_calibrated_target",
           "PRIOR_SIGMA"]

PRIOR_SIGMA = 2.0      # log units: a class's factor mostly within e^2 of its device's typical one
PRIOR_FIXED_SIGMA = 3.0  # log units: launch / region costs and cache_speedup, around their
                         # starting values (the target file's, or 1 us / 1x)
_FIXED = ("launch_us", "region_us", "cache_speedup", "parallel")


def error_ratio(pred: float, meas: float) -> float:
    """``max(pred/meas, meas/pred)``: 1.0 is exact, 1.5 is 50 % off either way."""
    return max(pred / meas, meas / pred)


def error_summary(ratios: Sequence[float]) -> dict[str, float]:
    return {"n": len(ratios), "median": statistics.median(ratios) if ratios else math.nan,
            "max": max(ratios) if ratios else math.nan}


@dataclass(frozen=True)
class Fit:
    """A fitted calibration: the new ``cost``, which parameters the data constrained, and the
    in-sample ratio per measurement."""

    cost: CostDesc
    fitted: dict[str, dict[str, int]]     # device -> parameter -> measurements exercising it
    in_sample: list[tuple[str, float, float]]  # (name, predicted ms, measured ms)


def fit_base(desc: Any) -> CostDesc:
    """Where a fit starts, whatever calibration ``desc`` holds now: every factor 1.0 (the plain
    roofline) and the fixed costs of its [cpu] / [npu] tables (their defaults if absent), so
    that calibrating a calibrated target gives the same result as the first time."""
    npu = desc.npu
    return CostDesc(CostTerms({}, desc.cpu.node_overhead_us),
                    CostTerms({}, npu.node_overhead_us, npu.region_overhead_us)
                    if npu is not None else None)


def _devices(entries: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({d for e in entries for d in e["terms"] if d in ("cpu", "npu")})


def _params(entries: Sequence[dict[str, Any]], base: CostDesc
            ) -> tuple[list[tuple[str, str]], dict[str, dict[str, int]]]:
    """Parameters to fit: every op class of every device in the data (those without data held
    by the prior), the launch cost of each device, the region cost if regions occur."""
    params: list[tuple[str, str]] = []
    used: dict[str, dict[str, int]] = {}
    for d in _devices(entries):
        if d == "npu" and base.npu is None:
            raise NpuccError("the measurements have NPU terms but the target has no [npu]")
        used[d] = {}
        for k in (*OP_CLASSES, *_FIXED):
            n = sum(1 for e in entries if _exercises(e["terms"].get(d, {}), k))
            used[d][k] = n
            if k in OP_CLASSES or n > 0:
                params.append((d, k))
    return params, used


def _exercises(terms: dict[str, Any], param: str) -> bool:
    if param == "launch_us":
        return terms.get("launches", 0) > 0
    if param == "region_us":
        return terms.get("regions", 0) > 0
    if param == "cache_speedup":
        return any(k.endswith("@cache") and v > 0 for k, v in terms.items())
    if param == "parallel":
        return terms.get("threads", 1) > 1
    return terms.get(param, 0) > 0 or terms.get(param + "@cache", 0) > 0


def _cost_from(theta: np.ndarray, params: list[tuple[str, str]], base: CostDesc) -> CostDesc:
    vals: dict[str, dict[str, float]] = {}
    for (d, k), t in zip(params, theta, strict=False):
        vals.setdefault(d, {})[k] = math.exp(t)

    def terms(d: str, old: CostTerms | None) -> CostTerms | None:
        if old is None:
            return None
        v = vals.get(d, {})
        factors = dict(old.factors)
        factors.update({k: 1.0 / v[k] for k in OP_CLASSES if k in v})
        return CostTerms(factors, v.get("launch_us", old.launch_us),
                         v.get("region_us", old.region_us),
                         v.get("cache_speedup", old.cache_speedup),
                         v.get("parallel", old.parallel))

    return replace(base, cpu=terms("cpu", base.cpu), npu=terms("npu", base.npu))


def fit_cost(entries: Sequence[dict[str, Any]], base: CostDesc,
             prior_sigma: float = PRIOR_SIGMA, fixed_sigma: float = PRIOR_FIXED_SIGMA) -> Fit:
    """Fit ``base``'s factors and fixed costs to ``entries`` (measurement-file entries); the
    priors' spreads are ``prior_sigma`` (classes) and ``fixed_sigma`` (fixed costs)."""
    from scipy.optimize import least_squares

    if not entries:
        raise NpuccError("no measurements to fit")
    params, used = _params(entries, base)
    devices = sorted(used)
    x0 = []
    for d, k in params:
        t = base.terms(d)
        x0.append(math.log(1.0 / t.factor(k)) if k in OP_CLASSES else
                  math.log(max(getattr(t, k), 1.0 if k in ("cache_speedup", "parallel")
                               else 0.5)))
    x0 += [statistics.fmean(x0[i] for i, (d, k) in enumerate(params)
                            if d == dev and k in OP_CLASSES) for dev in devices]
    n_p = len(params)
    meas = np.log([float(e["ms"]) for e in entries])
    w = np.sqrt([float(e.get("weight", 1.0)) for e in entries])
    cls_idx = [(i, devices.index(d)) for i, (d, k) in enumerate(params) if k in OP_CLASSES]
    fixed_idx = [i for i, (d, k) in enumerate(params) if k not in OP_CLASSES]
    x_start = np.array(x0)

    def residuals(x: np.ndarray) -> np.ndarray:
        cost = _cost_from(x[:n_p], params, base)
        pred = np.log([max(predict_ms(e["terms"], cost), 1e-12) for e in entries])
        prior = [(x[i] - x[n_p + j]) / prior_sigma for i, j in cls_idx]
        prior += [(x[i] - x_start[i]) / fixed_sigma for i in fixed_idx]
        return np.concatenate([w * (pred - meas), prior])

    sol = least_squares(residuals, np.array(x0), method="trf", x_scale=1.0, ftol=1e-12,
                        xtol=1e-12, gtol=1e-12)
    cost = _cost_from(sol.x[:n_p], params, base)
    in_sample = [(e["name"], predict_ms(e["terms"], cost), float(e["ms"])) for e in entries]
    return Fit(cost, used, in_sample)


def leave_one_out(entries: Sequence[dict[str, Any]], base: CostDesc,
                  prior_sigma: float = PRIOR_SIGMA, fixed_sigma: float = PRIOR_FIXED_SIGMA
                  ) -> list[tuple[str, float, float]]:
    """For every group (a model and its kernels), fit on the others and predict its
    per-model entries: ``[(name, predicted ms, measured ms)]``."""
    groups = sorted({e["group"] for e in entries})
    if len(groups) < 2:
        raise NpuccError("leave-one-out needs measurements of at least two models")
    out = []
    for g in groups:
        rest = [e for e in entries if e["group"] != g]
        cost = fit_cost(rest, base, prior_sigma, fixed_sigma).cost
        out += [(e["name"], predict_ms(e["terms"], cost), float(e["ms"]))
                for e in entries if e["group"] == g and e["kind"] == "model"]
    return out


# -- writing the [cost] section ------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.4g}" if v >= 1e-3 else f"{v:.3e}"


def render_cost_section(fit: Fit, calibration: Calibration, how: str) -> str:
    """The ``[cost]`` tables of ``fit.cost`` as TOML, each value commented with its origin."""
    lines = [f"# [cost] written by `npucc calibrate` on {calibration.date}: {how}",
             "# Factors: fraction of the roofline bound each op class reached; launch_us: fixed",
             "# cost per kernel call; region_us: per NPU region entry + exit.",
             "# Least squares in log space; a class no measurement exercises takes its",
             "# device's typical factor (the fit's prior) and is marked ASSUMED."]
    for d in ("cpu", "npu"):
        t = fit.cost.cpu if d == "cpu" else fit.cost.npu
        if t is None:
            continue
        lines.append(f"[cost.{d}]")
        used = fit.fitted.get(d)
        for k in (*OP_CLASSES, *_FIXED):
            if (k == "region_us" and d == "cpu") or (
                    k in ("cache_speedup", "parallel") and d == "npu"):
                continue
            if k in ("cache_speedup", "parallel") and not (used or {}).get(k) \
                    and getattr(t, k) == 1.0:
                continue
            v = t.factor(k) if k in OP_CLASSES else getattr(t, k)
            n = used.get(k, 0) if used is not None else 0
            why = ("kept from the target file (no measurement on this device)" if used is None
                   else f"fitted: {n} measurement(s) of {calibration.device or 'the device'}"
                   if n else "ASSUMED: no measurement exercises it (device's typical factor)"
                   if k in OP_CLASSES else "not fitted (no measurement has it): kept")
            lines.append(f"{k} = {_fmt(v)}".ljust(24) + f"# {why}")
    c = calibration
    lines.append("[cost.calibration]")
    for key in ("source", "date", "device", "measurements", "cpu", "assumed"):
        val = getattr(c, key)
        if val:
            lines.append(f"{key} = {_toml_str(val)}")
    lines.append(f"n = {c.n}")
    if c.error_median is not None:
        lines.append(f'error_kind = "{c.error_kind}"')
        lines.append(f"error_median = {c.error_median:.3f}")
        lines.append(f"error_max = {c.error_max:.3f}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def replace_cost_section(text: str, section: str) -> str:
    """``text`` (a target file) without its ``[cost...]`` tables, without the fixed costs the
    new section now holds (``node_overhead_us`` in [cpu] / [npu], ``region_overhead_us``),
    and with ``section`` appended."""
    out, table, skipping = [], "", False
    drop = {"cpu": ("node_overhead_us",), "npu": ("node_overhead_us", "region_overhead_us")}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            table = s.strip("[]").strip()
            skipping = table == "cost" or table.startswith("cost.")
            if skipping:   # and the header comment an earlier calibrate wrote above it
                _drop_generated_header(out)
        if skipping:
            continue
        key = s.split("=", 1)[0].strip() if "=" in s and not s.startswith("#") else ""
        if key in drop.get(table, ()):
            out.append(f"# {key}: now launch_us / region_us in [cost.{table}] below")
            continue
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + "\n\n" + section


def _drop_generated_header(out: list[str]) -> None:
    """Remove the trailing comment block from ``# [cost] written by`` on (render_cost_section's
    header), leaving comments written by people in place."""
    i = len(out)
    while i > 0 and (out[i - 1].lstrip().startswith("#") or not out[i - 1].strip()):
        i -= 1
        if out[i].startswith("# [cost] written by `npucc calibrate`"):
            del out[i:]
            return


def write_calibrated_target(source: str | os.PathLike, out: str | os.PathLike,
                            section: str) -> Path:
    """Write a copy of target file ``source`` with ``section`` as its [cost] to ``out``,
    atomically; never over ``source`` itself."""
    src, dst = Path(source).resolve(), Path(out)
    if dst.exists() and dst.resolve() == src:
        raise NpuccError(f"-o {out}: that is the target file being calibrated; write the "
                         f"calibrated copy to another path")
    text = replace_cost_section(src.read_text(encoding="utf-8"), section)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        from targets.description import load_target

        load_target(Path(tmp))   # the copy must load as written
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst

