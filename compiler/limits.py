"""Size limits a graph must meet before any kernel is built.

TVM indexes tensors with 32-bit integers unless told otherwise: a dimension or an element
count past 2**31 - 1 ends deep in codegen with ``Literal value ... exceeds range of int32``. A
tensor larger than the target's memory budget can never run. Both are the user's model, not a
compiler bug: :func:`check_graph_limits` refuses them up front with an :class:`NpuccError`
naming the value, its type and the limit.
"""

from __future__ import annotations

from compiler.errors import NpuccError

__all__ = ["INDEX_LIMIT", "check_graph_limits"]

INDEX_LIMIT = (1 << 31) - 1


def check_graph_limits(graph, budget_bytes: int | None = None, target: str = "") -> None:
    """Refuse a value whose dimension or element count exceeds ``INDEX_LIMIT`` or whose bytes
    exceed ``budget_bytes`` (when given). Every offending value is listed (up to 10)."""
    bad: list[str] = []
    for v in graph.values():
        t = v.type
        big_dim = next((d for d in t.shape if d > INDEX_LIMIT), None)
        if big_dim is not None:
            bad.append(f"%{v.name}: {t} has dimension {big_dim} > {INDEX_LIMIT} (int32 indexing)")
        elif t.size > INDEX_LIMIT:
            bad.append(f"%{v.name}: {t} has {t.size} elements > {INDEX_LIMIT} (int32 indexing)")
        elif budget_bytes is not None and t.nbytes > budget_bytes:
            bad.append(f"%{v.name}: {t} needs {t.nbytes} bytes, over the memory budget of "
                       f"{budget_bytes} bytes{f' of target {target!r}' if target else ''}")
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NpuccError("the model has tensors too large to compile:\n  "
                         + "\n  ".join(bad[:10]) + more)
