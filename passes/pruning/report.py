"""The pruning report: per-layer sparsity, parameters before/after, output error against the
unpruned model (``CompiledModel.prune_report``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret

__all__ = ["prune_report", "print_report", "output_error"]


def _params(graph: Graph) -> tuple[int, int]:
    """(entries, non-zero entries) of every float weight matrix / kernel (rank >= 2) the graph
    reads, each stored weight once (so an imported matmul weight and a fused dense weight
    count alike)."""
    seen, total, nnz = set(), 0, 0
    for n in graph.nodes:
        if n.op != "const" or "ref" not in n.attrs or n.attrs["ref"] in seen:
            continue
        seen.add(n.attrs["ref"])
        w = graph.weights.get(n.attrs["ref"])
        if w is None or w.ndim < 2 or w.dtype.kind != "f":
            continue
        total += w.size
        nnz += int(np.count_nonzero(w))
    return total, nnz


def output_error(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    """Cosine (worst sample/output), max abs and relative L2 error of ``got`` against ``ref``."""
    cos, mx, rel = 1.0, 0.0, 0.0
    for rs, gs in zip(ref, got, strict=True):
        for r, g in zip(rs, gs, strict=True):
            r = np.asarray(r, np.float64).reshape(-1)
            g = np.asarray(g, np.float64).reshape(-1)
            if r.shape != g.shape:
                return {"cosine": 0.0, "max_abs": float("inf"), "relative": float("inf")}
            nr = np.linalg.norm(r)
            cos = min(cos, float(r @ g / (nr * np.linalg.norm(g) + 1e-30)) if nr else 1.0)
            mx = max(mx, float(np.abs(r - g).max()) if r.size else 0.0)
            rel = max(rel, float(np.linalg.norm(r - g) / (nr + 1e-30)))
    return {"cosine": cos, "max_abs": mx, "relative": rel}


def prune_report(source: Graph, pruned: Graph, plan: dict[str, Any] | None, run: Any,
                 samples: list[dict[str, np.ndarray]] | None, *, stored_bytes: int | None = None,
                 dense_bytes: int | None = None) -> dict[str, Any]:
    """``run(inputs) -> outputs`` runs the pruned model (the compiled one); the unpruned
    reference is ``source`` on the reference interpreter. ``pruned`` is the graph after the
    passes (its conv/dense weights are counted)."""

    before, nnz_before = _params(source)
    after, nnz_after = _params(pruned)
    rep: dict[str, Any] = {
        "method": (plan or {}).get("method"),
        "options": (plan or {}).get("options", {}),
        "layers": (plan or {}).get("layers", {}),
        "params_before": int(nnz_before), "params_after": int(nnz_after),
        "param_entries_before": int(before), "param_entries_after": int(after),
        "sparsity": 1.0 - nnz_after / nnz_before if nnz_before else 0.0,
    }
    if stored_bytes is not None:
        rep["weight_bytes_stored"] = int(stored_bytes)
    if dense_bytes is not None:
        rep["weight_bytes_dense"] = int(dense_bytes)
    if samples:
        ref = [interpret(source, s) for s in samples]
        got = [run(s) for s in samples]
        rep["output_error"] = output_error(ref, got)
        rep["samples"] = len(samples)
    return rep


def print_report(rep: dict[str, Any], console: Any = None) -> None:
    """The report as a rich table (layers, then totals and the output error)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"pruning: {rep.get('method')}")
    for col in ("layer", "op", "before", "after", "sparsity", "note"):
        t.add_column(col, justify="right" if col in ("before", "after", "sparsity") else "left")
    for name, e in rep.get("layers", {}).items():
        if "heads_before" in e:
            b, a = f"{e['heads_before']} heads", f"{e['heads_after']} heads"
        elif "channels_before" in e:
            b, a = f"{e['channels_before']} ch", f"{e['channels_after']} ch"
        else:
            b, a = str(e.get("params_before", "")), str(e.get("params_after", ""))
        note = e.get("skipped") or e.get("kept_because") or e.get("pattern") or ""
        t.add_row(name, e.get("op", ""), b, a, f"{100 * e.get('sparsity', 0.0):.1f}%", note)
    console.print(t)
    line = (f"conv/dense parameters (non-zero): {rep['params_before']} -> "
            f"{rep['params_after']} ({100 * rep['sparsity']:.1f}% removed)")
    if "weight_bytes_stored" in rep:
        line += (f"; package weights {rep['weight_bytes_stored']} B"
                 + (f" (dense {rep['weight_bytes_dense']} B)" if "weight_bytes_dense" in rep
                    else ""))
    console.print(line)
    if "output_error" in rep:
        e = rep["output_error"]
        console.print(f"output vs unpruned on {rep['samples']} sample(s): cosine "
                      f"{e['cosine']:.5f}, max abs {e['max_abs']:.4g}, relative "
                      f"{e['relative']:.4g}")
