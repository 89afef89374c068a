"""A language model's decode latency (ms/token) from the same calibrated cost model.

Decoding one token reads every weight once (GEMV: memory-bound), reads the KV cache up to the
current position, and launches a fixed number of kernels per layer; each part costs what the
target's ``[cost]`` section says it costs (``memory`` factor for streamed bytes, ``launch_us``
per kernel, ``region_us`` per NPU region), so the LLM estimate and ``m.estimate()`` are one
model with one error band.

Two entry points:

- :func:`decode_estimate` (graph, target, position): the decode graph's own estimate, with
  ``cached_attention`` reading only positions ``0..position`` of its static cache and
  ``kv_write`` writing only the new rows (a static-shape graph otherwise counts the whole
  cache);
- :func:`decode_ms_per_token` (target, weight_bytes, kv_bytes_per_position, position,
  layers): the same arithmetic from sizes alone, before a graph exists (planning,
  compression budgets).

Wiring (compiler/llm, runtime/llm*): call ``decode_estimate(package_decode_graph, target,
position=n_prompt + n_new // 2)`` where the package's ms/token estimate is reported, and
print its ``summary``.
"""

from __future__ import annotations

from typing import Any

from compiler.ir.graph import Graph, Node
from targets.cost_model import (
    cost_of,
    device_peak_flops,
    estimate,
)
from targets.description import TargetDescription, load_target

__all__ = ["decode_estimate", "decode_ms_per_token"]

_KV_OPS = ("cached_attention", "kv_write", "cached_attention_q", "kv_write_q")


def _kv_row(node: Node, row: dict[str, Any], desc: TargetDescription, position: int
            ) -> dict[str, Any]:
    """``row`` re-costed for the KV rows actually touched at ``position``."""
    bw = desc.memory.dram_gbps * 1e9
    terms = cost_of(desc).terms(row["device"])
    if node.op in ("cached_attention", "cached_attention_q"):
        q = node.inputs[0].type
        cache = [x.type for x in node.inputs[1:-1]]    # f32 k, v; or codes, scales (, mins)
        c = cache[0].shape[0]
        n = min(position + q.shape[0], c)
        whole = sum(t.nbytes for t in cache)
        kv = whole * n / c
        nbytes = row["bytes"] - whole + kv
        flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * n   # q.k and p.v
        peak = device_peak_flops(desc, row["device"], "f32")
        t_c, t_m = flops / peak, nbytes / bw
        cls = "memory" if t_m > t_c else "attention"
    else:   # kv_write(_q): the new rows in, the same rows (or their codes) out, in place
        new = node.inputs[-2].type
        rows = sum(t.type.nbytes for t in node.inputs[:-2]) * new.shape[0] \
            // node.inputs[0].type.shape[0]
        t_c, t_m, nbytes, flops, kv, cls = 0.0, (new.nbytes + rows) / bw, new.nbytes + rows, \
            0.0, 0.0, "memory"
    roof = max(t_c, t_m) * 1e3
    return {**row, "class": cls, "flops": flops, "bytes": nbytes, "roofline_ms": roof,
            "cached_ms": 0.0, "kv_bytes": kv,
            "ms": roof / terms.factor(cls) + terms.launch_us * 1e-3,
            "bound": "compute" if t_c >= t_m else "memory"}


def decode_estimate(graph: Graph, target: str | TargetDescription, position: int | None = None
                    ) -> dict[str, Any]:
    """ms/token of one decode step of ``graph`` at KV position ``position`` (default: the last
    position of its static cache), with the split into weights, KV cache and fixed costs, and
    the target calibration's error band."""
    desc = load_target(target)
    est = estimate(graph, desc)
    by_label = {n.label: n for n in graph.nodes}
    caches = [n.inputs[1].type.shape[0] for n in graph.nodes if n.op == "cached_attention"]
    pos = (max(caches) - 1 if caches else 0) if position is None else int(position)
    rows = [(_kv_row(by_label[r["node"]], r, desc, pos) if r["op"] in _KV_OPS else r)
            for r in est["nodes"]]
    cost = cost_of(desc)
    kv_ms = sum(r["ms"] for r in rows if r["op"] in _KV_OPS)
    launch_ms = sum(cost.terms(r["device"]).launch_us * 1e-3 for r in rows if r["class"])
    other = est["region_launch_ms"] + est["transfer_ms"]
    total = sum(r["ms"] for r in rows) + other
    return {"target": desc.name, "position": pos, "ms_per_token": total,
            "tokens_per_s": 1e3 / total if total > 0 else float("inf"),
            "kv_ms": kv_ms, "fixed_ms": launch_ms + other,
            "weights_ms": total - kv_ms - launch_ms - other,
            "weights_bytes": est["weights_bytes"], "band": cost.band(),
            "summary": f"{total:.3g} ms/token at position {pos}, {cost.band()}", "nodes": rows}


def decode_ms_per_token(target: str | TargetDescription, *, weight_bytes: int,
                        kv_bytes_per_position: int, position: int, layers: int,
                        kernels_per_layer: int = 10, device: str = "cpu") -> dict[str, Any]:
    """The decode estimate from sizes alone: ``weight_bytes`` streamed once, the KV cache read
    up to ``position`` (``kv_bytes_per_position``: K and V of every layer for one position),
    ``layers * kernels_per_layer`` kernel launches (plus one NPU region on ``device="npu"``)."""
    desc = load_target(target)
    cost = cost_of(desc)
    terms = cost.terms(device)
    bw = desc.memory.dram_gbps * 1e9 * terms.factor("memory")
    weights_ms = weight_bytes / bw * 1e3
    kv_ms = kv_bytes_per_position * (position + 1) / bw * 1e3
    fixed_ms = (layers * kernels_per_layer * terms.launch_us
                + (terms.region_us if device == "npu" and desc.npu is not None else 0.0)) * 1e-3
    total = weights_ms + kv_ms + fixed_ms
    launches = layers * kernels_per_layer
    inputs = {"weight_bytes": int(weight_bytes), "dram_gbps": desc.memory.dram_gbps,
              "memory_factor": terms.factor("memory"),
              "kv_bytes": int(kv_bytes_per_position * (position + 1)), "launches": launches,
              "launch_us": terms.launch_us}
    formula = (f"{weight_bytes / 1e6:.1f} MB weights + {inputs['kv_bytes'] / 1e6:.1f} MB KV "
               f"(positions 0..{position}) over {desc.memory.dram_gbps:g} GB/s x "
               f"{inputs['memory_factor']:.3g} + {launches} launches x {terms.launch_us:g} us")
    return {"target": desc.name, "position": position, "ms_per_token": total,
            "tokens_per_s": 1e3 / total, "weights_ms": weights_ms, "kv_ms": kv_ms,
            "fixed_ms": fixed_ms, "band": cost.band(), "inputs": inputs, "formula": formula,
            "summary": f"{total:.3g} ms/token at position {position}, {cost.band()}"}
