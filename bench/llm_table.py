"""One table for issue 14 on SmolLM2-135M-Instruct, every row a package compiled by npucc:
perplexity on the same held-out text, weights and package size, decode tok/s and the kirin990
cost-model ms/token; and the 1.7B plan at 500 MB with its kirin990 estimate beside the int4 g32
package's, each printed with the formula's inputs.

    python bench/llm_table.py [--work DIR] [--reuse]

(25 minutes on 2 AMD EPYC cores at load 7-15 from other jobs: sensitivity 2 min, each row's
compile and perplexity 2-2.5 min, 3 decode rounds 3 min; ``--reuse`` skips the compiles and the
sensitivity.)

Rows: float; int4 g32; int4 g32 + KV K4/V8; int4 g32 + KV int8; the seed-2b preset; the
size-budget solver at the seed preset's size; the 1.7B model's 500 MB plan applied to SmolLM2
(its scheme per matrix kind at the same relative depth, the embedding's scheme for the
embedding: the same recipe; SmolLM2's K=576 matrices cannot take groups of 128, so 2-bit groups
of 128 become groups of 64 there and the bits per weight come out higher than at 1.7B). The
solver run on SmolLM2 itself at the 1.7B plan's bits per weight is tried too, and its refusal
(nothing that small exists at SmolLM2's shapes) printed.

Perplexity: ``bench/llm_decode.py``'s held-out half of ``pydoc_data.topics``, ``--eval-tokens``
in windows of ``--window`` from position 0 (the package's own prefill and cache, so a quantized
KV cache counts). Decode tok/s: ``--new`` greedy tokens after the first ``--prompt`` tokens of
that text, 2 threads, each package in its own process (``bench/llm_decode.py --worker``),
``--rounds`` rounds in turn, the median. kirin990: ``compiler.llm.estimate.estimate_decode`` on
the package (its weights.bin bytes, its KV cache bytes to ``--position``, its decode launches).

1.7B (SmolLM2-1.7B's shape, ``bench/llm_budget.SHAPE_1_7B``): no float copy is made. The
solver plans from SmolLM2's measured sensitivity carried over by matrix kind and relative depth
(``mixed.transfer_by_depth``), and the plan's bytes are ``mixed.plan_bytes`` -- the byte count
the solver budgets with (codes, f16 scales and offsets, 32-row padding, a zero bias per GEMV,
64-byte alignment); the SmolLM2 rows print the same count beside the weights.bin their
packages really wrote. The kirin990 estimate: ``targets.llm_cost.decode_ms_per_token`` with
those bytes, the f32 (or K4/V8) KV cache read to ``--position``, and the launches per layer of
the SmolLM2 package with the same recipe.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # see bench/llm_mixed.py

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)    # bench/ must not shadow packages (see bench/llm_decode.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1_000_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "npucc-bench-llm-table"))
    p.add_argument("--reuse", action="store_true", help="reuse packages and sensitivity in --work")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--position", type=int, default=1024, help="KV position of the estimates")
    p.add_argument("--budget-mb", type=float, default=500.0, help="the 1.7B plan's budget")
    p.add_argument("--measure", type=int, default=14, help="matrices whose KL is measured")
    p.add_argument("--target", default="kirin990")
    return bench(p.parse_args())


def smollm2():
    """(SmolLM2-135M-Instruct's float spec, the gguf path)."""
    from bench.llm_scale import smollm2_gguf
    from compiler.llm.hf_import import load_transformers, spec_from_transformers

    gguf = smollm2_gguf()
    hf, tok = load_transformers(gguf)
    return spec_from_transformers(hf, tok), gguf


def sensitivity(spec, calib: str, a, work: Path):
    from compiler.llm.sensitivity import measure_sensitivity

    cache = work / "sensitivity.pkl"
    if a.reuse and cache.exists():
        return pickle.loads(cache.read_bytes())
    sens = measure_sensitivity(spec, calib, measure=a.measure, progress=print)
    cache.write_bytes(pickle.dumps(sens))
    return sens


def plans_1_7b(spec, sens, a):
    """The 1.7B shape spec, its solver plan at ``--budget-mb`` and its int4 g32 package's."""
    from bench.llm_budget import SHAPE_1_7B as S
    from compiler.llm.mixed import (
        fixed_bytes,
        matrix_shapes,
        plan_of,
        shape_spec,
        solve,
        transfer_by_depth,
    )
    from compiler.llm.quantize import Scheme, parse_scheme

    big = shape_spec(S["vocab"], S["hidden"], S["intermediate"], S["layers"], S["heads"],
                     S["kv_heads"], name="smollm2-1.7b-shape")
    shapes = matrix_shapes(big)
    loss = transfer_by_depth(sens.loss, spec.layers, shapes)
    plan = solve(shapes, loss, int(a.budget_mb * MB), fixed_bytes(big, a.max_context),
                 name=f"1.7b@{a.budget_mb:g}MB")
    int4 = plan_of("int4-g32", big, {m: Scheme(8, None, "rtn") if m == "embed"
                                     else parse_scheme("int4-g32") for m in shapes},
                   a.max_context)
    return big, plan, int4


def rows_to_compile(spec, sens, plan17, a):
    """name -> (compile_llm source, keyword arguments, the plan whose bytes it should have)."""
    from compiler.llm.mixed import (
        matrix_shapes,
        plan_of,
        preset_plan,
        quantize_plan,
        transfer_by_depth,
    )
    from compiler.llm.quantize import Scheme, parse_scheme

    ctx = a.max_context
    shapes = matrix_shapes(spec)
    int4 = plan_of("int4-g32", spec, {m: Scheme(8, None, "rtn") if m == "embed"
                                      else parse_scheme("int4-g32") for m in shapes}, ctx)
    seed = preset_plan("seed-2b", spec, ctx)
    recipe = plan_of(f"{plan17.name} recipe", spec,
                     transfer_by_depth(plan17.schemes, plan17_layers(plan17), shapes), ctx)
    return {
        "float": (spec, {}, None),
        "int4 g32": (spec, {"quantize": "int4-g32"}, int4),
        "int4 g32 + KV K4/V8": (spec, {"quantize": "int4-g32", "kv_cache": "k4v8"}, int4),
        "int4 g32 + KV int8": (spec, {"quantize": "int4-g32", "kv_cache": "int8"}, int4),
        "seed-2b preset": (spec, {"quantize": "seed-2b"}, seed),
        "solver at the seed's size": (spec, {"size_budget_mb": seed.total / MB,
                                              "sensitivity": sens}, None),
        f"1.7B {a.budget_mb:g} MB plan's recipe": (quantize_plan(spec, recipe, ctx), {},
                                                   recipe),
    }


def plan17_layers(plan) -> int:
    return 1 + max(int(m.split(".")[0][1:]) for m in plan.schemes if m != "embed")


def measure_rows(rows, windows, prompt, a, work: Path) -> dict:
    from bench.llm_decode import perplexity
    from compiler.llm.compile import compile_llm
    from compiler.llm.estimate import estimate_decode
    from runtime.llm import load

    out = {}
    for i, (name, (source, kw, plan)) in enumerate(rows.items()):
        pkg = work / f"row{i}.npkg"
        t0 = time.perf_counter()
        if not (a.reuse and (pkg / "llm.json").exists()):
            compile_llm(source, max_context=a.max_context, chunk=32, output=pkg,
                        work_dir=work / "build",
                        progress=lambda m: print(f"  {m}") if "plan" in m or m.startswith("  ")
                        else None, **kw)
        m = load(pkg)
        st = m.stats()
        est = estimate_decode(m, a.target, position=a.position)
        prec = m.package.manifest["model"].get("precision_plan") or {}
        out[name] = {"ppl": perplexity(m.logits, windows), "weight_bytes": st["weight_bytes"],
                     "package_bytes": st["package_bytes"], "kv_bytes": st["kv_cache_bytes"],
                     "plan_bytes": plan.total if plan is not None else prec.get("weights_bytes"),
                     "est_ms": est["ms_per_token"], "launches": len(m.decode.calls),
                     "layers": int(m.config["layers"]), "pkg": str(pkg),
                     "embed": prec.get("matrices", {}).get("embed"),
                     "seconds": time.perf_counter() - t0}
        print(f"  {name}: perplexity {out[name]['ppl']:.3f}, weights "
              f"{st['weight_bytes'] / MB:.2f} MB ({out[name]['seconds']:.0f} s)", flush=True)
        del m
    speed(out, prompt, a)
    return out


def speed(rows: dict, prompt: list[int], a) -> None:
    from bench.llm_decode import run_worker

    runs: dict[str, list[float]] = {n: [] for n in rows}
    for r in range(a.rounds):
        for n, row in rows.items():
            got = run_worker(["--worker", "npucc", row["pkg"], json.dumps(prompt), str(a.new)])
            runs[n].append(got["decode_tok_s"])
        print(f"  decode round {r + 1}/{a.rounds}: load {os.getloadavg()[0]:.1f}", flush=True)
    for n, row in rows.items():
        row["tok_s"], row["tok_s_runs"] = statistics.median(runs[n]), runs[n]


def report(rows: dict, params: int, a) -> None:
    ref = rows["float"]["ppl"]
    print(f"\n| row | embedding | perplexity | vs float | weights.bin MB (plan_bytes) | "
          f"package MB | bits/weight | decode tok/s (median; rounds) | "
          f"{a.target} ms/token @{a.position} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        plan = f" ({r['plan_bytes'] / MB:.2f})" if r["plan_bytes"] else ""
        ratio = r["ppl"] / ref
        vs = f"x{ratio:.3g}" if ratio > 10 else f"{100 * (ratio - 1):+.1f}%"
        emb = r["embed"] or ("f32" if n == "float" else "int8 rows")
        print(f"| {n} | {emb} | {r['ppl']:.3f} | {vs} | "
              f"{r['weight_bytes'] / MB:.2f}{plan} | {r['package_bytes'] / MB:.2f} | "
              f"{8 * r['weight_bytes'] / params:.2f} | {r['tok_s']:.1f} "
              f"({', '.join(f'{x:.0f}' for x in r['tok_s_runs'])}) | {r['est_ms']:.2f} |")
    print(f"perplexity: the same {a.eval_tokens // a.window} x {a.window} held-out tokens for "
          f"every row; bits/weight = weights.bin x 8 / {params / 1e6:.1f} M matrix parameters; "
          f"decode: {a.new} tokens after a {a.prompt}-token prompt, 2 threads; {a.target}: "
          f"the package's weights, its KV cache to position {a.position}, its decode launches")


def report_1_7b(big, plan, int4, rows: dict, a) -> None:
    from compiler.llm.graphs import cache_types, kv_cache_layout
    from targets.llm_cost import decode_ms_per_token

    print(f"\n# SmolLM2-1.7B's shape ({sum(plan.params.values()) / 1e9:.3f} B matrix "
          f"parameters): the solver's plan at {a.budget_mb:g} MB (losses: SmolLM2's measured "
          f"sensitivity by kind and relative depth)")
    print(plan.table())
    recipe = rows[f"1.7B {a.budget_mb:g} MB plan's recipe"]
    per_layer = {int4.name: rows["int4 g32"]["launches"] / rows["int4 g32"]["layers"],
                 plan.name: recipe["launches"] / recipe["layers"]}
    print(f"\n{a.target} decode estimate at 1.7B, position {a.position} (bytes: "
          f"compiler.llm.mixed.plan_bytes; launches per layer: the SmolLM2 package of the same "
          f"recipe):")
    for p in (int4, plan):
        for kv in ("f32", "k4v8"):
            kv_pos = sum(t.nbytes for t in cache_types(
                big, a.max_context, kv_cache_layout(kv, big.head_dim)).values()) \
                // a.max_context
            est = decode_ms_per_token(a.target, weight_bytes=p.total,
                                      kv_bytes_per_position=kv_pos, position=a.position,
                                      layers=big.layers,
                                      kernels_per_layer=round(per_layer[p.name]))
            print(f"  {p.name:>14} KV {kv:<5} {est['ms_per_token']:6.1f} ms/token = "
                  f"{est['weights_ms']:.1f} weights + {est['kv_ms']:.1f} KV + "
                  f"{est['fixed_ms']:.2f} launches; inputs: {est['formula']} "
                  f"(KV {kv_pos} B/position)")
    print(f"  band: {est['band']}")


def bench(a: argparse.Namespace) -> int:
    from bench.llm_decode import cpu_name, eval_windows, texts
    from compiler.errors import NpuccError
    from compiler.llm.mixed import fixed_bytes, matrix_shapes, plan_for_budget

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    spec, _ = smollm2()
    calib, evaluation = texts()
    windows = eval_windows(spec.tokenizer_json, evaluation, a.window, a.eval_tokens)
    prompt = windows[0][:a.prompt]
    print(f"# SmolLM2-135M-Instruct; CPU {cpu_name()}; load {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    sens = sensitivity(spec, calib, a, work)
    print(f"sensitivity ({time.perf_counter() - t0:.0f} s; calibration: the first half of "
          f"pydoc_data.topics); the embedding's KL per scheme: " + ", ".join(
              f"{k} {v:.4f}" for k, v in sorted(sens.loss["embed"].items(), key=lambda kv:
                                                 kv[1])))
    big, plan17, int4_17 = plans_1_7b(spec, sens, a)
    params = sum(n * k for n, k in matrix_shapes(spec).values())
    bpw = plan17.bits_per_weight()
    same_mb = (fixed_bytes(spec, a.max_context) + bpw / 8 * params) / MB
    try:
        plan_for_budget(spec, same_mb, max_context=a.max_context, sensitivity=sens)
        print(f"the solver on SmolLM2 at the 1.7B plan's {bpw:.3f} bits/weight "
              f"({same_mb:.2f} MB) found a plan")
    except NpuccError as e:
        print(f"the solver on SmolLM2 at the 1.7B plan's {bpw:.3f} bits/weight: {e}")
    rows = measure_rows(rows_to_compile(spec, sens, plan17, a), windows, prompt, a, work)
    report(rows, params, a)
    report_1_7b(big, plan17, int4_17, rows, a)
    print(f"CPU {cpu_name()}; load average at the end {os.getloadavg()[0]:.1f} (other jobs "
          f"may be running: tok/s are this machine's at that load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
