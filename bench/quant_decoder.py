"""Acceptance bench for weight-only quantization on a small character-level decoder.

Trains examples/models.py's GPT-2-style decoder on the source of a few standard-library
modules (cached by config in the temp dir, never in the repository), then measures in one run:

- perplexity on held-out text (the last 10% of the corpus, never trained on) of the float
  graph, int4 group-128 round-to-nearest and int4 group-128 GPTQ, all through the reference
  interpreter (the same graphs the kernels are built from);
- weight bytes of the float, int8 (weight-only ``w8``) and int4 g128 graphs: the sum of the
  graph's weight arrays (what the package stores, before the kernels' N padding), and, with
  ``--compile``, the saved package's weights file size too.

Run: ``OMP_NUM_THREADS=1 python bench/quant_decoder.py`` (about 3 minutes on 2 cores the first
time, the training cached afterwards).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

CONFIG = {"n_layer": 2, "n_head": 4, "d_model": 256, "seq": 32, "steps": 500, "batch": 16,
          "lr": 3e-3, "seed": 0, "modules": ["argparse", "textwrap", "string", "json.decoder",
                                                "json.encoder", "csv", "difflib", "glob"]}


def corpus(modules: list[str]) -> str:
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)
    return "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text)


def train(cfg: dict, ids: np.ndarray, vocab: int):
    import torch

    from examples.models import gpt2_decoder

    key = hashlib.sha256(json.dumps({**cfg, "vocab": vocab}, sort_keys=True).encode()
                         ).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "npucc-bench-quant" / f"decoder-{key}.pt"
    model = gpt2_decoder(vocab=vocab, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         d_model=cfg["d_model"], seq=cfg["seq"], seed=cfg["seed"])
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        print(f"trained weights from {cache}")
        return model.eval()
    t0 = time.time()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["steps"],
                                                pct_start=0.1)
    rng = np.random.default_rng(cfg["seed"])
    data = torch.from_numpy(ids)
    seq = cfg["seq"]
    for step in range(cfg["steps"]):
        starts = rng.integers(0, len(ids) - seq - 1, cfg["batch"])
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    print(f"trained in {time.time() - t0:.0f} s, cached at {cache}")
    return model.eval()


def windows(ids: np.ndarray, seq: int, count: int, stride: int | None = None) -> list[np.ndarray]:
    stride = stride or seq
    out = []
    for s in range(0, len(ids) - seq - 1, stride):
        out.append(ids[s:s + seq + 1])
        if len(out) == count:
            break
    return out


def perplexity(graph, wins: list[np.ndarray]) -> float:
    from compiler.ir.interpreter import interpret

    nll, n = 0.0, 0
    name = graph.inputs[0].name
    for w in wins:
        logits = interpret(graph, {name: w[None, :-1].astype(np.int64)})[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    return math.exp(nll / n)


def perplexity_compiled(m, wins: list[np.ndarray]) -> float:
    nll, n = 0.0, 0
    for w in wins:
        logits = m.run({m.input_names[0]: w[None, :-1].astype(np.int64)})[0][0]
        logits = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    return math.exp(nll / n)


def weight_bytes(graph) -> int:
    refs = {n.attrs.get("ref") for n in graph.find("const")}
    return sum(int(a.nbytes) for r, a in graph.weights.items() if r in refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also compile + save packages")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from compiler.driver import CompileOptions, import_model
    from compiler.pass_manager import run_pipeline
    from passes.quantization.weight_only import quantize_graph

    cfg = CONFIG
    text = corpus(cfg["modules"])
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], np.int64)
    split = int(len(ids) * 0.9)
    print(f"corpus: {len(text)} chars of {', '.join(cfg['modules'])}; vocab {len(chars)}; "
          f"train {split}, held out {len(ids) - split}")
    model = train(cfg, ids[:split], len(chars))
    seq = cfg["seq"]
    opts = CompileOptions(example_inputs=(torch.zeros(1, seq, dtype=torch.long),),
                          input_names=["ids"])
    graph = import_model(model, opts)
    graph = run_pipeline(graph, "canonicalize,fuse-matmul-add,fuse-gemm,fuse-dense-act,"
                                "canonicalize")
    calib_starts = np.random.default_rng(1).integers(0, split - seq, args.calib_windows)
    calib = [{"ids": ids[s:s + seq][None]} for s in calib_starts]
    held = windows(ids[split:], seq, args.eval_windows)
    t = time.time()
    variants = {
        "float": graph,
        "int4 g128 RTN": quantize_graph(graph, {"dense": {"precision": "int4",
                                                          "group_size": 128}}, calib),
    }
    t_rtn = time.time() - t
    t = time.time()
    variants["int4 g128 GPTQ"] = quantize_graph(
        graph, {"dense": {"precision": "int4", "group_size": 128, "method": "gptq"}}, calib)
    t_gptq = time.time() - t
    w8 = {"dense": "w8", "gather": "w8", "layer_norm": "fp16"}
    int4 = {"dense": {"precision": "int4", "group_size": 128, "method": "gptq"},
            "gather": "int16", "layer_norm": "fp16"}
    variants["int8 weights (w8, i8 emb, f16 norms)"] = quantize_graph(graph, w8, calib)
    variants["int4 g128 GPTQ, i16 emb, f16 norms"] = quantize_graph(graph, int4, calib)
    print(f"quantization time: RTN {t_rtn:.2f} s, GPTQ {t_gptq:.2f} s "
          f"(Hessians from {len(calib)} windows of {seq})")
    fb = weight_bytes(graph)
    ppl = {}
    print(f"\n{'variant':38s} {'perplexity':>10s} {'vs float':>9s} {'weight bytes':>12s} "
          f"{'ratio':>6s}")
    for name, g in variants.items():
        ppl[name] = perplexity(g, held)
        wb = weight_bytes(g)
        print(f"{name:38s} {ppl[name]:10.4f} {ppl[name] / ppl['float'] - 1:+9.2%} {wb:12d} "
              f"{wb / fb:6.3f}")
    ok_gptq = ppl["int4 g128 GPTQ"] <= 1.05 * ppl["float"]
    ok_order = ppl["int4 g128 GPTQ"] < ppl["int4 g128 RTN"]
    ok8 = weight_bytes(variants["int8 weights (w8, i8 emb, f16 norms)"]) <= 0.27 * fb
    ok4 = weight_bytes(variants["int4 g128 GPTQ, i16 emb, f16 norms"]) <= 0.16 * fb
    print(f"\nGPTQ int4 within 5% of float: {ok_gptq}; GPTQ better than RTN: {ok_order}; "
          f"int8 <= 0.27x: {ok8}; int4 g128 <= 0.16x: {ok4}")
    if args.compile:
        from compiler import compile

        for name, q in (("float", None), ("int8 weights", w8), ("int4 g128 GPTQ", int4)):
            t = time.time()
            m = compile(graph, "host", quantize=q, calibration=calib)
            with tempfile.TemporaryDirectory() as d:
                path = m.save(Path(d) / "pkg")
                files = {p.name: p.stat().st_size for p in Path(path).rglob("*") if p.is_file()}
            wfile = sum(v for k, v in files.items() if k.endswith(".safetensors"))
            print(f"package {name:16s}: weights file {wfile} B, all files {sum(files.values())} "
                  f"B, stats weight_bytes {m.stats()['weight_bytes']}, perplexity through the "
                  f"kernels {perplexity_compiled(m, held):.4f} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
