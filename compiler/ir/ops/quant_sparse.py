"""2:4-sparse int4 weights: ``dense_wq24`` and its compact storage.

``dense_wq24(x, wq, idx, scales[, bias]){group_size}``
    ``x[..., K] @ W[N, K]^T + b`` where every row of ``W`` keeps 2 of every 4 consecutive
    inputs (a *quad*: k = 4j .. 4j + 3) and stores only those two, int4 symmetric, with an
    f16 scale per group of ``group_size`` kept weights (``2 * group_size`` inputs):

    - ``wq`` u8 ``[N, K/4]``: byte j of a row holds quad j's two kept codes, the one at the
      lower position in the low nibble; a nibble ``u`` is the weight ``q = u - 8`` (llama.cpp
      Q4_0's nibble, :func:`compiler.ir.ops.quant_weight.pack_int4` of the kept codes);
    - ``idx`` u8 ``[N, K/8]``: 4 bits per quad, 2 bits per kept weight: the positions
      ``a < b`` in 0..3 of the two kept inputs as ``a | b << 2``; quad 2i in the low nibble of
      byte i, quad 2i + 1 in its high nibble (:func:`pack_index`);
    - ``scales`` f16 ``[N, K / (2 * group_size)]``: kept weight t of a row (t = 2j or 2j + 1
      for quad j) is ``q * scales[n, t // group_size]``.

    So a weight costs 12 bits per quad (3 bits per dense weight) plus ``16 / (2 g)`` for the
    scale. ``K`` must be a multiple of 8 and of ``2 * group_size``; ``group_size`` even.
    Numerics: as ``dense_wq`` (the dequantised weight is exact in f32; f32 products and sums).
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.quant_weight import pack_int4, unpack_int4
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType

__all__ = ["pack_index", "unpack_index", "pack_sparse24", "dense_from_sparse24"]

def pack_index(pos: np.ndarray) -> np.ndarray:
    """Kept positions ``[..., K/2]`` (per quad ``a < b`` in 0..3, in pairs) -> u8
    ``[..., K/8]``: quad j's ``a | b << 2`` in nibble ``j % 2`` of byte ``j // 2``."""
    pos = np.asarray(pos)
    if pos.shape[-1] % 4:
        raise OpError(f"2:4 index packing needs K/2 a multiple of 4 (K a multiple of 8), got "
                      f"{pos.shape[-1]} kept positions per row")
    a, b = pos[..., 0::2].astype(np.int16), pos[..., 1::2].astype(np.int16)
    if a.size and not ((a >= 0) & (a < b) & (b <= 3)).all():
        raise OpError("2:4 index packing: every quad needs two positions 0 <= a < b <= 3")
    nib = a | (b << 2)                                   # 1..14, one per quad
    return pack_int4(nib - 8)


def unpack_index(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_index`: u8 ``[..., K/8]`` -> positions i8 ``[..., K/2]``."""
    nib = unpack_int4(packed).astype(np.int16) + 8      # [..., K/4], one per quad
    out = np.empty(nib.shape[:-1] + (nib.shape[-1] * 2,), np.int8)
    out[..., 0::2] = nib & 3
    out[..., 1::2] = nib >> 2
    return out


def pack_sparse24(q: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept codes i8 ``[N, K/2]`` in -8..7 and their positions -> ``(wq u8 [N, K/4], idx u8
    [N, K/8])`` as ``dense_wq24`` reads them."""
    return pack_int4(q), pack_index(pos)


def dense_from_sparse24(wq: np.ndarray, idx: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The f32 ``[N, K]`` weight ``dense_wq24`` multiplies by (zeros where pruned)."""
    q = unpack_int4(wq).astype(np.float32)              # [N, K/2]
    n, kept = q.shape
    g = kept // scales.shape[1]
    vals = q * np.repeat(np.asarray(scales).astype(np.float32), g, axis=1)
    cols = (unpack_index(idx).astype(np.int64)
            + 4 * (np.arange(kept) // 2)[None, :])      # absolute input index per kept weight
    w = np.zeros((n, kept * 2), np.float32)
    np.put_along_axis(w, cols, vals, axis=1)
    return w


def _infer(types, attrs):
    x, wq, idx, sc = types[:4]
    g = attrs["group_size"]
    if x.dtype != "f32" or x.rank < 1:
        raise OpError(f"dense_wq24 takes an f32 x[..., K], got {x}")
    k = x.shape[-1]
    if k % 8 or g <= 0 or g % 2 or k % (2 * g):
        raise OpError(f"dense_wq24: K={k} must be a multiple of 8 and of 2*group_size="
                      f"{2 * g} (group_size counts kept weights and must be even)")
    n = wq.shape[0] if wq.rank == 2 else -1
    for name, t, shape in (("wq", wq, (n, k // 4)), ("idx", idx, (n, k // 8))):
        if t.dtype != "u8" or t.shape != shape:
            raise OpError(f"dense_wq24: {name} must be u8{list(shape)} for K={k}, got {t}")
    if sc.dtype != "f16" or sc.shape != (n, k // (2 * g)):
        raise OpError(f"dense_wq24: scales must be f16[{n},{k // (2 * g)}] (N, K / (2 * "
                      f"group_size)), got {sc}")
    if len(types) == 5 and (types[4].shape != (n,) or types[4].dtype != "f32"):
        raise OpError(f"dense_wq24: bias must be f32[{n}], got {types[4]}")
    return [TensorType(x.shape[:-1] + (n,), "f32")]


def _ref(xs, attrs):
    w = dense_from_sparse24(xs[1], xs[2], xs[3])
    y = np.matmul(xs[0].astype(np.float32), w.T)
    if len(xs) == 5:
        y = y + xs[4]
    return [y.astype(np.float32)]


register_op(OpDef(
    "dense_wq24", (4, 5), {"group_size": Attr("int", 64)}, _infer, _ref, family="quant",
    doc="dense with 2:4-sparse int4 weights: 2 kept codes + a 4-bit pattern per 4 inputs"))
