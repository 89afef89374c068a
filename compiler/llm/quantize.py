"""Weight-only quantization of an :class:`LlmSpec`, done once for both graphs.

Schemes (``compile_llm(quantize=...)``, ``npucc compile-llm --quantize``):

- ``int8``: every projection int8 per output row (group = K), symmetric;
- ``int4-g32`` / ``int4-g128``: projections int4 in groups of 32 / 128 along K (llama.cpp
  Q4_0's encoding: :mod:`passes.quantization.gptq`), packed two per byte; where K is not a
  multiple of the group (SmolLM2's K=576 at g128) the largest power of two dividing K is used
  (g64), recorded per projection in ``spec.quant``;
- an ``-asym`` suffix (``int4-g32-asym``, ``int4-g32-gptq-asym``): a scale and a minimum per
  group (llama.cpp Q4_1's encoding, :func:`quantize_asym`): ``dense_wq{asym}`` with per-group
  offsets;
- a ``-gptq`` suffix (``int4-g32-gptq``): GPTQ instead of round-to-nearest, with Hessians
  ``2 X^T X / n`` of each projection's input captured by the reference interpreter on
  calibration text run through the float model (all projections from one float pass).

In every scheme the token embedding becomes int8 per row and so does the output projection:
a tied one reads the very same int8 table and row scales (``embed_rows`` / ``dense_rows``),
an untied ``lm_head`` becomes ``dense_wq{bits=8}`` per row (the embedding ``gather_q``). The
vocabulary-sized matrices are the precision-sensitive ends of the model. Norm weights,
biases and the RoPE tables stay f32.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.hf_import import LlmSpec

__all__ = ["Scheme", "parse_scheme", "quantize_spec", "PROJECTIONS", "SCHEMES"]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
SCHEMES = ("int8", "int4-g32", "int4-g128", "int4-g32-gptq", "int4-g128-gptq", "int8-gptq",
           "int4-g32-asym", "int4-g128-asym", "int4-g32-gptq-asym", "int4-g128-gptq-asym")


@dataclass(frozen=True)
class Scheme:
    bits: int
    group: int | None     # None: one group per row (K)
    method: str           # "rtn" | "gptq"
    asym: bool = False    # a scale and a minimum per group (else a scale, symmetric)


def parse_scheme(text: str | None) -> Scheme | None:
    if text is None or text in ("none", "f32", "float"):
        return None
    m = re.fullmatch(r"int(4|8)(?:-g(\d+))?(?:-(rtn|gptq))?(-asym)?", text)
    if m is None or (m.group(1) == "4" and m.group(2) is None) \
            or (m.group(4) and m.group(1) == "8"):
        raise NpuccError(f"unknown quantization {text!r}; choose one of: {', '.join(SCHEMES)} "
                         f"(a -rtn or -gptq suffix picks the method, -asym the int4 grid)")
    return Scheme(int(m.group(1)), int(m.group(2)) if m.group(2) else None,
                  m.group(3) or "rtn", bool(m.group(4)))


def quantize_spec(spec: LlmSpec, scheme: Scheme, *,
                  calibration: str | Sequence[int] | None = None,
                  max_context: int = 2048, chunk: int = 32) -> LlmSpec:
    """A copy of ``spec`` whose projections are ``dense_wq`` weights (see module docstring)."""
    from compiler.ir.ops.quant_weight import pack_int4
    from passes.quantization.gptq import gptq_quantize, gptq_quantize_asym, quantize_rtn
    from passes.quantization.weight_only import effective_group

    weights = dict(spec.weights)
    hessians = _hessians(spec, calibration) if scheme.method == "gptq" else {}
    quant: dict[str, tuple[int, int]] = {}
    for i in range(spec.layers):
        for p in PROJECTIONS:
            prefix = f"l{i}.{p}"
            w = weights.pop(f"{prefix}.w", None)
            if w is None:
                continue
            k = w.shape[1]
            # K not a multiple of the group (SmolLM2: K=576, g128): the largest power of two
            # >= 8 dividing K, as the graph quantizer does (weight_only.effective_group)
            g = effective_group(k, scheme.group or k, scheme.bits) if scheme.group else k
            if g is None:
                raise NpuccError(f"{prefix}: int4 needs an even K, got K={k}")
            if scheme.method == "gptq" and scheme.asym:
                q, s, weights[f"{prefix}.offsets"] = gptq_quantize_asym(w, hessians[prefix], g)
            elif scheme.method == "gptq":
                q, s = gptq_quantize(w, hessians[prefix], scheme.bits, g)
            elif scheme.asym:
                q, s, weights[f"{prefix}.offsets"] = quantize_asym(w, g)
            else:
                q, s = quantize_rtn(w, scheme.bits, g)
            weights[f"{prefix}.wq"] = pack_int4(q) if scheme.bits == 4 else q
            weights[f"{prefix}.scales"] = s
            quant[prefix] = (scheme.bits, g)
    table = weights.pop("embed")
    amax = np.abs(table).max(axis=1)
    row = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    weights["embed.q8"] = np.clip(np.rint(table / row[:, None]), -127, 127).astype(np.int8)
    weights["embed.row_scales"] = row
    if not spec.tied:   # tied: both ends read embed.q8 (embed_rows, dense_rows)
        head = weights.pop("lm_head")
        q, s = quantize_rtn(head, 8, head.shape[1])
        weights["lm_head.wq"], weights["lm_head.scales"] = q, s
        quant["lm_head"] = (8, head.shape[1])
    label = f"int{scheme.bits}" + (f"-g{scheme.group}" if scheme.group else "") \
        + ("" if scheme.method == "rtn" else f"-{scheme.method}") + ("-asym" if scheme.asym
                                                                       else "")
    return replace(spec, weights=weights, quant=quant, scheme=label)


def quantize_asym(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 (llama.cpp Q4_1's encoding): per group ``d = (max - min) / 15`` and
    ``m = min`` in f16, ``u = clip(round((w - m) / d), 0, 15)``, ``w ~= u d + m``.

    Returned as ``dense_wq{asym}`` reads it: ``q = u - 8`` (i8 in [-8, 7]), scales ``d``
    (f16 ``[N, K/g]``) and offsets ``c = m + 8 d`` (f32 ``[N, K/g]``), so ``w = q d + c``.
    On a model whose weights came from a Q4_1 file this reproduces them exactly."""
    n, k = w.shape
    wg = np.asarray(w, np.float32).reshape(n, k // group, group)
    lo, hi = wg.min(axis=-1), wg.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16)
    d[d == 0] = np.float16(1.0)
    m = lo.astype(np.float16).astype(np.float32)
    d32 = d.astype(np.float32)
    u = np.clip(np.rint((wg - m[..., None]) / d32[..., None]), 0, 15)
    q = (u - 8).astype(np.int8).reshape(n, k)
    return q, d, (m + 8.0 * d32).astype(np.float32)


CALIBRATION_TOKENS = 512


def calibration_text() -> str:
    """Built-in GPTQ calibration text: the module docstrings of a few standard-library
    modules (English prose; never the pydoc topics text perplexity is measured on)."""
    import argparse
    import collections
    import json
    import textwrap
    import unittest

    return "\n\n".join(m.__doc__ or "" for m in (argparse, collections, json, textwrap,
                                                 unittest))


def _hessians(spec: LlmSpec, calibration: str | Sequence[int] | None
              ) -> dict[str, np.ndarray]:
    """Per projection prefix: ``H = 2 X^T X / n`` of its input on the calibration tokens."""
    from compiler.llm.graphs import build_step_graph, sample_graph_inputs
    from passes.quantization.gptq import capture_hessians

    if calibration is not None and not isinstance(calibration, str):
        ids = [int(i) for i in calibration]          # token ids
    else:
        if spec.tokenizer_json is None:
            raise NpuccError("GPTQ calibration text needs a tokenizer, and this model has "
                             "none: pass calibration token ids")
        from tokenizers import Tokenizer

        ids = Tokenizer.from_str(spec.tokenizer_json).encode(
            calibration or calibration_text()).ids
    n = min(len(ids), CALIBRATION_TOKENS)
    seq = min(128, n)
    if n < 16:
        raise NpuccError(f"the calibration text has {len(ids)} tokens; GPTQ needs more")
    graph = build_step_graph(spec, seq, seq, fuse=False)
    inputs = {}
    for node in graph.nodes:
        if node.op == "dense":
            ref = node.inputs[1].producer.attrs.get("ref", "")
            if ref.endswith(".w") and ref[:-2].split(".")[-1] in PROJECTIONS:
                inputs[ref[:-2]] = node.inputs[0].name
    samples = [sample_graph_inputs(spec, seq, seq, np.asarray(ids[s:s + seq]), 0)
               for s in range(0, n - seq + 1, seq)]
    H = capture_hessians(graph, samples, set(inputs.values()))
    return {prefix: H[name] for prefix, name in inputs.items()}
