"""A roofline latency and memory estimate of a graph on a described target, calibrated per
target by its ``[cost]`` section (targets/cost_desc.py, fitted by targets/calibration.py).

Per node: ``ms = max(flops / peak, bytes / dram_bandwidth) / factor[class] + launch``, where

- ``flops``: 2 x MACs for conv2d / conv_transpose2d / dense / matmul / gemm and their integer
  forms (on the NPU with channel, K and N dimensions padded to ``channel_align``, as its cube
  computes them), pool window sizes, a few per element for softmax / norms, one per element
  for other element-wise ops and reductions, none for data movement (transpose, concat, slice,
  pad, gather...).
- ``peak``: NPU ``fp16_tops`` for float work (``int8_tops`` for integer work), or the CPU's
  ``threads`` fastest cores x GHz x SIMD lanes of the dtype x 2 (FMA) x FMA pipes; both x the
  description's ``efficiency``.
- ``bytes``: operands + results + weights read by the node (float tensors at 2 bytes on an
  NPU). Views (reshape, identity) move nothing and cost nothing.
- ``class``: ``memory`` for a node other than a convolution whose bound is DRAM bandwidth
  (data movement, GEMV at batch 1, most element-wise ops), else its kind
  (:func:`op_class`): conv, depthwise, dense
  (GEMM with a weight operand), attention (matmul of two activations, softmax, fused
  attention), elementwise (everything else that computes); ``factor[class]`` is the fraction
  of the roofline bound that class achieves on this device (``[cost.cpu]`` / ``[cost.npu]``,
  1.0 if uncalibrated); on a CPU whose last-level cache is known, the activation bytes of a
  memory-bound node that fit there move ``cache_speedup`` times as fast as streamed weights
  (fitted; below 1 where such kernels are limited by more than bandwidth); compute-bound CPU
  work on T threads is slowed by ``T / (1 + (T - 1) * parallel)`` (1 with ``parallel = 1``,
  linear scaling); ``launch`` is the device's ``launch_us``.

Plus, for a partitioned graph: each NPU region costs ``region_us`` (entry + exit), and each
value crossing between CPU and NPU (graph inputs/outputs live on the CPU) is read and written
once more at DRAM bandwidth (format / precision conversion). Nodes run one after another.
Graphs without device annotations are placed with :func:`targets.placement.place` first
(the graph is not modified).

``peak_memory_bytes`` = weights + the largest set of simultaneously live activations in node
order (a lower bound for the runtime's arena plus the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op, ops_with
from compiler.ir.types import is_float
from targets.cost_desc import CostDesc, CostTerms
from targets.description import TargetDescription, load_target
from targets.placement import (
    CPU,
    DEFAULT_MIN_REGION_NODES,
    NPU,
    Region,
    boundary_values,
    find_regions,
    place,
)

__all__ = ["estimate", "format_estimate", "node_cost", "region_costs", "node_flops", "node_bytes",
           "device_peak_flops", "peak_memory", "op_class", "cost_of", "cost_terms",
           "predict_ms", "llc_bytes"]

# op categories and FLOPs per element come from the registry (compiler/ir/ops/traits.py)
VIEW_OPS = ops_with("view")
_DATA_MOVEMENT = ops_with("data-movement")
_REDUCTIONS = ops_with("reduction")
_PARTIAL_READS = frozenset({"gather", "slice"})   # read only the part of the input they copy
# row lookups in a (quantized) table: op -> (ids operand, the per-row table operands)
_ROW_READS = {"embed_rows": (0, (1, 2)), "embed_wq": (0, (1, 2, 3)), "gather_q": (2, (0, 1))}
_INT_DTYPES_8 = frozenset({"i8", "u8", "i4", "u4"})


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align if align > 1 else n


def _out_elems(node: Node) -> int:
    return sum(v.type.size for v in node.outputs)


def _act(node: Node) -> int:
    return _out_elems(node) if node.attrs.get("activation", "none") != "none" else 0


def _conv_flops(node: Node, align: int) -> float:
    out = node.outputs[0]
    n = out.shape[0]
    nhwc = (node.attrs.get("out_layout") or node.attrs.get("layout")) == "NHWC"
    oc, oh, ow = (out.shape[3], out.shape[1], out.shape[2]) if nhwc else out.shape[1:4]
    w = node.inputs[1].shape
    kl = node.attrs.get("kernel_layout", "OIHW")
    kh, kw, icg = {"OIHW": (w[2], w[3], w[1]), "OHWI": (w[1], w[2], w[3]),
                   "HWIO": (w[0], w[1], w[2])}[kl]
    g = node.attrs.get("groups", 1)
    if g == 1:
        oc, icg = _pad(oc, align), _pad(icg, align)
    else:  # grouped / depthwise: the channel axis is padded, each group's width is not
        oc = _pad(oc, align)
    flops = 2.0 * n * oh * ow * oc * icg * kh * kw
    return flops + (out.type.size if len(node.inputs) > 2 else 0) + _act(node)


def _dwpw_flops(node: Node, align: int) -> float:
    """depthwise_pointwise: the depthwise conv's window and the 1x1 conv's product."""
    w = node.inputs[1].shape
    kh, kw = {"OIHW": (w[2], w[3]), "OHWI": (w[1], w[2]),
              "HWIO": (w[0], w[1])}[node.attrs.get("kernel_layout", "OHWI")]
    c, oc = node.inputs[1].shape[0], node.inputs[3].shape[0]  # OIHW / OHWI: O first
    if node.attrs.get("kernel_layout") == "HWIO":
        c, oc = w[3], node.inputs[3].shape[3]
    px = node.outputs[0].type.size // oc
    return 2.0 * px * _pad(c, align) * (kh * kw + _pad(oc, align)) + _act(node)


def _convt_flops(node: Node, align: int) -> float:
    x, w = node.inputs[0].shape, node.inputs[1].shape
    g = node.attrs.get("groups", 1)
    ic = _pad(x[1], align) if g == 1 else x[1]
    return 2.0 * x[0] * ic * x[2] * x[3] * _pad(w[1], align) * w[2] * w[3]


def _mkn_flops(m: int, k: int, n: int, batch: int, align: int) -> float:
    return 2.0 * batch * _pad(m, align) * _pad(k, align) * _pad(n, align)


def _dense_flops(node: Node, align: int) -> float:
    x, w = node.inputs[0].type, node.inputs[1].shape
    k, n = x.shape[-1], w[0]
    m = x.size // max(k, 1)
    return _mkn_flops(m, k, n, 1, align) + _act(node) + (
        node.outputs[0].type.size if len(node.inputs) > 2 else 0)


def _matmul_flops(node: Node, align: int) -> float:
    a, out = node.inputs[0].shape, node.outputs[0].type
    k = a[-1] if a else 1
    m = a[-2] if len(a) >= 2 else 1
    n = node.inputs[1].shape[-1] if node.inputs[1].type.rank >= 2 else 1
    batch = out.size // max(m * n, 1)
    return _mkn_flops(m, k, n, batch, align)


def _qdense_flops(node: Node, align: int) -> float:
    """Dense forms whose weight operand is packed or quantized: M, K from the input, N from
    the output."""
    x, out = node.inputs[0].type, node.outputs[0].type
    k, n = x.shape[-1], out.shape[-1]
    return _mkn_flops(x.size // max(k, 1), k, n, 1, align) + _act(node)


def _gemm_flops(node: Node, align: int) -> float:
    a = node.inputs[0].shape
    k = a[0] if node.attrs.get("trans_a") else a[1]
    m, n = node.outputs[0].shape
    return _mkn_flops(m, k, n, 1, align) + (node.outputs[0].type.size
                                            if len(node.inputs) > 2 else 0)


def _pool_flops(node: Node, align: int) -> float:
    kh, kw = node.attrs.get("kernel", [1, 1])
    return float(_out_elems(node) * kh * kw)


_FLOPS: dict[str, Callable[[Node, int], float]] = {
    "conv2d": _conv_flops, "conv_transpose2d": _convt_flops, "dense": _dense_flops,
    "matmul": _matmul_flops, "gemm": _gemm_flops, "max_pool2d": _pool_flops,
    "avg_pool2d": _pool_flops, "qconv2d": _conv_flops, "qdense": _qdense_flops,
    "qmatmul": _matmul_flops, "dense_wq": _qdense_flops, "dense_rows": _qdense_flops,
    "conv2d_fused": _conv_flops, "depthwise_pointwise": _dwpw_flops,
}
_CONV = frozenset({"conv2d", "qconv2d", "conv_transpose2d", "conv2d_fused",
                   "depthwise_pointwise"})
_DENSE = frozenset({"dense", "gemm", "qdense", "dense_wq", "dense_rows"})
_MATMUL = frozenset({"matmul", "qmatmul"})
_ATTENTION = frozenset({"softmax", "log_softmax", "cached_attention", "cached_attention_q"})
# convolutions keep their class even when memory-bound: their schedule, not bandwidth, sets
# their speed (a depthwise conv is memory-bound by the roofline and still compute-limited)
_OWN_CLASS = frozenset({"conv", "depthwise"})


def _is_const(v: Value) -> bool:
    p = v.producer
    while p is not None and p.op in VIEW_OPS | {"transpose", "dequantize", "cast"}:
        p = p.inputs[0].producer if p.inputs else None
    return p is not None and p.op == "const"


def op_class(node: Node) -> str | None:
    """The kind of work of a node: conv, depthwise, dense, attention, elementwise, or memory
    (pure data movement); None for views, which cost nothing. A matmul whose second operand is
    a weight is dense; of two activations, attention. (A compute kind whose node turns out
    memory-bound is costed as ``memory``: :func:`node_cost`.)"""
    op = node.op
    if op in VIEW_OPS or op == "const":
        return None
    if op in _CONV:
        return "depthwise" if node.attrs.get("groups", 1) > 1 else "conv"
    if op in _DENSE:
        return "dense"
    if op in _MATMUL:
        return "dense" if len(node.inputs) > 1 and _is_const(node.inputs[1]) else "attention"
    if op in _ATTENTION:
        return "attention"
    if op in _DATA_MOVEMENT or op in ("kv_write", "kv_write_q", "embed_rows", "gather_q", "gather_elements",
                                      "gather_nd", "scatter_elements", "scatter_nd"):
        return "memory"
    return "elementwise"


def cost_of(desc: TargetDescription) -> CostDesc:
    """The target's calibration (the plain roofline for a description built without one)."""
    if desc.cost is not None:
        return desc.cost
    npu = desc.npu
    return CostDesc(CostTerms({}, desc.cpu.node_overhead_us),
                    CostTerms({}, npu.node_overhead_us, npu.region_overhead_us)
                    if npu is not None else None)


def node_flops(node: Node, align: int = 1) -> float:
    """Floating-point (or integer) operations of one node; matrix dims padded to ``align``."""
    if node.op in _FLOPS:
        return _FLOPS[node.op](node, align)
    if node.op in VIEW_OPS or node.op in _DATA_MOVEMENT or node.op == "const":
        return 0.0
    if node.op in _REDUCTIONS:
        return float(node.inputs[0].type.size)
    per = get_op(node.op).flops or 1
    if node.op == "sum":
        per = max(len(node.inputs) - 1, 1)
    return float(per * _out_elems(node))


def _value_bytes(v: Value, npu_float_bytes: int | None) -> int:
    if npu_float_bytes is not None and is_float(v.dtype):
        return v.type.size * npu_float_bytes
    return v.type.nbytes


def node_bytes(node: Node, npu_float_bytes: int | None = None) -> int:
    """DRAM bytes a node moves: its operands (weights included) and results.

    gather and slice read only what they return from their first operand, and the quantized
    row lookups (``embed_rows``, ``embed_wq``, ``gather_q``) only the rows of their table and
    row scales they return (an embedding lookup does not stream the whole table).
    """
    if node.op in VIEW_OPS or node.op == "const":
        return 0
    sizes = [_value_bytes(v, npu_float_bytes) for v in [*node.inputs, *node.outputs]]
    if node.op in _PARTIAL_READS and node.inputs:
        sizes[0] = min(sizes[0], _value_bytes(node.outputs[0], npu_float_bytes))
    if node.op in _ROW_READS:
        ids, tables = _ROW_READS[node.op]
        rows = node.inputs[ids].type.size
        for i in tables:
            if i < len(node.inputs) and node.inputs[i].type.shape:
                total = node.inputs[i].type.shape[0]
                sizes[i] = sizes[i] * min(rows, total) // max(total, 1)
    return sum(sizes)


def _cpu_lanes(target: TargetDescription, dtype: str) -> float:
    cpu = target.cpu
    bits = {"f64": 64, "i64": 64, "u64": 64, "i16": 16, "u16": 16, "bf16": 32}.get(dtype, 32)
    if dtype == "f16":
        bits = 16 if cpu.fp16_simd else 32
    elif dtype in _INT_DTYPES_8:
        bits = 8 if cpu.int8_dot else 16
    return cpu.simd_bits / bits


def device_peak_flops(target: TargetDescription, device: str, dtype: str) -> float:
    """Peak operations per second of ``device`` for work in ``dtype`` (x efficiency)."""
    if device == NPU and target.npu is not None:
        npu = target.npu
        tops = npu.int8_tops if not is_float(dtype) else npu.fp16_tops
        return tops * 1e12 * npu.efficiency
    cpu = target.cpu
    lanes = _cpu_lanes(target, dtype)
    per_s = sum(c.ghz * 1e9 * lanes * 2 * c.fma_pipes for c in cpu.fastest_cores())
    return per_s * cpu.efficiency


def _work_dtype(node: Node) -> str:
    return (node.inputs[0] if node.inputs else node.outputs[0]).dtype


def peak_memory(graph: Graph) -> dict[str, int]:
    """Weights bytes and the largest live activation set in node order."""
    weights = 0
    seen: set[str] = set()
    for n in graph.nodes:
        if n.op == "const":
            ref = n.attrs.get("ref")
            if ref is None or ref not in seen:
                weights += n.outputs[0].type.nbytes
                if ref is not None:
                    seen.add(ref)
    steps = [n for n in graph.nodes if n.op != "const"]
    index = {id(n): i for i, n in enumerate(steps)}
    end = len(steps)
    delta = [0] * (end + 2)
    outputs = {id(v) for v in graph.outputs}
    for v in graph.values():
        if v.producer is not None and v.producer.op == "const":
            continue
        start = 0 if v.producer is None else index[id(v.producer)]
        last = max((index[id(u)] for u in v.uses if id(u) in index), default=start)
        if id(v) in outputs:
            last = end
        delta[start] += v.type.nbytes
        delta[last + 1] -= v.type.nbytes
    live, peak = 0, 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return {"weights_bytes": weights, "activations_peak_bytes": peak,
            "peak_memory_bytes": weights + peak}


def llc_bytes(desc: TargetDescription) -> int | None:
    """The CPU's last-level cache, where known (detected for the host)."""
    host = desc.cpu.detected
    return getattr(host, "l3_bytes", None) or None


def node_cost(node: Node, desc: TargetDescription, device: str, resident: bool = False
              ) -> dict[str, Any]:
    """One node's row: ``{node, op, device, class, kind, flops, bytes, roofline_ms, ms, bound,
    cached}`` (``roofline_ms``: the uncalibrated bound; ``ms``: calibrated, with the launch
    cost). For a memory-bound CPU node, ``cached_ms`` is the part of ``roofline_ms`` moving
    its activations when they fit in the CPU's last-level cache (the previous kernel just
    wrote them there); ``cache_speedup`` applies to it, the ``memory`` factor to all of it.
    ``resident`` (the whole graph fits in that cache) is recorded, not used: measured on the
    host, weight streaming ran at the same speed whether or not the weights fit."""
    npu = desc.npu
    on_npu = device == NPU and npu is not None
    device = NPU if on_npu else CPU
    flops = node_flops(node, npu.channel_align if on_npu else 1)
    nbytes = node_bytes(node, 2 if on_npu else None)  # NPUs hold floats as fp16
    cls = kind = op_class(node)
    cached_ms = 0.0
    if kind is None:
        t_c = t_m = roof = ms = 0.0
    else:
        terms = cost_of(desc).terms(device)
        t_c = flops / device_peak_flops(desc, device, _work_dtype(node))
        t_m = nbytes / (desc.memory.dram_gbps * 1e9)
        roof = max(t_c, t_m) * 1e3
        if t_m > t_c and kind not in _OWN_CLASS:
            cls = "memory"
        llc = llc_bytes(desc) if device == CPU and cls == "memory" else None
        if llc is not None:   # activations just written by the previous kernel
            acts = nbytes - sum(v.type.nbytes for v in node.inputs if _is_const(v))
            cached_ms = (acts if acts <= llc else 0) / (desc.memory.dram_gbps * 1e9) * 1e3
        f = terms.factor(cls)
        if cls != "memory" and device == CPU:
            f /= terms.thread_penalty(desc.cpu.threads)
        ms = ((roof - cached_ms) / f + cached_ms / (f * terms.cache_speedup)
              + terms.launch_us * 1e-3)
    return {"node": node.label, "op": node.op, "device": device, "class": cls, "kind": kind,
            "flops": flops, "bytes": nbytes, "roofline_ms": roof, "cached_ms": cached_ms,
            "ms": ms, "bound": "compute" if t_c >= t_m else "memory"}


def transfer_ms_of(value: Value, desc: TargetDescription) -> float:
    """Moving one value between CPU and NPU: read and write it once more in DRAM."""
    return 2 * value.type.nbytes / (desc.memory.dram_gbps * 1e9) * 1e3


def region_costs(graph: Graph, region: Region, desc: TargetDescription
                 ) -> tuple[float, float]:
    """(ms on the NPU including its launch and boundary transfers, ms on the CPU) of the
    nodes of ``region``."""
    outputs = graph.outputs
    inside = {id(n) for n in region.nodes}
    npu_ms = sum(node_cost(n, desc, NPU)["ms"] for n in region.nodes)
    cpu_ms = sum(node_cost(n, desc, CPU)["ms"] for n in region.nodes)
    crossing: dict[int, Value] = {}
    for n in region.nodes:
        for v in n.inputs:  # produced outside (or a graph input), read inside
            if (v.producer is None or v.producer.op != "const") and id(v.producer) not in inside:
                crossing[id(v)] = v
        for v in n.outputs:  # produced inside, read outside or returned
            if any(id(u) not in inside for u in v.uses) or any(o is v for o in outputs):
                crossing[id(v)] = v
    npu_ms += sum(transfer_ms_of(v, desc) for v in crossing.values())
    npu_ms += cost_of(desc).terms(NPU).region_us * 1e-3 if desc.npu is not None else 0.0
    return npu_ms, cpu_ms


def estimate(graph: Graph, target: str | TargetDescription,
             min_region_nodes: int = DEFAULT_MIN_REGION_NODES, by_cost: bool = False
             ) -> dict[str, Any]:
    """Roofline latency (ms) per node and in total, and the peak memory, on ``target``.

    Uses the graph's device annotations when every non-const node has one, else places the
    nodes with ``min_region_nodes`` / ``by_cost`` (like the partition pass would) without
    changing the graph.
    On a target without an NPU every node is on the CPU.
    """
    desc = load_target(target)
    annotated = all(n.device is not None for n in graph.nodes if n.op != "const")
    if desc.npu is None:
        def device_of(n: Node) -> str | None:
            return CPU
    elif annotated:
        def device_of(n: Node) -> str | None:
            return n.device
    else:
        placement = place(graph, desc, min_region_nodes, by_cost)
        device_of = placement.device_of
    npu = desc.npu
    rows: list[dict[str, Any]] = []
    per_device = {NPU: 0.0, CPU: 0.0}
    mem = peak_memory(graph)
    llc = llc_bytes(desc)
    resident = llc is not None and mem["peak_memory_bytes"] <= llc
    for node in graph.nodes:
        if node.op == "const":
            continue
        row = node_cost(node, desc, device_of(node) or CPU, resident)
        per_device[row["device"]] += row["ms"]
        rows.append(row)
    regions = find_regions(graph, device_of)
    npu_regions = [r for r in regions if r.device == NPU]
    cost = cost_of(desc)
    launch_ms = (len(npu_regions) * cost.terms(NPU).region_us * 1e-3) if npu is not None else 0.0
    crossing = boundary_values(graph, device_of) if npu_regions else []
    transfers = [{"value": v.name, "bytes": v.type.nbytes, "ms": transfer_ms_of(v, desc)}
                 for v in crossing]
    transfer_ms = sum(t["ms"] for t in transfers)
    total = sum(per_device.values()) + launch_ms + transfer_ms
    return {
        "target": desc.name,
        "cpu_threads": desc.cpu.threads,
        "latency_ms": total,
        "calibrated": cost.calibrated,
        "band": cost.band(),
        "summary": f"{total:.3g} ms, {cost.band()}",
        "ms_per_device": per_device,
        "region_launch_ms": launch_ms,
        "transfer_ms": transfer_ms,
        "npu_regions": len(npu_regions),
        "transfers": transfers,
        "flops": sum(r["flops"] for r in rows),
        "nodes": rows,
        **mem,
        "budget_bytes": desc.memory.budget_bytes,
        "fits_budget": mem["peak_memory_bytes"] <= desc.memory.budget_bytes,
    }


def cost_terms(est: dict[str, Any]) -> dict[str, Any]:
    """What an estimate's latency is made of, per device: the uncalibrated roofline ms of each
    class (``"memory@cache"``: the part moving cache-resident bytes), the kernel launches and
    NPU regions, the CPU's threads (when more than one), and the transfers (fixed ms).

    ``predict_ms(cost_terms(est), cost_of(target)) == est["latency_ms"]``; a measurement file
    stores these terms so that fitting needs no graph (targets/calibration.py)."""
    out: dict[str, Any] = {}
    for r in est["nodes"]:
        if r["class"] is None:
            continue
        dev = out.setdefault(r["device"], {"launches": 0})
        cached = r.get("cached_ms", 0.0)
        for key, ms in ((r["class"], r["roofline_ms"] - cached), (r["class"] + "@cache", cached)):
            if ms > 0:
                dev[key] = dev.get(key, 0.0) + ms
        dev["launches"] += 1
    if est["npu_regions"]:
        out.setdefault(NPU, {"launches": 0})["regions"] = est["npu_regions"]
    if CPU in out and est.get("cpu_threads", 1) > 1:
        out[CPU]["threads"] = est["cpu_threads"]
    out["fixed_ms"] = est["transfer_ms"]
    return out


def predict_ms(terms: dict[str, Any], cost: CostDesc) -> float:
    """Latency (ms) of a measurement's :func:`cost_terms` under the calibration ``cost``."""
    total = float(terms.get("fixed_ms", 0.0))
    for device, t in terms.items():
        if device == "fixed_ms":
            continue
        c = cost.terms(device)
        slow = c.thread_penalty(t.get("threads", 1))
        for k, ms in t.items():
            if k in ("launches", "regions", "threads"):
                continue
            cls, _, cached = k.partition("@")
            total += ms * (slow if cls != "memory" else 1.0) / (
                c.factor(cls) * (c.cache_speedup if cached else 1.0))
        total += t.get("launches", 0) * c.launch_us * 1e-3 + t.get("regions", 0) * c.region_us * 1e-3
    return total


def format_estimate(est: dict[str, Any], top: int = 10) -> str:
    """A short human-readable report: totals and the ``top`` slowest nodes."""
    per = est["ms_per_device"]
    lines = [f"target {est['target']}: {est['latency_ms']:.3f} ms "
             f"(npu {per.get(NPU, 0):.3f}, cpu {per.get(CPU, 0):.3f}, "
             f"{est['npu_regions']} NPU region(s) {est['region_launch_ms']:.3f}, "
             f"transfers {est['transfer_ms']:.3f}), {est['flops'] / 1e9:.2f} GFLOP, "
             f"peak memory {est['peak_memory_bytes'] / 2**20:.1f} MiB "
             f"(weights {est['weights_bytes'] / 2**20:.1f}); {est['band']}"]
    for r in sorted(est["nodes"], key=lambda r: -r["ms"])[:top]:
        lines.append(f"  {r['ms']:8.4f} ms  {r['device']}  {r['bound']:7s}  "
                     f"{r['flops'] / 1e6:9.1f} MFLOP  {r['bytes'] / 1e6:7.2f} MB  {r['node']}")
    return "\n".join(lines)

