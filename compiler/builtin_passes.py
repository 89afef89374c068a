"""Passes that belong to the pass manager rather than to a family: ``verify`` and
``print-op-stats``. Neither changes the graph."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from compiler.ir.graph import Graph
from compiler.pass_base import Pass, PassContext, PassResult, register_pass

__all__ = ["VerifyPass", "PrintOpStats"]


@register_pass
@dataclass(frozen=True)
class VerifyPass(Pass):
    """Run the graph verifier; fails naming every bad node. Leaves the graph unchanged.

    Useful at a chosen point of a pipeline run with --no-verify-each, or in a .ir test."""

    name: ClassVar[str] = "verify"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from compiler.ir.verify import verify

        verify(graph)
        return PassResult(graph, False)


@register_pass
@dataclass(frozen=True)
class PrintOpStats(Pass):
    """Print how many nodes of each op the graph has (to stderr, like MLIR's -print-op-stats).

    ``json=true`` prints one JSON object instead of a table. The counts are also the pass's
    stats (shown by --time-passes)."""

    name: ClassVar[str] = "print-op-stats"
    json: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        import json as _json

        counts = dict(sorted(graph.op_counts().items()))
        out = ctx.options.get("stats_stream") or sys.stderr
        if self.json:
            out.write(_json.dumps({"graph": graph.name, "ops": counts}) + "\n")
        else:
            width = max((len(k) for k in counts), default=4)
            out.write(f"// op stats of @{graph.name}: {len(graph.nodes)} nodes\n")
            for op, n in counts.items():
                out.write(f"//   {op:<{width}}  {n}\n")
        out.flush()
        return PassResult(graph, False, stats=counts)
