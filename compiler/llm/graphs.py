"""An :class:`LlmSpec` -> the step graph of ``T`` tokens over a static KV cache.

One function builds both graphs a package carries: prefill (``T`` = the chunk) and decode
(``T = 1``). Both read the same weight names, so the compiled kernels read one set of
weights. The graph's interface::

    inputs:  ids i32[T], pos i32[1], then per layer i: k_cache.i, v_cache.i  f32[C, Hkv, Dh]
    outputs: logits f32[T, V], then per layer: the updated k and v caches (``kv_write``)

The runtime binds each cache input and its updated output to one buffer (it owns the cache);
see :mod:`compiler.ir.ops.llm` for the ops' contracts.

A quantized KV cache (``kv_cache="int8"`` or ``"k4v8"``, :data:`KV_CACHES`) replaces each
f32 cache by the tensors of :func:`compiler.ir.ops.llm_kv.kv_tensor_types` (codes, scales and,
for 4-bit keys, mins: ``k_cache.i, k_scales.i, k_mins.i, v_cache.i, v_scales.i``), written by
``kv_write_q`` (which quantizes the new rows) and read by ``cached_attention_q``.

4-bit keys are rotated first (``k4v8`` when head_dim is a power of two): q and k, after RoPE,
are multiplied by one orthonormal Hadamard matrix ``H`` (``q.k = qH.kH``, so attention is
unchanged in exact arithmetic), which spreads the few large key channels over the whole
head before the per-token groups are quantized (QuaRot, Ashkboos et al. 2024). Measured on
SmolLM2 (bench/llm_decode.py): without it K4 costs +12.9% perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Value
from compiler.ir.ops.llm import rope_tables
from compiler.ir.ops.llm_kv import kv_tensor_types
from compiler.ir.ops.quant_weight import ACT_BLOCK
from compiler.ir.types import TensorType
from compiler.llm.hf_import import LlmSpec

__all__ = ["build_step_graph", "cache_names", "cache_types", "quantized_table",
           "check_kv_cache", "kv_cache_layout", "hadamard", "KvCacheLayout", "KV_CACHES", "INPUT_IDS", "INPUT_POS",
           "OUTPUT_LOGITS", "DECODE_ACTIVATIONS", "check_decode_activations"]

INPUT_IDS, INPUT_POS, OUTPUT_LOGITS = "ids", "pos", "logits"


def quantized_table(weights) -> str | None:
    """The key of the quantized embedding table (``embed.q8`` i8 or ``embed.q16`` i16, with
    ``embed.row_scales``), None when the table is f32 (``embed``)."""
    return next((k for k in ("embed.q8", "embed.q16") if k in weights), None)


# name -> (K bits, K group, V bits, V group); groups are capped at the head size
KV_CACHES = {
    "f32": None,
    "int8": (8, 32, 8, 32),    # llama.cpp --cache-type-k q8_0 --cache-type-v q8_0
    "k4v8": (4, 64, 8, 128),   # the seed's K int4 g64 / V int8 g128 (per head if Dh < 128)
}


@dataclass(frozen=True)
class KvCacheLayout:
    """A quantized KV cache: bits and group sizes along head_dim of K and V (4 bits are
    asymmetric, 8 bits symmetric: :mod:`compiler.ir.ops.llm_kv`)."""
    name: str
    k_bits: int
    k_group: int
    v_bits: int
    v_group: int
    k_rotate: bool = False   # q and k multiplied by an orthonormal Hadamard matrix

    def describe(self) -> dict:
        """The manifest's record of the layout."""
        return {"k_bits": self.k_bits, "k_group": self.k_group, "k_asym": self.k_bits == 4,
                "k_rotation": "hadamard" if self.k_rotate else None,
                "v_bits": self.v_bits, "v_group": self.v_group, "v_asym": self.v_bits == 4,
                "scales": "f32 per token and group, computed by the kernel that writes"}


# the decode graph's input to its int4 projections -> dense_wq act_bits
DECODE_ACTIVATIONS = {"f32": 0, "int8": 8}


def check_decode_activations(value: str | None) -> int:
    """``act_bits`` for a ``decode_activations`` name (None: ``"f32"``); an error naming the
    valid ones otherwise."""
    if value is None:
        return 0
    if value not in DECODE_ACTIVATIONS:
        raise NpuccError(f"unknown decode activations {value!r}: use f32 (the projections read "
                         f"the f32 input) or int8 (int4 projections quantize their input to "
                         f"int8 per block of 32 and take integer dot products, like llama.cpp's "
                         f"Q4 x Q8; faster on CPUs with VNNI, logits within ~1%)")
    return DECODE_ACTIVATIONS[value]


def _group(want: int, head_dim: int) -> int:
    """The largest even divisor of ``head_dim`` not above ``want``."""
    g = min(want, head_dim)
    while g > 2 and (head_dim % g or g % 2):
        g -= 1
    return g


def check_kv_cache(kv_cache: str | None) -> str:
    """``kv_cache`` (None: ``"f32"``) if it is one of :data:`KV_CACHES`; an error naming the
    valid ones otherwise."""
    if kv_cache is None:
        return "f32"
    if kv_cache not in KV_CACHES:
        raise NpuccError(f"unknown KV cache type {kv_cache!r}: use one of "
                         f"{', '.join(KV_CACHES)} (f32: float; int8: K and V int8 in groups "
                         f"of 32, like llama.cpp's q8_0; k4v8: K int4 in groups of 64, V int8 "
                         f"in groups of 128, or per head when head_dim < 128)")
    return kv_cache


def kv_cache_layout(kv_cache: str | None, head_dim: int) -> KvCacheLayout | None:
    """The layout of ``kv_cache`` (one of :data:`KV_CACHES`) for heads of ``head_dim``; None
    for the f32 cache. An unknown name is refused with the valid ones."""
    bits = KV_CACHES[check_kv_cache(kv_cache)]
    if bits is None:
        return None
    kb, kg, vb, vg = bits
    pow2 = head_dim & (head_dim - 1) == 0
    return KvCacheLayout(kv_cache, kb, _group(kg, head_dim), vb, _group(vg, head_dim),
                         k_rotate=kb == 4 and pow2)


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Hadamard matrix of order ``n`` (a power of two; Sylvester's
    construction), f32, symmetric: its own inverse."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def _layer_cache_names(i: int, layout: KvCacheLayout | None) -> list[str]:
    if layout is None:
        return [f"k_cache.{i}", f"v_cache.{i}"]
    k = [f"k_cache.{i}", f"k_scales.{i}"] + ([f"k_mins.{i}"] if layout.k_bits == 4 else [])
    return k + [f"v_cache.{i}", f"v_scales.{i}"] + ([f"v_mins.{i}"] if layout.v_bits == 4
                                                   else [])


def cache_names(layers: int, layout: KvCacheLayout | None = None) -> list[str]:
    """The cache inputs in graph order: k_cache.0, v_cache.0, k_cache.1, ... (a quantized
    cache: k_cache.0, k_scales.0, [k_mins.0,] v_cache.0, v_scales.0, k_cache.1, ...)."""
    return [n for i in range(layers) for n in _layer_cache_names(i, layout)]


def cache_types(spec: LlmSpec, max_context: int, layout: KvCacheLayout | None = None
                ) -> dict[str, TensorType]:
    """Every cache tensor's name and type, in graph order."""
    c, h, d = max_context, spec.kv_heads, spec.head_dim
    if layout is None:
        one = [TensorType((c, h, d), "f32")] * 2
    else:
        one = (kv_tensor_types(c, h, d, layout.k_bits, layout.k_group)
               + kv_tensor_types(c, h, d, layout.v_bits, layout.v_group))
    return dict(zip(cache_names(spec.layers, layout), one * spec.layers, strict=True))


class _Builder:
    def __init__(self, spec: LlmSpec, tokens: int, max_context: int, act_bits: int = 0):
        self.s, self.t, self.c = spec, tokens, max_context
        self.act_bits = act_bits
        self.g = Graph(f"{spec.name}_t{tokens}")
        self._consts: dict[str, Value] = {}
        self.weights = dict(spec.weights)   # + fused projections (never the spec's own dict)
        self.quant = dict(spec.quant)

    def w(self, name: str) -> Value | None:
        """The const value of weight ``name`` (one const node per weight), None if absent."""
        if name not in self._consts:
            arr = self.weights.get(name)
            if arr is None:
                return None
            self.g.weights[name] = arr
            self._consts[name] = self.g.make_node("const", [], {"ref": name},
                                                  types=[TensorType.of(arr)],
                                                  out_names=[name]).output
        return self._consts[name]

    def add(self, op: str, *xs: Value, **attrs) -> Value:
        return self.g.add(op, *xs, **attrs)

    def dense(self, x: Value, prefix: str) -> Value:
        b = self.w(f"{prefix}.b")
        bias = [b] if b is not None else []
        if prefix in self.quant:
            bits, group = self.quant[prefix]
            if f"{prefix}.idx" in self.weights:   # 2:4 sparse int4 (compiler.llm.sparse)
                return self.add("dense_wq24", x, self.w(f"{prefix}.wq"), self.w(f"{prefix}.idx"),
                                self.w(f"{prefix}.scales"), *bias, group_size=group)
            offsets = self.w(f"{prefix}.offsets")   # asymmetric groups: w = q d + offset
            extra = [offsets] if offsets is not None else []
            k = int(self.weights[f"{prefix}.wq"].shape[1]) * 8 // bits
            act = {"act_bits": self.act_bits} if self.act_bits and bits == 4 \
                and k % ACT_BLOCK == 0 and group % ACT_BLOCK == 0 else {}
            return self.add("dense_wq", x, self.w(f"{prefix}.wq"), self.w(f"{prefix}.scales"),
                            *extra, *bias, bits=bits, group_size=group,
                            asym=offsets is not None, **act)
        return self.add("dense", x, self.w(f"{prefix}.w"), *bias)

    def fused(self, prefixes: list[str]) -> str | None:
        """Weights of projections that read one input, concatenated along N under a new
        prefix (``l0.q+k+v``), when they share one scheme; None when they do not. Rows are
        quantized independently (RTN, asymmetric and GPTQ alike: one Hessian per input), so
        the concatenation holds the very same codes and scales: one GEMV call instead of
        several, the same arithmetic per output."""
        w, name = self.weights, "+".join(prefixes)
        if len({self.quant.get(p) for p in prefixes}) != 1:
            return None
        parts = ["wq", "scales"] if prefixes[0] in self.quant else ["w"]
        has_offsets = [f"{p}.offsets" in w for p in prefixes]
        if any(has_offsets) and not all(has_offsets):
            return None
        parts += ["offsets"] if all(has_offsets) else []
        has_idx = [f"{p}.idx" in w for p in prefixes]   # 2:4 sparse: all or none
        if any(has_idx) and not all(has_idx):
            return None
        parts += ["idx"] if all(has_idx) else []
        if any(f"{p}.{part}" not in w for p in prefixes for part in parts):
            return None
        for part in parts:   # a streamed spec (compiler.llm.stream) holds them concatenated
            if f"{name}.{part}" not in w:
                w[f"{name}.{part}"] = np.concatenate([w[f"{p}.{part}"] for p in prefixes])
        if any(f"{p}.b" in w for p in prefixes):
            w[f"{name}.b"] = np.concatenate(
                [w.get(f"{p}.b", np.zeros(len(w[f"{p}.{parts[0]}"]), np.float32))
                 for p in prefixes]).astype(np.float32)
        if prefixes[0] in self.quant:
            self.quant[name] = self.quant[prefixes[0]]
        return name

    def dense_split(self, x: Value, prefixes: list[str], fuse: bool) -> list[Value]:
        """``dense`` of each projection of ``x``: one fused GEMV and a split when ``fuse``."""
        name = self.fused(prefixes) if fuse else None
        if name is None:
            return [self.dense(x, p) for p in prefixes]
        key = "wq" if name in self.quant else "w"
        sizes = [int(self.weights[f"{p}.{key}"].shape[0]) for p in prefixes]
        y = self.dense(x, name)
        return list(self.g.make_node("split", [y], {"axis": -1, "sizes": sizes}).outputs)

    def embed(self, ids: Value) -> Value:
        if "embed" in self.quant:   # group-wise int4/3/2 rows (compiler.ir.ops.embed_q)
            bits, group = self.quant["embed"]
            off = self.w("embed.offsets")
            return self.add("embed_wq", ids, self.w("embed.wq"), self.w("embed.scales"),
                            *([off] if off is not None else []), bits=bits, group_size=group,
                            asym=off is not None)
        table = quantized_table(self.s.weights)
        if self.s.tied:   # the output projection reads the same table: one packed layout
            if table is not None:
                return self.add("embed_rows", ids, self.w(table), self.w("embed.row_scales"))
            return self.add("embed_rows", ids, self.w("embed"))
        if table is not None:
            return self.add("gather_q", self.w(table), self.w("embed.row_scales"), ids)
        return self.add("gather", self.w("embed"), ids, axis=0)

    def norm(self, x: Value, prefix: str) -> Value:
        if self.s.arch == "gpt2":
            return self.add("layer_norm", x, self.w(f"{prefix}.w"), self.w(f"{prefix}.b"),
                            epsilon=self.s.eps)
        return self.add("rms_norm", x, self.w(f"{prefix}.w"), epsilon=self.s.eps)


def build_step_graph(spec: LlmSpec, tokens: int, max_context: int, *,
                     fuse: bool = True, kv_cache: KvCacheLayout | None = None,
                     act_bits: int = 0) -> Graph:
    """The graph of one model step over ``tokens`` tokens (see the module docstring).

    ``fuse``: q, k, v are one projection (weights concatenated along N) followed by a split,
    and so are gate and up (per-call overhead: each GEMV is a parallel launch); GPTQ's
    Hessian capture builds the unfused graph, whose dense nodes name each projection.
    ``kv_cache``: the quantized cache's layout (:func:`kv_cache_layout`), None for f32.
    ``act_bits=8``: the int4 projections (K and group multiples of 32) quantize their input
    to int8 blocks of 32 (``dense_wq{act_bits=8}``: integer dot products, as llama.cpp's Q4 x
    Q8; :data:`DECODE_ACTIVATIONS`)."""
    b = _Builder(spec, tokens, max_context, act_bits)
    g, s = b.g, spec
    ids = g.add_input(INPUT_IDS, TensorType((tokens,), "i32"))
    pos = g.add_input(INPUT_POS, TensorType((1,), "i32"))
    ctypes = cache_types(s, max_context, kv_cache)
    caches = [g.add_input(n, t) for n, t in ctypes.items()]
    per_layer = len(caches) // s.layers
    x = b.embed(ids)
    rope = None
    if s.arch == "gpt2":
        where = b.add("positions", pos, count=tokens, limit=s.max_positions)
        x = b.add("add", x, b.add("gather", b.w("pos_embed"), where, axis=0))
    else:
        cos, sin = rope_tables(max_context, s.head_dim, s.rope_theta)
        rope = (g.add_weight("rope.cos", cos), g.add_weight("rope.sin", sin))
    new_caches: list[Value] = []
    for i in range(s.layers):
        h = b.norm(x, f"l{i}.attn_norm")
        q, k, v = b.dense_split(h, [f"l{i}.q", f"l{i}.k", f"l{i}.v"], fuse)
        q = b.add("reshape", q, shape=[tokens, s.heads, s.head_dim])
        k = b.add("reshape", k, shape=[tokens, s.kv_heads, s.head_dim])
        v = b.add("reshape", v, shape=[tokens, s.kv_heads, s.head_dim])
        if rope is not None:
            q = b.add("rope", q, pos, *rope)
            k = b.add("rope", k, pos, *rope)
        layer = caches[per_layer * i:per_layer * (i + 1)]
        a, written = _attention(b, q, k, v, pos, layer, kv_cache)
        new_caches += written
        x = b.add("add", x, b.dense(a, f"l{i}.o"))
        h = b.norm(x, f"l{i}.mlp_norm")
        if s.arch == "gpt2":
            m = b.add("gelu", b.dense(h, f"l{i}.up"), approximate="tanh")
        else:
            m = b.add("silu_mul", *b.dense_split(h, [f"l{i}.gate", f"l{i}.up"], fuse))
        x = b.add("add", x, b.dense(m, f"l{i}.down"))
    x = b.norm(x, "norm")
    table = quantized_table(s.weights)
    if s.tied and "embed" in s.quant:   # dense_wq over embed_wq's arrays: one copy
        logits = b.dense(x, "embed")
    elif s.tied and table is not None:   # the output projection reads the table itself
        logits = b.add("dense_rows", x, b.w(table), b.w("embed.row_scales"))
    elif s.tied:
        logits = b.add("dense_rows", x, b.w("embed"))
    elif "lm_head" in s.quant:
        logits = b.dense(x, "lm_head")
    else:
        logits = b.add("dense", x, b.w("lm_head"))
    g.outputs = [logits, *new_caches]
    _name_outputs(g, [OUTPUT_LOGITS] + [f"{n}.new" for n in ctypes])
    return g


def _attention(b: _Builder, q: Value, k: Value, v: Value, pos: Value, layer: list[Value],
               kv: KvCacheLayout | None) -> tuple[Value, list[Value]]:
    """Write this step's k and v rows into the layer's cache tensors, attend over them:
    (the attention result, the updated cache tensors in graph order)."""
    scale = 1.0 / math.sqrt(b.s.head_dim)
    if kv is not None and kv.k_rotate:
        q, k = _rotate(b, q), _rotate(b, k)
    if kv is None:
        kc = b.add("kv_write", layer[0], k, pos)
        vc = b.add("kv_write", layer[1], v, pos)
        return b.add("cached_attention", q, kc, vc, pos, scale=scale), [kc, vc]
    nk = 3 if kv.k_bits == 4 else 2
    kc = list(b.g.make_node("kv_write_q", [*layer[:nk], k, pos],
                            {"bits": kv.k_bits, "group": kv.k_group}).outputs)
    vc = list(b.g.make_node("kv_write_q", [*layer[nk:], v, pos],
                            {"bits": kv.v_bits, "group": kv.v_group}).outputs)
    a = b.add("cached_attention_q", q, *kc, *vc, pos, scale=scale, k_bits=kv.k_bits,
              k_group=kv.k_group, v_bits=kv.v_bits, v_group=kv.v_group)
    return a, kc + vc


def _rotate(b: _Builder, x: Value) -> Value:
    """``x[T, H, Dh]`` times the Hadamard matrix along Dh (one small dense over T*H rows)."""
    t, h, d = x.type.shape
    if "kv.hadamard" not in b._consts:
        b._consts["kv.hadamard"] = b.g.add_weight("kv.hadamard", hadamard(d))
    flat = b.add("reshape", x, shape=[t * h, d])
    return b.add("reshape", b.add("dense", flat, b._consts["kv.hadamard"]), shape=[t, h, d])


def _name_outputs(g: Graph, names: list[str]) -> None:
    for v, name in zip(g.outputs, names, strict=True):
        g.claim_name(name)
        v.name = name


def sample_graph_inputs(spec: LlmSpec, tokens: int, max_context: int, ids: np.ndarray,
                        pos: int, caches: list[np.ndarray] | None = None,
                        kv_cache: KvCacheLayout | None = None) -> dict:
    """Inputs for the reference interpreter (tests, GPTQ calibration)."""
    ctypes = cache_types(spec, max_context, kv_cache)
    caches = caches or [np.zeros(t.shape, t.np_dtype) for t in ctypes.values()]
    feeds = {INPUT_IDS: np.asarray(ids, np.int32).reshape(tokens),
             INPUT_POS: np.array([pos], np.int32)}
    feeds.update(zip(ctypes, caches, strict=True))
    return feeds
