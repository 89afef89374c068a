"""Weight-only quantized ops: ``dense_wq``, ``gather_q``, ``norm_f16``.

``dense_wq(x, wq, scales[, bias]){bits, group_size, activation}``
    ``x[..., K] @ W[N, K]^T + b`` with ``W`` stored group-wise quantized, symmetric (no zero
    points): ``W[n, k] = q[n, k] * f32(scales[n, k // group_size])``, ``scales`` f16
    ``[N, K / group_size]``.

    - ``bits=4``: ``wq`` is u8 ``[N, K / 2]``, two weights per byte. **Nibble order**: byte
      ``j`` of row ``n`` holds ``k = 2j`` in its low nibble and ``k = 2j + 1`` in its high
      nibble; a nibble ``u`` (0..15) is the weight ``q = u - 8`` (-8..7), llama.cpp's Q4_0
      encoding.
    - ``bits=3`` / ``bits=2``: ``wq`` is u8 ``[N, K * bits / 8]``: every 8 consecutive k of a
      row are one little-endian word of ``bits`` bytes, k = 8c + i in bits ``bits*i ..
      bits*i + bits - 1`` of word c; a code ``u`` is the weight ``q = u - 2^(bits-1)``
      (:func:`pack_bits`; with ``bits=4`` it is the nibble order above). K must be a
      multiple of 8 (3-bit) or 4 (2-bit).
    - ``bits=8``: ``wq`` is i8 ``[N, K]`` (-127..127).

    Numerics (reference = kernels): the dequantised weight is exact in f32 (a small integer
    times an f16 value); products and sums in f32, bias and activation in f32.

    ``asym=True`` (bits 2, 3, 4; required for 2 and 3) adds an operand after the scales, ``offsets`` f32 or f16
    ``[N, K/g]``:
    ``W[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]`` (a minimum per group,
    llama.cpp Q4_1's grid written as ``q = u - 8``, ``offset = min + 8 * scale``).

    ``act_bits=8`` (bits 4, K and group_size multiples of 32): the input is first quantized to
    int8 in blocks of 32 along K, as llama.cpp's Q8 activations (:func:`quantize_input_blocks`:
    ``dx = max|x| / 127``, ``x8 = round(x * (127 / max|x|))``, ``x = x8 * dx``), so a kernel
    may take integer dot products of codes (the asym offsets still multiply the f32 input's
    group sums). ``act_bits=0`` (default): the f32 input as it is.
``gather_q(table, scales, idx)``
    an embedding lookup from an i16 or i8 table ``[V, D]`` with per-row f32 scales ``[V]``:
    ``out[..., d] = f32(table[idx, d]) * scales[idx]`` (axis 0; negative indices wrap).
``norm_f16(x, scale, bias){axes, epsilon}``
    a normalisation with f16 storage: ``xh = f32(f16(x))`` (the input rounded to f16), the
    statistics over ``axes`` in f32 (mean, then the mean of squared deviations),
    ``y = (xh - mean) / sqrt(var + eps) * f32(scale) + f32(bias)`` in f32, rounded to f16 and
    returned as f32 (``f32(f16(y))``). ``axes=[]`` is a plain affine map ``xh * scale + bias``
    (an inference batch norm folded at compile time). ``scale`` and ``bias`` are f16 and
    broadcast against ``x`` numpy-style (right-aligned): layer norm passes them as the
    normalised shape, instance/batch norm NCHW as ``[C, 1, 1]``.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops._util import broadcast_shapes
from compiler.ir.ops.nn import ACTIVATION_ATTRS, apply_activation, check_activation
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["pack_int4", "unpack_int4", "pack_bits", "unpack_bits", "dequantize_groups",
           "packed_width", "quantize_input_blocks", "ACT_BLOCK"]

ACT_BLOCK = 32   # inputs per int8 block with act_bits=8


def pack_int4(q: np.ndarray) -> np.ndarray:
    """i8 values in [-8, 7], shape [..., K] (K even) -> u8 [..., K/2] (see nibble order)."""
    q = np.asarray(q)
    if q.shape[-1] % 2:
        raise OpError(f"int4 packing needs an even last dimension, got {list(q.shape)}")
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """u8 [..., K/2] -> i8 [..., K] in [-8, 7] (inverse of :func:`pack_int4`)."""
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.int8)
    out[..., 0::2] = (p & 15).astype(np.int8) - 8
    out[..., 1::2] = (p >> 4).astype(np.int8) - 8
    return out


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of ``k`` weights at ``bits`` (8: i8, else packed u8)."""
    return k * bits // 8


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """i8 values in ``[-2^(bits-1), 2^(bits-1) - 1]``, shape [..., K] -> u8
    ``[..., K * bits / 8]``: each 8 k a little-endian word of ``bits`` bytes, k = 8c + i at
    bit ``bits * i`` of word c (``bits=4``: :func:`pack_int4`'s nibble order)."""
    q = np.asarray(q)
    if bits == 4:
        return pack_int4(q)
    k = q.shape[-1]
    if k % 8 and not (bits == 2 and k % 4 == 0):
        raise OpError(f"{bits}-bit packing needs a last dimension that is a multiple of 8 "
                      f"(2-bit: 4), got {list(q.shape)}")
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint32)
    if bits == 2:   # four codes per byte: the word layout with byte-sized words
        u = u.reshape(q.shape[:-1] + (k // 4, 4))
        return (u << (2 * np.arange(4, dtype=np.uint32))).sum(-1).astype(np.uint8)
    words = (u.reshape(q.shape[:-1] + (k // 8, 8))
             << (bits * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    out = np.stack([(words >> (8 * b)) & 255 for b in range(bits)], -1).astype(np.uint8)
    return out.reshape(q.shape[:-1] + (k * bits // 8,))


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: u8 ``[..., K * bits / 8]`` -> i8 ``[..., K]``."""
    if bits == 4:
        return unpack_int4(packed)
    p = np.asarray(packed, np.uint8).astype(np.uint32)
    per = 4 if bits == 2 else 8             # codes per word
    nby = per * bits // 8                   # bytes per word
    lead = p.shape[:-1]
    words = p.reshape(lead + (p.shape[-1] // nby, nby))
    words = (words << (8 * np.arange(nby, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    codes = (words[..., None] >> (bits * np.arange(per, dtype=np.uint32))) & ((1 << bits) - 1)
    return (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8).reshape(
        lead + (words.shape[-1] * per,))


def dequantize_groups(wq: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The f32 weight ``[N, K]`` that ``dense_wq`` multiplies by."""
    q = unpack_bits(wq, bits) if bits < 8 else np.asarray(wq, np.int8)
    n, k = q.shape
    g = k // scales.shape[1]
    s = np.repeat(np.asarray(scales).astype(np.float32), g, axis=1)
    return q.astype(np.float32) * s


def quantize_input_blocks(x: np.ndarray, block: int = ACT_BLOCK) -> np.ndarray:
    """``x[..., K]`` rounded to int8 codes per block of ``block`` along K and back to f32:
    ``x8 * dx`` with ``dx = max|x| / 127`` and ``x8 = round(x * (127 / max|x|))`` (all f32;
    a zero block stays zero)."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.round(xb * inv).astype(np.float32)
    return (q * (amax / np.float32(127)).astype(np.float32)).reshape(x.shape)


# -- dense_wq --------------------------------------------------------------------------
def _dense_wq_infer(types, attrs):
    x, wq, sc = types[0], types[1], types[2]
    asym = attrs["asym"]
    if asym and (bits := attrs["bits"]) == 8:
        raise OpError("dense_wq: asym needs bits 2, 3 or 4, got bits=8")
    if len(types) > (4 if asym else 3) + 1 or (asym and len(types) < 4):
        raise OpError(f"dense_wq{' asym' if asym else ''} takes x, wq, scales"
                      f"{', offsets' if asym else ''} and an optional bias; got "
                      f"{len(types)} operands")
    bits, g = attrs["bits"], attrs["group_size"]
    if bits in (2, 3) and not asym:
        raise OpError(f"dense_wq bits={bits} is asymmetric only (scales and offsets per group): "
                      f"set asym=True and pass the offsets")
    if x.dtype != "f32" or x.rank < 1:
        raise OpError(f"dense_wq takes an f32 x[..., K], got {x}")
    want = "u8" if bits < 8 else "i8"
    if wq.dtype != want or wq.rank != 2 or (wq.shape[1] * 8) % bits:
        raise OpError(f"dense_wq bits={bits}: weights must be {want}[N, K"
                      f"{f'*{bits}/8' if bits < 8 else ''}], got {wq}")
    n = wq.shape[0]
    k = wq.shape[1] * 8 // bits
    if x.shape[-1] != k:
        raise OpError(f"dense_wq: x's last dimension {x.shape[-1]} differs from the weight's "
                      f"K {k} ({wq}, bits={bits})")
    if k % g:
        raise OpError(f"dense_wq: K={k} is not a multiple of group_size={g}")
    if sc.dtype != "f16" or sc.shape != (n, k // g):
        raise OpError(f"dense_wq: scales must be f16[{n},{k // g}] (N, K/group_size), got {sc}")
    if asym and (types[3].dtype not in ("f32", "f16") or types[3].shape != (n, k // g)):
        raise OpError(f"dense_wq: offsets must be f32 or f16 [{n},{k // g}], got {types[3]}")
    b = 4 if asym else 3
    if len(types) == b + 1 and (types[b].shape != (n,) or types[b].dtype != "f32"):
        raise OpError(f"dense_wq: bias must be f32[{n}], got {types[b]}")
    if attrs.get("act_bits", 0) and (bits != 4 or k % ACT_BLOCK or g % ACT_BLOCK):
        raise OpError(f"dense_wq act_bits=8 needs bits=4 and K, group_size multiples of "
                      f"{ACT_BLOCK}; got bits={bits}, K={k}, group_size={g}")
    return [TensorType(x.shape[:-1] + (n,), "f32")]


def _dense_wq_ref(xs, attrs):
    x, wq, sc = xs[0], xs[1], xs[2]
    w = dequantize_groups(wq, sc, attrs["bits"])
    x = x.astype(np.float32)
    b = 4 if attrs["asym"] else 3
    off = np.repeat(np.asarray(xs[3], np.float32), w.shape[1] // xs[3].shape[1], axis=1) \
        if attrs["asym"] else None
    if attrs.get("act_bits", 0):   # the codes meet the quantized input, the offsets the f32 one
        y = np.matmul(quantize_input_blocks(x), w.T)
        if off is not None:
            y = y + np.matmul(x, off.T)
    else:
        y = np.matmul(x, (w if off is None else w + off).T)
    if len(xs) == b + 1:
        y = y + xs[b]
    return [apply_activation(y.astype(np.float32), attrs)]


register_op(OpDef(
    "dense_wq", (3, 5),
    {"bits": Attr("int", 4, (2, 3, 4, 8)), "group_size": Attr("int", 128), "asym": Attr("bool", False),
     "act_bits": Attr("int", 0, (0, 8)), **ACTIVATION_ATTRS},
    _dense_wq_infer, _dense_wq_ref, verify=check_activation, family="quant",
    doc="dense with group-wise int2/3/4/8 weights and f16 scales (weight-only)"))


# -- gather_q ------------------------------------------------------------------------
def _gather_q_infer(types, attrs):
    table, sc, idx = types
    if table.dtype not in ("i16", "i8") or table.rank != 2:
        raise OpError(f"gather_q takes an i16 or i8 table [V, D], got {table}")
    if sc.dtype != "f32" or sc.shape != (table.shape[0],):
        raise OpError(f"gather_q: scales must be f32[{table.shape[0]}] (one per row), got {sc}")
    if idx.dtype not in ("i32", "i64"):
        raise OpError(f"gather_q's indices must be i32 or i64, got {idx}")
    return [TensorType(idx.shape + (table.shape[1],), "f32")]


def _gather_q_ref(xs, attrs):
    table, sc, idx = xs
    v = table.shape[0]
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -v or idx.max() >= v):
        raise OpError(f"gather_q: an index is outside [-{v}, {v - 1}]")
    idx = np.where(idx < 0, idx + v, idx)
    return [table[idx].astype(np.float32) * sc[idx][..., None]]


register_op(OpDef("gather_q", (3, 3), {}, _gather_q_infer, _gather_q_ref, family="quant",
                  doc="embedding rows from an i16/i8 table times per-row f32 scales"))


# -- norm_f16 --------------------------------------------------------------------------
def _norm_f16_infer(types, attrs):
    x, scale, bias = types
    if x.dtype != "f32":
        raise OpError(f"norm_f16 takes an f32 input, got {x}")
    for name, t in (("scale", scale), ("bias", bias)):
        if t.dtype != "f16":
            raise OpError(f"norm_f16's {name} must be f16, got {t}")
        if t.rank > x.rank or broadcast_shapes(t.shape, x.shape) != x.shape:
            raise OpError(f"norm_f16's {name} {t} does not broadcast to the input {x}")
    axes = attrs["axes"]
    if len(set(a % max(x.rank, 1) for a in axes)) != len(axes) \
            or any(not -x.rank <= a < x.rank for a in axes):
        raise OpError(f"norm_f16: axes {axes} are not distinct axes of {x}")
    return [x]


def norm_f16_reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                       axes: tuple[int, ...], eps: float) -> np.ndarray:
    xh = x.astype(np.float16).astype(np.float32)
    s, b = scale.astype(np.float32), bias.astype(np.float32)
    if not axes:
        y = xh * s + b
    else:
        mean = xh.mean(axis=axes, keepdims=True, dtype=np.float32)
        var = np.square(xh - mean).mean(axis=axes, keepdims=True, dtype=np.float32)
        y = (xh - mean) / np.sqrt(var + np.float32(eps)) * s + b
    return y.astype(np.float32).astype(np.float16).astype(np.float32)


def _norm_f16_ref(xs, attrs):
    x = xs[0]
    axes = tuple(sorted(a % x.ndim for a in attrs["axes"]))
    return [norm_f16_reference(x, xs[1], xs[2], axes, attrs["epsilon"])]


register_op(OpDef("norm_f16", (3, 3), {"axes": Attr("ints", []), "epsilon": Attr("float", 1e-5)},
                  _norm_f16_infer, _norm_f16_ref, family="quant",
                  doc="layer/instance/batch norm with f16 storage and f32 statistics"))
