"""The monitoring dashboard: one self-contained HTML file (plotly, its JavaScript inlined).

``write_dashboard(data, path)`` draws what ``npucc monitor`` measured (``compiler/cli_monitor.py``
builds ``data``): a latency gauge against the budget, latency and memory over time with the mode
switches marked, per-kernel bars, and the NPU/CPU split with the target's latency estimate (the
compiler's report stored in a package with modes). Nothing is fetched at view time: plotly.js is
in the page once, every figure's data too.

The file is written atomically (a temporary file beside it, then ``os.replace``), and only over
a file that is one of ours: a regular file carrying the ``<meta name="generator"
content="npucc monitor">`` marker in its first bytes. Anything else at the path is refused.
"""

from __future__ import annotations

import html
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from runtime.package_io import replace_file

__all__ = ["GENERATOR", "write_dashboard", "dashboard_html", "check_ours", "moving_p90"]

GENERATOR = "npucc monitor"
MARKER = f'<meta name="generator" content="{GENERATOR}">'
MODE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
MIB = 2**20
MAX_POINTS = 3000


def moving_p90(values: Sequence[float], window: int) -> np.ndarray:
    """The p90 of the last ``window`` values at every position (fewer at the start)."""
    a = np.asarray(values, dtype=np.float64)
    out = np.empty(len(a))
    for i in range(len(a)):
        out[i] = np.percentile(a[max(0, i + 1 - window):i + 1], 90)
    return out


def _mode_color(modes: Sequence[str], mode: str | None) -> str:
    return MODE_COLORS[modes.index(mode) % len(MODE_COLORS)] if mode in modes else "#7f7f7f"


def _gauge(data: Mapping[str, Any]):
    import plotly.graph_objects as go

    lat = data["metrics"]["latency_ms"]
    budget = data.get("budget_ms")
    top = max(lat["p99"], lat["p90"], budget or 0.0) * 1.25 or 1.0
    gauge: dict[str, Any] = {"axis": {"range": [0, top]}, "bar": {"color": "#333"}}
    if budget:
        h = data.get("headroom", 0.7) * budget
        gauge["steps"] = [{"range": [0, h], "color": "#d4f4dd"},
                          {"range": [h, budget], "color": "#fff3c4"},
                          {"range": [budget, top], "color": "#f8d0d0"}]
        gauge["threshold"] = {"line": {"color": "red", "width": 4}, "thickness": 0.9,
                              "value": budget}
    title = "p90 latency (last window)" + (f" vs budget {budget:g} ms" if budget else "")
    fig = go.Figure(go.Indicator(
        mode="gauge+number+delta" if budget else "gauge+number", value=data["p90_last_ms"],
        number={"suffix": " ms", "valueformat": ".2f"},
        delta={"reference": budget, "increasing": {"color": "red"},
               "decreasing": {"color": "green"}} if budget else None,
        title={"text": title}, gauge=gauge))
    fig.update_layout(height=320, margin={"t": 60, "b": 20})
    return fig


def _add_switches(fig, switches: Sequence[Mapping[str, Any]], rows: Sequence[int] = (1,)
                  ) -> None:
    for sw in switches:
        for row in rows:
            fig.add_vline(x=sw["t"], line_dash="dot", line_color="#555", row=row, col=1)
        fig.add_annotation(x=sw["t"], y=1.0, yref="paper", text=f"→ {sw['to']} ({sw['by']})",
                           showarrow=False, textangle=-90, xanchor="right", yanchor="top",
                           font={"size": 10})


def _timeline(data: Mapping[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    runs = data["runs"]
    modes = data["modes"]
    t = np.array([r["t"] for r in runs])
    lat = np.array([r["latency_ms"] for r in runs])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("latency per run (ms)", "memory (MiB)"))
    # at most MAX_POINTS markers (SVG stays quick to draw); the p90 line uses every run
    stride = max(1, -(-len(runs) // MAX_POINTS))
    every = slice(None, None, stride)
    shown = f" (every {stride}th)" if stride > 1 else ""
    for mode in dict.fromkeys(r["mode"] for r in runs):
        sel = [i for i, r in enumerate(runs) if r["mode"] == mode][every]
        fig.add_trace(go.Scatter(x=t[sel], y=lat[sel], mode="markers",
                                 name=f"run: {mode}{shown}",
                                 marker={"size": 3, "color": _mode_color(modes, mode)}),
                      row=1, col=1)
    if len(runs):
        fig.add_trace(go.Scatter(x=t[every], y=moving_p90(lat, data["window"])[every],
                                 mode="lines", name=f"moving p90 ({data['window']} runs)",
                                 line={"color": "black"}), row=1, col=1)
    if data.get("budget_ms"):
        fig.add_hline(y=data["budget_ms"], line_color="red", line_dash="dash", row=1, col=1,
                      annotation_text=f"budget {data['budget_ms']:g} ms")
    fig.add_trace(go.Scatter(x=t[every], y=[r["rss_bytes"] / MIB for r in runs[every]],
                             mode="lines", name="process RSS"), row=2, col=1)
    fig.add_trace(go.Scatter(x=t[every], y=[r["arena_bytes"] / MIB for r in runs[every]],
                             mode="lines", name="arenas held"), row=2, col=1)
    _add_switches(fig, data["switches"], rows=(1, 2))
    fig.update_xaxes(title_text="seconds since the load started", row=2, col=1)
    fig.update_layout(height=620, margin={"t": 40})
    return fig


def _kernels(data: Mapping[str, Any], top: int = 15):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kernels = data["kernels"]
    names = [m for m in data["modes"] if m in kernels] or list(kernels)
    if not names:
        return None
    fig = make_subplots(rows=len(names), cols=1, vertical_spacing=0.3 / len(names),
                        subplot_titles=[f"{m}: slowest {top} steps, mean ms on this CPU"
                                        for m in names])
    for j, mode in enumerate(names, start=1):
        rows = sorted(kernels[mode], key=lambda r: -r["mean_ms"])[:top][::-1]
        fig.add_trace(go.Bar(x=[r["mean_ms"] for r in rows],
                             y=[f"{r['index']}: {r['node'][-32:]} ({r['op']})" for r in rows],
                             orientation="h", name=mode,
                             marker_color=_mode_color(data["modes"], mode)), row=j, col=1)
    fig.update_layout(height=(100 + 22 * top) * len(names), margin={"l": 10, "t": 50},
                      showlegend=False)
    return fig


def _split(data: Mapping[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    reports = {m: r for m, r in data["reports"].items() if r}
    if not reports:
        return None
    modes = list(reports)
    target = next(iter(reports.values())).get("target", "target")
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"{target} estimate (ms)", "nodes per device", "measured here, by the device the "
        "target runs each step on (ms)"))
    parts = (("npu", "NPU", "#2ca02c"), ("cpu", "CPU", "#1f77b4"))
    for key, label, color in parts:
        fig.add_trace(go.Bar(x=modes, y=[r["ms_per_device"].get(key, 0.0)
                                         for r in reports.values()], name=f"{label} (est.)",
                             marker_color=color, legendgroup=key), row=1, col=1)
    fig.add_trace(go.Bar(x=modes, y=[r.get("transfer_ms", 0.0) for r in reports.values()],
                         name="CPU↔NPU transfers (est.)", marker_color="#bcbd22"), row=1, col=1)
    launches = [max(0.0, r["estimate_ms"] - sum(r["ms_per_device"].values())
                    - r.get("transfer_ms", 0.0)) for r in reports.values()]
    fig.add_trace(go.Bar(x=modes, y=launches, name="NPU region launches (est.)",
                         marker_color="#9467bd"), row=1, col=1)
    for key, label, color in parts:
        fig.add_trace(go.Bar(x=modes, y=[r["nodes_per_device"].get(key, 0)
                                         for r in reports.values()], name=f"{label} nodes",
                             marker_color=color, legendgroup=key, showlegend=False),
                      row=1, col=2)
    measured = data.get("measured_by_device", {})
    for key, label, color in parts:
        fig.add_trace(go.Bar(x=modes, y=[measured.get(m, {}).get(key, 0.0) for m in modes],
                             name=f"{label} steps (measured)", marker_color=color,
                             legendgroup=key, showlegend=False), row=1, col=3)
    fig.update_layout(barmode="stack", height=380, margin={"t": 60})
    for m, r in reports.items():
        fig.add_annotation(x=m, y=r["estimate_ms"], text=f"{r['estimate_ms']:.2f} ms",
                           showarrow=False, yshift=10, row=1, col=1)
    return fig


def _table(data: Mapping[str, Any]) -> str:
    m = data["metrics"]
    rows = []
    for mode in data["modes"]:
        s = m["latency_ms_by_mode"].get(mode)
        rep = data["reports"].get(mode) or {}
        est = f"{rep['estimate_ms']:.3f}" if rep.get("estimate_ms") is not None else "—"
        split = rep.get("nodes_per_device", {})
        cells = [mode, str(m["runs_per_mode"].get(mode, 0))]
        cells += [f"{s[k]:.3f}" for k in ("mean", "p50", "p90", "p99")] if s else ["—"] * 4
        cells += [est, f"{split.get('npu', '—')} / {split.get('cpu', '—')}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = ["mode", "runs", "mean ms", "p50 ms", "p90 ms", "p99 ms",
            f"{html.escape(str(data.get('estimate_target') or 'target'))} estimate ms",
            "nodes NPU / CPU"]
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def dashboard_html(data: Mapping[str, Any]) -> str:
    """The page (see the module docstring) for what ``npucc monitor`` measured."""
    from plotly.offline import get_plotlyjs

    figs = [("gauge", _gauge(data)), ("timeline", _timeline(data)),
            ("kernels", _kernels(data)), ("split", _split(data))]
    divs = []
    for name, fig in figs:
        if fig is None:
            why = {"kernels": "no per-kernel times (profiling was off)",
                   "split": "the package records no compiler report (compile it with "
                            "compile_modes to get the NPU/CPU split and the estimate)"}[name]
            divs.append(f'<p class="missing" id="{name}">{html.escape(why)}</p>')
            continue
        divs.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=name,
                                config={"displaylogo": False, "responsive": True}))
    m = data["metrics"]
    sw = data["switches"]
    facts = [
        f"package <code>{html.escape(str(data['package']))}</code>, modes "
        f"{html.escape(', '.join(data['modes']))}; final mode <b>{html.escape(str(data['mode']))}</b>",
        f"{m['runs']} runs in {data['duration_s']:.1f} s from {data['threads']} threads "
        f"({m['runs'] / max(data['duration_s'], 1e-9):.1f} runs/s); "
        f"{len(sw)} mode switch(es)" + (", automatic policy on" if data.get("auto") else ""),
        f"measured on {html.escape(data['cpu'])} ({data['cores']} CPUs usable); load average "
        f"{data['loadavg'][0]:.2f} at the start, {data['loadavg'][1]:.2f} at the end — other "
        f"processes share this machine unless the load average is near 0",
        f"peak RSS {m['peak_rss_bytes'] / MIB:.1f} MiB, peak arenas "
        f"{m['peak_arena_bytes'] / MIB:.2f} MiB; metrics cost "
        f"{data.get('record_overhead_us', float('nan')):.2f} µs per run",
    ]
    body = "\n".join(f"<li>{f}</li>" for f in facts)
    switches = "".join(
        f"<li>{s['t']:.2f} s: {html.escape(str(s['from']))} → {html.escape(s['to'])} "
        f"({html.escape(s['by'])}: {html.escape(s['reason'])})</li>" for s in sw[:50])
    payload = html.escape(json.dumps({"metrics": {k: v for k, v in m.items()
                                                  if k != "kernels"}}, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
{MARKER}
<title>npucc monitor — {html.escape(str(data['package']))}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
.missing{{color:#777}}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>npucc monitor</h1>
<ul>{body}</ul>
{_table(data)}
{''.join(divs)}
<h2>mode switches</h2><ul>{switches or '<li>none</li>'}</ul>
<script type="application/json" id="metrics">{payload}</script>
</body></html>
"""


def check_ours(path: Path) -> None:
    """Raise :class:`NpuccError` unless ``path`` is absent or a dashboard we wrote."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        why = "it is not a regular file"
    else:
        with open(path, "rb") as f:
            if MARKER.encode() not in f.read(4096):
                why = "it is not a dashboard written by npucc monitor"
    if why:
        raise NpuccError(f"refusing to overwrite {path}: {why}; remove it yourself or choose "
                         f"another output path")


def write_dashboard(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the dashboard for ``data`` to ``path`` atomically (see the module docstring)."""
    path = Path(os.path.abspath(path))
    check_ours(path)
    # check again just before the rename: nothing of someone else's appeared meanwhile
    return replace_file(path, dashboard_html(data).encode(), check=lambda: check_ours(path))
