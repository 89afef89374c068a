"""Which device runs each node: the NPU support check and region grouping.

Pure functions over a Graph and a TargetDescription; they never mutate the graph. The
``partition`` pass (passes/partition.py) writes their answer into ``Node.device``; the cost
model reads regions and boundary transfers from here too.

- :func:`npu_rejection` — why the NPU cannot run a node (``None`` when it can).
- :func:`find_regions` — group device-annotated nodes into convex single-device regions.
- :func:`place` — the full decision: support check, then NPU regions smaller than
  ``min_region_nodes`` go back to the CPU with the reason ``"region too small"``.

A region is *convex*: no path leaves it and comes back, so it can run as one launch.
``const`` nodes have no device and belong to no region.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from compiler.ir.graph import Graph, Node, Value
from targets.description import NpuDesc, NpuOp, TargetDescription

__all__ = ["CPU", "NPU", "REGION_TOO_SMALL", "DEFAULT_MIN_REGION_NODES", "Region", "Placement", "npu_rejection",
           "find_regions", "place", "boundary_values"]

CPU, NPU = "cpu", "npu"
REGION_TOO_SMALL = "region too small"
# NPU regions of fewer nodes run on the CPU by default: each launch costs a sync + transfers
DEFAULT_MIN_REGION_NODES = 3

# operands / results that hold indices, not data: not checked against the NPU's dtypes
_INDEX_OPERANDS: dict[str, frozenset[int]] = {"gather": frozenset({1})}
_INDEX_RESULTS = frozenset({"argmax", "argmin", "shape"})
# kernel spatial dims inside the weight, by kernel layout
_KERNEL_DIMS = {"OIHW": slice(2, 4), "OHWI": slice(1, 3), "HWIO": slice(0, 2)}


def _checked_dtypes(node: Node) -> list[str]:
    skip = _INDEX_OPERANDS.get(node.op, frozenset())
    dts = [v.dtype for i, v in enumerate(node.inputs) if i not in skip]
    if node.op not in _INDEX_RESULTS:
        dts += [v.dtype for v in node.outputs]
    return [d for d in dts if d != "bool"] or dts


def _channel_dims(node: Node) -> list[int]:
    layout = node.attrs.get("layout")
    dims = []
    for v in [*node.inputs, *node.outputs]:
        if v.producer is not None and v.producer.op == "const" and v not in node.outputs:
            continue
        if not v.shape:
            continue
        if layout in ("NCHW", "NHWC") and len(v.shape) == 4:
            dims.append(v.shape[1] if layout == "NCHW" else v.shape[3])
        else:
            dims.append(v.shape[-1])
    return dims


def _kernel_size(node: Node) -> list[int]:
    if node.op == "conv2d" and len(node.inputs) > 1 and node.inputs[1].type.rank == 4:
        return list(node.inputs[1].shape[_KERNEL_DIMS[node.attrs.get("kernel_layout", "OIHW")]])
    if node.op == "conv_transpose2d" and len(node.inputs) > 1:
        return list(node.inputs[1].shape[2:4])
    return list(node.attrs.get("kernel", []))


def _op_rejection(node: Node, spec: NpuOp) -> str | None:
    bad = sorted(set(_checked_dtypes(node)) - set(spec.dtypes))
    if bad:
        return f"dtype {', '.join(bad)} not in the NPU's {', '.join(spec.dtypes)}"
    values = [*node.inputs, *node.outputs]
    rank = max((v.type.rank for v in values), default=0)
    if rank > spec.max_rank:
        return f"rank {rank} > max rank {spec.max_rank}"
    if spec.max_batch is not None:
        batch = max((v.shape[0] for v in values if v.type.rank >= 3), default=1)
        if batch > spec.max_batch:
            return f"batch {batch} > max batch {spec.max_batch}"
    checks: list[tuple[str, Iterable[int], int | None]] = [
        ("channels", _channel_dims(node), spec.max_channels),
        ("kernel", _kernel_size(node), spec.max_kernel),
        ("stride", node.attrs.get("strides", []), spec.max_stride),
        ("dilation", node.attrs.get("dilations", []), spec.max_dilation),
    ]
    for what, vals, limit in checks:
        vals = list(vals)
        if limit is not None and vals and max(vals) > limit:
            return f"{what} {max(vals)} > max {what} {limit}"
    for attr, allowed in spec.attrs.items():
        value = node.attrs.get(attr)
        if value is not None and value not in allowed:
            return f"{attr}={value!r} not in the NPU's {', '.join(map(repr, allowed))}"
    for i in spec.const_inputs:
        if i < len(node.inputs):
            p = node.inputs[i].producer
            if p is None or p.op != "const":
                return f"operand {i} must be a constant on the NPU"
    return None


def npu_rejection(node: Node, npu: NpuDesc | None) -> str | None:
    """Why ``npu`` cannot run ``node``, or None when it can. ``const`` nodes are never asked."""
    if npu is None:
        return "the target has no NPU"
    spec = npu.ops.get(node.op)
    if spec is None and node.op == "sum" and len(node.inputs) == 2:
        spec = npu.ops.get("add")  # a two-operand sum is an add
    if spec is None:
        return f"op {node.op} not supported by the NPU"
    return _op_rejection(node, spec)


@dataclass
class Region:
    """A convex run of nodes on one device, in graph order."""

    id: int
    device: str
    nodes: list[Node] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nodes)


def find_regions(graph: Graph, device_of: Callable[[Node], str | None]) -> list[Region]:
    """Group the non-const nodes into convex single-device regions (greedy, in graph order).

    A node joins a region of one of its same-device producers when that keeps the region
    convex (none of its other producers depends on that region), and that region absorbs the
    node's other same-device producer regions when the union stays convex (so the Q, K and V
    projections feeding one attention matmul become one region); otherwise it starts one.
    """
    regions: list[Region] = []
    parent: list[int] = []                # union-find over region ids
    node_region: dict[int, int] = {}      # id(node) -> region id (as created)
    deps: dict[int, frozenset[int]] = {}  # id(node) -> region ids it transitively reads
    preds: dict[int, list[Node]] = {}     # id(node) -> its non-const producers

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    def reads_any(n: Node, roots: set[int]) -> bool:
        return any(find(x) in roots for x in deps[id(n)])

    def convex_with(roots: set[int], extra: list[Node]) -> bool:
        """No path leaves the union of ``roots`` (plus ``extra``) and comes back."""
        members = [m for r in roots for m in regions[r].nodes] + extra
        for m in members:
            for p in preds[id(m)]:
                if find(node_region[id(p)]) not in roots and reads_any(p, roots):
                    return False
        return True

    for node in graph.nodes:
        dev = device_of(node)
        if node.op == "const" or dev is None:
            continue
        producers = list(dict.fromkeys(v.producer for v in node.inputs
                                       if v.producer is not None and id(v.producer) in deps))
        preds[id(node)] = producers
        cands = list(dict.fromkeys(find(node_region[id(p)]) for p in producers
                                   if regions[find(node_region[id(p)])].device == dev))
        chosen: int | None = None
        for r in cands:
            if not any(find(node_region[id(q)]) != r and reads_any(q, {r}) for q in producers):
                chosen = r
                break
        if chosen is None:
            chosen = len(regions)
            regions.append(Region(chosen, dev))
            parent.append(chosen)
        else:
            for r2 in cands:
                a, b = find(chosen), find(r2)
                if a != b and convex_with({a, b}, [node]):
                    parent[b] = a
                    regions[a].nodes.extend(regions[b].nodes)
                    regions[b].nodes = []
        root = find(chosen)
        regions[root].nodes.append(node)
        node_region[id(node)] = root
        deps[id(node)] = frozenset({root}).union(*(deps[id(q)] for q in producers))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    out: list[Region] = []
    for r in regions:
        if find(r.id) == r.id:
            out.append(Region(0, r.device, sorted(r.nodes, key=lambda n: order[id(n)])))
    out.sort(key=lambda r: order[id(r.nodes[0])])
    for i, r in enumerate(out):
        r.id = i
    return out


@dataclass
class Placement:
    device: dict[int, str]        # id(node) -> "npu" | "cpu" (non-const nodes)
    reasons: dict[int, str]       # id(node) -> why it is not on the NPU (cpu nodes only)
    regions: list[Region]
    small_regions: list[int]      # sizes of NPU regions sent back to the CPU

    def device_of(self, node: Node) -> str | None:
        return self.device.get(id(node))


def place(graph: Graph, target: TargetDescription,
          min_region_nodes: int = DEFAULT_MIN_REGION_NODES, by_cost: bool = False
          ) -> Placement:
    """Decide every non-const node's device for ``target`` (see the module docstring).

    With ``by_cost``, an NPU region smaller than ``min_region_nodes`` stays on the NPU when
    the cost model says it is faster there, its launch and boundary transfers included.
    """
    device: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for node in graph.nodes:
        if node.op == "const":
            continue
        why = npu_rejection(node, target.npu)
        device[id(node)] = NPU if why is None else CPU
        if why is not None:
            reasons[id(node)] = why
    small: list[int] = []
    for _ in range(len(graph.nodes) + 1):  # demotions can only shrink the NPU set
        regions = find_regions(graph, lambda n: device.get(id(n)))
        tiny = [r for r in regions if r.device == NPU and len(r) < min_region_nodes
                and not (by_cost and _faster_on_npu(graph, r, target))]
        if not tiny:
            break
        for r in tiny:
            small.append(len(r))
            for n in r.nodes:
                device[id(n)] = CPU
                reasons[id(n)] = REGION_TOO_SMALL
    return Placement(device, reasons, regions, small)


def _faster_on_npu(graph: Graph, region: Region, target: TargetDescription) -> bool:
    from targets.cost_model import region_costs  # (the cost model imports this module)

    npu_ms, cpu_ms = region_costs(graph, region, target)
    return npu_ms < cpu_ms


def boundary_values(graph: Graph, device_of: Callable[[Node], str | None]) -> list[Value]:
    """Values that cross between CPU and NPU: produced on one device and read on the other.

    Graph inputs and outputs live in CPU memory, so an NPU node reading an input or
    producing an output counts too. Constants are loaded with the weights and never cross.
    """
    crossing: list[Value] = []
    for v in graph.values():
        p = v.producer
        if p is not None and p.op == "const":
            continue
        src = CPU if p is None else device_of(p)
        readers = {device_of(u) for u in v.uses} - {None}
        if any(o is v for o in graph.outputs):
            readers.add(CPU)
        if any(r != src for r in readers):
            crossing.append(v)
    return crossing
