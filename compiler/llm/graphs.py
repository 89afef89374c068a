"""An :class:`LlmSpec` -> the step graph of ``T`` tokens over a static KV cache.

One function builds both graphs a package carries: prefill (``T`` = the chunk) and decode
(``T = 1``). Both read the same weight names, so the compiled kernels read one set of
weights. The graph's interface::

    inputs:  ids i32[T], pos i32[1], then per layer i: k_cache.i, v_cache.i  f32[C, Hkv, Dh]
    outputs: logits f32[T, V], then per layer: the updated k and v caches (``kv_write``)

The runtime binds each cache input and its updated output to one buffer (it owns the cache);
see :mod:`compiler.ir.ops.llm` for the ops' contracts.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.ir.graph import Graph, Value
from compiler.ir.ops.llm import rope_tables
from compiler.ir.types import TensorType
from compiler.llm.hf_import import LlmSpec

__all__ = ["build_step_graph", "cache_names", "quantized_table", "INPUT_IDS", "INPUT_POS", "OUTPUT_LOGITS"]

INPUT_IDS, INPUT_POS, OUTPUT_LOGITS = "ids", "pos", "logits"


def quantized_table(weights) -> str | None:
    """The key of the quantized embedding table (``embed.q8`` i8 or ``embed.q16`` i16, with
    ``embed.row_scales``), None when the table is f32 (``embed``)."""
    return next((k for k in ("embed.q8", "embed.q16") if k in weights), None)


def cache_names(layers: int) -> list[str]:
    """The cache inputs in graph order: k_cache.0, v_cache.0, k_cache.1, ..."""
    return [f"{kv}_cache.{i}" for i in range(layers) for kv in "kv"]


class _Builder:
    def __init__(self, spec: LlmSpec, tokens: int, max_context: int):
        self.s, self.t, self.c = spec, tokens, max_context
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
            offsets = self.w(f"{prefix}.offsets")   # asymmetric groups: w = q d + offset
            extra = [offsets] if offsets is not None else []
            return self.add("dense_wq", x, self.w(f"{prefix}.wq"), self.w(f"{prefix}.scales"),
                            *extra, *bias, bits=bits, group_size=group,
                            asym=offsets is not None)
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
        if any(f"{p}.{part}" not in w for p in prefixes for part in parts):
            return None
        for part in parts:
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
                     fuse: bool = True) -> Graph:
    """The graph of one model step over ``tokens`` tokens (see the module docstring).

    ``fuse``: q, k, v are one projection (weights concatenated along N) followed by a split,
    and so are gate and up (per-call overhead: each GEMV is a parallel launch); GPTQ's
    Hessian capture builds the unfused graph, whose dense nodes name each projection."""
    b = _Builder(spec, tokens, max_context)
    g, s = b.g, spec
    ids = g.add_input(INPUT_IDS, TensorType((tokens,), "i32"))
    pos = g.add_input(INPUT_POS, TensorType((1,), "i32"))
    cshape = TensorType((max_context, s.kv_heads, s.head_dim), "f32")
    caches = [g.add_input(n, cshape) for n in cache_names(s.layers)]
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
        kc = b.add("kv_write", caches[2 * i], k, pos)
        vc = b.add("kv_write", caches[2 * i + 1], v, pos)
        new_caches += [kc, vc]
        a = b.add("cached_attention", q, kc, vc, pos, scale=1.0 / math.sqrt(s.head_dim))
        x = b.add("add", x, b.dense(a, f"l{i}.o"))
        h = b.norm(x, f"l{i}.mlp_norm")
        if s.arch == "gpt2":
            m = b.add("gelu", b.dense(h, f"l{i}.up"), approximate="tanh")
        else:
            m = b.add("silu_mul", *b.dense_split(h, [f"l{i}.gate", f"l{i}.up"], fuse))
        x = b.add("add", x, b.dense(m, f"l{i}.down"))
    x = b.norm(x, "norm")
    table = quantized_table(s.weights)
    if s.tied and table is not None:   # the output projection reads the table itself
        logits = b.add("dense_rows", x, b.w(table), b.w("embed.row_scales"))
    elif s.tied:
        logits = b.add("dense_rows", x, b.w("embed"))
    elif "lm_head" in s.quant:
        logits = b.dense(x, "lm_head")
    else:
        logits = b.add("dense", x, b.w("lm_head"))
    g.outputs = [logits, *new_caches]
    _name_outputs(g, [OUTPUT_LOGITS] + [f"{n}.new" for n in cache_names(s.layers)])
    return g


def _name_outputs(g: Graph, names: list[str]) -> None:
    for v, name in zip(g.outputs, names, strict=True):
        g.claim_name(name)
        v.name = name


def sample_graph_inputs(spec: LlmSpec, tokens: int, max_context: int, ids: np.ndarray,
                        pos: int, caches: list[np.ndarray] | None = None) -> dict:
    """Inputs for the reference interpreter (tests, GPTQ calibration)."""
    shape = (max_context, spec.kv_heads, spec.head_dim)
    caches = caches or [np.zeros(shape, np.float32) for _ in cache_names(spec.layers)]
    feeds = {INPUT_IDS: np.asarray(ids, np.int32).reshape(tokens),
             INPUT_POS: np.array([pos], np.int32)}
    feeds.update(zip(cache_names(spec.layers), caches, strict=True))
    return feeds
