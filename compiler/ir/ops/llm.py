"""Decoder-LLM ops: ``rms_norm``, ``silu_mul``, ``rope``, ``positions``, ``kv_write``,
``cached_attention``, ``dense_rows``, ``embed_rows``.

The static KV cache (DESIGN.md, Language models): every layer has a K and a V cache
``f32[C, Hkv, Dh]`` of ``C = max_context`` positions. A graph takes the caches as inputs and
returns them updated (``kv_write``); the runtime binds a cache and its update to one buffer,
so ``kv_write``'s kernel writes only the rows it changes (its result *is* its first operand,
updated in place). ``pos`` (i32[1]) is the position of the graph's first token; token ``t``
of a chunk is at position ``pos + t``.

``rms_norm(x, w){epsilon}``
    ``x * 1/sqrt(mean(x^2 over the last axis) + eps) * w`` (Llama's RMSNorm), ``w[D]``.
``silu_mul(gate, up)``
    ``gate * sigmoid(gate) * up`` (the SwiGLU of Llama's MLP).
``rope(x, pos, cos, sin)``
    rotary embedding of ``x[T, H, Dh]`` in the rotate-half convention (transformers' Llama,
    Qwen2): with ``c = cos[p, i mod Dh/2]``, ``s = sin[p, i mod Dh/2]`` and
    ``p = min(pos + t, P - 1)`` (``cos``/``sin`` are ``f32[P, Dh/2]`` tables),
    ``y[i] = x[i] c - x[i + Dh/2] s`` for ``i < Dh/2`` and ``y[i] = x[i] c + x[i - Dh/2] s``.
``positions(pos){count, limit}``
    ``i32[count]``: ``min(pos + t, limit - 1)`` (learned position embeddings, GPT-2).
``kv_write(cache, new, pos)``
    ``cache`` with rows ``pos .. pos + T - 1`` replaced by ``new[T, Hkv, Dh]``; rows at or past
    ``C`` are dropped (the padded tail of the last prefill chunk).
``dense_rows(x, table[, row_scales])`` and ``embed_rows(ids, table[, row_scales])``
    a tied embedding table ``[V, D]`` (f32, or i8/i16 with f32 per-row scales) read by both ends
    of the model: ``embed_rows`` looks rows up (``f32(table[ids]) * row_scales[ids]``),
    ``dense_rows`` is the output projection ``x[M, D] @ table^T (* row_scales)``. Their kernels
    read the table in one packed layout (:mod:`targets.kernels.llm`), so the package holds it
    once.
``cached_attention(q, k, v, pos){scale}``
    causal attention of ``q[T, Hq, Dh]`` over the caches ``k, v[C, Hkv, Dh]`` (grouped-query:
    head ``h`` reads kv head ``h // (Hq / Hkv)``): query ``t`` attends positions
    ``0 .. min(pos + t, C - 1)``; result ``[T, Hq * Dh]``. Padding needs no mask of its own:
    padded tokens come after every real one, so the causal rule hides them.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.registry import REQUIRED, Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["rope_tables", "attention_reference"]


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` f32 ``[positions, head_dim/2]`` as transformers computes them (inverse
    frequencies and angles in f32)."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    ang = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _f32(t: TensorType, what: str) -> None:
    if t.dtype != "f32":
        raise OpError(f"{what} must be f32, got {t}")


def _pos(t: TensorType, op: str) -> None:
    if t.dtype != "i32" or t.shape != (1,):
        raise OpError(f"{op}: pos must be i32[1] (the first token's position), got {t}")


# -- rms_norm, silu_mul ---------------------------------------------------------------------
def _rms_infer(types, attrs):
    x, w = types
    _f32(x, "rms_norm's input")
    if x.rank < 1 or w.shape != (x.shape[-1],) or w.dtype != "f32":
        raise OpError(f"rms_norm: weight must be f32[{x.shape[-1] if x.rank else '?'}], "
                      f"got {w} for input {x}")
    return [x]


def _rms_ref(xs, attrs):
    x, w = xs
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return [(x / np.sqrt(var + np.float32(attrs["epsilon"])) * w).astype(np.float32)]


register_op(OpDef("rms_norm", (2, 2), {"epsilon": Attr("float", 1e-6)}, _rms_infer, _rms_ref,
                  family="llm", doc="x / sqrt(mean(x^2) + eps) * w over the last axis"))


def _silu_mul_infer(types, attrs):
    g, u = types
    _f32(g, "silu_mul's gate")
    if g != u:
        raise OpError(f"silu_mul: gate {g} and up {u} must have one type")
    return [g]


def _silu_mul_ref(xs, attrs):
    g, u = (x.astype(np.float64) for x in xs)
    return [(g / (1.0 + np.exp(-g)) * u).astype(np.float32)]


register_op(OpDef("silu_mul", (2, 2), {}, _silu_mul_infer, _silu_mul_ref, inplace=True,
                  family="llm", doc="gate * sigmoid(gate) * up"))


# -- rope, positions --------------------------------------------------------------------------
def _rope_infer(types, attrs):
    x, pos, cos, sin = types
    _f32(x, "rope's input")
    _pos(pos, "rope")
    if x.rank != 3 or x.shape[2] % 2:
        raise OpError(f"rope takes x[T, H, Dh] with an even Dh, got {x}")
    half = x.shape[2] // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != "f32" or t.rank != 2 or t.shape[1] != half:
            raise OpError(f"rope: {name} must be f32[P, {half}], got {t}")
    if cos.shape != sin.shape:
        raise OpError(f"rope: cos {cos} and sin {sin} differ")
    return [x]


def _rope_ref(xs, attrs):
    x, pos, cos, sin = xs
    t_, _, dh = x.shape
    half = dh // 2
    p = np.minimum(int(pos[0]) + np.arange(t_), cos.shape[0] - 1)
    c = np.concatenate([cos[p], cos[p]], axis=-1)[:, None, :]
    s = np.concatenate([sin[p], sin[p]], axis=-1)[:, None, :]
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return [(x * c + rot * s).astype(np.float32)]


register_op(OpDef("rope", (4, 4), {}, _rope_infer, _rope_ref, family="llm",
                  doc="rotary position embedding (rotate-half) at positions pos + t"))


def _positions_infer(types, attrs):
    _pos(types[0], "positions")
    if attrs["count"] < 1 or attrs["limit"] < 1:
        raise OpError(f"positions: count and limit must be >= 1, got {attrs}")
    return [TensorType((attrs["count"],), "i32")]


def _positions_ref(xs, attrs):
    p = int(xs[0][0]) + np.arange(attrs["count"])
    return [np.minimum(p, attrs["limit"] - 1).astype(np.int32)]


register_op(OpDef("positions", (1, 1), {"count": Attr("int", REQUIRED),
                                        "limit": Attr("int", REQUIRED)},
                  _positions_infer, _positions_ref, family="llm",
                  doc="min(pos + arange(count), limit - 1)"))


# -- kv_write, cached_attention -----------------------------------------------------------------
def _kv_write_infer(types, attrs):
    cache, new, pos = types
    _f32(cache, "kv_write's cache")
    _pos(pos, "kv_write")
    if cache.rank != 3 or new.rank != 3 or new.shape[1:] != cache.shape[1:] \
            or new.dtype != cache.dtype:
        raise OpError(f"kv_write: new rows must be f32[T, {', '.join(map(str, cache.shape[1:]))}]"
                      f" for cache {cache}, got {new}")
    return [cache]


def _kv_write_ref(xs, attrs):
    cache, new, pos = xs
    out = cache.copy()
    p = int(pos[0])
    n = max(0, min(new.shape[0], cache.shape[0] - p))
    if p >= 0:
        out[p:p + n] = new[:n]
    return [out]


register_op(OpDef("kv_write", (3, 3), {}, _kv_write_infer, _kv_write_ref, family="llm",
                  doc="the KV cache with rows pos.. replaced (in place in the runtime)"))


def _attn_infer(types, attrs):
    q, k, v, pos = types
    _f32(q, "cached_attention's q")
    _pos(pos, "cached_attention")
    if q.rank != 3 or k.rank != 3 or k != v or k.shape[2] != q.shape[2] or k.dtype != "f32":
        raise OpError(f"cached_attention takes q[T, Hq, Dh] and caches k, v[C, Hkv, Dh], got "
                      f"{q}, {k}, {v}")
    if q.shape[1] % k.shape[1]:
        raise OpError(f"cached_attention: {q.shape[1]} query heads are not a multiple of "
                      f"{k.shape[1]} kv heads")
    return [TensorType((q.shape[0], q.shape[1] * q.shape[2]), "f32")]


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int,
                        scale: float) -> np.ndarray:
    """``cached_attention``'s numpy reference over f32 caches ``k, v[C, Hkv, Dh]``:
    ``[T, Hq * Dh]``."""
    t_, hq, dh = q.shape
    c, hkv, _ = k.shape
    rep = hq // hkv
    out = np.zeros((t_, hq, dh), np.float32)
    for t in range(t_):
        n = min(int(pos) + t, c - 1) + 1
        kk = np.repeat(k[:n], rep, axis=1).astype(np.float64)   # [n, Hq, Dh]
        vv = np.repeat(v[:n], rep, axis=1).astype(np.float64)
        s = np.einsum("hd,nhd->hn", q[t].astype(np.float64), kk) * scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[t] = np.einsum("hn,nhd->hd", p, vv)
    return out.reshape(t_, hq * dh)


def _attn_ref(xs, attrs):
    q, k, v, pos = xs
    return [attention_reference(q, k, v, int(pos[0]), attrs["scale"])]


register_op(OpDef("cached_attention", (4, 4), {"scale": Attr("float", REQUIRED)}, _attn_infer,
                  _attn_ref, family="llm",
                  doc="causal grouped-query attention over a static KV cache"))


# -- dense_rows -------------------------------------------------------------------------------
def _dense_rows_infer(types, attrs):
    x, w = types[0], types[1]
    _f32(x, "dense_rows' x")
    if x.rank != 2 or w.rank != 2 or w.shape[1] != x.shape[1] \
            or w.dtype not in ("f32", "i8", "i16"):
        raise OpError(f"dense_rows takes x[M, K] and an f32, i8 or i16 w[N, K], got {x}, {w}")
    if (w.dtype != "f32") != (len(types) == 3):
        raise OpError("dense_rows: an i8/i16 weight needs f32 row scales, an f32 one none")
    if len(types) == 3 and (types[2].shape != (w.shape[0],) or types[2].dtype != "f32"):
        raise OpError(f"dense_rows: row scales must be f32[{w.shape[0]}], got {types[2]}")
    return [TensorType((x.shape[0], w.shape[0]), "f32")]


def _dense_rows_ref(xs, attrs):
    x, w = xs[0], xs[1].astype(np.float32)
    y = x.astype(np.float32) @ w.T
    if len(xs) == 3:
        y = y * xs[2][None, :]
    return [y.astype(np.float32)]


register_op(OpDef("dense_rows", (2, 3), {}, _dense_rows_infer, _dense_rows_ref, family="llm",
                  doc="x @ table^T over a tied embedding table (f32, or i8 + row scales)"))


def _embed_rows_infer(types, attrs):
    ids, table = types[0], types[1]
    if ids.dtype != "i32" or ids.rank != 1:
        raise OpError(f"embed_rows takes ids i32[T], got {ids}")
    if table.rank != 2 or table.dtype not in ("f32", "i8", "i16"):
        raise OpError(f"embed_rows takes an f32, i8 or i16 table [V, D], got {table}")
    if (table.dtype != "f32") != (len(types) == 3):
        raise OpError("embed_rows: an i8/i16 table needs f32 row scales, an f32 one none")
    if len(types) == 3 and (types[2].shape != (table.shape[0],) or types[2].dtype != "f32"):
        raise OpError(f"embed_rows: row scales must be f32[{table.shape[0]}], got {types[2]}")
    return [TensorType((ids.shape[0], table.shape[1]), "f32")]


def _embed_rows_ref(xs, attrs):
    ids, table = xs[0].astype(np.int64), xs[1]
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise OpError(f"embed_rows: a token id is outside [0, {v})")
    rows = table[ids].astype(np.float32)
    if len(xs) == 3:
        rows = rows * xs[2][ids][:, None]
    return [rows]


register_op(OpDef("embed_rows", (2, 3), {}, _embed_rows_infer, _embed_rows_ref, family="llm",
                  doc="rows of a tied embedding table (f32, or i8 + row scales)"))
