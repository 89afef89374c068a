"""The ``partition`` pass: every non-const node gets ``device = "npu"`` or ``"cpu"``.

Decided from the target description named by the ``target`` option (a built-in target name
or a .toml path; empty: ``PassContext.target``) by :func:`targets.placement.place`: a node goes to the
NPU when its op is in ``[npu.ops]`` and its dtypes, rank, batch, channels, kernel, strides,
dilations, attribute values and constant operands meet that entry's limits; NPU regions of
fewer than ``min_region_nodes`` nodes go back to the CPU (``"region too small"``), because each
region launch costs a CPU<->NPU transfer and a sync.

Before: any verified graph. After: the same graph, every non-const node annotated, consts
unannotated. Reasons live in ``PassResult.stats["fallbacks"]``; :func:`partition_summary`
recomputes them from any annotated graph and the description.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from compiler.errors import NpuccError
from compiler.ir.graph import Graph
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from targets.description import TargetDescription, load_target
from targets.placement import (
    CPU,
    DEFAULT_MIN_REGION_NODES,
    NPU,
    REGION_TOO_SMALL,
    boundary_values,
    find_regions,
    npu_rejection,
    place,
)
from targets.reference import target_for_pass

__all__ = ["Partition", "partition_summary"]


@register_pass
@dataclass(frozen=True)
class Partition(Pass):
    """Assign each non-const node to the NPU or the CPU from the target description.

    Options: ``target`` (the description: a built-in name or a .toml path; empty: the
    context's); ``min-region-nodes`` (NPU regions smaller than this run on the CPU);
    ``by-cost`` (keep such a small region on the NPU when the roofline cost model says it is
    faster there, counting its launch and its CPU<->NPU transfers).
    """

    name: ClassVar[str] = "partition"
    target: str = ""     # a built-in target name or .toml path; "": PassContext.target
    min_region_nodes: int = DEFAULT_MIN_REGION_NODES
    by_cost: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        target = target_for_pass(self.target, ctx.target, self.name)
        placement = place(graph, target, self.min_region_nodes, self.by_cost)
        changed = False
        for node in graph.nodes:
            dev = placement.device_of(node)
            if node.device != dev:
                node.device = dev
                changed = True
        counts = Counter(placement.device.values())
        fallbacks = [{"node": n.label, "op": n.op, "reason": placement.reasons[id(n)]}
                     for n in graph.nodes if id(n) in placement.reasons]
        npu_regions = [r for r in placement.regions if r.device == NPU]
        if placement.small_regions:
            ctx.remark(f"partition: {len(placement.small_regions)} NPU region(s) smaller than "
                       f"min-region-nodes={self.min_region_nodes} moved to the CPU")
        stats: dict[str, Any] = {
            "npu": counts.get(NPU, 0), "cpu": counts.get(CPU, 0),
            "npu_regions": len(npu_regions), "regions": len(placement.regions),
            "small_regions": placement.small_regions, "fallbacks": fallbacks,
            "fallback_reasons": dict(Counter(f["reason"] for f in fallbacks)),
        }
        return PassResult(graph, changed, stats)


def partition_summary(graph: Graph, target: str | TargetDescription | None = None
                      ) -> dict[str, Any]:
    """What a partitioned graph runs where, and why each CPU node is not on the NPU.

    ``{"nodes_per_device": {"npu": n, "cpu": n}, "fallbacks": [{node, op, reason}],
    "regions": [{id, device, nodes, first, last}], "transfers": {count, bytes}}``.
    Devices are read from the graph; reasons are recomputed from ``target`` (without it they
    read "unknown"). A node the NPU supports but that sits on the CPU was in a region too small.
    """
    missing = [n.label for n in graph.nodes if n.op != "const" and n.device is None]
    if missing:
        raise NpuccError(f"{len(missing)} node(s) have no device (first: {missing[0]}); run "
                         f"the partition pass first")
    desc = load_target(target) if target is not None else None
    counts = Counter(n.device for n in graph.nodes if n.op != "const")
    fallbacks = []
    for n in graph.nodes:
        if n.op == "const" or n.device != CPU:
            continue
        if desc is None:
            reason = "unknown (give the target to explain)"
        else:
            reason = npu_rejection(n, desc.npu) or REGION_TOO_SMALL
        fallbacks.append({"node": n.label, "op": n.op, "reason": reason})
    regions = find_regions(graph, lambda n: n.device)
    crossing = boundary_values(graph, lambda n: n.device)
    return {
        "nodes_per_device": {NPU: counts.get(NPU, 0), CPU: counts.get(CPU, 0)},
        "fallbacks": fallbacks,
        "regions": [{"id": r.id, "device": r.device, "nodes": len(r),
                     "first": r.nodes[0].label, "last": r.nodes[-1].label} for r in regions],
        "transfers": {"count": len(crossing), "bytes": sum(v.type.nbytes for v in crossing)},
    }
