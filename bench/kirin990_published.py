"""Fit the kirin990 cost model to published Kirin 990 / Kirin 980 / Cortex-A76 latencies and
report the leave-one-out error.

    python bench/kirin990_published.py [--write-measurements] [-o NEW.toml]

Reads ``targets/data/kirin990_published.json`` (each figure with its source), rebuilds each
model's architecture (torchvision at 224x224; MobileNetV1 from bench/estimate_targets.py;
random weights: only shapes matter), runs kirin990's pipeline and computes the cost-model
terms of every figure on the device it was measured on:

- CPU figures: every node on the CPU, with ``threads`` and the big-core clock of the
  measuring device (Kirin 980: 2.6 GHz, Raspberry Pi 5: 2.4 GHz); fp16 figures (ncnn's
  default arithmetic on ARMv8.2, Paddle-Lite's fp16 table) with the graph's float tensors
  in f16;
- NPU figures: kirin990's default pipeline (partition by cost, NPU numerics).

Then it fits ``[cost]`` on all used figures, prints the leave-one-out prediction of every
figure with its source, the error distribution, and what rests on assumptions.
``--write-measurements`` writes the terms to ``targets/data/kirin990_measurements.json``
(``npucc calibrate kirin990 --measurements`` that file reproduces the fit); ``-o`` writes a
calibrated copy of kirin990.toml.

Acceptance (issue 20): leave-one-out error, median <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATA = ROOT / "targets" / "data" / "kirin990_published.json"
MEASUREMENTS = ROOT / "targets" / "data" / "kirin990_measurements.json"
CPU_PIPELINE = ("canonicalize,fuse-matmul-add,fuse-gemm,fold-batchnorm,fuse-conv-relu,"
                "fuse-dense-act,to-nhwc,canonicalize")


def graph_of(name: str):
    """The imported (not yet optimised) graph of architecture ``name`` at 224x224."""
    if name == "mobilenet_v1":
        from estimate_targets import mobilenet_v1

        return mobilenet_v1()
    import torch

    from compiler.frontends import from_torch
    from examples.vision import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, **({"aux_logits": False, "init_weights": False}
                                                      if name == "googlenet" else {})).eval()
    return from_torch(model, (torch.rand(1, 3, 224, 224),))


def _to_f16(g):
    from compiler.ir.types import TensorType

    for v in g.values():
        if v.type.dtype == "f32":
            v.type = TensorType(v.type.shape, "f16")
    return g


def device_variant(desc, fig):
    """kirin990 as the measuring device ran it: its threads on big cores at its clock."""
    from targets.description import Cluster

    cpu = desc.cpu
    big = Cluster("measured", 4, "cortex-a76", float(fig["core_ghz"]), 2)
    return replace(desc, cpu=replace(cpu, clusters=(big,), threads=int(fig["threads"])))


def terms_of(fig, graphs, desc):
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.cost_model import cost_terms, estimate

    key = (fig["model"], fig["processor"], fig["precision"])
    if key not in graphs:
        g0 = graph_of(fig["model"])
        if fig["processor"] == "npu":
            g = run_pipeline(g0, desc.default_pipeline, PassContext(target=desc))
        else:
            g = run_pipeline(g0, CPU_PIPELINE, PassContext(target=desc))
            for n in g.nodes:
                n.device = None if n.op == "const" else "cpu"
            if fig["precision"] == "fp16":
                g = _to_f16(g)
        graphs[key] = g
    variant = device_variant(desc, fig) if fig["processor"] == "cpu" else desc
    return cost_terms(estimate(graphs[key], variant))


def measurements(desc) -> list[dict]:
    doc = json.loads(DATA.read_text(encoding="utf-8"))
    graphs: dict = {}
    out = []
    for i, f in enumerate(x for x in doc["figures"] if x["use"]):
        name = (f"{f['model']} {f['processor']} {f['precision']} {f['threads']}T "
                f"{f['device']} ({f['library'].split(' ')[0]})")
        out.append({"name": name, "kind": "model", "ms": f["ms"], "weight": 1.0,
                    "group": f"{i:02d} {name}", "terms": terms_of(f, graphs, desc),
                    "source": f["source_url"], "library": f["library"],
                    "device": f["device"], "threads": f["threads"],
                    "precision": f["precision"], "processor": f["processor"]})
        print(f"  terms: {name}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-measurements", action="store_true")
    ap.add_argument("-o", "--output", help="write a calibrated copy of kirin990.toml here")
    ap.add_argument("--measurements", help="reuse a measurement file (skip the rebuilding)")
    args = ap.parse_args()

    from targets.calibration import error_ratio, error_summary, fit_base, fit_cost, leave_one_out
    from targets.description import load_target
    from targets.measurements import read_measurements, write_measurements

    desc = load_target("kirin990")
    if args.measurements:
        entries = read_measurements(args.measurements)["measurements"]
    else:
        entries = measurements(desc)
    if args.write_measurements:
        write_measurements(MEASUREMENTS, entries, desc, device="Kirin 990 / Kirin 980 / "
                           "Cortex-A76 (published)", source=f"published figures: {DATA.name} "
                           "(bench/kirin990_published.py)")
        print(f"wrote {MEASUREMENTS}")
    base = fit_base(desc)   # the plain roofline
    rows = leave_one_out(entries, base)
    ratios = [error_ratio(p, m) for _, p, m in rows]
    print(f"\n{'figure':<66}{'pred ms':>9}{'pub ms':>9}{'ratio':>7}")
    for (name, p, m), r in zip(rows, ratios, strict=True):
        print(f"{name[:66]:<66}{p:>9.2f}{m:>9.2f}{r:>7.2f}")
    s = error_summary(ratios)
    print(f"leave-one-out error: median x{s['median']:.2f}, max x{s['max']:.2f} over "
          f"{s['n']} figures (acceptance: median <= x1.5: {'met' if s['median'] <= 1.5 else 'NOT met'})")
    for proc in ("cpu", "npu"):
        r = [x for x, e in zip(ratios, sorted(entries, key=lambda e: e["group"]), strict=True)
             if e["processor"] == proc]
        if r:
            ss = error_summary(r)
            print(f"  {proc}: median x{ss['median']:.2f}, max x{ss['max']:.2f} over {ss['n']}")
    base_r = [error_ratio(__import__("targets.cost_model", fromlist=["x"]).predict_ms(
        e["terms"], base), e["ms"]) for e in entries]
    bs = error_summary(base_r)
    print(f"uncalibrated roofline on the same figures: median x{bs['median']:.2f}, max "
          f"x{bs['max']:.2f}")
    fit = fit_cost(entries, base)
    for d in ("cpu", "npu"):
        t = fit.cost.terms(d).as_dict()
        print(f"fitted [cost.{d}]: " + ", ".join(f"{k} {v:.3g}" for k, v in t.items()))
    if args.output:
        from compiler.cli_calibrate import calibrate

        calibrate("kirin990", [str(MEASUREMENTS)], args.output)
    return 0 if s["median"] <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
