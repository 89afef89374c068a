"""The quantization report: per-layer and model-level error of a quantized graph vs float.

Both graphs run side by side through the reference interpreter on the same samples; values are
matched by name (the quantization handlers keep a replaced node's result name). A **layer** is
a node of the quantized graph that computes in a reduced precision (``dense_wq``,
``gather_q``, ``norm_f16``, the integer ops, or a node reading a ``dequantize``) whose result
name and shape exist in the float graph. Its figures compare its output in the quantized model
(errors of the layers before it included) with the same value in the float model (``local``:
the same figures for the layer alone, run on the float model's inputs to it, when those exist
by name):

- ``mse``, ``max_abs``, ``cosine``, ``snr_db = 10 log10(sum y^2 / sum (y - y_q)^2)``;
- ``channel_rel_err``: per output channel (last axis) ``rms(y - y_q) / rms(y)``, resampled to
  at most 64 bins: one row of the heatmap;
- ``bytes_float`` / ``bytes_quant``: the constant operands the node reads in each graph.

``outputs`` has the same figures for the model outputs; ``bytes`` the weights of both graphs.
:func:`write_report` writes ``quant_report.json``, ``quant_report_heatmap.png`` and
``quant_report.html`` (the PNG embedded).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node
from compiler.ir.interpreter import check_inputs, interpret, run_node
from compiler.numeric import make_sample_inputs
from compiler.pass_manager import run_pipeline
from compiler.pipeline import parse_pipeline

__all__ = ["build_report", "write_report", "render_html", "heatmap_png", "QUANT_OPS"]

QUANT_OPS = frozenset({"dense_wq", "gather_q", "norm_f16", "qdense", "qconv2d", "qmatmul",
                       "qattention"})
BINS = 64


def _is_layer(node: Node) -> bool:
    if node.op in QUANT_OPS:
        return True
    return node.op not in ("quantize", "dequantize") and any(
        v.producer is not None and v.producer.op == "dequantize" for v in node.inputs)


def _const_bytes(graph: Graph, node: Node) -> int:
    total = 0
    for v in node.inputs:
        p = v.producer
        if p is not None and p.op == "dequantize":  # the int8 path: i8 weight -> dequantize
            v = p.inputs[0]
            p = v.producer
        arr = graph.const_value(v) if p is not None and p.op == "const" else None
        if arr is not None and arr.size > 16:
            total += int(arr.nbytes)
    return total


def weight_bytes(graph: Graph) -> int:
    refs = {n.attrs.get("ref") for n in graph.find("const")}
    return sum(int(a.nbytes) for r, a in graph.weights.items() if r in refs)


class _Acc:
    """Running sums for one compared value."""

    def __init__(self) -> None:
        self.se = self.ref2 = self.out2 = self.dot = 0.0
        self.n = 0
        self.max_abs = 0.0
        self.ch_se: np.ndarray | None = None
        self.ch_ref: np.ndarray | None = None

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        r = np.asarray(ref, np.float64)
        o = np.asarray(out, np.float64)
        d = r - o
        self.se += float(np.sum(d * d))
        self.ref2 += float(np.sum(r * r))
        self.out2 += float(np.sum(o * o))
        self.dot += float(np.sum(r * o))
        self.n += r.size
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
        if r.ndim >= 1 and r.size:
            c = r.shape[-1]
            se = (d * d).reshape(-1, c).sum(axis=0)
            rr = (r * r).reshape(-1, c).sum(axis=0)
            self.ch_se = se if self.ch_se is None else self.ch_se + se
            self.ch_ref = rr if self.ch_ref is None else self.ch_ref + rr

    def figures(self) -> dict[str, Any]:
        mse = self.se / max(self.n, 1)
        snr = math.inf if self.se == 0 else (10 * math.log10(self.ref2 / self.se)
                                             if self.ref2 > 0 else -math.inf)
        cos = self.dot / math.sqrt(self.ref2 * self.out2) if self.ref2 > 0 and self.out2 > 0 \
            else 1.0
        out: dict[str, Any] = {"mse": mse, "max_abs": self.max_abs, "cosine": cos,
                               "snr_db": snr}
        if self.ch_se is not None:
            rel = np.sqrt(self.ch_se / np.maximum(self.ch_ref, 1e-30))
            out["channel_rel_err"] = [float(x) for x in _bins(rel)]
        return out


def _bins(x: np.ndarray) -> np.ndarray:
    if len(x) <= BINS:
        return x
    edges = np.linspace(0, len(x), BINS + 1).astype(int)
    return np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])


def build_report(float_graph: Graph, quant_graph: Graph,
                 samples: Sequence[Mapping[str, np.ndarray]], *,
                 plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compare ``quant_graph`` with ``float_graph`` on ``samples`` (see the module doc)."""

    ftypes = {v.name: v.type for v in float_graph.values()}
    fnodes = {o.name: n for n in float_graph.nodes for o in n.outputs}
    layers = [n for n in quant_graph.nodes if _is_layer(n) and len(n.outputs) == 1
              and ftypes.get(n.output.name) is not None
              and ftypes[n.output.name].shape == n.output.shape]
    names = {n.output.name for n in layers}

    def is_const(v) -> bool:
        return v.producer is not None and v.producer.op == "const"

    local = [n for n in layers if all(is_const(v) or ftypes.get(v.name) == v.type
                                      for v in n.inputs)]
    needed = names | {v.name for n in local for v in n.inputs if not is_const(v)}
    accs = {name: _Acc() for name in names}
    local_accs = {id(n): _Acc() for n in local}
    out_accs = [_Acc() for _ in quant_graph.outputs]
    ref: dict[str, np.ndarray] = {}
    for sample in samples:
        ref.clear()
        ref.update({k: a for k, a in check_inputs(float_graph, sample).items() if k in needed})

        def keep_ref(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=True):
                if v.name in needed:
                    ref[v.name] = r

        fouts = interpret(float_graph, sample, observe=keep_ref)

        def compare(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=True):
                if v.name in names:
                    accs[v.name].add(ref[v.name], r)

        qouts = interpret(quant_graph, sample, observe=compare)
        for acc, f, q in zip(out_accs, fouts, qouts, strict=True):
            acc.add(f, q)
        for n in local:  # the layer alone: its float inputs, its quantized weights
            args = [quant_graph.const_value(v) if is_const(v) else ref[v.name]
                    for v in n.inputs]
            local_accs[id(n)].add(ref[n.output.name], run_node(quant_graph, n, args)[0])
    rows = []
    for n in layers:
        fn = fnodes[n.output.name]
        rows.append({"value": n.output.name, "name": n.name, "op": n.op, "float_op": fn.op,
                     "shape": list(n.output.shape),
                     "bytes_float": _const_bytes(float_graph, fn),
                     "bytes_quant": _const_bytes(quant_graph, n),
                     **accs[n.output.name].figures(),
                     "local": ({k: v for k, v in local_accs[id(n)].figures().items()
                                if k != "channel_rel_err"} if id(n) in local_accs else None)})
    fb, qb = weight_bytes(float_graph), weight_bytes(quant_graph)
    return {
        "samples": len(samples),
        "layers": rows,
        "unmatched_layers": sum(1 for n in quant_graph.nodes if _is_layer(n)) - len(rows),
        "outputs": [{"value": v.name, **a.figures()}
                    for v, a in zip(quant_graph.outputs, out_accs, strict=True)],
        "bytes": {"float": fb, "quantized": qb, "ratio": qb / fb if fb else None},
        "op_counts": quant_graph.op_counts(),
        **({"plan": dict(plan)} if plan else {}),
    }


def heatmap_png(report: Mapping[str, Any], path: str | Path) -> Path:
    """Layers x channel bins of ``log10`` relative error, one row per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["layers"] if r.get("channel_rel_err")]
    path = Path(path)
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no quantized layers", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    width = max(len(r["channel_rel_err"]) for r in rows)
    img = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        e = np.asarray(r["channel_rel_err"], np.float64)
        img[i, :len(e)] = np.log10(np.maximum(e, 1e-8))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows)))
    im = ax.imshow(img, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['name'] or r['value']} ({r['op']})" for r in rows], fontsize=7)
    ax.set_xlabel(f"output channel (binned to <= {BINS})")
    ax.set_title("per-channel relative error, log10 rms(y - y_q) / rms(y)")
    fig.colorbar(im, ax=ax, label="log10 relative error")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return html.escape(str(x))


def render_html(report: Mapping[str, Any], png: bytes | None) -> str:
    cols = ("name", "op", "shape", "snr_db", "cosine", "mse", "max_abs", "local_snr_db",
            "bytes_float", "bytes_quant")

    def cell(r: Mapping[str, Any], c: str) -> str:
        if c == "local_snr_db":
            return _fmt((r.get("local") or {}).get("snr_db", "-"))
        return _fmt(r.get(c))
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>"
                   for r in report["layers"])
    outs = "".join(f"<tr><td>{html.escape(o['value'])}</td><td>{_fmt(o['snr_db'])}</td>"
                   f"<td>{_fmt(o['cosine'])}</td><td>{_fmt(o['mse'])}</td>"
                   f"<td>{_fmt(o['max_abs'])}</td></tr>" for o in report["outputs"])
    b = report["bytes"]
    img = (f'<img alt="error heatmap" src="data:image/png;base64,'
           f'{base64.b64encode(png).decode()}">' if png else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>npucc quantization report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>
<h1>Quantization report</h1>
<p>{report['samples']} sample(s). snr_db etc.: the layer's output in the quantized model
vs the float model (earlier layers' errors included); local_snr_db: the layer alone.
Weights: float {b['float']} B, quantized {b['quantized']} B
(ratio {_fmt(b['ratio'])}).</p>
<h2>Model outputs</h2>
<table><tr><th>output</th><th>snr_db</th><th>cosine</th><th>mse</th><th>max_abs</th></tr>
{outs}</table>
<h2>Layers</h2>
<table><tr>{head}</tr>{body}</table>
<h2>Error heatmap</h2>{img}
</body></html>
"""


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``quant_report.json``, ``quant_report_heatmap.png`` and ``quant_report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "quant_report.json"
    js.write_text(json.dumps(report, indent=1, default=_json_default))
    png = heatmap_png(report, out / "quant_report_heatmap.png")
    page = out / "quant_report.html"
    page.write_text(render_html(report, png.read_bytes()))
    return {"json": js, "png": png, "html": page}


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def float_reference(source: Graph, target: Any) -> Graph:
    """``source`` through ``target``'s default pipeline up to where ``compile`` puts the
    ``quantize`` pass (before ``partition``, after the layout passes): the float graph the
    ``quantize`` pass saw (without pruning)."""

    passes = parse_pipeline(target.default_pipeline)
    at = next((i for i, p in enumerate(passes) if p.name == "partition"), len(passes))
    return run_pipeline(source.copy(), passes[:at]) if at else source.copy()


def model_report(source: Graph, quant_graph: Graph, target: Any,
                 samples: Sequence[Mapping[str, np.ndarray]] | None, *,
                 plan: Mapping[str, Any] | None = None, count: int = 4) -> dict[str, Any]:
    """:func:`build_report` of ``quant_graph`` against ``source``'s float pipeline; random
    samples (``count``) when none are given."""

    float_graph = float_reference(source, target)
    if not samples:
        samples = [make_sample_inputs(float_graph, seed=i) for i in range(count)]
    return build_report(float_graph, quant_graph, samples, plan=plan)
