"""Group-wise weight quantization: round-to-nearest and GPTQ (Frantar et al., 2022).

Both produce ``(q, scales)`` for a weight ``W[N, K]`` (N output features, K inputs):
``q`` i8 ``[N, K]`` and ``scales`` f16 ``[N, K/g]``, with ``W ~= q * scales`` per group of
``g`` consecutive k. The encoding is symmetric, no zero points:

- int4 (llama.cpp Q4_0): per group, ``m`` = the weight of largest magnitude (with its sign),
  ``d = m / -8``, ``q = clip(round(w / d), -8, 7)``; the extreme weight maps to -8 exactly and
  the whole [-8, 7] range is used.
- int8: ``d = max|w| / 127``, ``q = clip(round(w / d), -127, 127)``.

``d`` is rounded to f16 first and ``q`` computed with the rounded value, so ``q * f16(d)``
is exactly what the kernels compute. An all-zero group gets ``d = 1``.

GPTQ: ``H = 2 X^T X / n`` from the layer's calibration inputs (:func:`capture_hessians`, via
the reference interpreter's ``observe`` hook), damped by ``damp * mean(diag H)``; the upper
Cholesky factor of ``H^-1`` drives the column-by-column quantization, each column's error
``(w - q) / Hinv[k, k]`` spread over the not yet quantized columns of its block at once
(rank-1 numpy updates), and the block's errors over the later blocks in one matrix product
(lazy batch updates). A group's scale is chosen when its first column is reached, from the
weights as updated so far (blocks are a multiple of the group so groups never straddle them).
Dead inputs (``H[k, k] == 0``) get zero weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.interpreter import check_inputs, interpret

__all__ = ["group_scales", "quantize_with_scales", "quantize_rtn", "gptq_quantize",
           "gptq_quantize_asym",
           "capture_hessians", "damped_inverse_factor", "QRANGE"]

QRANGE = {4: (-8, 7), 8: (-127, 127)}


def group_scales(w: np.ndarray, bits: int) -> np.ndarray:
    """Scales (f16) for groups laid out as ``w[N, G, g]`` -> ``[N, G]``."""
    w = np.asarray(w, np.float32)
    if bits == 4:
        idx = np.abs(w).argmax(axis=-1)
        m = np.take_along_axis(w, idx[..., None], axis=-1)[..., 0]
        d = m / -8.0
    else:
        d = np.abs(w).max(axis=-1) / 127.0
    d = np.clip(d, -65504.0, 65504.0)
    d16 = d.astype(np.float16)
    tiny = (d16 == 0) & (d != 0)
    d16[tiny] = np.float16(np.copysign(6e-8, d[tiny]))
    d16[d == 0] = np.float16(1.0)
    return d16


def quantize_with_scales(w: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """``clip(round(w / d))`` for ``w[..., g]`` and f16 ``d[...]`` -> i8."""
    lo, hi = QRANGE[bits]
    d = np.asarray(scales).astype(np.float32)[..., None]
    return np.clip(np.rint(np.asarray(w, np.float32) / d), lo, hi).astype(np.int8)


def _check(w: np.ndarray, bits: int, group: int) -> tuple[int, int]:
    if bits not in QRANGE:
        raise NpuccError(f"weight quantization: bits={bits} is not 4 or 8")
    n, k = w.shape
    if group <= 0 or k % group:
        raise NpuccError(f"weight quantization: K={k} is not a multiple of group_size={group}")
    return n, k


def quantize_rtn(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest: ``(q i8 [N, K], scales f16 [N, K/group])``."""
    n, k = _check(w, bits, group)
    wg = np.asarray(w, np.float32).reshape(n, k // group, group)
    s = group_scales(wg, bits)
    return quantize_with_scales(wg, s, bits).reshape(n, k), s


def gptq_quantize(w: np.ndarray, H: np.ndarray, bits: int, group: int, *,
                  damp: float = 0.01, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with group-wise scales: ``(q i8 [N, K], scales f16 [N, K/group])``.

    ``H`` is the ``[K, K]`` Hessian proxy ``2 X^T X / n`` of the layer's inputs."""
    _check(w, bits, group)
    lo, hi = QRANGE[bits]

    def choose(wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s16 = group_scales(wg[:, None, :], bits)[:, 0]
        return s16, np.zeros(len(s16))

    Q, S, _ = _gptq(w, H, group, choose, lo, hi, damp, block)
    return Q, S


def gptq_quantize_asym(w: np.ndarray, H: np.ndarray, group: int, *, damp: float = 0.01,
                       block: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with an asymmetric int4 grid per group (llama.cpp Q4_1's: ``d = (max - min) / 15``,
    ``m = min`` in f16, codes 0..15): ``(q i8 [N, K] = code - 8, d f16 [N, K/group],
    c f32 [N, K/group] = m + 8 d)``, so ``w ~= q d + c``."""
    _check(w, 4, group)

    def choose(wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = wg.min(axis=1), wg.max(axis=1)
        d = ((hi - lo) / 15.0).astype(np.float16)
        d[d == 0] = np.float16(1.0)
        m = lo.astype(np.float16).astype(np.float64)
        return d, m + 8.0 * d.astype(np.float64)

    return _gptq(w, H, group, choose, -8, 7, damp, block)


def _gptq(w: np.ndarray, H: np.ndarray, group: int, choose, lo: int, hi: int, damp: float,
          block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GPTQ loop; ``choose(w_group [N, g]) -> (scales f16 [N], offsets [N])`` picks a
    group's grid ``w ~= q * scale + offset`` when its first column is reached."""
    n, k = w.shape
    W, Hinv = damped_inverse_factor(w, H, damp)
    block = max(group, (block // group) * group)
    Q = np.zeros((n, k), np.int8)
    S = np.zeros((n, k // group), np.float16)
    C = np.zeros((n, k // group), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scale = offset = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                s16, off = choose(W1[:, i:i + group])
                S[:, col // group] = s16
                C[:, col // group] = off
                scale, offset = s16.astype(np.float64), np.asarray(off, np.float64)
            wcol = W1[:, i]
            q = np.clip(np.rint((wcol - offset) / scale), lo, hi)
            Q[:, col] = q.astype(np.int8)
            err = (wcol - (q * scale + offset)) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q, S, C


def _upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``H^-1 = U^T U`` (GPTQ's ``Hinv``); more damping on
    failure (a rank-deficient H from few calibration tokens)."""
    import scipy.linalg

    k = H.shape[0]
    extra = 0.0
    for _ in range(6):
        try:
            L = np.linalg.cholesky(H + extra * np.eye(k))
            Linv = scipy.linalg.solve_triangular(L, np.eye(k), lower=True)
            Hi = Linv.T @ Linv
            return np.linalg.cholesky(Hi).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) or 1e-6)
    raise NpuccError("GPTQ: the layer's Hessian is not positive definite even after damping")


def damped_inverse_factor(w: np.ndarray, H: np.ndarray, damp: float, what: str = "GPTQ"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``(W, U)`` for a column-by-column OBS update of ``w[N, K]`` (GPTQ, SparseGPT): ``W`` a
    float64 copy with dead inputs (``H[k, k] == 0``) zeroed, ``U`` the upper Cholesky factor
    of ``H^-1`` after damping ``H`` by ``damp * mean(diag H)``."""
    k = w.shape[1]
    W = np.array(w, np.float64)
    H = np.array(H, np.float64)
    if H.shape != (k, k):
        raise NpuccError(f"{what}: the Hessian is {list(H.shape)}, the weight has K={k}")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = float(np.mean(np.diag(H)))
    H[np.diag_indices(k)] += damp * (mean_diag if mean_diag > 0 else 1.0)
    return W, _upper_cholesky_of_inverse(H)


def capture_hessians(graph, samples: Sequence[Mapping[str, np.ndarray]],
                     value_names: Iterable[str]) -> dict[str, np.ndarray]:
    """``H = 2 X^T X / n`` (float64) for each named value of ``graph`` (rows = all leading
    positions of all samples), from one interpreter run per sample."""

    names = set(value_names)
    acc: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}

    def add(name: str, arr: np.ndarray) -> None:
        x = np.asarray(arr, np.float64).reshape(-1, arr.shape[-1])
        acc[name] = acc.get(name, 0) + x.T @ x
        count[name] = count.get(name, 0) + x.shape[0]

    def observe(node, results) -> None:
        for v, r in zip(node.outputs, results, strict=True):
            if v.name in names:
                add(v.name, r)

    for sample in samples:
        bound = check_inputs(graph, sample)
        for name, arr in bound.items():
            if name in names:
                add(name, arr)
        interpret(graph, bound, observe=observe)
    return {n: 2.0 * acc[n] / max(count[n], 1) for n in acc}
