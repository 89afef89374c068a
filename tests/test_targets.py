"""Target descriptions, the partition pass and the roofline cost model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.ir import Graph, TensorType, parse, verify
from compiler.pass_base import PassContext
from passes.partition import Partition, partition_summary
from targets.cost_model import estimate, format_estimate, node_flops
from targets.description import TARGETS_DIR, TargetError, list_targets, load_target
from targets.placement import REGION_TOO_SMALL, find_regions, place

KIRIN = (TARGETS_DIR / "kirin990.toml").read_text()

# A made-up NPU whose op list differs from the Kirin delegate's: it runs layer_norm and gelu
# (transformer blocks) but no pooling, and only 3x3-or-smaller kernels.
CUSTOM = """
name = "toy"
[cpu]
tvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a55" }
arch = "aarch64"
simd_bits = 128
threads = 2
clusters = [{ name = "little", cores = 4, core = "cortex-a55", ghz = 1.8 }]
[npu]
name = "toy npu"
compute_dtype = "int8"
dtypes = ["f32", "f16", "i8"]
layout = "NHWC"
channel_align = 8
fp16_tops = 1.0
int8_tops = 2.0
buffer_bytes = 262144
[npu.ops]
conv2d = { max_kernel = 3, max_channels = 256 }
dense = { const_inputs = [1] }
matmul = {}
layer_norm = {}
gelu = {}
add = {}
softmax = { max_batch = 1 }
[memory]
dram_gbps = 10
budget_mb = 64
"""


def write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def transformer_block() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("block")
    x = g.add_input("x", TensorType((1, 16, 64), "f32"))
    w1 = g.add_weight("w1", rng.standard_normal((256, 64)).astype(np.float32))
    w2 = g.add_weight("w2", rng.standard_normal((64, 256)).astype(np.float32))
    s = g.add_weight("ln.scale", np.ones(64, np.float32))
    h = g.add("layer_norm", x, s)
    h = g.add("dense", h, w1)
    h = g.add("gelu", h)
    h = g.add("dense", h, w2)
    y = g.add("add", h, x)
    y = g.add("softmax", y)
    g.outputs = [y]
    verify(g)
    return g


def conv_graph(c: int = 64, hw: int = 56) -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("convs")
    x = g.add_input("x", TensorType((1, c, hw, hw), "f32"))
    w = g.add_weight("w", rng.standard_normal((c, c, 3, 3)).astype(np.float32))
    y = g.add("conv2d", x, w, pads=[1, 1, 1, 1])
    y = g.add("relu", y)
    y = g.add("add", y, x)
    g.outputs = [y]
    verify(g)
    return g


def partition(g: Graph, target, min_region_nodes: int = 1):
    return Partition(min_region_nodes=min_region_nodes).run(g, PassContext(target=target))


# -- descriptions ----------------------------------------------------------------------
def test_builtin_targets_load_and_list():
    names = list_targets()
    assert {"host", "kirin990", "rk3588"} <= set(names)
    for name in names:
        t = load_target(name)
        assert t.name == name and t.cpu.clusters and t.memory.dram_gbps > 0
    k = load_target("kirin990")
    assert k.cpu.arch == "aarch64" and k.cpu.total_cores == 8 and k.cpu.threads == 4
    assert [c.ghz for c in k.cpu.clusters] == [2.86, 2.09, 1.86]
    assert k.npu is not None and k.npu.compute_dtype == "fp16" and k.npu.channel_align == 16
    assert "conv2d" in k.npu.ops and "layer_norm" not in k.npu.ops and "erf" not in k.npu.ops
    assert "i8" not in k.npu.ops["conv2d"].dtypes
    assert load_target("host").npu is None
    assert load_target(TARGETS_DIR / "rk3588.toml").npu.int8_tops == 6.0
    info = k.cpu_info()
    assert info.arch == "aarch64" and info.simd_bits == 128 and info.num_cores == 4
    # capabilities come from LLVM's description of the target, not from the TOML's claims
    assert info.fp16_arith and info.int8_dot and not info.amx
    assert info.has("neon", "dotprod", "fullfp16") and not info.has("i8mm")
    assert k.default_pipeline.endswith("partition{by-cost=true},npu-numerics")


def test_tvm_target_is_built_lazily_and_checked(tmp_path):
    t = load_target("kirin990").cpu.tvm()
    assert t.kind.name == "llvm" and bool(t.attrs["feature.has_dotprod"])
    host = load_target("host")
    assert str(host.cpu.tvm().attrs["mcpu"]) == host.cpu.detected.mcpu
    bad = KIRIN.replace('mcpu = "cortex-a76"', 'mcpuu = "cortex-a76"')
    desc = load_target(write(tmp_path, bad))  # loads: TVM is not consulted yet
    with pytest.raises(TargetError, match=r"\[cpu\] tvm_target: TVM refuses") as e:
        desc.cpu.tvm()
    assert "mcpuu" in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("old,new,patterns", [
    ("dram_gbps = 34.1", "dram_gpbs = 34.1",
     [r"\[memory\] dram_gpbs", r"did you mean 'dram_gbps'", r"valid: dram_gbps, budget_mb"]),
    ("simd_bits = 128", 'simd_bits = "128"', [r"\[cpu\] simd_bits", "must be an integer"]),
    ("conv_transpose2d = {}", "conv2dd = {}",
     [r"\[npu.ops\] conv2dd", "not a registered op", "did you mean 'conv2d'", "valid ops: .*abs"]),
    ('dtypes = ["f32", "f16"]', 'dtypes = ["f32", "fp16"]',
     [r"\[npu\] dtypes", "'fp16' is not a dtype", "did you mean 'f16'", "valid: f64, f32"]),
    ('arch = "aarch64"', 'arch = "arm64"', [r"\[cpu\] arch", "valid: x86_64, aarch64"]),
    ('compute_dtype = "fp16"', 'compute_dtype = "fp32"',
     [r"\[npu\] compute_dtype", "valid: fp16, int8"]),
    ("max_pool2d = {}", "max_pool2d = { max_kernl = 3 }",
     [r"\[npu.ops.max_pool2d\] max_kernl", "did you mean 'max_kernel'"]),
    ('conv2d = { attrs = { activation = ["none", "relu", "relu6", "clip", "sigmoid"] } }',
     'conv2d = { attrs = { activation = ["none", "swish"] } }',
     [r"conv2d.attrs.activation", "'swish' not a value", "valid: 'none', 'relu'"]),
    ("threads = 4", "threads = 9", [r"\[cpu\] threads", r"not in 1..8"]),
    ('mtriple = "aarch64-linux-android"', 'mtriple = "arm64-linux-android"',
     [r"mtriple", "must start with 'aarch64'"]),
])
def test_bad_description_names_file_key_and_choices(tmp_path, old, new, patterns):
    assert old in KIRIN
    path = write(tmp_path, KIRIN.replace(old, new, 1))
    with pytest.raises(TargetError) as e:
        load_target(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for pat in patterns:
        assert re.search(pat, msg), (pat, msg)
    assert isinstance(e.value, NpuccError)


def test_unknown_target_name_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(TargetError, match="did you mean 'kirin990'.*built-in targets: host"):
        load_target("kirin99")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(write(tmp_path, "[cpu\narch = 1"))
    with pytest.raises(TargetError, match="no such file"):
        load_target(tmp_path / "nope.toml")
    with pytest.raises(TargetError, match=r"top level: missing required key\(s\): memory"):
        load_target(write(tmp_path, KIRIN.split("[memory]")[0] + "[pipeline]\n"))


# -- partitioning ----------------------------------------------------------------------
def test_partition_differs_between_targets_with_different_op_lists(tmp_path):
    toy = load_target(write(tmp_path, CUSTOM, "toy.toml"))
    g_k, g_t = transformer_block(), transformer_block()
    partition(g_k, "kirin990")
    partition(g_t, toy)
    dev_k = {n.op + str(i): n.device for i, n in enumerate(g_k.nodes)}
    dev_t = {n.op + str(i): n.device for i, n in enumerate(g_t.nodes)}
    assert dev_k != dev_t
    on = {n.op: n.device for n in g_k.nodes if n.op != "const"}
    assert on["layer_norm"] == "cpu" and on["gelu"] == "cpu" and on["dense"] == "npu"
    assert all(n.device == "npu" for n in g_t.nodes if n.op != "const")
    assert all(n.device is None for n in g_t.nodes if n.op == "const")
    s = partition_summary(g_k, "kirin990")
    reasons = {f["op"]: f["reason"] for f in s["fallbacks"]}
    assert reasons == {"layer_norm": "op layer_norm not supported by the NPU",
                       "gelu": "op gelu not supported by the NPU"}
    assert s["nodes_per_device"] == {"npu": 4, "cpu": 2}
    # the text form carries the annotation and parses back
    assert str(parse(str(g_k))) == str(g_k)


def test_shape_and_attribute_limits(tmp_path):
    toy = load_target(write(tmp_path, CUSTOM, "toy.toml"))
    rng = np.random.default_rng(1)
    g = Graph("limits")
    x = g.add_input("x", TensorType((2, 8, 16, 16), "f32"))
    w5 = g.add_weight("w5", rng.standard_normal((8, 8, 5, 5)).astype(np.float32))
    w3 = g.add_weight("w3", rng.standard_normal((300, 8, 3, 3)).astype(np.float32))
    a = g.add("conv2d", x, w5, pads=[2, 2, 2, 2], name="k5")
    b = g.add("conv2d", a, w3, pads=[1, 1, 1, 1], name="c300")
    t = g.add_input("t", TensorType((2, 4, 16), "f32"))
    u = g.add_input("u", TensorType((16, 8), "f32"))
    d = g.add("dense", t, g.add("transpose", u, perm=[1, 0]), name="dyn")
    s = g.add("softmax", t, name="sm")
    g.outputs = [b, d, s]
    verify(g)
    placement = place(g, toy, min_region_nodes=1)
    why = {n.name: placement.reasons.get(id(n)) for n in g.nodes if n.name}
    assert why["k5"] == "kernel 5 > max kernel 3"
    assert why["c300"] == "channels 300 > max channels 256"
    assert why["dyn"] == "operand 1 must be a constant on the NPU"
    assert why["sm"] == "batch 2 > max batch 1"


def test_small_islands_go_back_to_cpu():
    g = transformer_block()
    r = partition(g, "kirin990", min_region_nodes=3)
    # dense (after layer_norm) is alone between CPU ops; dense+add+softmax is a region of 3
    devs = [(n.op, n.device) for n in g.nodes if n.op != "const"]
    assert devs == [("layer_norm", "cpu"), ("dense", "cpu"), ("gelu", "cpu"),
                    ("dense", "npu"), ("add", "npu"), ("softmax", "npu")]
    assert r.stats["small_regions"] == [1] and r.stats["npu_regions"] == 1
    assert {"node": "dense %1", "op": "dense", "reason": REGION_TOO_SMALL} in r.stats["fallbacks"]
    s = partition_summary(g, "kirin990")
    assert s["fallbacks"] == r.stats["fallbacks"]
    assert [(x["device"], x["nodes"]) for x in s["regions"]] == [("cpu", 3), ("npu", 3)]
    again = partition(g, "kirin990", min_region_nodes=3)
    assert not again.changed


def test_by_cost_keeps_a_heavy_island_on_the_npu():
    rng = np.random.default_rng(2)
    g = Graph("island")
    x = g.add_input("x", TensorType((1, 128, 28, 28), "f32"))
    w = g.add_weight("w", rng.standard_normal((128, 128, 3, 3)).astype(np.float32))
    y = g.add("erf", g.add("conv2d", g.add("erf", x), w, pads=[1, 1, 1, 1]))
    g.outputs = [y]
    kirin = load_target("kirin990")
    conv = g.nodes[2]
    assert place(g, kirin, 3).device_of(conv) == "cpu"
    assert place(g, kirin, 3, by_cost=True).device_of(conv) == "npu"
    est_cpu, est_npu = estimate(g, kirin), estimate(g, kirin, by_cost=True)
    assert est_npu["latency_ms"] < est_cpu["latency_ms"]
    # a light island is not worth its launch and transfers
    g2 = transformer_block()
    partition(g2, kirin, min_region_nodes=3)
    devs = [n.device for n in g2.nodes if n.op != "const"]
    assert Partition(min_region_nodes=3, by_cost=True).run(
        g2, PassContext(target=kirin)).changed is False
    assert [n.device for n in g2.nodes if n.op != "const"] == devs


def test_gather_reads_only_its_rows():
    g = Graph("emb")
    ids = g.add_input("ids", TensorType((1, 4), "i64"))
    table = g.add_weight("table", np.zeros((1000, 8), np.float32))
    y = g.add("gather", table, ids)
    g.outputs = [y]
    row = estimate(g, "host")["nodes"][0]
    assert row["bytes"] == 2 * 4 * 8 * 4 + 4 * 8


def test_regions_stay_convex():
    # a (npu) -> erf (cpu) -> c (npu), and a -> c directly: a and c cannot be one region
    g = parse("""
graph @g(%x: f32[1,8]) -> (f32[1,8]) {
  %a = relu(%x) : f32[1,8]
  %b = erf(%a) : f32[1,8]
  %c = add(%a, %b) : f32[1,8]
  return %c
}""")
    partition(g, "kirin990")
    assert [n.device for n in g.nodes] == ["npu", "cpu", "npu"]
    regions = find_regions(g, lambda n: n.device)
    assert [(r.device, len(r)) for r in regions] == [("npu", 1), ("cpu", 1), ("npu", 1)]


def test_sibling_regions_merge_into_one_launch():
    # q, k, v projections of a CPU layer_norm output meet in two matmuls: one NPU region
    g = parse("""
graph @attn(%x: f32[1,8,16], %s: f32[16]) -> (f32[1,8,16]) {
  %h = layer_norm(%x, %s) : f32[1,8,16]
  %q = relu(%h) : f32[1,8,16]
  %k0 = sigmoid(%h) : f32[1,8,16]
  %k = transpose(%k0) {perm=[0,2,1]} : f32[1,16,8]
  %v = tanh(%h) : f32[1,8,16]
  %a = matmul(%q, %k) : f32[1,8,8]
  %p = softmax(%a) : f32[1,8,8]
  %o = matmul(%p, %v) : f32[1,8,16]
  return %o
}""")
    r = partition(g, "kirin990", min_region_nodes=3)
    assert r.stats["npu_regions"] == 1 and r.stats["npu"] == 7
    regions = partition_summary(g, "kirin990")["regions"]
    assert [(x["device"], x["nodes"]) for x in regions] == [("cpu", 1), ("npu", 7)]
    # a sibling that depends on the region through the CPU cannot merge
    g = parse("""
graph @g(%x: f32[1,8]) -> (f32[1,8]) {
  %a = relu(%x) : f32[1,8]
  %b = erf(%a) : f32[1,8]
  %c = sigmoid(%b) : f32[1,8]
  %d = add(%a, %c) : f32[1,8]
  return %d
}""")
    partition(g, "kirin990")
    assert [(r.device, len(r)) for r in find_regions(g, lambda n: n.device)] == [
        ("npu", 1), ("cpu", 1), ("npu", 2)]


def test_partition_runs_in_a_pipeline():
    from compiler.pass_manager import run_pipeline

    g = run_pipeline(transformer_block(), "partition{min-region-nodes=1}",
                     PassContext(target="kirin990"))
    assert {n.device for n in g.nodes if n.op != "const"} == {"npu", "cpu"}
    with pytest.raises(NpuccError, match="needs a target"):
        Partition().run(transformer_block(), PassContext())
    with pytest.raises(NpuccError, match="no device"):
        partition_summary(transformer_block())


# -- cost model ------------------------------------------------------------------------
def test_cost_model_conv_compute_bound_elementwise_memory_bound():
    g = conv_graph()
    partition(g, "kirin990")
    est = estimate(g, "kirin990")
    rows = {r["op"]: r for r in est["nodes"]}
    conv, relu = rows["conv2d"], rows["relu"]
    assert conv["device"] == relu["device"] == "npu"
    assert conv["flops"] == 2 * 56 * 56 * 64 * 64 * 9  # channels already multiples of 16
    assert conv["bound"] == "compute" and relu["bound"] == "memory"
    assert relu["bytes"] == 2 * 64 * 56 * 56 * 2  # fp16 in and out on the NPU
    kirin = load_target("kirin990")
    npu, cost = kirin.npu, kirin.cost.npu   # the calibrated [cost.npu] section
    assert conv["class"] == "conv" and relu["class"] == "memory"
    assert conv["ms"] == pytest.approx(conv["flops"] / (npu.fp16_tops * 1e12) * 1e3
                                       / cost.factor("conv") + cost.launch_us * 1e-3)
    # one region: one launch, the input in and the output out
    assert est["npu_regions"] == 1 and len(est["transfers"]) == 2
    assert est["latency_ms"] == pytest.approx(
        sum(r["ms"] for r in est["nodes"]) + est["region_launch_ms"] + est["transfer_ms"])
    assert est["weights_bytes"] == 64 * 64 * 9 * 4 and est["fits_budget"]
    # the same graph on the CPUs: slower than the NPU, host faster than the A76s
    cpu_k = estimate(conv_graph(), "host")["latency_ms"]
    assert est["latency_ms"] < cpu_k
    text = format_estimate(est)
    assert "kirin990" in text and "conv2d" in text


def test_npu_pads_channels_to_alignment():
    g = conv_graph(c=3, hw=8)
    conv = next(n for n in g.nodes if n.op == "conv2d")
    assert node_flops(conv) == 2 * 8 * 8 * 3 * 3 * 9
    assert node_flops(conv, align=16) == 2 * 8 * 8 * 16 * 16 * 9


def test_resnet50_estimate_prints():
    onnx = pytest.importorskip("onnx")
    frontends = pytest.importorskip("compiler.frontends")
    from compiler.pass_manager import run_pipeline
    from examples.models import light_model_path

    model = onnx.version_converter.convert_version(
        onnx.load(str(light_model_path("resnet50"))), 17)
    g0 = frontends.from_onnx(model)
    kirin = load_target("kirin990")
    g = run_pipeline(g0.copy(), kirin.default_pipeline, PassContext(target=kirin))
    est = estimate(g, kirin)
    print(format_estimate(est, top=5))
    assert 7e9 < est["flops"] < 12e9  # ~4.1 GMAC, plus channel padding on the NPU
    summary = partition_summary(g, kirin)
    assert summary["nodes_per_device"]["npu"] > 0.9 * sum(summary["nodes_per_device"].values())
    assert 0.5 < est["latency_ms"] < 100
    host = estimate(run_pipeline(g0.copy(), load_target("host").default_pipeline,
                                 PassContext(target="host")), "host")
    assert host["ms_per_device"]["npu"] == 0 and host["latency_ms"] > est["latency_ms"]
