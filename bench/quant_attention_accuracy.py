"""What int8 attention arithmetic would cost MiniLM-L6 in accuracy, before any kernel does it.

    python bench/quant_attention_accuracy.py [--eval 60] [--p-bits 8,6,4]

The design an int8 attention kernel (vpdpbusd for q.k and p.v) would compute, run in torch
in place of the float attention of the trained all-MiniLM-L6-v2 (seq 128, transformers'
``sdpa`` attention, whose ``torch.nn.functional.scaled_dot_product_attention`` is replaced in
this process):

- q and k quantized per row (each query's and each key's ``head_dim`` values), symmetric i8
  with scale ``max|row| / 127``; scores ``(q8 . k8) * s_q * s_k * scale`` (+ the mask);
- ``e = exp(s - row max)`` in (0, 1], stored as unsigned ``p_bits``-bit integers
  ``round(e * (2^p_bits - 1))`` (u8 at 8 bits);
- v quantized per column (each of ``head_dim`` columns over the keys), symmetric i8;
- out = ``(e_q . v8) * s_v / sum(e_q)``.

Prints the mean and min cosine of the sentence embeddings (mask-aware mean of
``last_hidden_state``) against the float model, over the EVALUATION sentences, for each
``p_bits``. This is the attention's share of the error alone (dense layers in float); the
int8 package's qdense layers cost MiniLM 0.9979 mean cosine by themselves (the issue's bar
is 0.997), so an int8 attention fits only if its own loss is far below that margin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from bench.common import cosine, cpu_header, mean_pool  # noqa: E402


def quantize_i8(x, dim: int):
    """Symmetric i8 values (as floats) and their scales, one scale per slice along ``dim``."""
    s = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 127
    return (x / s).round().clamp(-127, 127), s


def int8_attention(p_bits: int):
    """An ``F.scaled_dot_product_attention`` replacement computing the int8 design above."""
    import torch

    levels = 2 ** p_bits - 1

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_kw):
        if is_causal or dropout_p:
            raise ValueError("MiniLM's attention is neither causal nor dropped out in eval")
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        q8, sq = quantize_i8(q, -1)
        k8, sk = quantize_i8(k, -1)
        s = (q8 @ k8.transpose(-1, -2)) * sq * sk.transpose(-1, -2) * scale
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else s + attn_mask
        e = torch.round(torch.exp(s - s.amax(-1, keepdim=True)) * levels)
        v8, sv = quantize_i8(v, -2)
        return (e @ v8) * sv / e.sum(-1, keepdim=True)
    return attend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=60)
    ap.add_argument("--p-bits", default="8,6,4")
    args = ap.parse_args()
    print(cpu_header(), flush=True)
    import torch
    import torch.nn.functional as F

    from examples.models import minilm, minilm_inputs
    from examples.sentences import EVALUATION

    model, tok = minilm("sdpa")
    evals = [minilm_inputs(tok, [s], seq=128) for s in EVALUATION[:args.eval]]

    def embeddings() -> list[np.ndarray]:
        out = []
        with torch.no_grad():
            for f in evals:
                h = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state
                out.append(mean_pool(h.numpy(), f["attention_mask"]))
        return out

    ref = embeddings()
    float_attention = F.scaled_dot_product_attention   # transformers looks it up per call
    print(f"MiniLM-L6, seq 128, {len(evals)} evaluation sentences; attention int8 (q, k per "
          f"row, v per column, exp(s - max) as unsigned p_bits), dense layers float")
    try:
        for bits in (int(b) for b in args.p_bits.split(",")):
            F.scaled_dot_product_attention = int8_attention(bits)
            got = embeddings()
            c = np.array([cosine(a, b) for a, b in zip(ref, got, strict=True)])
            print(f"p_bits {bits}: mean cosine {c.mean():.5f}, min {c.min():.5f}")
    finally:
        F.scaled_dot_product_attention = float_attention


if __name__ == "__main__":
    main()
