"""Where a decode step of an LLM package spends its time: per kernel kind (each projection's
GEMV, the tied lm_head, attention over the KV cache, the small ops), per call and per step,
beside the step's wall time, the Python loop over the kernel calls and the greedy argmax.

    python bench/llm_profile.py smol-int4-g32.npkg [--steps 64] [--prompt 64]

Every kernel call of ``--steps`` decode steps (after a ``--prompt``-token prefill of the
evaluation text) is timed on its own; a kind's figure is the sum over its calls of each call's
median (and of each call's minimum: what it costs when no other job takes its core). "Step"
is the uninstrumented step; "calls outside kernels" is the step minus the kernels' medians:
Python, the FFI, launches. Other jobs on the machine inflate medians, not minimums.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kind(step: dict) -> str:
    """``dense_wq:gate+up`` for a projection (layer prefixes dropped), the op otherwise."""
    op = step["op"]
    if op.startswith("dense"):
        if any(a.startswith("embed") for a in step["args"]):
            return f"{op}:lm_head"
        w = next((a for a in step["args"] if re.match(r"l\d+\.", a)), None)
        if w is not None:
            return f"{op}:" + re.sub(r"l\d+\.", "", w).split(".wq")[0].split(".w.")[0]
    return op


def profile(pkg: str, steps: int, prompt_len: int) -> None:
    from bench.llm_decode import eval_windows, texts
    from runtime.llm import load

    warnings.simplefilter("ignore")
    m = load(pkg)
    prompt = eval_windows(m.package.tokenizer_json(), texts()[1], prompt_len, prompt_len)[0]
    m.generate(prompt[:8], 8, ignore_eos=True)                 # warm up
    d, pos = m.decode, len(prompt)
    logits = m._prefill(prompt)
    wall = []
    for i in range(steps):
        t0 = time.perf_counter()
        logits = d.run(np.array([int(np.argmax(logits))], np.int32), pos + i)[0]
        wall.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(200):
        int(np.argmax(logits))
    argmax_s = (time.perf_counter() - t0) / 200
    per = np.zeros((steps, len(d.calls)))
    for i in range(steps):
        d.np["ids"][:] = 1
        d.np["pos"][0] = pos + i
        for j, (f, args, _) in enumerate(d.calls):
            t0 = time.perf_counter()
            f(*args)
            per[i, j] = time.perf_counter() - t0
    med, low = np.median(per, 0), per.min(0)
    by: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for j, (_, _, s) in enumerate(d.calls):
        row = by[kind(s)]
        row[0] += 1
        row[1] += med[j]
        row[2] += low[j]
    step = float(np.median(wall))
    kernels = float(med.sum())
    print(f"{pkg}: {len(d.calls)} kernel calls per decode step at positions {pos}..{pos + steps}")
    print(f"step {step * 1e3:.3f} ms median ({1 / step:.1f} tok/s); kernels {kernels * 1e3:.3f} "
          f"ms (sum of medians), {low.sum() * 1e3:.3f} ms (sum of minimums); calls outside "
          f"kernels {max(step - kernels, 0) * 1e3:.3f} ms; argmax over {logits.size} logits "
          f"{argmax_s * 1e6:.1f} us")
    print(f"{'kind':<26}{'calls':>6}{'ms/step':>9}{'us/call':>9}{'share':>7}{'min ms':>8}")
    for name, (n, t, lo) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<26}{n:>6}{t * 1e3:>9.3f}{t / n * 1e6:>9.1f}{t / kernels:>7.0%}"
              f"{lo * 1e3:>8.3f}")
    import os

    print(f"threads {os.environ.get('TVM_NUM_THREADS')}; load average {os.getloadavg()[0]:.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    a = p.parse_args()
    profile(a.package, a.steps, a.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
