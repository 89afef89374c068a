"""NPU regions of a partitioned graph as quantized (QDQ) ONNX models for the vendor converters.

The NPU has no public code generator; its vendors' converters (HiAI / MindSpore Lite for the
Kirin NPU, rknn-toolkit2 for RKNPU2, SNPE/QNN for Hexagon) take ONNX, and a QDQ model carries
the quantization we chose. :func:`region_to_onnx` turns one NPU region (a convex set of
``device == "npu"`` nodes) back into ONNX ops:

- Our ops map to their ONNX counterparts (conv2d -> Conv + fused activation, dense -> Gemm or
  MatMul + Add, pools, elementwise, softmax, layer_norm, shape ops...). An op without a mapping
  raises :class:`ExportError` naming the node and the ops that are supported.
- Layout: ONNX Conv and pools are NCHW. An NHWC node is emitted in NCHW with Transposes at
  the edges; a value is transposed only when a reader needs the other layout, so chains of
  convs, pools and elementwise ops between them stay NCHW. Region inputs and outputs keep the
  IR layout (so a region model is a drop-in for the region).
- f16 storage (npu-numerics) is undone: f16 tensors and weights are exported as float32
  (casts between float types become aliases), since the quantization is the converter's
  input.
- Quantization (``quantize=True``): every weight of Conv / ConvTranspose / Gemm / MatMul is an
  int8 initializer, per output channel, symmetric (scale = max|w_c| / 127, zero point 0),
  read through DequantizeLinear; its bias an int32 initializer with scale = s_x * s_w[c]
  (the ONNX QDQ convention); every float activation (region inputs and every node's float
  results) goes through a QuantizeLinear/DequantizeLinear pair, int8, per tensor, asymmetric,
  the range from calibration (min/max over the samples, widened to include 0).
- Calibration: the whole lowered graph is run by the reference interpreter on the given
  samples; without samples, on random inputs (float: standard normal; integer inputs: 0 or 1)
  — the model's doc_string says which was used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.interpreter import interpret
from compiler.ir.serialize import atomic_write
from compiler.ir.types import is_float
from targets.onnx_writer import (
    IR_VERSION,
    OPSET,
    SUPPORTED_OPS,
    ExportError,
    Writer,
)
from targets.onnx_writer import value_info as _value_info

__all__ = ["ExportError", "RegionExport", "npu_regions", "calibrate", "region_to_onnx",
           "export_regions", "OPSET", "SUPPORTED_OPS"]

@dataclass
class RegionExport:
    id: int
    path: Path | None
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    calibration: str
    model: Any = field(repr=False, default=None)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        p = self.path
        if p is not None and root is not None:
            p = p.relative_to(root)
        return {"id": self.id, "onnx": str(p) if p else None, "nodes": len(self.nodes),
                "first": self.nodes[0], "last": self.nodes[-1], "inputs": self.inputs,
                "outputs": self.outputs, "calibration": self.calibration}


def npu_regions(graph: Graph) -> list[tuple[int, list[Node], list[Value], list[Value]]]:
    """(id, nodes, inputs, outputs) of every NPU region: inputs are non-constant values read
    from outside the region, outputs the region's values read outside it or returned."""
    from targets.placement import NPU, find_regions

    out = []
    graph_outs = {id(v) for v in graph.outputs}
    for r in find_regions(graph, lambda n: n.device):
        if r.device != NPU:
            continue
        inside = {id(n) for n in r.nodes}
        ins: dict[int, Value] = {}
        outs: dict[int, Value] = {}
        for n in r.nodes:
            for v in n.inputs:
                p = v.producer
                if (p is None or id(p) not in inside) and (p is None or p.op != "const"):
                    ins.setdefault(id(v), v)
            for v in n.outputs:
                if id(v) in graph_outs or any(id(u) not in inside for u in v.uses):
                    outs.setdefault(id(v), v)
        out.append((r.id, list(r.nodes), list(ins.values()), list(outs.values())))
    return out


def random_inputs(graph: Graph, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` random input dicts: floats standard normal, integers 0 or 1, bools random."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        s = {}
        for v in graph.inputs:
            dt = v.type.np_dtype
            if is_float(v.dtype):
                s[v.name] = rng.standard_normal(v.shape).astype(dt)
            else:
                s[v.name] = rng.integers(0, 2, v.shape).astype(dt)
        samples.append(s)
    return samples


def calibrate(graph: Graph, samples: Iterable[Mapping[str, Any]],
              names: set[str] | None = None) -> dict[str, tuple[float, float]]:
    """min/max of every float value (of ``names``, default all) over the interpreted samples."""

    ranges: dict[str, tuple[float, float]] = {}

    def note(v: Value, a: np.ndarray) -> None:
        if not is_float(v.dtype) or (names is not None and v.name not in names) or a.size == 0:
            return
        a = np.asarray(a, np.float32)
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        old = ranges.get(v.name)
        ranges[v.name] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)

    for s in samples:
        for v in graph.inputs:
            note(v, np.asarray(s[v.name]))
        interpret(graph, dict(s), observe=lambda node, res: [
            note(v, r) for v, r in zip(node.outputs, res, strict=True)])
    return ranges


# -- the ONNX writer ---------------------------------------------------------------------
def region_to_onnx(graph: Graph, nodes: list[Node], inputs: list[Value], outputs: list[Value],
                   ranges: Mapping[str, tuple[float, float]] | None = None, *,
                   quantize: bool = True, name: str = "region", doc: str = "") -> Any:
    """One region as an ``onnx.ModelProto`` (opset 17) whose inputs/outputs are the region's
    boundary values, by IR name, in the IR layout, float32 for every float dtype."""
    from onnx import checker, helper

    if quantize and ranges is None:
        raise ExportError("a quantized export needs activation ranges (see calibrate())")
    w = Writer(graph, ranges or {}, quantize)
    for v in [*inputs, *outputs]:
        w.names.add(v.name)
    for v in inputs:
        w.define(v, v.name)
    for n in nodes:
        w.node(n)
    for v in outputs:
        src = w.get(v)
        w.nodes.append(helper.make_node("Identity", [src], [v.name],
                                        name=w.fresh(f"Identity_{v.name}_out")))
    g = helper.make_graph(w.nodes, name, [_value_info(v) for v in inputs],
                          [_value_info(v) for v in outputs], initializer=w.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="npucc", doc_string=doc)
    model.ir_version = IR_VERSION
    meta = {**w.counts, "nodes": len(nodes)}
    helper.set_model_props(model, {"npucc.region": json.dumps(meta)})
    checker.check_model(model)
    return model


def export_regions(graph: Graph, out_dir: str | Path | None = None, *, target: Any = None,
                   calibration: Iterable[Mapping[str, Any]] | None = None,
                   num_random_samples: int = 4, seed: int = 0, quantize: bool = True
                   ) -> list[RegionExport]:
    """Every NPU region of the partitioned ``graph`` as a QDQ ONNX model.

    Written to ``out_dir/region<id>.onnx`` when ``out_dir`` is given. Calibration runs the
    whole graph on ``calibration`` (input dicts) or on ``num_random_samples`` random inputs.
    """
    regions = npu_regions(graph)
    if not regions:
        return []
    if calibration is not None:
        samples = [dict(s) for s in calibration]
        how = (f"activation ranges: min/max over {len(samples)} calibration sample(s) given to "
               f"the export")
    else:
        samples = random_inputs(graph, num_random_samples, seed)
        how = (f"activation ranges: min/max over {num_random_samples} RANDOM input(s) (no "
               f"calibration samples were given; float inputs standard normal, integer inputs "
               f"0/1, seed {seed}) - pass calibration= for ranges that mean something")
    ranges = calibrate(graph, samples) if quantize else {}
    tname = getattr(target, "name", target) or "unknown target"
    out = []
    for rid, nodes, ins, outs in regions:
        doc = (f"npucc NPU region {rid} of graph {graph.name} for {tname}: {len(nodes)} nodes "
               f"({nodes[0].label} .. {nodes[-1].label}). "
               + ("QDQ: int8 per-channel symmetric weights, int8 per-tensor activations; "
                  + how if quantize else "float32, not quantized"))
        model = region_to_onnx(graph, nodes, ins, outs, ranges, quantize=quantize,
                               name=f"{graph.name}_npu_region{rid}", doc=doc)
        path = None
        if out_dir is not None:


            path = Path(out_dir) / f"region{rid}.onnx"
            atomic_write(path, model.SerializeToString())
        out.append(RegionExport(rid, path, [n.label for n in nodes], [v.name for v in ins],
                                [v.name for v in outs], how if quantize else "none", model))
    return out
