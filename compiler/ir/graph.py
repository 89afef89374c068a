"""The graph IR core: Value, Node, Graph.

Invariants (checked by :func:`compiler.ir.verify`):
- ``graph.nodes`` is in topological order; every value is defined once, by a graph input
  or by exactly one node output, before its first use.
- ``value.uses`` lists the nodes that read the value (one entry per operand slot), kept in
  sync by every mutating method here. Passes mutate only through these methods.
- Weights live in ``graph.weights`` (name -> numpy array, held by reference) and are
  referenced by ``const`` nodes (``attrs["ref"]``); small constants may be inline
  (``attrs["value"]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from compiler.errors import OpError
from compiler.ir.types import TensorType
from compiler.ir.value import ListLike, UseList, Value

__all__ = ["Value", "Node", "NodeList", "UseList", "Graph"]


class Node:
    """An operation: op name, operands, results, attributes, optional device annotation."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "device", "_list", "_prev", "_next")

    def __init__(self, op: str, inputs: Iterable[Value], outputs: Iterable[Value],
                 attrs: dict[str, Any] | None = None, name: str = "", device: str | None = None):
        self.op = op
        self.inputs: list[Value] = list(inputs)
        self.outputs: list[Value] = list(outputs)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.name = name
        self.device = device
        self._list: NodeList | None = None       # the graph's node list holding it (links)
        self._prev: Node | None = None
        self._next: Node | None = None
        for v in self.inputs:
            v.uses.append(self)
        for v in self.outputs:
            v.producer = self

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise OpError(f"node {self.label} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    @property
    def label(self) -> str:
        """How errors name this node: its name if it has one, else its first result."""
        res = f"%{self.outputs[0].name}" if self.outputs else "<no result>"
        return f"{self.op} {self.name!r} ({res})" if self.name else f"{self.op} {res}"

    def set_input(self, index: int, value: Value) -> None:
        old = self.inputs[index]
        old.uses.remove(self)
        self.inputs[index] = value
        value.uses.append(self)

    def set_inputs(self, values: Iterable[Value]) -> None:
        for v in self.inputs:
            v.uses.remove(self)
        self.inputs = list(values)
        for v in self.inputs:
            v.uses.append(self)

    def drop_inputs(self) -> None:
        self.set_inputs([])

    def __repr__(self) -> str:
        return f"<Node {self.label}>"


class NodeList(ListLike):
    """A graph's nodes in order: an intrusive doubly linked list (as MLIR's op lists).

    Membership, ``remove``, ``insert_before`` and ``append`` are O(1), so a pass that rewrites
    k nodes of an n-node graph costs O(n + k), never O(n k). Iteration follows the links and
    sees nodes appended meanwhile; a removed node keeps its forward link, so an iteration
    standing on it goes on. Indexing other than ``[0]``/``[-1]``, slicing and ``index`` use a
    snapshot list kept until the next insertion or removal (appends extend it). It also
    counts the ``const`` nodes naming each weight, so a rewrite can tell in O(1) whether a
    weight is still referenced.
    """

    __slots__ = ("_head", "_tail", "_len", "_snap", "_index", "_refs")

    def __init__(self, nodes: Iterable[Node] = ()):
        self._head: Node | None = None
        self._tail: Node | None = None
        self._len = 0
        self._snap: list[Node] | None = None
        self._index: dict[int, int] | None = None
        self._refs: dict[str, int] = {}
        for n in nodes:
            self.append(n)

    # -- mutation ----------------------------------------------------------------------
    def _adopt(self, node: Node) -> None:
        if node._list is not None:
            where = "this" if node._list is self else "another"
            raise ValueError(f"{node.label} is already in {where} graph")
        node._list = self
        self._len += 1
        ref = node.attrs.get("ref") if node.op == "const" else None
        if ref:
            self._refs[ref] = self._refs.get(ref, 0) + 1

    def append(self, node: Node) -> None:
        self._adopt(node)
        node._prev, node._next = self._tail, None
        if self._tail is None:
            self._head = node
        else:
            self._tail._next = node
        self._tail = node
        if self._snap is not None:
            if self._index is not None:
                self._index[id(node)] = len(self._snap)
            self._snap.append(node)

    def insert_before(self, anchor: Node, node: Node) -> None:
        """Put ``node`` just before ``anchor``."""
        if anchor._list is not self:
            raise ValueError(f"{anchor.label} is not in the graph")
        self._adopt(node)
        node._prev, node._next = anchor._prev, anchor
        if anchor._prev is None:
            self._head = node
        else:
            anchor._prev._next = node
        anchor._prev = node
        self._snap = self._index = None

    def insert(self, i: int, node: Node) -> None:
        """List-style insert before position ``i``."""
        if i >= self._len:
            self.append(node)
        else:
            self.insert_before(self[i], node)

    def remove(self, node: Node) -> None:
        if node._list is not self:
            raise ValueError(f"{node.label} is not in the graph")
        prev, nxt = node._prev, node._next
        if prev is None:
            self._head = nxt
        else:
            prev._next = nxt
        if nxt is None:
            self._tail = prev
        else:
            nxt._prev = prev
        node._list = node._prev = None   # _next stays: an iteration standing here goes on
        self._len -= 1
        ref = node.attrs.get("ref") if node.op == "const" else None
        if ref:
            self._refs[ref] -= 1
            if not self._refs[ref]:
                del self._refs[ref]
        self._snap = self._index = None

    def reverse(self) -> None:
        nodes = list(self)
        self.release()
        for n in reversed(nodes):
            self.append(n)

    def release(self) -> None:
        """Empty the list, leaving its nodes free to join another (a reordered copy)."""
        for n in list(self):
            n._list = n._prev = n._next = None
        self._head = self._tail = None
        self._len, self._refs = 0, {}
        self._snap = self._index = None

    def references(self, ref: str) -> int:
        """How many ``const`` nodes read weight ``ref``."""
        return self._refs.get(ref, 0)

    # -- reading -----------------------------------------------------------------------
    def _list(self) -> list[Node]:
        if self._snap is None:
            self._snap = list(self)
        return self._snap

    def index(self, node: Node) -> int:
        if node._list is not self:
            raise ValueError(f"{node.label} is not in the graph")
        snap = self._list()
        if self._index is None:
            self._index = {id(n): i for i, n in enumerate(snap)}
        return self._index[id(node)]

    def __contains__(self, node: object) -> bool:
        return getattr(node, "_list", None) is self

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Node]:
        n = self._head
        while n is not None:
            if n._list is self:
                yield n
            n = n._next

    def __reversed__(self) -> Iterator[Node]:
        return reversed(self._list())

    def __getitem__(self, i):
        if i == 0 and self._head is not None:
            return self._head
        if i == -1 and self._tail is not None:
            return self._tail
        return self._list()[i]



_NAME_OK = re.compile(r"[A-Za-z0-9_.\-/]+\Z")


class Graph:
    """A function-like dataflow graph with named inputs/outputs and a weight store."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes = NodeList()
        self.weights: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        self._counter = 0

    @property
    def nodes(self) -> NodeList:
        """The nodes in topological order (a :class:`NodeList`; assign any iterable)."""
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: Iterable[Node]) -> None:
        if isinstance(nodes, NodeList):
            self._nodes = nodes
            return
        nodes = list(nodes)
        old = getattr(self, "_nodes", None)
        if old is not None:
            old.release()
        self._nodes = NodeList(nodes)

    # -- construction ---------------------------------------------------------------
    def unique_name(self, base: str | None = None) -> str:
        """A value name not used in this graph, derived from ``base`` when given."""
        if base is not None and base not in self._names:
            self._names.add(base)
            return base
        stem = base if base is not None else ""
        while True:
            name = f"{stem}_{self._counter}" if stem else str(self._counter)
            self._counter += 1
            if name not in self._names:
                self._names.add(name)
                return name

    def claim_name(self, name: str) -> None:
        self._names.add(name)

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.unique_name(name), type)
        self.inputs.append(v)
        return v

    def make_node(self, op: str, inputs: Iterable[Value], attrs: dict[str, Any] | None = None,
                  *, types: list[TensorType] | None = None, name: str = "",
                  out_names: list[str] | None = None, before: Node | None = None,
                  device: str | None = None) -> Node:
        """Create a node, infer (or take) its result types, and insert it.

        Inserted at the end, or just before ``before``. Attributes are normalised against
        the op's schema (defaults filled in, kinds checked).
        """
        from compiler.ir.registry import get_op

        inputs = list(inputs)
        opdef = get_op(op)
        attrs = opdef.normalize_attrs(attrs or {})
        if types is None:
            types = opdef.infer_types(self, inputs, attrs)
        names = out_names or [None] * len(types)
        outs = [Value(self.unique_name(n), t) for n, t in zip(names, types, strict=True)]
        node = Node(op, inputs, outs, attrs, name=name, device=device)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert_before(before, node)
        return node

    def add(self, op: str, *inputs: Value, name: str = "", before: Node | None = None,
            **attrs: Any) -> Value:
        """Shorthand for single-result nodes: ``g.add("relu", x)``."""
        return self.make_node(op, inputs, attrs, name=name, before=before).output

    def add_weight(self, name: str, array: np.ndarray, *, before: Node | None = None,
                   node_name: str = "") -> Value:
        """Store ``array`` under a fresh weight name and return the ``const`` value reading it."""
        ref = name
        i = 0
        while ref in self.weights:
            i += 1
            ref = f"{name}_{i}"
        self.weights[ref] = array
        vname = ref if _NAME_OK.match(ref) else None
        node = self.make_node("const", [], {"ref": ref}, types=[TensorType.of(array)],
                              out_names=[vname] if vname else None, before=before,
                              name=node_name)
        return node.output

    def add_const(self, array: np.ndarray | Any, dtype: str | None = None, *,
                  name: str | None = None, before: Node | None = None,
                  inline_limit: int = 16) -> Value:
        """A constant: inline when small (``<= inline_limit`` elements), else a weight."""
        from compiler.ir.types import to_numpy_dtype

        arr = np.asarray(array)
        if dtype is not None:
            arr = arr.astype(to_numpy_dtype(dtype))
        if arr.size <= inline_limit:
            node = self.make_node("const", [], {"value": arr}, types=[TensorType.of(arr)],
                                  out_names=[name] if name else None, before=before)
            return node.output
        return self.add_weight(name or "const", arr, before=before)

    # -- queries -------------------------------------------------------------------
    def const_value(self, value: Value) -> np.ndarray | None:
        """The array of a value produced by a ``const`` node, else None."""
        node = value.producer
        if node is None or node.op != "const":
            return None
        if node.attrs.get("value") is not None:
            return node.attrs["value"]
        return self.weights.get(node.attrs.get("ref", ""))

    def weight_in_use(self, ref: str) -> bool:
        """Whether a ``const`` node of this graph still reads weight ``ref``."""
        return self.nodes.references(ref) > 0

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield from n.outputs

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    # -- mutation ------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (and the graph outputs) read ``new`` instead."""
        if old is new:
            return
        for node in list(old.uses):
            for i, v in enumerate(node.inputs):
                if v is old:
                    node.set_input(i, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Remove a node whose results are unused."""
        for v in node.outputs:
            if v.uses or any(o is v for o in self.outputs):
                raise OpError(f"cannot remove {node.label}: %{v.name} is still used")
        node.drop_inputs()
        self.nodes.remove(node)

    def remove_dead(self) -> int:
        """Remove nodes whose results reach no graph output; returns how many went."""
        live: set[int] = set()
        stack = [v for v in self.outputs]
        while stack:
            v = stack.pop()
            n = v.producer
            if n is None or id(n) in live:
                continue
            live.add(id(n))
            stack.extend(n.inputs)
        dead = [n for n in self.nodes if id(n) not in live]
        for n in dead:   # O(1) each: the rest of the list stays as it is
            n.drop_inputs()
            self.nodes.remove(n)
        for ref in [r for r in self.weights if not self.nodes.references(r)]:
            del self.weights[ref]
        return len(dead)

    def toposort(self) -> None:
        """Re-order ``nodes`` topologically, keeping the current order where it is free.

        Raises :class:`OpError` naming the nodes on a cycle.
        """
        index = {id(n): i for i, n in enumerate(self.nodes)}
        indeg = {id(n): 0 for n in self.nodes}
        for n in self.nodes:
            for p in {id(v.producer) for v in n.inputs if v.producer is not None}:
                if p in indeg:
                    indeg[id(n)] += 1
        import heapq

        ready = [(index[id(n)], n) for n in self.nodes if indeg[id(n)] == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            _, n = heapq.heappop(ready)
            order.append(n)
            for user in {id(u): u for v in n.outputs for u in v.uses}.values():
                if id(user) in indeg:
                    indeg[id(user)] -= 1
                    if indeg[id(user)] == 0:
                        heapq.heappush(ready, (index[id(user)], user))
        if len(order) != len(self.nodes):
            stuck = [n.label for n in self.nodes if indeg[id(n)] > 0]
            raise OpError("cycle among nodes: " + ", ".join(stuck[:10]))
        self.nodes = order

    def copy(self) -> Graph:
        """A structural copy sharing the weight arrays (they are never mutated in place)."""
        g = Graph(self.name)
        g.weights = dict(self.weights)
        g._names = set(self._names)
        g._counter = self._counter
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            nv = Value(v.name, v.type)
            vmap[id(v)] = nv
            g.inputs.append(nv)
        for n in self.nodes:
            outs = [Value(v.name, v.type) for v in n.outputs]
            for old, new in zip(n.outputs, outs, strict=True):
                vmap[id(old)] = new
            ins = [vmap[id(v)] for v in n.inputs]
            g.nodes.append(Node(n.op, ins, outs, dict(n.attrs), n.name, n.device))
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g

    def __str__(self) -> str:
        from compiler.ir.printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph @{self.name}: {len(self.nodes)} nodes>"
