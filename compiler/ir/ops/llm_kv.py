"""The quantized static KV cache: ``kv_write_q`` and ``cached_attention_q``.

A quantized cache of ``C`` positions, ``Hkv`` kv heads and head size ``Dh`` is two or three
tensors, quantized per token in groups of ``group`` values along ``Dh`` (the groups never
span two heads: ``group`` divides ``Dh``):

- 8 bits, symmetric: ``codes i8[C, Hkv, Dh]``, ``scales f32[C, Hkv, Dh/group]``;
  ``x ~ code * scale`` with ``scale = max|x| / 127`` (llama.cpp's ``q8_0`` rule).
- 4 bits, asymmetric: ``codes u8[C, Hkv, Dh/2]`` (two codes a byte: byte ``j`` of a group
  holds value ``j`` in its low nibble and value ``j + group/2`` in its high one),
  ``scales f32[C, Hkv, Dh/group]`` and ``mins f32[C, Hkv, Dh/group]``;
  ``x ~ code * scale + min`` with ``scale = (max - min) / 15``, codes ``0..15``.
  Asymmetric because a key group is rarely centred on zero (RoPE'd keys carry channels with
  a large offset of one sign); a symmetric 4-bit grid would spend half its 15 levels on the
  side that is not used. 8 bits have levels to spare, so they stay symmetric (one multiply).

Codes are rounded to nearest, ties to even (``np.rint``, ``llvm.nearbyint``), with the
reciprocal of the scale (``x * (1 / scale)``): :func:`quantize_kv_rows` is the exact rule
the write kernel follows, so its codes and scales equal the kernel's bit for bit.

``kv_write_q(codes, scales[, mins], new, pos){bits, group}``
    quantizes ``new f32[T, Hkv, Dh]`` and writes it at rows ``pos .. pos + T - 1`` of the
    cache tensors (rows at or past ``C`` are dropped); results: the cache tensors, updated
    (the runtime binds each to its operand's buffer: in place, like ``kv_write``).
``cached_attention_q(q, kcodes, kscales[, kmins], vcodes, vscales, pos){scale, k_bits,
k_group, v_bits, v_group}``
    ``cached_attention`` over a quantized K cache (4 or 8 bits) and an 8-bit V cache, the
    cache read as stored (dequantized in registers, never copied to floats).
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.llm import attention_reference
from compiler.ir.registry import REQUIRED, Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["quantize_kv_rows", "dequantize_kv_rows", "kv_tensor_types", "split_attention_inputs"]


def kv_tensor_types(c: int, hkv: int, dh: int, bits: int, group: int) -> list[TensorType]:
    """The tensors of one quantized cache: codes, scales and (4 bits) mins."""
    if bits not in (4, 8):
        raise OpError(f"a quantized KV cache has 4 or 8 bits, got {bits}")
    if group < 2 or group % 2 or dh % group:
        raise OpError(f"KV group size {group} must be even and divide the head size {dh}")
    codes = TensorType((c, hkv, dh), "i8") if bits == 8 else TensorType((c, hkv, dh // 2), "u8")
    side = TensorType((c, hkv, dh // group), "f32")
    return [codes, side] + ([side] if bits == 4 else [])


def quantize_kv_rows(x: np.ndarray, bits: int, group: int) -> list[np.ndarray]:
    """``x f32[T, H, Dh]`` -> the cache tensors of its T rows (the kernel's rule, bit for bit):
    ``[codes, scales]`` (8 bits) or ``[codes, scales, mins]`` (4 bits)."""
    x = np.asarray(x, np.float32)
    t, h, dh = x.shape
    xg = x.reshape(t, h, dh // group, group)
    if bits == 8:
        d = (np.abs(xg).max(axis=-1) / np.float32(127)).astype(np.float32)
        lo, top = np.zeros_like(d), 127
    else:
        lo, hi = xg.min(axis=-1), xg.max(axis=-1)
        d = ((hi - lo) / np.float32(15)).astype(np.float32)
        top = 15
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint((xg - lo[..., None]) * inv[..., None])
    q = np.clip(q, -top if bits == 8 else 0, top)
    if bits == 8:
        return [q.astype(np.int8).reshape(t, h, dh), d]
    q = q.astype(np.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return [packed.reshape(t, h, dh // 2), d, lo.astype(np.float32)]


def dequantize_kv_rows(tensors: list[np.ndarray], bits: int, group: int) -> np.ndarray:
    """The f32 rows ``[T, H, Dh]`` a quantized cache stands for."""
    codes, scales = tensors[0], tensors[1]
    t, h, g = scales.shape
    if bits == 8:
        q = codes.reshape(t, h, g, group).astype(np.float32)
        return (q * scales[..., None]).reshape(t, h, g * group)
    b = codes.reshape(t, h, g, group // 2)
    q = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.float32)
    return (q * scales[..., None] + tensors[2][..., None]).reshape(t, h, g * group)


def _pos(t: TensorType, op: str) -> None:
    if t.dtype != "i32" or t.shape != (1,):
        raise OpError(f"{op}: pos must be i32[1] (the first token's position), got {t}")


def _check_cache(op: str, given: list[TensorType], new: TensorType, bits: int, group: int
                 ) -> None:
    if new.rank != 3 or new.dtype != "f32" or not given or given[0].rank != 3:
        raise OpError(f"{op}: rows must be f32[T, Hkv, Dh] and the cache rank 3, got {new}, "
                      f"{given}")
    c, hkv, dh = given[0].shape[0], new.shape[1], new.shape[2]
    want = kv_tensor_types(c, hkv, dh, bits, group)
    if list(given) != want:
        raise OpError(f"{op}: a {bits}-bit cache of groups of {group} for rows {new} is "
                      f"{', '.join(map(str, want))}; got {', '.join(map(str, given))}")


# -- kv_write_q ---------------------------------------------------------------------------------
def _write_infer(types, attrs):
    *cache, new, pos = types
    _pos(pos, "kv_write_q")
    _check_cache("kv_write_q", cache, new, attrs["bits"], attrs["group"])
    return list(cache)


def _write_ref(xs, attrs):
    *cache, new, pos = xs
    outs = [a.copy() for a in cache]
    p = int(pos[0])
    n = max(0, min(new.shape[0], cache[0].shape[0] - p))
    if p >= 0 and n:
        for o, r in zip(outs, quantize_kv_rows(new[:n], attrs["bits"], attrs["group"]),
                        strict=True):
            o[p:p + n] = r
    return outs


register_op(OpDef("kv_write_q", (4, 5), {"bits": Attr("int", REQUIRED),
                                         "group": Attr("int", REQUIRED)},
                  _write_infer, _write_ref, family="llm",
                  doc="quantize rows per token and write them into a quantized KV cache"))


# -- cached_attention_q -----------------------------------------------------------------------
def split_attention_inputs(xs: list, k_bits: int) -> tuple:
    """``(q, k tensors, v tensors, pos)`` of a ``cached_attention_q`` operand list."""
    nk = 3 if k_bits == 4 else 2
    return xs[0], list(xs[1:1 + nk]), list(xs[1 + nk:-1]), xs[-1]


def _attn_infer(types, attrs):
    if len(types) != (7 if attrs["k_bits"] == 4 else 6):
        raise OpError(f"cached_attention_q with {attrs['k_bits']}-bit keys takes "
                      f"{7 if attrs['k_bits'] == 4 else 6} operands, got {len(types)}")
    q, kt, vt, pos = split_attention_inputs(types, attrs["k_bits"])
    _pos(pos, "cached_attention_q")
    if q.rank != 3 or q.dtype != "f32" or kt[0].rank != 3 or vt[0].rank != 3:
        raise OpError(f"cached_attention_q takes q f32[T, Hq, Dh], got {q}")
    rows = TensorType((1, kt[0].shape[1], q.shape[2]), "f32")
    _check_cache("cached_attention_q (keys)", kt, rows, attrs["k_bits"], attrs["k_group"])
    if attrs["v_bits"] != 8:
        raise OpError(f"cached_attention_q reads an 8-bit V cache, got v_bits={attrs['v_bits']}")
    _check_cache("cached_attention_q (values)", vt, rows, 8, attrs["v_group"])
    if vt[0].shape[0] != kt[0].shape[0] or q.shape[1] % kt[0].shape[1]:
        raise OpError(f"cached_attention_q: {q.shape[1]} query heads over {kt[0].shape[1]} kv "
                      f"heads, caches of {kt[0].shape[0]} and {vt[0].shape[0]} positions")
    return [TensorType((q.shape[0], q.shape[1] * q.shape[2]), "f32")]


def _attn_ref(xs, attrs):
    q, kt, vt, pos = split_attention_inputs(xs, attrs["k_bits"])
    k = dequantize_kv_rows(kt, attrs["k_bits"], attrs["k_group"])
    v = dequantize_kv_rows(vt, 8, attrs["v_group"])
    return [attention_reference(q, k, v, int(pos[0]), attrs["scale"])]


register_op(OpDef("cached_attention_q", (6, 7), {
    "scale": Attr("float", REQUIRED), "k_bits": Attr("int", REQUIRED),
    "k_group": Attr("int", REQUIRED), "v_bits": Attr("int", 8),
    "v_group": Attr("int", REQUIRED)}, _attn_infer, _attn_ref, family="llm",
    doc="causal grouped-query attention over a quantized static KV cache"))
