"""How compile time and memory grow with graph size: synthetic graphs of 10k, 100k and 1M nodes.

    python bench/compile_scaling.py [--sizes 10000,100000,1000000] [--target host]

Each size runs in its own child process (its peak RSS is its own) and goes through the steps
every compile takes before code generation:

- **parse**: the IR text (``compiler.ir.parse``) with its weights;
- **verify**: ``compiler.ir.verify``;
- **pipeline**: the target's default pipeline (canonicalize, the fusions, to-nhwc...);
- **plan**: the static memory plan of the lowered graph (``runtime.memory_pool.plan_memory``,
  every ordering the compiler tries);
- **print**: the lowered graph back to text.

The graph is a stack of residual MLP blocks on small tensors (so time goes to the compiler,
not to numpy), each block with what the passes work on: a matmul + bias the fusion folds, a
relu it fuses, a pair of transposes canonicalize cancels, a residual add, a constant
subexpression to fold, and a duplicate node CSE removes. Every block has its own weights.

Printed per size: wall seconds per step and in total, the CPU seconds of all steps (this
process's: without the time it waited for a core, so a loaded machine inflates it less than
the wall clock; the compiler is single-threaded), peak RSS,
and the growth exponent of the total between consecutive sizes (``log(t2/t1) / log(n2/n1)``:
1.0 is linear).

Real models (``--zoo [NAMES]``): every model of ``bench/models.py`` (the phone models of the
model-zoo test among them) goes through ``compiler.compile`` for the target, each in its own
child process (its ONNX exported first, in another): nodes before and after the pipeline,
seconds per compile phase (import, passes, codegen, package, and the rest of ``compile``) and
peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK_NODES = 12   # nodes per block in the text (before the passes)
D = 8              # feature width


def block_text(i: int, h: str) -> tuple[list[str], str]:
    """IR lines of block ``i`` reading value ``h``; returns (lines, the block's result)."""
    t = f"f32[1,{D}]"
    lines = [
        f'  %w{i} = const "w{i}" : f32[{D},{D}]',
        f'  %b{i} = const "b{i}" : f32[{D}]',
        f"  %m{i} = matmul({h}, %w{i}) : {t}",
        f"  %a{i} = add(%m{i}, %b{i}) : {t}",
        f"  %r{i} = relu(%a{i}) : {t}",
        f"  %t{i} = transpose(%r{i}) {{perm=[1,0]}} : f32[{D},1]",
        f"  %u{i} = transpose(%t{i}) {{perm=[1,0]}} : {t}",
        f"  %k{i} = const [2.0] : f32[1]",
        f"  %c{i} = mul(%k{i}, %k{i}) : f32[1]",
        f"  %s{i} = mul(%u{i}, %c{i}) : {t}",
        f"  %d{i} = mul(%u{i}, %c{i}) : {t}",
        f"  %y{i} = add(%s{i}, {h}) : {t}",
    ]
    lines.append(f"  %z{i} = add(%y{i}, %d{i}) : {t}")
    return lines, f"%z{i}"


def synthetic(n_nodes: int, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    blocks = max(1, n_nodes // (BLOCK_NODES + 1))
    rng = np.random.default_rng(seed)
    lines = [f"graph @scaling(%x: f32[1,{D}]) -> (f32[1,{D}]) {{"]
    weights: dict[str, np.ndarray] = {}
    h = "%x"
    scale = np.float32(0.5 / math.sqrt(D))
    for i in range(blocks):
        body, h = block_text(i, h)
        lines += body
        weights[f"w{i}"] = (rng.standard_normal((D, D), np.float32) * scale)
        weights[f"b{i}"] = rng.standard_normal(D, np.float32) * np.float32(0.1)
    lines += [f"  return {h}", "}"]
    return "\n".join(lines) + "\n", weights


def measure(n_nodes: int, target: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from compiler.ir import parse, verify
    from compiler.ir.printer import print_graph
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from runtime.memory_pool import PlanStep, PlanTensor, plan_memory
    from targets.description import load_target

    desc = load_target(target)   # first: it imports TVM, which no step should be charged for
    text, weights = synthetic(n_nodes)
    times: dict[str, float] = {}
    cpu0 = time.process_time()
    t = time.perf_counter()
    g = parse(text, weights)
    times["parse"] = time.perf_counter() - t
    nodes_in = len(g.nodes)
    del text
    t = time.perf_counter()
    verify(g)
    times["verify"] = time.perf_counter() - t
    t = time.perf_counter()
    g = run_pipeline(g, desc.default_pipeline, ctx=PassContext(target=desc))
    times["pipeline"] = time.perf_counter() - t
    t = time.perf_counter()
    tensors, steps, seen = [], [], set()
    consts = {id(n.output) for n in g.nodes if n.op == "const"}
    outs = {id(v) for v in g.outputs}
    for v in g.inputs:
        tensors.append(PlanTensor(v.name, v.type.nbytes, "input"))
        seen.add(id(v))
    for n in g.nodes:
        for v in n.outputs:
            kind = ("weight" if id(v) in consts else "output" if id(v) in outs
                    else "intermediate")
            tensors.append(PlanTensor(v.name, v.type.nbytes, kind))
        if n.op != "const":
            steps.append(PlanStep(tuple(v.name for v in n.inputs),
                                  tuple(v.name for v in n.outputs)))
    plan = plan_memory(tensors, steps)
    times["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    out_text = print_graph(g)
    times["print"] = time.perf_counter() - t
    from bench.common import peak_rss_bytes

    return {"nodes": nodes_in, "nodes_after": len(g.nodes), "times": times,
            "total": sum(times.values()), "cpu": time.process_time() - cpu0,
            "peak_mb": peak_rss_bytes() / 2**20,
            "arena_bytes": plan.arena_bytes, "text_mb": len(out_text) / 2**20}


# -- real models --------------------------------------------------------------------------
PHASES = ("import", "passes", "codegen", "package")


def export_model(name: str) -> str:
    """Child: the ONNX file of bench/models.py's model ``name`` (exported once, then cached)."""
    from bench.models import BUILDERS

    return str(BUILDERS[name]()[0])


def compile_model(path: str, target: str) -> dict:
    """Child: compile one ONNX file as ``compiler.compile`` does for a user."""
    from bench.common import peak_rss_bytes
    from compiler import compile as npucc_compile

    t = time.perf_counter()
    m = npucc_compile(path, target=target, progress=False)
    total = time.perf_counter() - t
    return {"nodes": len(m.source.nodes), "nodes_after": len(m.graph.nodes), "total": total,
            "times": {k: m.phase_seconds.get(k, 0.0) for k in PHASES},
            "peak_mb": peak_rss_bytes() / 2**20}


def _child(args: list[str]) -> tuple[dict | str | None, str]:
    """Run this script with ``args`` in a child process: (its RESULT, or None; its stderr)."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return None, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULT "):]), ""


def zoo(names: list[str], target: str) -> bool:
    print(f"{'model':<20} {'nodes':>6} {'after':>6} " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'other':>8} {'total s':>8} {'peak MB':>8}", flush=True)
    ok = True
    for name in names:
        path, err = _child(["--export", name])
        r, err = (None, err) if path is None else _child(["--compile", path, "--target", target])
        if r is None:
            print(f"{name:<20} FAILED ({err})", flush=True)
            ok = False
            continue
        print(f"{name:<20} {r['nodes']:>6} {r['nodes_after']:>6} "
              + " ".join(f"{r['times'][p]:>8.2f}" for p in PHASES)
              + f" {r['total'] - sum(r['times'].values()):>8.2f} {r['total']:>8.2f}"
              + f" {r['peak_mb']:>8.0f}", flush=True)
    print("other: the rest of compile() (loading the target, which imports TVM and detects "
          "the host; budget checks)")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--target", default="host")
    ap.add_argument("--zoo", nargs="?", const="all", default=None, metavar="NAMES",
                    help="compile bench/models.py's models instead (comma-separated, or all)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args.one, args.target)), flush=True)
        return 0
    if args.export is not None:
        print("RESULT " + json.dumps(export_model(args.export)), flush=True)
        return 0
    if args.compile is not None:
        print("RESULT " + json.dumps(compile_model(args.compile, args.target)), flush=True)
        return 0
    from bench.common import cpu_header

    print(cpu_header())
    if args.zoo is not None:
        from bench.models import MODELS

        names = list(MODELS) if args.zoo == "all" else args.zoo.split(",")
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
        return 0 if zoo(names, args.target) else 1
    steps = ("parse", "verify", "pipeline", "plan", "print")
    print(f"{'nodes':>9} {'after':>9} " + " ".join(f"{s:>9}" for s in steps)
          + f" {'total s':>9} {'cpu s':>9} {'peak MB':>9} {'exponent':>9}")
    prev = None
    ok = True
    for n in (int(s) for s in args.sizes.split(",")):
        r, err = _child(["--one", str(n), "--target", args.target])
        if r is None:
            print(f"{n:>9}: FAILED ({err})")
            ok = False
            continue
        exp = ""
        if prev is not None:
            exp = f"{math.log(r['total'] / prev['total']) / math.log(r['nodes'] / prev['nodes']):.2f}"
        print(f"{r['nodes']:>9} {r['nodes_after']:>9} "
              + " ".join(f"{r['times'][s]:>9.2f}" for s in steps)
              + f" {r['total']:>9.2f} {r['cpu']:>9.2f} {r['peak_mb']:>9.0f} {exp:>9}",
              flush=True)
        prev = r
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
