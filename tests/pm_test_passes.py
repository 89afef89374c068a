"""Passes that exist only to test the pass manager (loaded as a plugin:
``npucc opt --load-plugin tests/pm_test_passes.py`` or ``load_plugin(path)``).

- ``test-flip-sign``: negates the first graph output (breaks the numerics, verifies fine);
- ``test-double-neg``: wraps the first output in ``neg(neg(.))`` (changes the graph, not the
  numbers);
- ``test-corrupt``: declares a wrong result type on the first node (breaks verification);
- ``test-crash``: removes a node's inputs, then raises (a pass bug).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compiler.ir.graph import Graph
from compiler.ir.types import TensorType
from compiler.pass_base import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class FlipSign(Pass):
    """Negate the first graph output."""

    name: ClassVar[str] = "test-flip-sign"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.outputs[0] = graph.add("neg", graph.outputs[0])
        return PassResult(graph, True, stats={"flipped": 1})


@register_pass
@dataclass(frozen=True)
class DoubleNeg(Pass):
    """Wrap the first graph output in neg(neg(.)), ``times`` times."""

    name: ClassVar[str] = "test-double-neg"
    times: int = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for _ in range(self.times):
            graph.outputs[0] = graph.add("neg", graph.add("neg", graph.outputs[0]))
        return PassResult(graph, self.times > 0, stats={"added": 2 * self.times})


@register_pass
@dataclass(frozen=True)
class Corrupt(Pass):
    """Declare a wrong result type on the first non-const node."""

    name: ClassVar[str] = "test-corrupt"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        node = next(n for n in graph.nodes if n.op != "const")
        v = node.outputs[0]
        v.type = TensorType((*v.type.shape, 1), v.type.dtype)
        return PassResult(graph, True)


@register_pass
@dataclass(frozen=True)
class Crash(Pass):
    """Damage the graph, then raise RuntimeError(message)."""

    name: ClassVar[str] = "test-crash"
    message: str = "boom"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.nodes[-1].drop_inputs()
        raise RuntimeError(self.message)
