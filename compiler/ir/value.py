"""SSA values and their use lists (``compiler.ir.graph`` re-exports both)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from compiler.ir.types import TensorType

if TYPE_CHECKING:
    from compiler.ir.graph import Node

__all__ = ["Value", "UseList", "ListLike"]


class ListLike:
    """``==`` against lists and tuples (and each other), unhashable, and a list-like repr: what
    the IR's linked containers (:class:`UseList`, ``NodeList``) share with the lists they
    replaced."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ListLike | list | tuple):
            return list(self) == list(other)   # type: ignore[call-overload]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"   # type: ignore[call-overload]


class UseList(ListLike):
    """The nodes reading a value, one entry per operand slot (a node reading it twice is
    there twice), in first-use order, with O(1) ``append`` and ``remove``: a constant shared
    by every block of a large model (after CSE) has as many uses as blocks, and removing
    them one by one from a list was quadratic."""

    __slots__ = ("_count", "_len")

    def __init__(self) -> None:
        self._count: dict[Node, int] = {}
        self._len = 0

    def append(self, node: Node) -> None:
        self._count[node] = self._count.get(node, 0) + 1
        self._len += 1

    def remove(self, node: Node) -> None:
        c = self._count.get(node)
        if not c:
            raise ValueError(f"{node!r} does not use this value")
        if c == 1:
            del self._count[node]
        else:
            self._count[node] = c - 1
        self._len -= 1

    def distinct(self) -> list[Node]:
        """Each reading node once, in first-use order."""
        return list(self._count)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __contains__(self, node: object) -> bool:
        return node in self._count

    def __iter__(self) -> Iterator[Node]:
        for n, c in self._count.items():
            for _ in range(c):
                yield n

    def __getitem__(self, i):
        if i == 0 and self._count:
            return next(iter(self._count))
        return list(self)[i]



class Value:
    """An SSA value: a name, a type, the node producing it (None for graph inputs)."""

    __slots__ = ("name", "type", "producer", "uses")

    def __init__(self, name: str, type: TensorType, producer: Node | None = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.uses = UseList()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def users(self) -> list[Node]:
        """Distinct nodes reading this value, in first-use order."""
        return self.uses.distinct()

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"
