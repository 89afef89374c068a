"""Latency of compiled models vs onnxruntime and torch eager, measured side by side, batch 1.

    python bench/models.py [--models minilm,resnet50,mobilenet_v2,gpt2] [--repeat N] [--spin]

Per model, one child process (so its peak RSS is its own) holds three runtimes and times
them interleaved: every repetition runs ours, onnxruntime, then torch once each, so machine
drift (other jobs on the 2 cores) hits all three alike.

- ours: ``compiler.compile(ONNX file, target="host")``, the same ONNX file onnxruntime runs;
  TVM kernels with 2 threads (TVM_NUM_THREADS=2).
- onnxruntime: CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=2.
- torch eager: ``torch.set_num_threads(2)``, ``torch.inference_mode()``.

The three thread pools live in one process, and by default each busy-waits after a call
(TVM's pool, OpenMP under torch, onnxruntime's intra-op pool): the idle spinners of one
runtime then steal the two cores from the next one. Spinning is therefore turned off for all
three (TVM_THREAD_POOL_SPIN_COUNT=0, OMP_WAIT_POLICY=PASSIVE, onnxruntime
``session.intra_op.allow_spinning=0``); ``--spin`` keeps the defaults.

Models: MiniLM-L6 (trained, seq 128); resnet50 (onnx's light model with seeded random weights:
torch is skipped, no torch module with these weights exists here); MobileNetV2 (224x224);
the GPT-2-style decoder ("bench" config: 4 layers, d 256, seq 64).

Printed per model: median / p90 latency of each runtime, ours / onnxruntime (medians),
compile time, arena bytes vs the live-set lower bound, peak RSS of the child process, the
largest relative difference of our outputs from onnxruntime's, and the five slowest kernels
from ``m.profile``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "resnet50", "mobilenet_v2", "gpt2")
THREADS = 2


# -- the models (child process) --------------------------------------------------------
def _minilm() -> tuple[Path, dict, Any, str]:
    import torch

    from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs

    model, tok = minilm()
    feeds = minilm_inputs(tok, MINILM_SENTENCES[:1], seq=128)
    path = export_onnx(model, feeds)

    def run_torch():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    return path, feeds, run_torch, "trained all-MiniLM-L6-v2, batch 1, seq 128"


def _resnet50() -> tuple[Path, dict, Any, str]:
    import numpy as np
    import onnx

    from examples.models import cache_dir
    from examples.random_weights import light_onnx

    path = cache_dir() / "light_resnet50-random-seed0-logits.onnx"
    if not path.exists():
        onnx.save(light_onnx("resnet50", seed=0), str(path))
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    inp = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return path, {inp: x}, None, ("onnx light_resnet50, seeded random weights; torch skipped "
                                  "(no torch module with these weights)")


def _mobilenet_v2() -> tuple[Path, dict, Any, str]:
    import torch

    from examples.models import export_onnx, mobilenet_inputs, mobilenet_v2

    model, x = mobilenet_v2(resolution=224), mobilenet_inputs(224)
    path = export_onnx(model, x, input_names=["images"])
    tx = torch.from_numpy(x)
    return path, {"images": x}, lambda: model(tx), "MobileNetV2 1.0, 224x224, seeded weights"


def _gpt2() -> tuple[Path, dict, Any, str]:
    import torch

    from examples.models import export_onnx, gpt2_config, gpt2_decoder, gpt2_inputs

    cfg = gpt2_config("bench")
    model, ids = gpt2_decoder(**cfg), gpt2_inputs(**cfg)
    path = export_onnx(model, ids, input_names=["input_ids"])
    tids = torch.from_numpy(ids)
    desc = ", ".join(f"{k} {v}" for k, v in cfg.items())
    return path, {"input_ids": ids}, lambda: model(tids), f"GPT-2-style decoder ({desc})"


BUILDERS = {"minilm": _minilm, "resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2,
            "gpt2": _gpt2}


def _percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(name: str, repeat: int, warmup: int = 3, spin: bool = False,
            gap_ms: float = 0.0) -> dict[str, Any]:
    """Build, compile and time one model; returns the figures as a JSON-able dict."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from compiler import compile as npucc_compile

    torch.set_num_threads(THREADS)
    path, feeds, run_torch, desc = BUILDERS[name]()

    t0 = time.perf_counter()
    m = npucc_compile(path, target="host", progress=False)
    compile_s = time.perf_counter() - t0

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}

    # our importer keeps the ONNX input order; names may be made IR-safe
    our_feeds = dict(zip(m.input_names, (feeds[i.name] for i in sess.get_inputs()), strict=True))
    runners: dict[str, Any] = {"npucc": lambda: m.run(our_feeds),
                               "onnxruntime": lambda: sess.run(None, ort_feeds)}
    if run_torch is not None:
        def torch_once():
            with torch.inference_mode():
                return run_torch()
        runners["torch"] = torch_once

    ours, theirs = m.run(our_feeds), sess.run(None, ort_feeds)
    diff = max(float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
               for a, b in zip(ours, theirs, strict=False))
    for _ in range(warmup):
        for f in runners.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):  # interleaved: each runtime once per repetition
        for k, f in runners.items():
            time.sleep(gap_ms / 1e3)  # let the previous runtime's pool go idle
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)

    prof = m.profile(our_feeds, repeat=max(3, min(repeat, 10)))
    top = sorted(prof.steps, key=lambda s: -s.median_ms)[:5]
    s = m.stats()
    return {
        "model": name, "desc": desc, "repeat": repeat, "spin": spin, "gap_ms": gap_ms,
        "latency_ms": {k: {"median": _percentile(v, 50), "p90": _percentile(v, 90)}
                       for k, v in times.items()},
        "compile_s": compile_s, "compile_phases": s["compile_seconds"],
        "arena_bytes": s["arena_bytes"], "lower_bound_bytes": s["lower_bound_bytes"],
        "naive_bytes": s["naive_bytes"], "weight_bytes": s["weight_bytes"],
        "steps": s["steps"], "peak_rss_bytes": _peak_rss_bytes(), "max_rel_diff_vs_ort": diff,
        "profile_total_ms": prof.total_ms, "profile_kernel_ms": prof.kernel_ms,
        "top_kernels": [{"node": k.node, "op": k.op, "kernel": k.kernel, "ms": k.median_ms}
                        for k in top],
    }


# -- the report (parent process) -------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    lines = [f"== {r['model']}: {r['desc']}"]
    lines.append(f"   {'runtime':<12} {'median ms':>10} {'p90 ms':>10}")
    for k, v in lat.items():
        lines.append(f"   {k:<12} {v['median']:>10.2f} {v['p90']:>10.2f}")
    if "torch" not in lat:
        lines.append(f"   {'torch':<12} {'skipped':>10}")
    ratio = lat["npucc"]["median"] / lat["onnxruntime"]["median"]
    ph = ", ".join(f"{k} {v:.1f}s" for k, v in r["compile_phases"].items())
    lines += [
        f"   ours / onnxruntime: {ratio:.2f}x   (max rel diff of outputs "
        f"{r['max_rel_diff_vs_ort']:.1e}, {r['repeat']} interleaved repetitions)",
        f"   compile {r['compile_s']:.1f} s ({ph})",
        f"   arena {_mib(r['arena_bytes'])} vs lower bound {_mib(r['lower_bound_bytes'])} "
        f"({r['arena_bytes'] / r['lower_bound_bytes']:.3f}x; naive {_mib(r['naive_bytes'])}), "
        f"weights {_mib(r['weight_bytes'])}, peak RSS {_mib(r['peak_rss_bytes'])}",
        f"   top 5 kernels (of {r['steps']} steps, kernels {r['profile_kernel_ms']:.2f} ms, "
        f"run {r['profile_total_ms']:.2f} ms):",
    ]
    lines += [f"     {k['ms']:>8.3f} ms  {k['op']:<16} {k['node'][:28]:<28} {k['kernel']}"
              for k in r["top_kernels"]]
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    head = (f"{'model':<13} {'npucc':>9} {'ort':>9} {'torch':>9} {'ours/ort':>9} "
            f"{'compile s':>10} {'arena/lb':>9} {'peak RSS':>10}")
    rows = [head, "-" * len(head)]
    for r in results:
        lat = r["latency_ms"]
        t = f"{lat['torch']['median']:>9.2f}" if "torch" in lat else f"{'-':>9}"
        rows.append(
            f"{r['model']:<13} {lat['npucc']['median']:>9.2f} {lat['onnxruntime']['median']:>9.2f}"
            f" {t} {lat['npucc']['median'] / lat['onnxruntime']['median']:>8.2f}x "
            f"{r['compile_s']:>10.1f} {r['arena_bytes'] / r['lower_bound_bytes']:>9.3f} "
            f"{_mib(r['peak_rss_bytes']):>10}")
    rows.append("(median latency in ms, batch 1, 2 threads each)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--repeat", type=int, default=30, help="interleaved repetitions")
    ap.add_argument("--spin", action="store_true",
                    help="keep the thread pools' default busy-waiting (see the docstring)")
    ap.add_argument("--gap-ms", type=float, default=20.0,
                    help="idle time before each timed call (spinning pools go to sleep)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one model, JSON
    args = ap.parse_args(argv)
    if args.one:
        res = measure(args.one, args.repeat, spin=args.spin, gap_ms=args.gap_ms)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    from _common import cpu_header

    print(cpu_header(), flush=True)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    env = dict(os.environ, TVM_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)
    if not args.spin:
        env.update(TVM_THREAD_POOL_SPIN_COUNT="0", OMP_WAIT_POLICY="PASSIVE")
    results = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--repeat", str(args.repeat),
               "--gap-ms", str(args.gap_ms)]
        proc = subprocess.run(cmd + (["--spin"] if args.spin else []), env=env,
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"== {name}: FAILED (exit {proc.returncode})\n{proc.stderr[-4000:]}",
                  flush=True)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(report(results[-1]), flush=True)
    if results:
        print()
        print(summary(results))
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
