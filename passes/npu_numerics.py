"""The ``npu-numerics`` pass: NPU regions compute in the NPU's number format.

An fp16 NPU (Kirin 990's Da Vinci through HiAI / MindSpore Lite) holds every tensor of an NPU
region in f16. Running the region's kernels in f32 here would report what the device does
*not* compute. After ``partition``, this pass rewrites every NPU node that works on f32 data
into its f16 form, so the host kernels built from the lowered graph run on f16 data:

- constant operands (weights, biases, inline scalars) are converted to f16 at compile time;
- an f32 value entering an NPU node from outside the region (a CPU node or a graph input) goes
  through ``cast{to=f16}`` (an *entry* cast, device npu, named ``npu-numerics.entry``);
- results of NPU nodes become f16; a CPU node or graph output reading one gets it through
  ``cast{to=f32}`` (an *exit* cast, device npu, named ``npu-numerics.exit``); a graph output
  keeps its name (the exit cast takes it);
- ``cast{to=f32}`` nodes on the NPU become ``cast{to=f16}``.

Numerics inside the region (what the kernels and the op references both implement):

- conv2d / conv_transpose2d / dense / matmul / gemm: f16 operands, products and sums in f32
  (the Da Vinci cube accumulates in its f32 L0C buffer), bias and fused activation in f32,
  result rounded to f16 once (``accumulator_dtype`` in compiler/ir/ops/nn.py and
  targets/kernels/_te.py).
- Elementwise ops: f16 in, f16 out, each result correctly rounded from the f32 computation.
- ``F32_INSIDE`` ops (softmax, log_softmax, layer/instance/batch norm, lrn, avg pools): their
  statistics need more than f16's 11 bits (a row sum of exps, a variance, a 7x7 window sum), so
  they run in f32 between an f16->f32 and an f32->f16 cast on the NPU — what the device's
  vector unit does (widen, compute, round the result to f16). ``reduce_*`` kernels already
  accumulate f16 in f32, so reductions stay f16 operations.

Nodes whose op refuses f16 operands stay f32 (casts around them); ``stats["kept_f32"]`` names
them. Runs only for a target whose NPU computes in fp16; for an int8 NPU (rk3588) f32 work on
the NPU is also computed in fp16 (its description: "f32 runs as fp16"), so the same rewrite
applies; quantized (int8) nodes are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compiler.errors import NpuccError, OpError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from targets.placement import NPU
from targets.reference import target_for_pass

__all__ = ["NpuNumerics", "F32_INSIDE", "ENTRY", "EXIT", "WIDEN", "NARROW"]

F32_INSIDE = frozenset({"softmax", "log_softmax", "layer_norm", "instance_norm", "batch_norm",
                        "lrn", "avg_pool2d", "global_avg_pool"})
ENTRY, EXIT = "npu-numerics.entry", "npu-numerics.exit"
WIDEN, NARROW = "npu-numerics.widen", "npu-numerics.narrow"
_OURS = (ENTRY, EXIT, WIDEN, NARROW)
SRC, DST = "f32", "f16"


@register_pass
@dataclass(frozen=True)
class NpuNumerics(Pass):
    """Give NPU regions the NPU's storage dtype (f16 for an fp16 NPU): f16 weights, f16
    activations, casts at region entries/exits, f32 statistics inside softmax/norm/avg-pool.

    Before: a partitioned graph (every non-const node has a device). After: NPU nodes read and
    write f16; the graph's inputs and outputs keep their f32 types. Idempotent.
    """

    name: ClassVar[str] = "npu-numerics"
    target: str = ""     # a built-in target name or .toml path; "": PassContext.target

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        desc = target_for_pass(self.target, ctx.target, self.name)
        if desc.npu is None:
            return PassResult(graph, False, {"skipped": "the target has no NPU"})
        unplaced = [n.label for n in graph.nodes if n.op != "const" and n.device is None]
        if unplaced:
            raise NpuccError(f"npu-numerics runs after partition: {len(unplaced)} node(s) have "
                             f"no device (first: {unplaced[0]})")
        return _Rewrite(graph).run()


class _Rewrite:
    def __init__(self, graph: Graph):
        self.g = graph
        self.narrow: dict[int, Value] = {}     # f32 value -> its f16 version
        self.converted: set[int] = set()       # values whose type this pass made f16
        self.stats: dict[str, Any] = {"nodes_f16": 0, "weights_f16": 0, "entry_casts": 0,
                                      "exit_casts": 0, "f32_inside": 0, "kept_f32": []}

    # -- helpers ---------------------------------------------------------------------
    def _cast(self, x: Value, to: str, before: Node, name: str) -> Value:
        return self.g.make_node("cast", [x], {"to": to}, before=before, name=name,
                                device=NPU).output

    def _f16_of(self, v: Value, user: Node) -> Value:
        """The f16 version of the f32 value ``v`` read by the NPU node ``user``."""
        got = self.narrow.get(id(v))
        if got is not None:
            return got
        arr = self.g.const_value(v)
        if arr is not None:
            node = v.producer
            assert node is not None
            half = np.asarray(arr, np.float32).astype(np.float16)
            if "value" in node.attrs and node.attrs["value"] is not None:
                new = self.g.add_const(half, before=node, inline_limit=max(16, half.size))
            else:
                new = self.g.add_weight(f"{node.attrs.get('ref', v.name)}.f16", half,
                                        before=node)
            self.stats["weights_f16"] += 1
        else:
            new = self._cast(v, DST, user, ENTRY)
            self.stats["entry_casts"] += 1
        self.narrow[id(v)] = new
        return new

    def _done_inside(self, node: Node) -> bool:
        """An F32_INSIDE node this pass already wrapped (widened inputs, narrowed results)."""
        fed = [v for v in node.inputs if v.dtype == SRC and self.g.const_value(v) is None]
        return bool(fed) and all(v.producer is not None and v.producer.name == WIDEN
                                 for v in fed)

    def _next(self, node: Node) -> Node | None:
        i = self.g.nodes.index(node) + 1
        return self.g.nodes[i] if i < len(self.g.nodes) else None

    def _needs_f16(self, v: Value) -> bool:
        return v.dtype == SRC and id(v) not in self.converted

    # -- the rewrite -------------------------------------------------------------------
    def run(self) -> PassResult:
        changed = False
        for node in list(self.g.nodes):
            if node.op == "const" or node.device != NPU or node.name in _OURS:
                continue
            if node.op in F32_INSIDE and self._done_inside(node):
                continue
            if self._rewrite(node):
                changed = True
        changed |= self._exits()
        if changed:
            self.g.remove_dead()
        self.stats["kept_f32"] = self.stats["kept_f32"][:20]
        return PassResult(self.g, changed, self.stats)

    def _rewrite(self, node: Node) -> bool:
        if not any(self._needs_f16(v) for v in node.inputs) and not any(
                v.dtype == SRC for v in node.outputs):
            return False
        if node.op == "cast" and node.attrs["to"] == SRC:
            node.attrs["to"] = DST
            # a cast from f16 to f16 is what remains: keep it (the planner treats it as a copy)
        new_inputs = [self._f16_of(v, node) if self._needs_f16(v) else v for v in node.inputs]
        try:
            types = get_op(node.op).infer_types(self.g, new_inputs, node.attrs)
        except OpError as e:
            self._keep_f32(node, str(e))
            return True
        if node.op in F32_INSIDE:
            self._f32_inside(node, new_inputs)
            return True
        node.set_inputs(new_inputs)
        for v, t in zip(node.outputs, types, strict=True):
            if v.type != t:
                v.type = t
                if t.dtype == DST:
                    self.converted.add(id(v))
        self.stats["nodes_f16"] += 1
        return True

    def _f32_inside(self, node: Node, f16_inputs: list[Value]) -> None:
        """cast f16->f32, the op in f32, cast f32->f16: statistics in f32, f16 result."""
        ins = []
        for v16, v in zip(f16_inputs, node.inputs, strict=True):
            if v16.dtype == DST and self.g.const_value(v) is None:
                ins.append(self._cast(v16, SRC, node, WIDEN))
            elif v.dtype == DST and id(v) in self.converted:
                ins.append(self._cast(v, SRC, node, WIDEN))
            else:
                ins.append(v)   # f32 constants (gamma, beta) stay f32
        node.set_inputs(ins)
        nxt = self._next(node)
        for v in node.outputs:
            if v.dtype != SRC:
                continue
            out16 = self._cast(v, DST, nxt, NARROW)
            for user in list(v.uses):
                if user is not out16.producer:
                    for i, x in enumerate(user.inputs):
                        if x is v:
                            user.set_input(i, out16)
            if any(o is v for o in self.g.outputs):
                self.g.outputs = [out16 if o is v else o for o in self.g.outputs]
                v.name, out16.name = out16.name, v.name
            self.converted.add(id(out16))
        self.stats["f32_inside"] += 1

    def _keep_f32(self, node: Node, why: str) -> None:
        ins = []
        for v in node.inputs:
            if v.dtype == DST and id(v) in self.converted:
                ins.append(self._cast(v, SRC, node, WIDEN))
            else:
                ins.append(v)
        node.set_inputs(ins)
        self.stats["kept_f32"].append(f"{node.label}: {why}")

    def _exits(self) -> bool:
        """Readers outside the region (CPU nodes, graph outputs) get f32 back."""
        changed = False
        for v in [v for v in self.g.values() if id(v) in self.converted]:
            outside = [u for u in v.users() if u.device != NPU]
            is_out = any(o is v for o in self.g.outputs)
            if not outside and not is_out:
                continue
            assert v.producer is not None
            back = self.g.make_node("cast", [v], {"to": SRC}, before=self._next(v.producer),
                                    name=EXIT, device=NPU,
                                    types=[TensorType(v.shape, SRC)]).output
            for user in outside:
                for i, x in enumerate(user.inputs):
                    if x is v:
                        user.set_input(i, back)
            if is_out:
                self.g.outputs = [back if o is v else o for o in self.g.outputs]
                v.name, back.name = back.name, v.name
            self.stats["exit_casts"] += 1
            changed = True
        return changed
