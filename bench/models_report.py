"""The printed report of ``bench/models.py``: one block per model and the summary table."""

from __future__ import annotations

from typing import Any

__all__ = ["ratio", "report", "summary"]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _round_lines(r: dict[str, Any]) -> list[str]:
    """Each round's median per engine, and the CPU time the hypervisor stole while each engine
    was timed (separate-process mode): a round far from the others is the host, not a
    runtime, when its steal share is high."""
    if "round_medians_ms" not in r:
        return []
    per = "; ".join(f"{e} " + " / ".join(f"{m:.2f}" for m in ms)
                    for e, ms in r["round_medians_ms"].items())
    st = ", ".join(f"{e} {v * 100:.1f}%" for e, v in r["steal_by_engine"].items()
                   if v is not None)
    return [f"   round medians ms: {per}"] + ([f"   CPU stolen by the host while timing: {st}"]
                                             if st else [])


def ratio(r: dict[str, Any], peer: str) -> float:
    """Ours / ``peer``: the median of the per-turn ratios when the engines took turns (drift
    between turns cancels), else the ratio of the two engines' medians over all calls."""
    if "paired" in r:
        return r["paired"][peer]["median"]
    lat = r["latency_ms"]
    return lat["npucc"]["median"] / lat[peer]["median"]


def _paired_lines(r: dict[str, Any]) -> list[str]:
    if "paired" not in r:
        return []
    lat = r["latency_ms"]
    return [f"   per-turn ratio to {e}: median {p['median']:.2f}x, p10-p90 {p['p10']:.2f}-"
            f"{p['p90']:.2f}x over {p['turns']} turns (ratio of all-call medians "
            f"{lat['npucc']['median'] / lat[e]['median']:.2f}x)"
            for e, p in r["paired"].items()]


def report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    lines = [f"== {r['model']}: {r['desc']}", f"   mode: {r.get('mode', 'same process')}"]
    rss = r.get("peak_rss_by_engine", {})
    lines.append(f"   {'runtime':<12} {'median ms':>10} {'p90 ms':>10} {'peak RSS':>10}")
    for k, v in lat.items():
        mem = _mib(rss[k]) if k in rss else ""
        lines.append(f"   {k:<12} {v['median']:>10.2f} {v['p90']:>10.2f} {mem:>10}")
    if "torch" not in lat:
        lines.append(f"   {'torch':<12} {'skipped':>10}")
    vs_torch = f", ours / torch: {ratio(r, 'torch'):.2f}x" if "torch" in lat else ""
    reps = (f"{r['rounds']} rounds x {r['repeat']} calls per engine" if "rounds" in r
            else f"{r['repeat']} interleaved repetitions")
    ph = ", ".join(f"{k} {v:.1f}s" for k, v in r["compile_phases"].items())
    lines += [
        f"   ours / onnxruntime: {ratio(r, 'onnxruntime'):.2f}x{vs_torch}   (max rel diff of "
        f"outputs {r['max_rel_diff_vs_ort']:.1e}, {reps})",
        *_paired_lines(r),
        *_round_lines(r),
        f"   compile {r['compile_s']:.1f} s ({ph})",
        f"   arena {_mib(r['arena_bytes'])} vs lower bound {_mib(r['lower_bound_bytes'])} "
        f"({r['arena_bytes'] / r['lower_bound_bytes']:.3f}x; naive {_mib(r['naive_bytes'])}), "
        f"weights {_mib(r['weight_bytes'])}, peak RSS {_mib(r['peak_rss_bytes'])}",
        f"   top 5 kernels (of {r['steps']} steps, kernels {r['profile_kernel_ms']:.2f} ms, "
        f"run {r['profile_total_ms']:.2f} ms):",
    ]
    lines += [f"     {k['ms']:>8.3f} ms  {k['op']:<16} {k['node'][:28]:<28} {k['kernel']}"
              for k in r["top_kernels"]]
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    w = max([13] + [len(r["model"]) for r in results])
    head = (f"{'model':<{w}} {'npucc':>9} {'ort':>9} {'torch':>9} {'ours/ort':>9} "
            f"{'ours/torch':>10} "
            f"{'compile s':>10} {'arena/lb':>9} {'peak RSS':>10}")
    rows = [head, "-" * len(head)]
    for r in results:
        lat = r["latency_ms"]
        t = f"{lat['torch']['median']:>9.2f}" if "torch" in lat else f"{'-':>9}"
        vt = f"{ratio(r, 'torch'):>9.2f}x" if "torch" in lat else f"{'-':>10}"
        rows.append(
            f"{r['model']:<{w}} {lat['npucc']['median']:>9.2f} {lat['onnxruntime']['median']:>9.2f}"
            f" {t} {ratio(r, 'onnxruntime'):>8.2f}x {vt} "
            f"{r['compile_s']:>10.1f} {r['arena_bytes'] / r['lower_bound_bytes']:>9.3f} "
            f"{_mib(r['peak_rss_bytes']):>10}")
    mode = results[0].get("mode", "same process, 2 threads each, no spinning")
    how = "; ratios: median of the per-turn ratios" if "paired" in results[0] else ""
    rows.append(f"(median latency in ms, batch 1; {mode}{how})")
    return "\n".join(rows)
