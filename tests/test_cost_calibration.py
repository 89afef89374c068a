"""The cost model's calibration: the [cost] schema, fitting, `npucc calibrate`, the error band."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.ir import Graph, TensorType, verify
from targets.calibration import fit_cost, leave_one_out
from targets.cost_desc import OP_CLASSES, CostDesc, CostTerms, cpu_key
from targets.cost_model import cost_of, cost_terms, estimate, predict_ms
from targets.description import TARGETS_DIR, TargetError, load_target
from targets.measurements import read_measurements, write_measurements

KIRIN = (TARGETS_DIR / "kirin990.toml").read_text()
HOST = (TARGETS_DIR / "host.toml").read_text()
TRUE_CPU = {"conv": 0.31, "depthwise": 0.12, "dense": 0.55, "attention": 0.22,
            "elementwise": 0.4, "memory": 0.7}
TRUE_NPU = {"conv": 0.45, "depthwise": 0.2, "dense": 0.35, "attention": 0.3,
            "elementwise": 0.25, "memory": 0.5}


def small_cnn(c: int = 32, hw: int = 28) -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("cnn")
    x = g.add_input("x", TensorType((1, c, hw, hw), "f32"))
    w = g.add_weight("w", rng.standard_normal((c, c, 3, 3)).astype(np.float32))
    dw = g.add_weight("dw", rng.standard_normal((c, 1, 3, 3)).astype(np.float32))
    y = g.add("relu", g.add("conv2d", x, w, pads=[1, 1, 1, 1]))
    y = g.add("conv2d", y, dw, pads=[1, 1, 1, 1], groups=c)
    y = g.add("reshape", g.add("global_avg_pool", g.add("add", y, x)), shape=[1, c])
    fc = g.add_weight("fc", rng.standard_normal((10, c)).astype(np.float32))
    g.outputs = [g.add("softmax", g.add("dense", y, fc))]
    verify(g)
    return g


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """Random cost terms on both devices (as a measurement file holds them), kirin990-like."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cpu = {c: float(rng.uniform(0.05, 5)) for c in OP_CLASSES if rng.random() < 0.8}
        cpu["launches"] = int(rng.integers(5, 200))
        if rng.random() < 0.5:
            cpu["threads"] = 4
        terms = {"cpu": cpu, "fixed_ms": float(rng.uniform(0, 0.2))}
        if rng.random() < 0.5:
            npu = {c: float(rng.uniform(0.01, 1)) for c in OP_CLASSES if rng.random() < 0.8}
            npu.update(launches=int(rng.integers(5, 100)), regions=int(rng.integers(1, 4)))
            terms["npu"] = npu
        out.append({"name": f"m{i}", "kind": "model", "weight": 1.0, "group": f"m{i}",
                    "terms": terms})
    return out


TRUE = CostDesc(CostTerms(TRUE_CPU, 7.0, parallel=0.5), CostTerms(TRUE_NPU, 4.0, 150.0))
PLAIN = CostDesc(CostTerms({}, 2.0), CostTerms({}, 5.0, 100.0))


# -- fitting ----------------------------------------------------------------------------------
def test_fit_recovers_known_factors_from_its_own_predictions():
    entries = synthetic(40)
    for e in entries:
        e["ms"] = predict_ms(e["terms"], TRUE)
    fit = fit_cost(entries, PLAIN, prior_sigma=1e3, fixed_sigma=1e3)  # priors out of the way
    for dev, true in (("cpu", TRUE.cpu), ("npu", TRUE.npu)):
        got = fit.cost.terms(dev)
        for c in OP_CLASSES:
            assert got.factor(c) == pytest.approx(true.factor(c), rel=1e-3), (dev, c)
        assert got.launch_us == pytest.approx(true.launch_us, rel=3e-2)
    assert fit.cost.npu.region_us == pytest.approx(150.0, rel=2e-2)
    assert fit.cost.cpu.parallel == pytest.approx(0.5, rel=1e-2)   # 1- and 4-thread terms
    # with the default (weak) priors the fit still reproduces the data closely
    fit = fit_cost(entries, PLAIN)
    assert max(abs(math.log(p / m)) for _, p, m in fit.in_sample) < 0.15
    # and leave-one-out predicts each model from the others almost exactly
    rows = leave_one_out(entries[:25], PLAIN, prior_sigma=1e3, fixed_sigma=1e3)
    assert len(rows) == 25 and all(abs(math.log(p / m)) < 0.02 for _, p, m in rows)


def test_fit_recovers_factors_from_real_graph_terms():
    """Terms of a real graph on kirin990 (CPU and NPU placements, regions and transfers):
    the estimate under a known calibration is the measurement; the fit finds it again."""
    kirin = load_target("kirin990")
    entries = []
    for i, (c, hw) in enumerate([(16, 14), (32, 28), (64, 14), (16, 56), (48, 20), (24, 40)]):
        g = small_cnn(c, hw)
        for by_cost in (False, True):
            est = estimate(g, kirin, min_region_nodes=1, by_cost=by_cost)
            terms = cost_terms(est)
            entries.append({"name": f"{c}x{hw}/{by_cost}", "kind": "model", "weight": 1.0,
                            "group": f"{i}{by_cost}", "terms": terms,
                            "ms": predict_ms(terms, TRUE)})
    fit = fit_cost(entries, cost_of(kirin), prior_sigma=1e3, fixed_sigma=1e3)
    for e in entries:
        assert predict_ms(e["terms"], fit.cost) == pytest.approx(e["ms"], rel=0.01)


def test_terms_reproduce_the_estimate():
    for name in ("kirin990", "host"):
        desc = load_target(name)
        est = estimate(small_cnn(), desc, min_region_nodes=1)
        assert predict_ms(cost_terms(est), cost_of(desc)) == pytest.approx(est["latency_ms"])
        assert {r["class"] for r in est["nodes"]} <= {*OP_CLASSES, None}
    rows = {r["op"]: r for r in estimate(small_cnn(), "kirin990")["nodes"]}
    assert rows["reshape"]["class"] is None and rows["reshape"]["ms"] == 0


# -- the [cost] schema ------------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def without_cost(text: str) -> str:
    return text[:text.index("\n[cost.cpu]")] if "\n[cost.cpu]" in text else text


@pytest.mark.parametrize("section, message", [
    ("[cost.cpu]\nconvv = 0.5\n", r"\[cost.cpu\] convv: unknown key 'convv'; did you mean "
                                  r"'conv'\? valid: conv, depthwise"),
    ("[cost.gpu]\nconv = 0.5\n", r"\[cost\] gpu: unknown key 'gpu'; did you mean 'npu'\? "
                                 r"valid: cpu, npu, calibration, per_cpu"),
    ("[cost.cpu]\nmemory = -0.5\n", r"\[cost.cpu\] memory: must be > 0, got -0.5"),
    ("[cost.cpu]\nlaunch_us = \"fast\"\n", r"\[cost.cpu\] launch_us: must be a number"),
    ("[cost.npu]\nregion_uss = 3\n", r"did you mean 'region_us'\?"),
    ("[cost.calibration]\nerror_median = 0.8\n", r"error_median: is a ratio .* >= 1"),
    ("[cost.calibration]\nerror_kind = \"leave-two-out\"\n", r"did you mean 'leave-one-out'"),
    ("[cost]\nper_cpu = \"data\"\n", r"only a target whose CPU is detected"),
])
def test_cost_schema_errors(tmp_path, section, message):
    text = without_cost(KIRIN) + "\n" + section
    with pytest.raises(TargetError, match=message):
        load_target(write(tmp_path, text))


def test_a_fixed_cost_has_one_home(tmp_path):
    text = without_cost(KIRIN).replace(
        "threads = 4 ", "node_overhead_us = 3.0\nthreads = 4 ") + "\n[cost.cpu]\nlaunch_us = 2\n"
    with pytest.raises(TargetError, match=r"\[cost.cpu\] launch_us: \[cpu\] node_overhead_us is "
                                          r"given too; give the fixed cost once"):
        load_target(write(tmp_path, text))
    # without [cost] the old keys still set the fixed costs (the plain roofline)
    plain = load_target(write(tmp_path, without_cost(KIRIN).replace(
        "threads = 4 ", "node_overhead_us = 3.0\nthreads = 4 "), "p.toml"))
    assert plain.cost.cpu.launch_us == 3.0 and not plain.cost.calibrated
    assert plain.cost.band() == "uncalibrated roofline"


def test_a_copied_host_target_keeps_finding_its_calibrations(tmp_path):
    copy = load_target(write(tmp_path, HOST, "copy.toml"))
    assert copy.cost.band() == load_target("host").cost.band()
    gone = load_target(write(tmp_path, HOST.replace('"data/host_cost"', '"nowhere"'), "g.toml"))
    assert gone.cost.band().startswith("uncalibrated roofline (no calibration folder 'nowhere'")


def test_no_npu_no_npu_costs(tmp_path):
    text = HOST.replace("[memory]", "[cost.npu]\nconv = 0.5\n\n[memory]")
    with pytest.raises(TargetError, match=r"\[cost.npu\]: this target has no \[npu\] section"):
        load_target(write(tmp_path, text))


def test_host_calibrations_are_per_cpu(tmp_path):
    """A detected CPU uses only a calibration recorded on that CPU; another CPU's figures are
    never presented as this one's."""
    key = cpu_key(load_target("host").cpu)
    folder = tmp_path / "cal"
    folder.mkdir()
    cal = ('[cost.cpu]\nconv = 0.25\nlaunch_us = 4.0\n[cost.calibration]\ncpu = "{cpu}"\n'
           'n = 5\nerror_kind = "held-out"\nerror_median = 1.1\nerror_max = 1.4\n')
    (folder / "other.toml").write_text(cal.format(cpu="Some Other CPU (zen9, 64 threads)"))
    base = re.sub(r"(?ms)^\[cost\]\n.*?\n\n", "", HOST)   # host.toml without its [cost]
    base = "\n".join(ln for ln in base.splitlines() if not ln.startswith("node_overhead_us"))
    assert "[memory]" in base and "per_cpu" not in base
    target = write(tmp_path, base + '\n[cost]\nper_cpu = "cal"\n', "host.toml")
    t = load_target(target)
    assert not t.cost.calibrated and "no calibration in" in t.cost.band() and key in t.cost.band()
    (folder / "this.toml").write_text(cal.format(cpu=key))
    t = load_target(target)
    assert t.cost.calibrated and t.cost.cpu.factor("conv") == 0.25
    assert t.cost.band() == ("typically within x1.10 (max x1.40) on this target's calibration "
                             "set (5 model latencies, held-out)")
    # inline: measured on another CPU -> dropped, and the band says whose they were
    other = write(tmp_path, base + "\n" + cal.format(cpu="Some Other CPU (zen9, 64 threads)"),
                  "h2.toml")
    t = load_target(other)
    assert not t.cost.calibrated and t.cost.cpu.factor("conv") == 1.0
    assert "measured on Some Other CPU (zen9, 64 threads), this is " + key in t.cost.band()
    with pytest.raises(TargetError, match=r"\[cost.calibration\] cpu: a detected-CPU target's "
                                          r"calibration must name the CPU"):
        load_target(write(tmp_path, base + "\n[cost.calibration]\nn = 3\n", "h3.toml"))


# -- npucc calibrate ----------------------------------------------------------------------------
def kirin_measurements(tmp_path: Path) -> Path:
    kirin = load_target("kirin990")
    entries = []
    for i, (c, hw) in enumerate([(16, 14), (32, 28), (64, 14), (16, 56), (48, 20)]):
        est = estimate(small_cnn(c, hw), kirin, min_region_nodes=1, by_cost=bool(i % 2))
        terms = cost_terms(est)
        entries.append({"name": f"cnn{c}x{hw}", "kind": "model", "weight": 1.0,
                        "group": f"cnn{c}x{hw}", "terms": terms,
                        "ms": predict_ms(terms, TRUE) * (1.1 if i % 2 else 0.95)})
    return write_measurements(tmp_path / "m.json", entries, kirin, device="synthetic",
                              source="tests")


def test_calibrate_cli_writes_a_target_that_loads_and_changes_estimates(tmp_path, capsys):
    from compiler.cli import main

    meas = kirin_measurements(tmp_path)
    out = tmp_path / "k.toml"
    assert main(["calibrate", "kirin990", "--measurements", str(meas), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leave-one-out" in printed and f"wrote {out}" in printed
    new, old = load_target(out), load_target("kirin990")
    assert new.cost.calibration.measurements == str(meas)
    assert new.cost.calibration.error_kind == "leave-one-out" and new.cost.calibration.n == 5
    assert new.cost.calibration.error_median < 1.3
    g = small_cnn()
    assert estimate(g, new)["latency_ms"] != pytest.approx(estimate(g, old)["latency_ms"])
    text = out.read_text()
    assert "# fitted: 5 measurement(s) of synthetic" in text and text.count("\n[cost.cpu]\n") == 1
    assert "node_overhead_us = " not in text.replace("# node_overhead_us", "")
    # the rest of the description is the original's
    assert new.npu.ops == old.npu.ops and new.default_pipeline == old.default_pipeline
    # a second run replaces its own output
    assert main(["calibrate", "kirin990", "--measurements", str(meas), "-o", str(out)]) == 0


def test_calibrate_cli_refusals(tmp_path, capsys):
    from compiler.cli import main

    meas = kirin_measurements(tmp_path)
    mine = write(tmp_path, "my notes\n", "notes.toml")
    assert main(["calibrate", "kirin990", "--measurements", str(meas), "-o", str(mine)]) == 1
    assert "was not written by npucc calibrate" in capsys.readouterr().err
    assert mine.read_text() == "my notes\n"
    src = write(tmp_path, KIRIN, "mine.toml")
    assert main(["calibrate", str(src), "--measurements", str(meas), "-o", str(src)]) == 1
    assert "that is the target file being calibrated" in capsys.readouterr().err
    assert main(["calibrate", "host", "--measurements", str(meas), "-o",
                 str(tmp_path / "h.toml")]) == 1
    assert "roofline of target 'kirin990', not 'host'" in capsys.readouterr().err
    bad = write(tmp_path, json.dumps({"format": "npucc-measurements/1", "target": "kirin990",
                                      "measurements": [{"name": "x", "ms": -1, "terms": {}}]}),
                "bad.json")
    with pytest.raises(NpuccError, match=r"measurements\[0\] \('?x'?\): 'ms' must be a positive"):
        read_measurements(bad)


# -- the band on a compiled model ----------------------------------------------------------------
def test_estimate_carries_the_band_and_profile_measures(tmp_path):
    from compiler import compile

    g = small_cnn(16, 14)
    m = compile(g, "kirin990")
    est = m.estimate()
    kirin = load_target("kirin990")
    assert est["calibrated"] and est["band"] == kirin.cost.band()
    assert est["band"].startswith("typically within x1.13 (max x1.80)")
    assert est["summary"] == f"{est['latency_ms']:.3g} ms, {est['band']}"
    # the helper that turns m.profile() into a measurement file
    from targets.measurements import profile_measurements

    x = np.random.default_rng(0).standard_normal((1, 16, 14, 14)).astype(np.float32)
    entries = profile_measurements(m, {m.input_names[0]: x}, "cnn", repeat=3, warmup=1)
    assert entries[0]["kind"] == "model" and entries[0]["ms"] > 0
    kernels = entries[1:]
    assert kernels and all(e["kind"] == "kernel" and e["group"] == "cnn" for e in kernels)
    assert sum(e["weight"] for e in kernels) == pytest.approx(1.0)
    path = write_measurements(tmp_path / "p.json", entries, m.target, source="test")
    doc = read_measurements(path)
    assert doc["target"] == "kirin990" and len(doc["measurements"]) == len(entries)


# -- the LLM decode estimate uses the same model --------------------------------------------------
def decode_graph(ctx: int = 512, d: int = 256, heads: int = 4) -> Graph:
    rng = np.random.default_rng(0)
    dh = d // heads
    g = Graph("decode")
    x = g.add_input("x", TensorType((1, d), "f32"))
    kc = g.add_input("k_cache", TensorType((ctx, heads, dh), "f32"))
    vc = g.add_input("v_cache", TensorType((ctx, heads, dh), "f32"))
    pos = g.add_input("pos", TensorType((1,), "i32"))
    w = {n: g.add_weight(n, rng.standard_normal((d, d)).astype(np.float32))
         for n in ("wq", "wk", "wv", "wo")}
    q, k, v = (g.add("reshape", g.add("dense", x, w[n]), shape=[1, heads, dh])
               for n in ("wq", "wk", "wv"))
    kc2 = g.add("kv_write", kc, k, pos)
    vc2 = g.add("kv_write", vc, v, pos)
    a = g.add("cached_attention", q, kc2, vc2, pos, scale=dh ** -0.5)
    g.outputs = [g.add("dense", a, w["wo"])]
    verify(g)
    return g


def test_decode_estimate_reads_the_kv_cache_up_to_the_position():
    from targets.llm_cost import decode_estimate, decode_ms_per_token

    g = decode_graph()
    kirin = load_target("kirin990")
    early, late = decode_estimate(g, kirin, position=0), decode_estimate(g, kirin)
    assert late["position"] == 511 and early["position"] == 0
    assert early["weights_ms"] == pytest.approx(late["weights_ms"])
    assert late["kv_ms"] > 10 * early["kv_ms"] > 0
    assert late["ms_per_token"] == pytest.approx(
        late["weights_ms"] + late["kv_ms"] + late["fixed_ms"])
    assert late["band"] == kirin.cost.band() and "ms/token at position 511" in late["summary"]
    # kv_write costs the new rows, not the whole static cache; the full-cache estimate of
    # the plain graph is larger
    assert decode_estimate(g, kirin)["ms_per_token"] < estimate(g, kirin)["latency_ms"]
    # from sizes alone: weights streamed at the calibrated bandwidth, KV read to the position
    mem = kirin.cost.cpu.factor("memory")
    s = decode_ms_per_token(kirin, weight_bytes=4 * 256 * 256 * 4, kv_bytes_per_position=2048,
                            position=99, layers=1, kernels_per_layer=8)
    bw = kirin.memory.dram_gbps * 1e9 * mem
    assert s["weights_ms"] == pytest.approx(4 * 256 * 256 * 4 / bw * 1e3)
    assert s["kv_ms"] == pytest.approx(2048 * 100 / bw * 1e3)
    assert s["fixed_ms"] == pytest.approx(8 * kirin.cost.cpu.launch_us * 1e-3)
