"""Canonicalisation: constant folding, DCE, CSE, BatchNorm folding, reshape/transpose cleanup.

``canonicalize`` runs the others to a fixed point (with an iteration cap; non-convergence is
reported in the stats and as a remark, never silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compiler.ir.graph import Graph, Node
from compiler.ir.interpreter import run_node
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._fold_affine import (
    AFFINE_OPS,
    bn_affine,
    bn_to_mul_add,
    elementwise_affine,
    fold_affine,
)
from passes._rewrite import (
    compose_perm,
    const_array,
    erase_dead,
    is_identity_perm,
    new_const,
    replace_node,
)

__all__ = ["FoldConstants", "DeadCodeElimination", "CommonSubexpressionElimination",
           "FoldBatchNorm", "SimplifyReshapes", "Canonicalize", "fold_constants_in"]


# -- fold-constants ------------------------------------------------------------------
def _foldable_args(graph: Graph, node: Node) -> list[np.ndarray] | None:
    """The operand arrays of ``node`` if it can be evaluated at compile time, else None."""
    if node.op == "const":
        return None
    if node.op == "shape":  # depends on the static shape only
        (x,) = node.inputs
        return [np.broadcast_to(np.zeros((), x.type.np_dtype), x.shape)]
    args = []
    for v in node.inputs:
        arr = const_array(graph, v)
        if arr is None:
            return None
        args.append(arr)
    return args


def fold_constants_in(graph: Graph, max_bytes: int, inline_limit: int = 16,
                      ctx: PassContext | None = None) -> dict[str, int]:
    """Evaluate every node whose operands are constants; returns {"folded", "skipped_big"}
    (and "failed": nodes whose reference implementation raised, left in place)."""
    folded = skipped = failed = 0
    for node in list(graph.nodes):
        args = _foldable_args(graph, node)
        if args is None or not node.outputs \
                or all(not v.uses and v not in graph.outputs for v in node.outputs):
            continue
        if sum(v.type.nbytes for v in node.outputs) > max_bytes:
            skipped += 1
            continue
        try:
            with np.errstate(all="ignore"):
                results = run_node(graph, node, args)
        except Exception as e:  # the node fails at run time too; leave it for the verifier
            failed += 1
            if ctx is not None:
                ctx.remark(f"fold-constants: cannot evaluate {node.label}: {e}")
            continue
        for v, arr in zip(node.outputs, results, strict=True):
            base = node.name or f"folded.{v.name}"
            graph.replace_all_uses(v, new_const(graph, arr, name=base, before=node,
                                                inline_limit=inline_limit))
        erase_dead(graph, [node])
        folded += 1
    stats = {"folded": folded, "skipped_big": skipped}
    if failed:
        stats["failed"] = failed
    return stats


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate at compile time every node whose operands are all constants.

    Uses each op's reference implementation; ``shape`` folds always (shapes are static),
    ``fill``/``arange`` have no operands and fold too, so ONNX ConstantOfShape/Shape/Range
    chains disappear. Before: any graph. After: no non-const node has only constant operands
    (except folds whose result exceeds ``max_bytes``); results of more than
    ``inline_limit`` elements are weights (``graph.add_weight``), smaller ones inline.
    """

    name: ClassVar[str] = "fold-constants"
    max_bytes: int = 64 << 20
    inline_limit: int = 16

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = fold_constants_in(graph, self.max_bytes, self.inline_limit, ctx)
        if stats["skipped_big"]:
            ctx.remark(f"fold-constants: {stats['skipped_big']} fold(s) larger than "
                       f"max-bytes={self.max_bytes} left in the graph")
        return PassResult(graph, stats["folded"] > 0, stats)


# -- dce -----------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose results reach no graph output, and weights no const reads.

    After: every node contributes to an output.
    """

    name: ClassVar[str] = "dce"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nweights = len(graph.weights)
        removed = graph.remove_dead()
        return PassResult(graph, removed > 0,
                          {"removed": removed, "weights_removed": nweights - len(graph.weights)})


# -- cse -----------------------------------------------------------------------------
def _freeze(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return ("nd", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, float):
        return ("f", v.hex())
    return (type(v).__name__, v)


def _cse_key(node: Node) -> tuple:
    attrs = tuple(sorted((k, _freeze(a)) for k, a in node.attrs.items())) if node.attrs else ()
    types = tuple(v.type for v in node.outputs) if node.op == "const" else ()
    return (node.op, tuple(id(v) for v in node.inputs), attrs, types, node.device)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes with the same op, the same operands and equal attributes.

    Constants merge when they read the same weight (``ref``) or hold equal inline values
    (compared by dtype, shape and bytes). After: no two nodes compute the same thing.
    """

    name: ClassVar[str] = "cse"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        seen: dict[tuple, Node] = {}
        merged = 0
        for node in list(graph.nodes):
            if not node.outputs:
                continue
            key = _cse_key(node)
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            for a, b in zip(node.outputs, first.outputs, strict=True):
                graph.replace_all_uses(a, b)
            erase_dead(graph, [node])
            merged += 1
        return PassResult(graph, merged > 0, {"merged": merged})


# -- fold-batchnorm ------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Remove every batch_norm whose scale/bias/mean/var are constants.

    A batch_norm reading a conv2d or dense (no fused activation, the BN its only reader,
    constant weight and bias, BN over its output channels) is folded into its weight and bias;
    so is (``affine``) a mul/add/sub/div by a constant varying along the output channels only.
    Any other batch_norm with constant statistics becomes ``mul`` + ``add`` by per-channel
    constants. After: only batch_norms with non-constant statistics remain.
    """

    name: ClassVar[str] = "fold-batchnorm"
    into_conv: bool = True
    affine: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"folded_into_conv": 0, "to_mul_add": 0}
        for node in list(graph.nodes):
            if node.op == "batch_norm":
                st = bn_affine(graph, node)
                if st is None:
                    continue
                x, axis = node.inputs[0], node.attrs["axis"]
                if self.into_conv and fold_affine(graph, node, x, axis, *st):
                    stats["folded_into_conv"] += 1
                else:
                    bn_to_mul_add(graph, node, *st)
                    stats["to_mul_add"] += 1
            elif self.into_conv and self.affine and node.op in AFFINE_OPS \
                    and len(node.outputs) == 1 and _alive(graph, node):
                found = elementwise_affine(graph, node)
                if found is not None and fold_affine(graph, node, *found):
                    stats[f"{node.op}_folded"] = stats.get(f"{node.op}_folded", 0) + 1
        return PassResult(graph, any(stats.values()), stats)


# -- simplify-reshapes ---------------------------------------------------------------
def _unit_moves_only(shape: tuple[int, ...], perm: list[int]) -> bool:
    """True when transposing ``shape`` by ``perm`` keeps the order of the non-1 dimensions."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


def simplify_node(graph: Graph, node: Node, transpose_to_reshape: bool = True) -> str | None:
    """Apply one reshape/transpose simplification to ``node``; returns the rule's name."""
    found = _simplify(graph, node, transpose_to_reshape)
    return found[0] if found else None


_SIMPLIFIED = frozenset({"identity", "reshape", "transpose"})   # the ops a rule applies to


def _simplify(graph: Graph, node: Node, transpose_to_reshape: bool
              ) -> tuple[str, Node | None] | None:
    """``simplify_node``, also returning the node the rule created (None if it only erased)."""
    rule = "simplify-reshapes"
    if node.op == "identity":
        graph.replace_all_uses(node.output, node.inputs[0])
        erase_dead(graph, [node])
        return "identity", None
    if node.op not in _SIMPLIFIED:
        return None
    x = node.inputs[0]
    inner = x.producer
    if node.op == "reshape":
        if tuple(node.attrs["shape"]) == x.shape:
            graph.replace_all_uses(node.output, x)
            erase_dead(graph, [node])
            return "identity-reshape", None
        if inner is not None and inner.op == "reshape":
            return "reshape-chain", replace_node(graph, node, "reshape", [inner.inputs[0]],
                                                 dict(node.attrs), rule=rule)
        return None
    perm = list(node.attrs["perm"])
    if is_identity_perm(perm):
        graph.replace_all_uses(node.output, x)
        erase_dead(graph, [node])
        return "identity-transpose", None
    if inner is not None and inner.op == "transpose":
        p = compose_perm(list(inner.attrs["perm"]), perm)
        if is_identity_perm(p):
            graph.replace_all_uses(node.output, inner.inputs[0])
            erase_dead(graph, [node])
            return "transpose-chain", None
        return "transpose-chain", replace_node(graph, node, "transpose", [inner.inputs[0]],
                                               {"perm": p}, rule=rule)
    if transpose_to_reshape and _unit_moves_only(x.shape, perm):
        return "transpose-as-reshape", replace_node(
            graph, node, "reshape", [x], {"shape": list(node.output.shape)}, rule=rule)
    return None


@register_pass
@dataclass(frozen=True)
class SimplifyReshapes(Pass):
    """Drop identity ops, identity reshapes and transposes; merge reshape chains and
    transpose chains (to one transpose, or none when they cancel); a transpose that only
    moves size-1 dimensions becomes a reshape (``transpose-to-reshape``).

    After: no identity op, no reshape of a reshape, no transpose of a transpose.

    One sweep in graph order reaches the fixed point: a rule at a node looks only at the
    node and its producer, which the sweep has already simplified, and the node a rule
    creates is simplified again at once (at most ``max_iterations`` times in a row).
    """

    name: ClassVar[str] = "simplify-reshapes"
    transpose_to_reshape: bool = True
    max_iterations: int = 10

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for node in list(graph.nodes):
            for _ in range(self.max_iterations):
                if node.op not in _SIMPLIFIED or node not in graph.nodes \
                        or not _alive(graph, node):
                    break
                found = _simplify(graph, node, self.transpose_to_reshape)
                if found is None:
                    break
                rule, node = found
                stats[rule] = stats.get(rule, 0) + 1
                if node is None:
                    break
        return PassResult(graph, bool(stats), stats)


def _alive(graph: Graph, node: Node) -> bool:
    return any(v.uses or v in graph.outputs for v in node.outputs)


# -- canonicalize --------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Run fold-constants, simplify-reshapes, fold-batchnorm, cse and dce until none of them
    changes the graph, at most ``max_iterations`` rounds.

    Non-convergence is reported (``stats["converged"] = False`` and a remark).
    """

    name: ClassVar[str] = "canonicalize"
    max_iterations: int = 10
    max_bytes: int = 64 << 20
    fold_batchnorm: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        passes: list[Pass] = [FoldConstants(max_bytes=self.max_bytes), SimplifyReshapes()]
        if self.fold_batchnorm:
            passes.append(FoldBatchNorm())
        passes += [CommonSubexpressionElimination(), DeadCodeElimination()]
        stats: dict[str, Any] = {}
        any_change = False
        converged = False
        rounds = 0
        for rounds in range(1, self.max_iterations + 1):  # noqa: B007
            changed = False
            for p in passes:
                r = p.run(graph, ctx)
                graph = r.graph
                changed |= r.changed
                for k, v in r.stats.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        key = f"{p.name}.{k}"
                        stats[key] = stats.get(key, 0) + v
            any_change |= changed
            if not changed:
                converged = True
                break
        stats["iterations"] = rounds
        stats["converged"] = converged
        if not converged:
            ctx.remark(f"canonicalize did not converge in {self.max_iterations} iterations")
        return PassResult(graph, any_change, stats)
