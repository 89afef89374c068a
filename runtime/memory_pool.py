"""Static memory planning: tensor lifetimes from the execution order -> offsets in one arena.

Pure Python, no TVM. Inputs are the tensors (name, nbytes, kind) and the steps in execution
order (the tensors each step reads and writes), plus which steps are elementwise.

Time model. Step ``i`` runs at time ``i``; time ``-1`` is "copy the graph inputs in" and time
``n`` (the number of steps) is "copy the graph outputs out". A tensor lives on the closed interval
``[first, last]``: graph inputs from ``-1``, everything else from the step that writes it; until
the last step that reads it, graph outputs until ``n``. Operands and results of one step are live
at the same time, so a kernel never writes over its own operands — except in place:

In place. An elementwise step may write its result over an operand that dies at that step
(last read there), has exactly the result's size and is neither a weight nor a graph output. The
two tensors then share one *buffer*; chains (add -> relu -> ...) share one buffer throughout.

Graph inputs and outputs live in the arena: the executor copies inputs in at the start of a run
and copies outputs out at its end, so one arena serves every run and kernels never see user
memory. Weights are not in the arena (they are read-only and live for the whole run; the
executor keeps them in their own aligned buffers); ``naive_bytes`` and the bound exclude them.

Placement: buffers sorted by an ordering heuristic (by default: largest first), each placed in
the best-fitting gap (the smallest one that fits) between buffers already placed whose lifetimes
overlap its own, or above all of them. Every size is rounded up to ``ALIGN`` bytes, so every
offset is aligned. ``plan_memory`` tries several orderings and keeps the smallest arena; it
stops at the first that reaches the lower bound, which none can beat.

Figures: ``arena_bytes``; ``lower_bound_bytes`` = the largest total (aligned) size of buffers
live at one time — no placement can do better; ``naive_bytes`` = the sum of all tensors' aligned
sizes (one allocation each, no reuse).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bulk import bulk_work
from .errors import PlanError

__all__ = ["ALIGN", "KINDS", "ORDERINGS", "PlanTensor", "PlanStep", "MemoryPlan", "plan_memory",
           "align"]

ALIGN = 64
KINDS = ("input", "output", "intermediate", "weight")


def align(nbytes: int, alignment: int = ALIGN) -> int:
    return (int(nbytes) + alignment - 1) // alignment * alignment


@dataclass(frozen=True, slots=True)
class PlanTensor:
    name: str
    nbytes: int
    kind: str  # one of KINDS; a tensor both input and output of the graph is "input"


@dataclass(frozen=True, slots=True)
class PlanStep:
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass
class _Buffer:
    size: int
    first: int
    last: int
    tensors: list[str]
    offset: int = -1


def _by_size(b: _Buffer) -> tuple:
    return (-b.size, -(b.last - b.first), b.first)


def _by_area(b: _Buffer) -> tuple:
    return (-b.size * (b.last - b.first + 1), -b.size, b.first)


def _by_duration(b: _Buffer) -> tuple:
    return (-(b.last - b.first), -b.size, b.first)


def _by_start(b: _Buffer) -> tuple:
    return (b.first, -b.size)


# Ordering heuristics for the greedy placement; "size" is the classic greedy-by-size.
ORDERINGS = {"size": _by_size, "area": _by_area, "duration": _by_duration, "start": _by_start}


@dataclass
class MemoryPlan:
    """Where every non-weight tensor lives in the arena, and the figures of the plan.

    ``offsets``/``lifetimes`` cover every tensor some step or the graph interface uses (weights
    excluded). ``inplace`` lists ``(step, operand, result)`` pairs sharing memory.
    """

    offsets: dict[str, int]
    sizes: dict[str, int]                        # aligned sizes
    lifetimes: dict[str, tuple[int, int]]
    inplace: list[tuple[int, str, str]]
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    ordering: str = "size"
    alignment: int = ALIGN
    tried: dict[str, int] = field(default_factory=dict)  # ordering -> arena bytes

    @property
    def ratio(self) -> float:
        """arena / lower bound (1.0 is optimal)."""
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0

    def figures(self) -> dict[str, Any]:
        return {"arena_bytes": self.arena_bytes, "lower_bound_bytes": self.lower_bound_bytes,
                "naive_bytes": self.naive_bytes, "alignment": self.alignment,
                "ordering": self.ordering, "orderings_tried": dict(self.tried),
                "inplace": [list(p) for p in self.inplace]}

    def check(self) -> None:
        """Raise :class:`PlanError` unless the plan is sound: aligned offsets, inside the arena,
        and no two tensors live at the same time share a byte (in-place pairs excepted)."""
        problems = []
        for name, off in self.offsets.items():
            if not isinstance(off, int) or off < 0:
                problems.append(f"tensor {name!r} has offset {off!r}; expected an int >= 0")
                continue
            if off % self.alignment:
                problems.append(f"tensor {name!r} at offset {off} is not {self.alignment}-aligned")
            if off + self.sizes[name] > self.arena_bytes:
                problems.append(f"tensor {name!r} ends at {off + self.sizes[name]}, past the "
                                f"arena ({self.arena_bytes} bytes)")
        shared = {(a, r) for _, a, r in self.inplace} | {(r, a) for _, a, r in self.inplace}
        live = [n for n, off in self.offsets.items()
                if isinstance(off, int) and off >= 0 and self.sizes[n] and n in self.lifetimes]
        if live:
            index = _Lifetimes(min(self.lifetimes[n][0] for n in live),
                               max(self.lifetimes[n][1] for n in live))
            for b in live:
                f2, l2 = self.lifetimes[b]
                b0, b1 = self.offsets[b], self.offsets[b] + self.sizes[b]
                for a in index.overlapping(f2, l2):
                    a0, a1 = self.offsets[a], self.offsets[a] + self.sizes[a]
                    if a0 < b1 and b0 < a1 and (a, b) not in shared:
                        f1, l1 = self.lifetimes[a]
                        problems.append(f"tensors {a!r} [{a0}, {a1}) live {f1}..{l1} and "
                                        f"{b!r} [{b0}, {b1}) live {f2}..{l2} overlap")
                index.add(b, f2, l2)
        if problems:
            raise PlanError("invalid memory plan:\n  " + "\n  ".join(problems))


def _lifetimes(tensors: Mapping[str, PlanTensor], steps: Sequence[PlanStep],
               io: Collection[str]) -> dict[str, list[int]]:
    n = len(steps)
    life: dict[str, list[int]] = {}
    for t in tensors.values():
        if t.kind == "input":
            life[t.name] = [-1, -1]
    for i, step in enumerate(steps):
        for name in step.reads:
            t = tensors.get(name)
            if t is None:
                raise PlanError(f"step {i} reads {name!r}, which is not in the tensor table")
            if t.kind == "weight":
                continue
            if name not in life:
                raise PlanError(f"step {i} reads {name!r} before any step writes it")
            life[name][1] = i
        for name in step.writes:
            t = tensors.get(name)
            if t is None:
                raise PlanError(f"step {i} writes {name!r}, which is not in the tensor table")
            if t.kind in ("weight", "input"):
                raise PlanError(f"step {i} writes {name!r}, a graph {t.kind}")
            if name in life:
                raise PlanError(f"step {i} writes {name!r}, already written by an earlier step")
            life[name] = [i, i]
    for t in tensors.values():
        if t.kind == "output" or t.name in io:
            if t.name not in life:
                raise PlanError(f"graph output {t.name!r} is written by no step")
            life[t.name][1] = n
    return life


def _coerce_tensors(tensors: Iterable[PlanTensor | tuple]) -> dict[str, PlanTensor]:
    table: dict[str, PlanTensor] = {}
    for t in tensors:
        if not isinstance(t, PlanTensor):
            t = PlanTensor(*t)
        if t.kind not in KINDS:
            raise PlanError(f"tensor {t.name!r} has kind {t.kind!r}; expected one of {KINDS}")
        if t.name in table:
            raise PlanError(f"tensor {t.name!r} appears twice in the tensor table")
        table[t.name] = t
    return table


def plan_memory(tensors: Iterable[PlanTensor | tuple[str, int, str]],
                steps: Sequence[PlanStep | tuple[Sequence[str], Sequence[str]]],
                elementwise_steps: Collection[int] = (),
                *, orderings: Sequence[str] | None = None,
                inputs_also_outputs: Collection[str] = (),
                alignment: int = ALIGN, stop_at_bound: bool = True) -> MemoryPlan:
    """Plan the arena for ``steps`` run in order.

    ``tensors``: ``PlanTensor(name, nbytes, kind)`` or ``(name, nbytes, kind)`` tuples.
    ``steps``: ``PlanStep(reads, writes)`` or ``(reads, writes)`` pairs, in execution order.
    ``elementwise_steps``: indices of steps that may write a result over a dying operand.
    ``orderings``: heuristics to try (names in ``ORDERINGS``; default all), smallest arena wins.
    ``stop_at_bound``: stop at the first ordering whose arena equals the lower bound (no
    other can do better, so the plan is the same; ``tried`` then lists only the orderings
    run). ``False`` runs every ordering (to compare them).
    ``inputs_also_outputs``: graph inputs returned unchanged as outputs (kept live to the end).
    """
    with bulk_work():
        return _plan(tensors, steps, elementwise_steps, orderings, inputs_also_outputs,
                     alignment, stop_at_bound)


def _plan(tensors, steps, elementwise_steps, orderings, inputs_also_outputs,
          alignment, stop_at_bound) -> MemoryPlan:
    table = _coerce_tensors(tensors)
    io = frozenset(inputs_also_outputs)
    steps = [s if isinstance(s, PlanStep) else PlanStep(tuple(s[0]), tuple(s[1])) for s in steps]
    elementwise = set(elementwise_steps)
    life = _lifetimes(table, steps, io)
    sizes = {name: align(table[name].nbytes, alignment) for name in life}

    # Buffers: one per tensor, merged along in-place chains.
    buf_of: dict[str, _Buffer] = {}
    for name in sorted(life, key=lambda x: (life[x][0], x)):
        buf_of[name] = _Buffer(sizes[name], life[name][0], life[name][1], [name])
    inplace: list[tuple[int, str, str]] = []
    for i in sorted(elementwise):
        if not 0 <= i < len(steps):
            raise PlanError(f"elementwise step {i} out of range (there are {len(steps)} steps)")
        step, claimed = steps[i], set()
        for r in step.writes:
            for a in step.reads:
                t = table[a]
                if (t.kind in ("weight", "output") or a in io or a in claimed
                        or a == r or life[a][1] != i or t.nbytes != table[r].nbytes
                        or buf_of[a].last != i):
                    continue
                buf, rbuf = buf_of[a], buf_of[r]
                buf.last = rbuf.last
                buf.tensors += rbuf.tensors
                for name in rbuf.tensors:
                    buf_of[name] = buf
                claimed.add(a)
                inplace.append((i, a, r))
                break
    buffers = list({id(b): b for b in buf_of.values()}.values())

    bound = _lower_bound(buffers)
    naive = sum(sizes.values())
    names = list(orderings or ORDERINGS)
    for name in names:
        if name not in ORDERINGS:
            raise PlanError(f"unknown ordering {name!r}; known: {', '.join(ORDERINGS)}")
    tried: dict[str, int] = {}
    best: tuple[int, str, list[int]] | None = None
    for name in names:
        arena = _place(buffers, ORDERINGS[name])
        tried[name] = arena
        if best is None or arena < best[0]:
            best = (arena, name, [b.offset for b in buffers])
        if stop_at_bound and arena <= bound:
            break   # optimal: no ordering can place these buffers in less
    assert best is not None
    arena, ordering, offsets = best
    offs: dict[str, int] = {}
    for b, off in zip(buffers, offsets, strict=True):
        for name in b.tensors:
            offs[name] = off
    return MemoryPlan(offsets=offs, sizes=sizes,
                      lifetimes={k: (v[0], v[1]) for k, v in life.items()}, inplace=inplace,
                      arena_bytes=arena, lower_bound_bytes=bound, naive_bytes=naive,
                      ordering=ordering, alignment=alignment, tried=tried)


def _lower_bound(buffers: Sequence[_Buffer]) -> int:
    events: list[tuple[int, int]] = []
    for b in buffers:
        events.append((b.first, b.size))
        events.append((b.last + 1, -b.size))
    live = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before allocations
        live += delta
        peak = max(peak, live)
    return peak


class _Lifetimes:
    """Buffers indexed by lifetime, to find those alive during ``[first, last]`` without
    scanning every buffer (which made planning, and checking a plan, quadratic in the number
    of steps).

    A buffer overlaps ``[a, b]`` if it is alive at ``a`` or starts inside ``(a, b]``. Short
    buffers (most: a value read by the next few steps) are listed at every step they live;
    long ones sit at O(log T) nodes of a segment tree over the steps, found by a stabbing
    query. A query costs O(1 + (b - a) + k), plus O(log T) when long buffers exist.
    """

    SHORT = 64

    def __init__(self, first: int, last: int):
        self.base = first
        self.size = 1 << max(1, (last - first + 1).bit_length())
        self.tree: dict[int, list] = {}
        self.live: dict[int, list] = {}
        self.starts: dict[int, list] = {}

    def add(self, item, first: int, last: int) -> None:
        self.starts.setdefault(first, []).append(item)
        if last - first < self.SHORT:
            for t in range(first, last + 1):
                self.live.setdefault(t, []).append(item)
            return
        lo, hi = first - self.base + self.size, last - self.base + self.size + 1
        while lo < hi:
            if lo & 1:
                self.tree.setdefault(lo, []).append(item)
                lo += 1
            if hi & 1:
                hi -= 1
                self.tree.setdefault(hi, []).append(item)
            lo >>= 1
            hi >>= 1

    def overlapping(self, first: int, last: int) -> list:
        found = list(self.live.get(first, ()))
        if self.tree:
            i = first - self.base + self.size
            while i:
                found.extend(self.tree.get(i, ()))
                i >>= 1
        starts = self.starts
        for t in range(first + 1, last + 1):
            found.extend(starts.get(t, ()))
        return found


def _place(buffers: Sequence[_Buffer], key) -> int:
    """Greedy placement in ``key`` order, best fit among the gaps; returns the arena size."""
    if not buffers:
        return 0
    index = _Lifetimes(min(b.first for b in buffers), max(b.last for b in buffers))
    top = 0
    for b in sorted(buffers, key=key):
        if b.size == 0:
            b.offset = 0
            continue
        conflicts = sorted(index.overlapping(b.first, b.last), key=lambda p: p.offset)
        best_off, best_gap, end = -1, -1, 0
        for p in conflicts:
            gap = p.offset - end
            if gap >= b.size and (best_gap < 0 or gap < best_gap):
                best_off, best_gap = end, gap
            end = max(end, p.offset + p.size)
        b.offset = best_off if best_off >= 0 else end
        index.add(b, b.first, b.last)
        top = max(top, b.offset + b.size)
    return top
