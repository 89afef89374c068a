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
- ``int3-gN`` / ``int2-gN``: 3 and 2 bits, always asymmetric (an f16 scale and an f16 offset
  per group, the range per group chosen among a few shrunk min..max ranges for the least
  squared error), packed 8 (3-bit) or 4 (2-bit) codes per little-endian word
  (:func:`compiler.ir.ops.quant_weight.pack_bits`), round-to-nearest only;
- ``int4-g128-2:4`` (``-wanda``, ``-sparsegpt``): 2 of every 4 inputs kept, int4 in groups of
  kept weights, stored compactly for ``dense_wq24`` (:mod:`compiler.llm.sparse`);
- a mixed plan (``quantize_spec(plan=...)``, :mod:`compiler.llm.mixed`): a scheme per matrix,
  the embedding table int8 or int16 per row, or group-wise int4 / int3 / int2 like a
  projection (``embed.wq``, ``embed.scales``, ``embed.offsets``; ``quant["embed"]``): rows
  gathered by ``embed_wq``, a tied output projection is ``dense_wq`` over the same arrays;
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.hf_import import LlmSpec

__all__ = ["Scheme", "parse_scheme", "quantize_spec", "quantize_projection", "quantize_rows_int8",
           "quantize_rows", "quantize_asym", "group_for", "matrix_bytes", "table_bytes",
           "scheme_label", "calibration_token_ids", "PROJECTIONS", "SCHEMES"]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
SCHEMES = ("int8", "int4-g32", "int4-g128", "int4-g32-gptq", "int4-g128-gptq", "int8-gptq",
           "int4-g32-asym", "int4-g128-asym", "int4-g32-gptq-asym", "int4-g128-gptq-asym",
           "int3-g32", "int3-g64", "int3-g128", "int2-g32", "int2-g64", "int2-g128")


@dataclass(frozen=True)
class Scheme:
    """How one matrix is stored: ``bits`` 8 / 4 / 3 / 2 for projections (3 and 2 always
    asymmetric), 8 / 16 for an embedding table (per row)."""
    bits: int
    group: int | None     # None: one group per row (K)
    method: str           # "rtn" | "gptq"
    asym: bool = False    # a scale and a minimum per group (else a scale, symmetric)
    sparse: bool = False  # 2:4 int4, group = kept weights per scale (compiler.llm.sparse)


def parse_scheme(text: str | None) -> Scheme | None:
    if text is None or text in ("none", "f32", "float"):
        return None
    if "2:4" in text:
        from compiler.llm.sparse import parse_sparse_scheme

        return parse_sparse_scheme(text)
    m = re.fullmatch(r"int(2|3|4|8)(?:-g(\d+))?(?:-(rtn|gptq))?(-asym)?", text)
    low = m is not None and m.group(1) in ("2", "3")
    if m is None or (m.group(1) != "8" and m.group(2) is None) \
            or (m.group(4) and m.group(1) == "8") or (low and m.group(3) == "gptq"):
        raise NpuccError(f"unknown quantization {text!r}; choose one of: {', '.join(SCHEMES)} "
                         f"(a -rtn or -gptq suffix picks the method, -asym the int4 grid; "
                         f"int3/int2 are round-to-nearest and asymmetric; int4-g128-2:4: "
                         f"2:4 sparse, compiler.llm.sparse), or a preset / "
                         f"size budget (compiler.llm.mixed)")
    return Scheme(int(m.group(1)), int(m.group(2)) if m.group(2) else None,
                  m.group(3) or "rtn", bool(m.group(4)) or low)


def scheme_label(scheme: Scheme) -> str:
    """``int4-g32-gptq-asym`` style name of a scheme (``int8`` per row, ``int16`` rows)."""
    if scheme.sparse:
        return f"int4-g{scheme.group}-2:4" + ("" if scheme.method == "rtn" else
                                             f"-{scheme.method}")
    return f"int{scheme.bits}" + (f"-g{scheme.group}" if scheme.group else "") \
        + ("" if scheme.method == "rtn" else f"-{scheme.method}") \
        + ("-asym" if scheme.asym and scheme.bits == 4 else "")


def matrix_bytes(n: int, k: int, scheme: Scheme) -> int:
    """Bytes ``dense_wq`` stores for an ``[N, K]`` projection: packed codes, f16 scales per
    group, offsets per asymmetric group (f32 at int4,
    f16 at 3/2 bits). Panel padding of N (to the kernel's panel width) is not counted."""
    if scheme.sparse:
        from compiler.llm.sparse import sparse_bytes

        return sparse_bytes(n, k, group_for(k // 2, scheme))
    g = group_for(k, scheme) if scheme.group else k
    codes = n * k * scheme.bits // 8
    scales = n * (k // g) * 2
    offsets = n * (k // g) * (4 if scheme.bits == 4 else 2) if scheme.asym else 0
    return codes + scales + offsets


def table_bytes(v: int, d: int, bits: int) -> int:
    """Bytes of an embedding table ``[V, D]`` at int8 / int16 per row (f32 row scales)."""
    return v * d * bits // 8 + v * 4


def quantize_spec(spec: LlmSpec, scheme: Scheme, *,
                  calibration: str | Sequence[int] | None = None,
                  max_context: int = 2048, chunk: int = 32,
                  plan: Mapping[str, Scheme] | None = None, label: str | None = None
                  ) -> LlmSpec:
    """A copy of ``spec`` whose projections are ``dense_wq`` weights (see module docstring).

    ``plan`` (mixed precision, :mod:`compiler.llm.mixed`): a scheme per matrix name
    (``l3.q``, ``embed``, ``lm_head``) overriding ``scheme``; ``embed`` takes ``int8`` or
    ``int16`` rows (``Scheme(16, None, "rtn")``) or a grouped int4 / int3 / int2 scheme
    (round-to-nearest, as a projection). ``label`` names the result
    (``spec.scheme``)."""
    from passes.quantization.gptq import quantize_rtn

    plan = dict(plan or {})
    weights = dict(spec.weights)
    wants_gptq = any(plan.get(f"l{i}.{p}", scheme).method != "rtn"   # GPTQ, 2:4 selection
                     for i in range(spec.layers) for p in PROJECTIONS)
    hessians = _hessians(spec, calibration) if wants_gptq else {}
    quant: dict[str, tuple[int, int]] = {}
    for i in range(spec.layers):
        for p in PROJECTIONS:
            prefix = f"l{i}.{p}"
            w = weights.pop(f"{prefix}.w", None)
            if w is None:
                continue
            sch = plan.get(prefix, scheme)
            parts, g = quantize_projection(w, sch, hessians.get(prefix), prefix)
            weights.update({f"{prefix}.{part}": a for part, a in parts.items()})
            quant[prefix] = (sch.bits, g)
    emb = plan.get("embed")
    if emb is not None and emb.group is not None:   # group-wise rows: dense_wq's arrays
        parts, g = quantize_projection(weights.pop("embed"), emb, None, "embed")
        weights.update({f"embed.{part}": a for part, a in parts.items()})
        quant["embed"] = (emb.bits, g)
    else:
        table_bits = emb.bits if emb is not None else 8
        weights[f"embed.q{table_bits}"], weights["embed.row_scales"] = quantize_rows(
            weights.pop("embed"), table_bits)
    if not spec.tied:   # tied: both ends read embed.q8 / q16 (embed_rows, dense_rows)
        head = weights.pop("lm_head")
        sch = plan.get("lm_head", Scheme(8, None, "rtn"))
        if sch.bits == 8 and sch.group is None:
            q, s = quantize_rtn(head, 8, head.shape[1])
            weights["lm_head.wq"], weights["lm_head.scales"] = q, s
            quant["lm_head"] = (8, head.shape[1])
        else:
            parts, g = quantize_projection(head, sch, None, "lm_head")
            weights.update({f"lm_head.{part}": a for part, a in parts.items()})
            quant["lm_head"] = (sch.bits, g)
    return replace(spec, weights=weights, quant=quant, scheme=label or scheme_label(scheme))


def group_for(k: int, scheme: Scheme, prefix: str = "weight") -> int:
    """The group size ``scheme`` uses for a projection of ``k`` inputs: K not a multiple of
    the group (SmolLM2: K=576, g128) takes the largest power of two >= 8 dividing K, as the
    graph quantizer does (``weight_only.effective_group``); no group means one per row."""
    from passes.quantization.weight_only import effective_group

    g = effective_group(k, scheme.group or k, scheme.bits) if scheme.group else k
    if g is None:
        raise NpuccError(f"{prefix}: int4 needs an even K, got K={k}")
    return g


def quantize_projection(w: np.ndarray, scheme: Scheme, hessian: np.ndarray | None = None,
                        prefix: str = "weight") -> tuple[dict[str, np.ndarray], int]:
    """One ``[N, K]`` projection as ``dense_wq`` stores it: ``({"wq": packed codes,
    "scales": f16 [N, K/g], "offsets": f32 [N, K/g] (asymmetric only)}, g)``. Rows are
    quantized independently (GPTQ too: ``hessian`` is of the input), so a block of rows
    quantizes to the same rows of the whole matrix's result."""
    from compiler.ir.ops.quant_weight import pack_bits
    from passes.quantization.gptq import gptq_quantize, gptq_quantize_asym, quantize_rtn

    if scheme.sparse:
        from compiler.llm.sparse import quantize_sparse

        return quantize_sparse(w, scheme, hessian, prefix)
    g = group_for(w.shape[1], scheme, prefix)
    if scheme.bits in (2, 3):
        if g % 8:
            raise NpuccError(f"{prefix}: {scheme.bits}-bit groups must be multiples of 8 "
                             f"(K={w.shape[1]}, group {g})")
        q, s, c = quantize_asym(w, g, scheme.bits)
        return {"wq": pack_bits(q, scheme.bits), "scales": s, "offsets": c}, g
    parts: dict[str, np.ndarray] = {}
    if scheme.method == "gptq" and hessian is None:
        raise NpuccError(f"{prefix}: GPTQ needs the Hessian of the projection's input")
    if scheme.method == "gptq" and scheme.asym:
        q, s, parts["offsets"] = gptq_quantize_asym(w, hessian, g)
    elif scheme.method == "gptq":
        q, s = gptq_quantize(w, hessian, scheme.bits, g)
    elif scheme.asym:
        q, s, parts["offsets"] = quantize_asym(w, g)
    else:
        q, s = quantize_rtn(w, scheme.bits, g)
    parts = {"wq": pack_bits(q, 4) if scheme.bits == 4 else q, "scales": s, **parts}
    return parts, g


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A token embedding int8 per row, symmetric: ``(q8 i8 [V, D], row_scales f32 [V])``
    (rows independent: a block of rows gives the same rows)."""
    return quantize_rows(table, 8)


def quantize_rows(table: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A table symmetric per row at ``bits`` 8 (i8) or 16 (i16): ``(codes, row_scales f32)``."""
    if bits not in (8, 16):
        raise NpuccError(f"an embedding table is stored int8 or int16 per row, not int{bits}")
    top = 127.0 if bits == 8 else 32767.0
    amax = np.abs(table).max(axis=1)
    row = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / row[:, None]), -top, top)
    return q.astype(np.int8 if bits == 8 else np.int16), row


def quantize_asym(w: np.ndarray, group: int, bits: int = 4
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric ``bits``-bit groups (int4: llama.cpp Q4_1's encoding): per group
    ``d = (max - min) / (2^bits - 1)`` and ``m = min`` in f16, ``u = clip(round((w - m) / d),
    0, 2^bits - 1)``, ``w ~= u d + m``.

    Returned as ``dense_wq{asym}`` reads it: ``q = u - z`` with ``z = 2^(bits-1)``, scales
    ``d`` (f16 ``[N, K/g]``) and offsets ``c = m + z d`` (``[N, K/g]``: f32 at int4, f16 at
    3/2 bits, where the codes are rounded against the f16 offset), so ``w = q d + c``.
    On a model whose weights came from a Q4_1 file int4 reproduces them exactly."""
    n, k = w.shape
    top, z = float((1 << bits) - 1), float(1 << (bits - 1))
    wg = np.asarray(w, np.float32).reshape(n, k // group, group)
    lo, hi = wg.min(axis=-1), wg.max(axis=-1)
    d = ((hi - lo) / top).astype(np.float16)
    d[d == 0] = np.float16(1.0)
    d32 = d.astype(np.float32)
    if bits == 4:
        m = lo.astype(np.float16).astype(np.float32)
        u = np.clip(np.rint((wg - m[..., None]) / d32[..., None]), 0, top)
        return (u - z).astype(np.int8).reshape(n, k), d, (m + z * d32).astype(np.float32)
    best = None
    for shrink in CLIP_SHRINK:   # 3/2 bits: the range per group that minimises the error
        d = np.maximum((hi - lo) * shrink / top, 1e-8).astype(np.float16)
        d[d == 0] = np.float16(1.0)
        d32 = d.astype(np.float32)
        mid = (lo + hi) / 2
        c = (mid - d32 * top / 2 + z * d32).astype(np.float16)
        c32 = c.astype(np.float32)[..., None]
        q = np.clip(np.rint((wg - c32) / d32[..., None]), -z, z - 1)
        err = np.square(q * d32[..., None] + c32 - wg).sum(-1)
        if best is None:
            best = [q, d, c, err]
        else:
            better = err < best[3]
            best[0][better], best[1][better], best[2][better] = q[better], d[better], c[better]
            best[3] = np.minimum(err, best[3])
    return best[0].astype(np.int8).reshape(n, k), best[1], best[2]


CLIP_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


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


def calibration_token_ids(spec: LlmSpec, calibration: str | Sequence[int] | None,
                          what: str) -> list[int]:
    """Token ids of ``calibration`` (token ids, text, or None: :func:`calibration_text`)."""
    if calibration is not None and not isinstance(calibration, str):
        return [int(i) for i in calibration]
    if spec.tokenizer_json is None:
        raise NpuccError(f"{what} calibration text needs a tokenizer, and this model has "
                         f"none: pass calibration token ids")
    from tokenizers import Tokenizer

    return Tokenizer.from_str(spec.tokenizer_json).encode(calibration or calibration_text()).ids


def _hessians(spec: LlmSpec, calibration: str | Sequence[int] | None
              ) -> dict[str, np.ndarray]:
    """Per projection prefix: ``H = 2 X^T X / n`` of its input on the calibration tokens."""
    from compiler.llm.graphs import build_step_graph, sample_graph_inputs
    from passes.quantization.gptq import capture_hessians

    ids = calibration_token_ids(spec, calibration, "GPTQ")
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
