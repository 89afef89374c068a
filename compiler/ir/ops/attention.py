"""Fused multi-head attention of encoders and prompt-sized decoders: ``attention``.

``attention(q, k, v[, mask]){heads, head_dim, scale, causal, q_offset, k_offset, v_offset}``

- ``q`` is ``f32[B, S, Nq]`` and ``k``, ``v`` are ``f32[B, Sk, Nk]``, ``f32[B, Sk, Nv]``: the
  rows the producing dense writes. Head ``h`` of the query is the columns
  ``q_offset + h * head_dim .. + head_dim`` (likewise for ``k``, ``v``), so one fused QKV dense
  can feed all three operands (the same value three times, offsets 0, H·D, 2·H·D) and the head
  split, the transposes and the QKV split of the exported graph are only indexing.
- ``mask`` (optional) is an additive f32 mask ``[Bm, Hm, Sm, Sk]`` broadcast to
  ``[B, H, S, Sk]`` (each of Bm, Hm, Sm is 1 or the full size): BERT's padding mask.
- ``causal``: query ``i`` sees keys ``0 .. i + (Sk - S)`` only (GPT-2's triangle).

Per batch ``b`` and head ``h``::

    s = q_h @ k_h^T * scale + mask[b, h]        (masked keys of a causal row: -inf)
    p = softmax(s) over the keys                (the row max subtracted; a row of -inf gives
                                                 NaN, as softmax does, a NaN score NaN)
    out[b, :, h*D:(h+1)*D] = p @ v_h

so the result is ``f32[B, S, H * head_dim]``, the layout the output projection reads. The
reference computes exactly the unfused chain (matmul, scale, mask add, softmax, matmul) in
float64, which is what ``fuse-attention`` (passes/attention.py) replaces.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.registry import REQUIRED, Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["attention_heads"]


def _columns(t: TensorType, offset: int, heads: int, dim: int, what: str) -> None:
    if t.dtype != "f32" or t.rank != 3:
        raise OpError(f"attention's {what} must be f32[B, S, N], got {t}")
    if offset < 0 or offset + heads * dim > t.shape[2]:
        raise OpError(f"attention's {what} {t} has no columns {offset}..{offset + heads * dim}"
                      f" for {heads} heads of {dim} at {what[0]}_offset={offset}")


def _infer(types, attrs):
    q, k, v = types[:3]
    h, d = attrs["heads"], attrs["head_dim"]
    if h < 1 or d < 1:
        raise OpError(f"attention needs heads >= 1 and head_dim >= 1, got {h} and {d}")
    for t, off, what in ((q, attrs["q_offset"], "query"), (k, attrs["k_offset"], "key"),
                         (v, attrs["v_offset"], "value")):
        _columns(t, off, h, d, what)
    b, s = q.shape[:2]
    if k.shape[:2] != v.shape[:2] or k.shape[0] != b:
        raise OpError(f"attention: key {k} and value {v} must share [B, Sk] with B={b} of the "
                      f"query {q}")
    sk = k.shape[1]
    if attrs["causal"] and sk < s:
        raise OpError(f"attention: causal with fewer keys ({sk}) than queries ({s})")
    if len(types) == 4:
        m = types[3]
        full = (b, h, s, sk)
        if m.dtype != "f32" or m.rank != 4 or m.shape[3] != sk or any(
                x not in (1, f) for x, f in zip(m.shape[:3], full[:3], strict=True)):
            raise OpError(f"attention's mask must be an additive f32[Bm, Hm, Sm, {sk}] with "
                          f"Bm in (1, {b}), Hm in (1, {h}), Sm in (1, {s}), got {m}")
    return [TensorType((b, s, h * d), "f32")]


def attention_heads(x: np.ndarray, offset: int, heads: int, dim: int) -> np.ndarray:
    """The heads of ``x[B, S, N]`` at column ``offset``: ``[B, H, S, D]``."""
    b, s, _ = x.shape
    return x[:, :, offset:offset + heads * dim].reshape(b, s, heads, dim).transpose(0, 2, 1, 3)


def _reference(xs, attrs):
    h, d = attrs["heads"], attrs["head_dim"]
    q = attention_heads(xs[0], attrs["q_offset"], h, d).astype(np.float64)
    k = attention_heads(xs[1], attrs["k_offset"], h, d).astype(np.float64)
    v = attention_heads(xs[2], attrs["v_offset"], h, d).astype(np.float64)
    s = q @ k.transpose(0, 1, 3, 2) * attrs["scale"]
    if len(xs) == 4:
        s = s + xs[3].astype(np.float64)
    if attrs["causal"]:
        sq, sk = s.shape[2:]
        s = np.where(np.triu(np.ones((sq, sk), bool), k=sk - sq + 1), -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    # as softmax's reference: a row of -inf (every key masked) keeps max 0 and gives 0 / 0 =
    # NaN, as onnxruntime; a NaN score makes its row NaN
    e = np.exp(s - np.where(m == -np.inf, 0, m))
    with np.errstate(invalid="ignore"):
        o = (e / e.sum(axis=-1, keepdims=True)) @ v               # [B, H, S, D]
    b, _, sq, _ = o.shape
    return [o.transpose(0, 2, 1, 3).reshape(b, sq, h * d).astype(np.float32)]


register_op(OpDef(
    "attention", (3, 4),
    {"heads": Attr("int", REQUIRED, doc="number of heads H"),
     "head_dim": Attr("int", REQUIRED, doc="columns per head D"),
     "scale": Attr("float", REQUIRED, doc="factor of q.k before the mask"),
     "causal": Attr("bool", False, doc="query i sees keys 0..i + Sk - S"),
     "q_offset": Attr("int", 0, doc="first query column"),
     "k_offset": Attr("int", 0, doc="first key column"),
     "v_offset": Attr("int", 0, doc="first value column")},
    _infer, _reference, family="nn",
    doc="softmax(q k^T * scale + mask) v per head, heads read from and written to [B, S, H*D]"))
