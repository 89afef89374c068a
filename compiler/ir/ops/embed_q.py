"""``embed_wq``: token rows gathered from a group-wise quantized table.

``embed_wq(ids, wq, scales[, offsets]){bits, group_size, asym}``
    rows ``ids`` (i32 ``[T]``) of a table ``[V, D]`` stored exactly as ``dense_wq`` stores
    a weight ``[N, K]`` (:mod:`compiler.ir.ops.quant_weight`): ``bits`` 4, 3 or 2 packed
    codes per row (u8 ``[V, D * bits / 8]``, a little-endian bit stream: code ``d`` at bit
    ``bits * d``), f16 ``scales[V, D / group_size]``, and with ``asym`` f32 / f16
    ``offsets[V, D / group_size]``:
    ``out[..., d] = q[id, d] * f32(scales[id, d // g]) (+ offsets[id, d // g])``, with
    ``q = u - 2^(bits-1)``. Result f32 ``[T, D]``.

    A tied embedding quantized this way is read by both ends of the model: ``embed_wq``
    looks rows up, ``dense_wq`` over the same three arrays is the output projection; the two
    kernels pack the table into one layout, so the package holds it once. Ids outside
    ``[0, V)`` are an error here (the kernel clamps them).
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.quant_weight import dequantize_groups
from compiler.ir.registry import REQUIRED, Attr, OpDef, declare_traits, register_op
from compiler.ir.types import TensorType

__all__ = ["dequantize_table"]


def _infer(types, attrs):
    ids, wq, sc = types[0], types[1], types[2]
    bits, g, asym = attrs["bits"], attrs["group_size"], attrs["asym"]
    if ids.dtype != "i32" or ids.rank != 1:
        raise OpError(f"embed_wq takes ids i32[T], got {ids}")
    if len(types) != (4 if asym else 3):
        raise OpError(f"embed_wq{' asym' if asym else ''} takes ids, wq, scales"
                      f"{', offsets' if asym else ''}; got {len(types)} operands")
    if bits in (2, 3) and not asym:
        raise OpError(f"embed_wq bits={bits} is asymmetric only: set asym=True and pass the "
                      f"offsets")
    if wq.dtype != "u8" or wq.rank != 2 or (wq.shape[1] * 8) % bits:
        raise OpError(f"embed_wq bits={bits}: the table must be u8[V, D*{bits}/8], got {wq}")
    v, d = wq.shape[0], wq.shape[1] * 8 // bits
    if g < 1 or d % g:
        raise OpError(f"embed_wq: D={d} is not a multiple of group_size={g}")
    if sc.dtype != "f16" or sc.shape != (v, d // g):
        raise OpError(f"embed_wq: scales must be f16[{v},{d // g}] (V, D/group_size), got {sc}")
    if asym and (types[3].dtype not in ("f32", "f16") or types[3].shape != (v, d // g)):
        raise OpError(f"embed_wq: offsets must be f32 or f16 [{v},{d // g}], got {types[3]}")
    return [TensorType(ids.shape + (d,), "f32")]


def dequantize_table(wq: np.ndarray, scales: np.ndarray, bits: int,
                     offsets: np.ndarray | None = None) -> np.ndarray:
    """The f32 table ``[V, D]`` that ``embed_wq`` and ``dense_wq`` read."""
    w = dequantize_groups(wq, scales, bits)
    if offsets is not None:
        w += np.repeat(np.asarray(offsets, np.float32), w.shape[1] // offsets.shape[1], axis=1)
    return w


def _reference(xs, attrs):
    ids = xs[0].astype(np.int64)
    v = xs[1].shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise OpError(f"embed_wq: a token id is outside [0, {v})")
    flat = np.unique(ids)
    rows = dequantize_table(xs[1][flat], xs[2][flat], attrs["bits"],
                            xs[3][flat] if len(xs) == 4 else None)
    return [rows[np.searchsorted(flat, ids)].astype(np.float32)]


register_op(OpDef("embed_wq", (3, 4),
                  {"bits": Attr("int", REQUIRED, (2, 3, 4)), "group_size": Attr("int", REQUIRED),
                   "asym": Attr("bool", False)},
                  _infer, _reference, family="quant",
                  doc="rows of a group-wise int4/3/2 table (dense_wq's layout)"))
declare_traits("data-movement", "embed_wq")
