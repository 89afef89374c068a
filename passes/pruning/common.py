"""Shared pieces of the pruning passes: which nodes are prunable layers, how a layer is named,
how a weight is replaced (never in place: weights are held by reference), and the plan record
the report and the torch bridge read back (``ctx.options["prune_plan"]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType

__all__ = ["PruneError", "Layer", "layers", "layer_name", "set_const", "reinfer_types",
           "PLAN_KEY"]

PLAN_KEY = "prune_plan"
LAYER_OPS = ("conv2d", "dense")


class PruneError(NpuccError):
    """A pruning request the model or the options cannot satisfy (names the part at fault)."""


def layer_name(node: Node) -> str:
    """The name a layer goes by in plans and reports: the node's name (the torch module path or
    the ONNX node name) when it has one, else its result."""
    return node.name or node.outputs[0].name


@dataclass
class Layer:
    node: Node
    weight: np.ndarray          # the current weight array (f32)

    @property
    def name(self) -> str:
        return layer_name(self.node)

    @property
    def depthwise(self) -> bool:
        n = self.node
        return n.op == "conv2d" and n.attrs.get("groups", 1) > 1


def layers(graph: Graph, ops: tuple[str, ...] = LAYER_OPS) -> list[Layer]:
    """conv2d/dense nodes whose weight (operand 1) is a float32 constant, in graph order.

    Names are made unique (a second node with the same name gets ``#2``), since a torch module
    called twice gives two nodes one name."""
    out, seen = [], {}
    for n in graph.nodes:
        if n.op not in ops or len(n.inputs) < 2:
            continue
        w = graph.const_value(n.inputs[1])
        if w is None or w.dtype != np.float32:
            continue
        out.append(Layer(n, w))
        seen[layer_name(n)] = seen.get(layer_name(n), 0) + 1
    return out


def set_const(graph: Graph, node: Node, index: int, array: np.ndarray) -> Value:
    """Make operand ``index`` of ``node`` a new constant holding ``array`` (the old constant is
    left for DCE; other readers of it are untouched)."""
    old = node.inputs[index]
    base = old.producer.attrs.get("ref") if old.producer is not None else None
    new = graph.add_const(np.ascontiguousarray(array), name=base or old.name, before=node)
    node.set_input(index, new)
    return new


def reinfer_types(graph: Graph) -> None:
    """Recompute every non-const node's result types from its operands (after shrinking)."""

    for n in graph.nodes:
        if n.op == "const":
            arr = graph.const_value(n.outputs[0])
            if arr is not None:
                n.outputs[0].type = TensorType.of(arr)
            continue
        types = get_op(n.op).infer_types(graph, n.inputs, n.attrs)
        for v, t in zip(n.outputs, types, strict=True):
            v.type = t


@dataclass
class Plan:
    """What a prune pass did, per layer (read by ``CompiledModel.prune_report`` and
    :func:`passes.pruning.torch_bridge.apply_to_torch`)."""

    method: str
    options: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.options),
                "layers": {k: dict(v) for k, v in self.layers.items()}}
