"""The 500 MB question: which weight recipes fit a 1.7B-parameter Llama (SmolLM2-1.7B's shape)
into 500 MB (about 2.3 bits per weight), and what each costs in perplexity when the same
recipe is applied to SmolLM2-135M (the real model).

    python bench/llm_budget.py [--budget-mb 500] [--check int2-g64]

Per recipe: its bytes at 1.7B (projections as stored: codes, f16 scales, offsets; the tied
embedding int8 per row; norms), bits per weight, whether it fits the budget, the kirin990
cost-model decode estimate at 1.7B (``targets.llm_cost.decode_ms_per_token``, its inputs
printed), and SmolLM2's perplexity on ``bench/llm_decode.py``'s held-out text (pydoc topics,
second half, 16 windows of 512 tokens) with the recipe applied to its float weights **in torch
on the dequantized weights** (fake quantization: the same codes the packages store, run by
transformers). ``--check`` compiles the named recipes with npucc (``compile_llm`` on the
SmolLM2 folder, the streaming route) and prints the package's perplexity beside it, so
fake and real quantization are compared in one run.

Recipes: uniform int4 / int3 / int2 groups (int3/int2 asymmetric, as ``dense_wq`` stores
them); 2:4 sparsity (magnitude, 2 of every 4 along K kept) on top of int4 g128, stored as the
kept codes plus a 2-bit index per kept weight (no npucc decode kernel reads this layout yet:
size and quality only); structured pruning of half the MLP channels (score ``|gate_i| |up_i|
|down_:,i|``, no fine-tuning or distillation) with int3 / int4 on what remains; attention
int4 with MLP int2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)    # bench/ must not shadow packages (see bench/llm_decode.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTN, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
# name -> (attention scheme, MLP scheme, 2:4 sparse, fraction of MLP channels kept)
RECIPES = {
    "int4-g32": ("int4-g32", "int4-g32", False, 1.0),
    "int4-g128": ("int4-g128", "int4-g128", False, 1.0),
    "int3-g128": ("int3-g128", "int3-g128", False, 1.0),
    "int2-g64": ("int2-g64", "int2-g64", False, 1.0),
    "int2-g128": ("int2-g128", "int2-g128", False, 1.0),
    "attn int4-g64, mlp int2-g128": ("int4-g64", "int2-g128", False, 1.0),
    "2:4 + int4-g128": ("int4-g128", "int4-g128", True, 1.0),
    "mlp 50% pruned + int4-g128": ("int4-g128", "int4-g128", False, 0.5),
    "mlp 50% pruned + int3-g128": ("int3-g128", "int3-g128", False, 0.5),
}
SHAPE_1_7B = {"hidden": 2048, "intermediate": 8192, "layers": 24, "heads": 32, "kv_heads": 32,
              "head_dim": 64, "vocab": 49152}


def matrices(shape: dict, keep: float) -> dict[str, tuple[int, int]]:
    """[N, K] of one layer's projections (MLP channels kept: ``keep``)."""
    d, f = shape["hidden"], int(round(shape["intermediate"] * keep))
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (f, d), "up": (f, d),
            "down": (d, f)}


def recipe_bytes(name: str, shape: dict) -> tuple[int, int]:
    """(bytes, parameters of the unpruned model) of recipe ``name`` at ``shape``."""
    from compiler.llm.quantize import matrix_bytes, parse_scheme, table_bytes

    attn, mlp, sparse, keep = RECIPES[name]
    total = table_bytes(shape["vocab"], shape["hidden"], 8)          # tied embedding, int8
    total += (2 * shape["layers"] + 1) * shape["hidden"] * 4          # RMSNorm weights
    for p, (n, k) in matrices(shape, keep).items():
        sch = parse_scheme(attn if p in ATTN else mlp)
        if sparse:   # the kept half: codes + scales over kept values, + 2-bit index each
            b = matrix_bytes(n, k // 2, sch) + n * (k // 2) * 2 // 8
        else:
            b = matrix_bytes(n, k, sch)
        total += b * shape["layers"]
    params = shape["vocab"] * shape["hidden"] + shape["layers"] * sum(
        n * k for n, k in matrices(shape, 1.0).values())
    return total, params


def fake(w: np.ndarray, scheme_text: str) -> np.ndarray:
    """``w`` [N, K] quantized by ``scheme_text`` and dequantized (the values the GEMV reads)."""
    from compiler.llm.quantize import group_for, parse_scheme, quantize_asym
    from passes.quantization.gptq import quantize_rtn

    sch = parse_scheme(scheme_text)
    g = group_for(w.shape[1], sch)
    n, k = w.shape
    if sch.asym:
        q, d, c = quantize_asym(w, g, sch.bits)
        return (q.reshape(n, k // g, g) * d.astype(np.float32)[..., None]
                + c.astype(np.float32)[..., None]).reshape(n, k)
    q, s = quantize_rtn(w, sch.bits, g)
    return (q.reshape(n, k // g, g) * s.astype(np.float32)[..., None]).reshape(n, k)


def fake_sparse(w: np.ndarray, scheme_text: str) -> np.ndarray:
    """2:4 by magnitude along K, then the kept values quantized in groups of kept values."""
    from passes.pruning.magnitude import nm_mask

    keep = nm_mask(w, "dense", 2, 4)
    n, k = w.shape
    kept = w[keep].reshape(n, k // 2)
    out = np.zeros_like(w)
    out[keep] = fake(kept, scheme_text).reshape(-1)
    return out


def apply_recipe(hf, name: str) -> dict:
    """Recipe ``name`` applied in place to a transformers Llama's weights; returns the
    original state dict (to restore)."""
    import torch

    attn, mlp, sparse, keep = RECIPES[name]
    saved = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        from compiler.llm.quantize import quantize_rows

        q8, row = quantize_rows(emb.numpy(), 8)
        emb.copy_(torch.from_numpy(q8.astype(np.float32) * row[:, None]))
        for layer in hf.model.layers:
            mods = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj,
                    "v": layer.self_attn.v_proj, "o": layer.self_attn.o_proj,
                    "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj,
                    "down": layer.mlp.down_proj}
            if keep < 1.0:
                prune_mlp(mods, keep)
            for p, mod in mods.items():
                w = mod.weight.numpy()
                sch = attn if p in ATTN else mlp
                mod.weight.copy_(torch.from_numpy(fake_sparse(w, sch) if sparse
                                                  else fake(w, sch)))
    return saved


def prune_mlp(mods: dict, keep: float) -> None:
    """Zero the MLP channels of lowest ``|gate_i| |up_i| |down_:,i|`` (removing a channel and
    zeroing it give the same output); ``keep`` of them stay."""
    g, u, d = (mods[p].weight for p in MLP)
    score = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)
    drop = score.argsort()[: int(round(len(score) * (1 - keep)))]
    g[drop] = 0
    u[drop] = 0
    d[:, drop] = 0


def kernels_per_layer(work: Path) -> int:
    """Decode kernel launches per layer of a 1.7B package in ``work`` (bench/llm_scale.py's),
    else 10."""
    pkg = work / "1.7b-int4-g32.npkg"
    if not (pkg / "llm.json").exists():
        return 10
    m = json.loads((pkg / "llm.json").read_text())
    return max(1, round(len(m["graphs"]["decode"]["steps"]) / m["model"]["layers"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-mb", type=float, default=500.0)
    p.add_argument("--check", default="int2-g64",
                   help="recipes also compiled by npucc (comma-separated; uniform ones only)")
    p.add_argument("--work", default="/tmp/npucc-bench-llm-scale")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.llm_decode import cpu_name, eval_windows, perplexity, texts
    from bench.llm_scale import smollm2_folder, smollm2_gguf
    from compiler.llm.hf_import import add_tokenizer, load_transformers, spec_from_transformers
    from targets.llm_cost import decode_ms_per_token

    hf, tok = load_transformers(smollm2_gguf())
    spec = spec_from_transformers(hf, None)
    add_tokenizer(spec, tok)
    windows = eval_windows(spec.tokenizer_json, texts()[1], a.window, a.eval_tokens)

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(lambda w: hf(torch.tensor([w])).logits[0].numpy(), windows)

    base = ppl()
    work = Path(a.work)
    kpl = kernels_per_layer(work)
    s = SHAPE_1_7B
    kv_f32 = s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * 4
    print(f"# recipes at SmolLM2-1.7B's shape (1.711B parameters); budget {a.budget_mb:.0f} MB; "
          f"SmolLM2-135M perplexity on {len(windows)} x {a.window} held-out tokens: float "
          f"{base:.3f}")
    print(f"kirin990 estimate inputs: weight bytes of the recipe (all read once per token), KV "
          f"cache f32 {kv_f32 / 1e3:.0f} kB per position (24 layers x K,V x 32 heads x 64) read "
          f"to position 1024, {s['layers']} layers x {kpl} kernels (the 1.7B package's decode "
          f"graph)")
    print(f"{'recipe':<32}{'MB @1.7B':>9}{'bits/w':>8}{'fits':>6}{'kirin990 ms/tok':>17}"
          f"{'SmolLM2 ppl':>13}{'vs float':>10}")
    checks = [c for c in a.check.split(",") if c]
    for name in RECIPES:
        nbytes, params = recipe_bytes(name, s)
        est = decode_ms_per_token("kirin990", weight_bytes=nbytes, kv_bytes_per_position=kv_f32,
                                  position=1024, layers=s["layers"], kernels_per_layer=kpl)
        saved = apply_recipe(hf, name)
        got = ppl()
        hf.load_state_dict(saved)
        print(f"{name:<32}{nbytes / 1e6:>9.0f}{8 * nbytes / params:>8.2f}"
              f"{'yes' if nbytes <= a.budget_mb * 1e6 else 'no':>6}"
              f"{est['ms_per_token']:>17.1f}{got:>13.4g}{100 * (got / base - 1):>+10.4g}%",
              flush=True)
    for name in checks:
        print(f"npucc package {name}: perplexity {package_ppl(name, smollm2_folder(work), windows, work):.2f} "
              f"(compiled by compile_llm, the streaming route; compare the fake-quant row)")
    print(f"band of the kirin990 estimate: {est['band']}\nCPU: {cpu_name()}; load average "
          f"{os.getloadavg()[0]:.1f} (other jobs were running on this machine)")
    return 0


def package_ppl(name: str, folder: Path, windows: list[list[int]], work: Path) -> float:
    from bench.llm_decode import perplexity
    from compiler.llm.compile import compile_llm

    attn, mlp, sparse, keep = RECIPES[name]
    if attn != mlp or sparse or keep < 1.0:
        raise SystemExit(f"--check {name}: only uniform recipes compile as one scheme")
    m = compile_llm(str(folder), quantize=attn, max_context=max(map(len, windows)), chunk=32,
                    output=work / f"135m-{name}.npkg")
    return perplexity(m.logits, windows)


if __name__ == "__main__":
    sys.exit(main())
