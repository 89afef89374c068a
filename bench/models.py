"""Latency of compiled models vs onnxruntime and torch eager, each at its own defaults, batch 1.

    python bench/models.py [--models minilm,resnet50,mobilenet_v2,gpt2] [--rounds 3]
                           [--repeat 20] [--block 5] [--same-process --no-spin]
                           [--pipeline TEXT]

Each engine runs in its own process, as a user would run it, with the settings it ships with:

- npucc: ``runtime.load`` of the package ``compile(ONNX file, target="host")`` wrote (the
  detected CPU; TVM's thread pool sized to the target's cores, TVM's default spinning);
- onnxruntime: ``InferenceSession(path, providers=["CPUExecutionProvider"])`` with default
  ``SessionOptions`` (ORT_ENABLE_ALL, intra-op threads = physical cores, spinning pool);
- torch eager: default threads, ``torch.inference_mode()``.

A first child per model builds the model, exports the ONNX file, compiles and saves our
package, and checks our outputs against onnxruntime's. Then each of ``--rounds`` rounds starts
a fresh process per engine and the live processes take turns (``bench/paired.py``): a block
of ``--block`` calls by one engine while the others are stopped, the first engine of a turn
rotating, until each has made ``--repeat`` timed calls. The speed of this kind of shared
virtual machine drifts by up to ~1.8x over seconds; engines timed one after the other carry
that drift into their ratio, engines taking turns ~100 ms apart do not. Reported: the median
and p90 over all calls, each round's median, the CPU share the hypervisor stole while each
engine ran, each engine process's peak RSS, and ours / onnxruntime and ours / torch as the
**median of the per-turn ratios** (with p10-p90, and the ratio of the all-call medians).

``--same-process`` keeps the older mode: the three runtimes in one process, interleaved call
by call, with every pool's spinning turned off (``--no-spin``, the default there) so idle
spinners of one runtime do not steal the cores of the next; it is not the engines' default.

Models: MiniLM-L6 (trained, seq 128); resnet50 (onnx's light model with seeded random weights:
torch is skipped, no torch module with these weights exists here); MobileNetV2 (224x224);
the GPT-2-style decoder ("bench" config: 4 layers, d 256, seq 64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "resnet50", "mobilenet_v2", "gpt2", "mobilenet_v3_small",
          "efficientnet_b0", "resnet18", "deit_tiny")
THREADS = 2          # --same-process mode only: every runtime pinned to 2 threads
ENGINES = ("npucc", "onnxruntime", "torch")


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


def _vision(name: str, timm: bool = False) -> tuple[Path, dict, Any, str]:
    """A torchvision / timm model of the model-zoo test at 224x224, seeded random weights."""
    import torch

    from examples.models import export_onnx
    from examples.vision import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    if timm:
        import timm as timm_lib

        model = timm_lib.create_model(name, pretrained=False).eval()
    else:
        model = getattr(tv.models, name)(weights=None).eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, x, input_names=["images"])
    source = "timm" if timm else "torchvision"
    return (path, {"images": x.numpy()}, lambda: model(x),
            f"{source} {name}, 224x224, seeded random weights")


BUILDERS = {"minilm": _minilm, "resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2,
            "gpt2": _gpt2,
            # the phone models of the model-zoo test (tests/test_model_zoo.py)
            "mobilenet_v3_small": lambda: _vision("mobilenet_v3_small"),
            "efficientnet_b0": lambda: _vision("efficientnet_b0"),
            "resnet18": lambda: _vision("resnet18"),
            "deit_tiny": lambda: _vision("deit_tiny_patch16_224", timm=True)}


def _percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def measure(name: str, repeat: int, warmup: int = 3, spin: bool = False,
            gap_ms: float = 0.0) -> dict[str, Any]:
    """Build, compile and time one model; returns the figures as a JSON-able dict."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from bench.common import peak_rss_bytes
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
        "steps": s["steps"], "peak_rss_bytes": peak_rss_bytes(), "max_rel_diff_vs_ort": diff,
        "profile_total_ms": prof.total_ms, "profile_kernel_ms": prof.kernel_ms,
        "top_kernels": [{"node": k.node, "op": k.op, "kernel": k.kernel, "ms": k.median_ms}
                        for k in top],
    }


# -- separate processes at default settings (children) -----------------------------------
def _work_dir(name: str) -> Path:
    from examples.models import cache_dir

    d = cache_dir() / f"bench-models-{name}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def prepare(name: str, pipeline: str | None = None) -> dict[str, Any]:
    """Child: build, export, compile (with ``pipeline`` instead of the host's default when
    given) and save; outputs checked against onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    from compiler import compile as npucc_compile

    path, feeds, run_torch, desc = BUILDERS[name]()
    t0 = time.perf_counter()
    m = npucc_compile(path, target="host", pipeline=pipeline, progress=False)
    compile_s = time.perf_counter() - t0
    d = _work_dir(name)
    pkg = m.save(d / "model.npkg")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    np.savez(d / "inputs.npz", **{n: feeds[n] for n in names})
    our_feeds = dict(zip(m.input_names, (feeds[n] for n in names), strict=True))
    ours = m.run(our_feeds)
    theirs = sess.run(None, {n: feeds[n] for n in names})
    prof = m.profile(our_feeds, repeat=5)
    top = sorted(prof.steps, key=lambda st: -st.median_ms)[:5]
    diff = max(float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
               for a, b in zip(ours, theirs, strict=False))
    s = m.stats()
    return {"model": name, "desc": desc, "onnx": str(path), "package": str(pkg),
            "inputs": str(d / "inputs.npz"), "input_names": names,
            "torch": run_torch is not None, "compile_s": compile_s,
            "compile_phases": s["compile_seconds"], "arena_bytes": s["arena_bytes"],
            "lower_bound_bytes": s["lower_bound_bytes"], "naive_bytes": s["naive_bytes"],
            "weight_bytes": s["weight_bytes"], "steps": s["steps"],
            "max_rel_diff_vs_ort": diff, "profile_total_ms": prof.total_ms,
            "profile_kernel_ms": prof.kernel_ms,
            "top_kernels": [{"node": k.node, "op": k.op, "kernel": k.kernel, "ms": k.median_ms}
                            for k in top]}


def engine_call(prep: dict[str, Any], engine: str) -> Any:
    """Child: load one engine at its defaults; a function running one call on the inputs."""
    import numpy as np

    data = np.load(prep["inputs"])
    feeds = {n: data[n] for n in prep["input_names"]}
    if engine == "npucc":
        import runtime

        m = runtime.load(prep["package"])
        ours = dict(zip(m.input_names, feeds.values(), strict=True))
        return lambda: m.run(ours)
    if engine == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(prep["onnx"], providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, feeds)
    import torch

    _, _, run_torch, _ = BUILDERS[prep["model"]]()

    def call():
        with torch.inference_mode():
            return run_torch()
    return call


def time_engine(prep: dict[str, Any], engine: str, repeat: int, warmup: int = 3
                ) -> dict[str, Any]:
    """Child: load one engine at its defaults and time ``repeat`` calls (ms each)."""
    from bench.common import cpu_steal_ticks, peak_rss_bytes

    call = engine_call(prep, engine)
    for _ in range(warmup):
        call()
    times = []
    steal0 = cpu_steal_ticks()
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return {"engine": engine, "times_ms": times, "peak_rss_bytes": peak_rss_bytes(),
            "steal_ticks": [steal0, cpu_steal_ticks()]}


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    from bench.common import run_child

    return run_child(__file__, args, env)


def separate(name: str, rounds: int, repeat: int, env: dict[str, str],
             pipeline: str | None = None, block: int = 5) -> dict[str, Any]:
    """Parent: prepare once, then ``rounds`` rounds of one live process per engine, taking
    turns in blocks of ``block`` calls (bench.paired)."""
    from bench.paired import Engine, paired_rounds, turn_ratios

    prep = _child(["--prepare", name] + (["--pipeline", pipeline] if pipeline else []), env)
    engines = [e for e in ENGINES if e != "torch" or prep["torch"]]
    spawn = lambda e: Engine(e, __file__, ["--serve", e, "--prep", json.dumps(prep)], env)  # noqa: E731
    p = paired_rounds(spawn, engines, rounds, repeat, block)
    times = {e: by[""] for e, by in p["times_ms"].items()}
    paired = {e: turn_ratios(p["turns"], ("npucc", ""), (e, "")) for e in engines[1:]}
    return {**prep, "repeat": repeat, "rounds": rounds,
            "mode": f"separate processes at their defaults, taking turns in blocks of {block}",
            "latency_ms": {e: {"median": _percentile(t, 50), "p90": _percentile(t, 90)}
                           for e, t in times.items()},
            "paired": {e: {"median": _percentile(r, 50), "p10": _percentile(r, 10),
                           "p90": _percentile(r, 90), "turns": len(r)}
                       for e, r in paired.items()},
            "round_medians_ms": {e: by[""] for e, by in p["round_medians_ms"].items()},
            "steal_by_engine": p["steal_by_engine"],
            "peak_rss_by_engine": p["peak_rss_by_engine"],
            "peak_rss_bytes": p["peak_rss_by_engine"]["npucc"]}


def selected_models(ap: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated model names of ``text``; an unknown one is a usage error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return names


def child_env() -> dict[str, str]:
    """The environment of a bench child process: offline hub, this checkout importable."""
    return dict(os.environ, HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (processes)")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per engine and round")
    ap.add_argument("--same-process", action="store_true",
                    help="the three runtimes in one process, interleaved (not their defaults)")
    ap.add_argument("--spin", action="store_true",
                    help="with --same-process: keep the pools' busy-waiting")
    ap.add_argument("--gap-ms", type=float, default=20.0,
                    help="with --same-process: idle time before each timed call")
    ap.add_argument("--pipeline", default=None,
                    help="npucc's pass pipeline instead of the host target's default (e.g. "
                         "to measure one pass's effect); printed with the results")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)      # same-process child
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)  # separate: build
    ap.add_argument("--block", type=int, default=5,
                    help="calls per turn: the engines' live processes take turns in blocks "
                         "of this many calls (bench/paired.py)")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)   # one-shot timing
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)    # a paired engine
    ap.add_argument("--prep", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        res = measure(args.one, args.repeat, spin=args.spin, gap_ms=args.gap_ms)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.prepare:
        print("RESULT " + json.dumps(prepare(args.prepare, args.pipeline)), flush=True)
        return 0
    if args.serve:
        from bench.paired import serve

        serve(engine_call(json.loads(args.prep), args.serve))
        return 0
    if args.engine:
        res = time_engine(json.loads(args.prep), args.engine, args.repeat)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    from bench.common import cpu_header
    from bench.models_report import report, summary

    print(cpu_header(), flush=True)
    if args.pipeline:
        if args.same_process:
            ap.error("--pipeline applies to the separate-process mode only")
        print(f"npucc pipeline: {args.pipeline}", flush=True)
    names = selected_models(ap, args.models)
    env = child_env()
    if args.same_process:
        env.update(TVM_NUM_THREADS=str(THREADS))
        env.pop("OMP_NUM_THREADS", None)
        if not args.spin:
            env.update(TVM_THREAD_POOL_SPIN_COUNT="0", OMP_WAIT_POLICY="PASSIVE")
    results = []
    for name in names:
        try:
            if args.same_process:
                results.append(_child(["--one", name, "--repeat", str(args.repeat),
                                       "--gap-ms", str(args.gap_ms)]
                                      + (["--spin"] if args.spin else []), env))
            else:
                results.append(separate(name, args.rounds, args.repeat, env, args.pipeline,
                                        args.block))
        except RuntimeError as e:
            print(f"== {name}: FAILED\n{e}", flush=True)
            continue
        print(report(results[-1]), flush=True)
    if results:
        print()
        print(summary(results))
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)  # bench.<name> only, never bare
    sys.exit(main())
