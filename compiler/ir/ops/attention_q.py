"""Attention with int8 dot products, quantized dynamically from its f32 operands: ``qattention``.

``qattention(q, k, v[, mask]){heads, head_dim, scale, causal, q_offset, k_offset, v_offset}``
takes exactly ``attention``'s operands and attributes (:mod:`compiler.ir.ops.attention`: f32
rows of a QKV dense, heads at column offsets, additive mask, causal triangle) and gives its
``f32[B, S, H * head_dim]`` result, computed with 8-bit operands whose scales come from the
data of each call (no calibration). Per batch ``b`` and head ``h``:

- ``q`` and ``k`` are quantized per row (each query's, each key's ``head_dim`` values):
  ``s = max|row| / 127``, ``x8 = round(x * (127 / max(max|row|, 1e-28)))`` half to even, in
  -127..127 (each step an f32 operation);
- ``scores = (q8 . k8) * s_q * s_k * scale + mask`` (masked keys of a causal row: -inf);
- ``e = exp(scores - row max)`` (a row of -inf takes max 0, as softmax) stored as the integers
  ``e8 = round(e * 255)`` in 0..255;
- ``v`` is quantized per column of the head over its keys (the same rule, axis = keys);
- ``out = (e8 . v8) * s_v[column] / sum(e8)``.

Non-finite operands: a NaN or infinity in a row of ``q`` or ``k`` makes its scale NaN, and in a
column of ``v`` that column's scale, so the rows (a key: every row of the head) or the column
it reaches are NaN, where ``attention`` gives NaN too; a NaN mask value makes its row NaN; a row
with every key masked gives 0 / 0 = NaN, as ``attention`` does.

Cost in accuracy: the all-MiniLM-L6-v2 sentence embeddings (seq 128, dense layers float) keep
a mean cosine of 0.99996 (min 0.99983) to the float model with this attention
(``bench/quant_attention_accuracy.py``): ~1/255 relative on each probability, ~1/254 of a row's
(or column's) largest magnitude on each q, k, v value. A row whose probabilities are all below
1/510 of its largest one attends to that key alone; long sequences with flat attention lose
most (there ``attention`` stays exact: keep it float in the ``quantize=`` mapping).

The reference computes exactly this: the quantization in f32 (what the kernel computes,
bit for bit), the rest in float64; the kernel (``targets/kernels/attention_q.py``) computes the
scores and the exponentials in f32, so an ``e8`` at a rounding boundary may land one step
away. Made by the int8 quantization flow (``passes/quantization/attention_q.py``) from an
``attention`` whose precision is int8.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.attention import attention_heads
from compiler.ir.registry import OpDef, get_op, register_op

__all__ = ["quantize_rows", "P_LEVELS", "AMAX_FLOOR"]

P_LEVELS = 255        # e = exp(s - max) in (0, 1] as round(e * 255)
AMAX_FLOOR = 1e-28    # x * 127 / max(max|row|, floor): an all-zero row quantizes to zeros


def quantize_rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values of ``x`` (f32) along ``axis``: (``x8`` as float64, per-slice scale
    as float64, NaN where the slice holds a NaN or an infinity)."""
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x)
    xs = np.where(finite, x, np.float32(0))
    amax = np.abs(xs).max(axis=axis, keepdims=True)
    s = amax / np.float32(127)
    x8 = np.clip(np.round(xs * (np.float32(127) / np.maximum(amax, np.float32(AMAX_FLOOR)))),
                 -127, 127)
    bad = ~finite.all(axis=axis, keepdims=True)
    return x8.astype(np.float64), np.where(bad, np.nan, s.astype(np.float64))


def _infer(types, attrs):
    try:
        return get_op("attention").infer(types, attrs)
    except OpError as e:
        raise OpError(f"qattention (attention's operands): {e}") from None


def _reference(xs, attrs):
    h, d = attrs["heads"], attrs["head_dim"]
    q8, sq = quantize_rows(attention_heads(xs[0], attrs["q_offset"], h, d), -1)
    k8, sk = quantize_rows(attention_heads(xs[1], attrs["k_offset"], h, d), -1)
    v8, sv = quantize_rows(attention_heads(xs[2], attrs["v_offset"], h, d), -2)
    s = (q8 @ k8.transpose(0, 1, 3, 2)) * sq * sk.transpose(0, 1, 3, 2) * attrs["scale"]
    if len(xs) == 4:
        s = s + xs[3].astype(np.float64)
    if attrs["causal"]:
        sq_, sk_ = s.shape[2:]
        s = np.where(np.triu(np.ones((sq_, sk_), bool), k=sk_ - sq_ + 1), -np.inf, s)
    m = s.max(axis=-1, keepdims=True)                     # NaN if the row holds one
    with np.errstate(invalid="ignore"):
        e8 = np.round(np.exp(s - np.where(m == -np.inf, 0, m)) * P_LEVELS)
        o = (e8 @ v8) * sv / e8.sum(axis=-1, keepdims=True)     # [B, H, S, D]
    b, _, sq_, _ = o.shape
    return [o.transpose(0, 2, 1, 3).reshape(b, sq_, h * d).astype(np.float32)]


register_op(OpDef(
    "qattention", (3, 4), dict(get_op("attention").attrs), _infer, _reference, family="nn",
    doc="attention with q, k per-row and v per-column i8 and softmax weights as u8, all "
        "quantized from the f32 operands per call; f32 result"))
