"""2:4 sparsity on top of int4 for ``compile_llm``: which 2 of every 4 inputs a projection
keeps, and the compact storage ``dense_wq24`` reads (:mod:`compiler.ir.ops.quant_sparse`).

Schemes (``compile_llm(quantize=...)``): ``int4-g128-2:4`` / ``int4-g32-2:4`` and the
``-wanda`` / ``-sparsegpt`` variants. Along K every quad (4 consecutive inputs) of a row keeps
2 weights; the kept ones are int4 symmetric (llama.cpp Q4_0's grid) with an f16 scale per
group of ``g`` *kept* weights (``2 g`` inputs; where K/2 is not a multiple of g the largest
power of two dividing it, as :func:`compiler.llm.quantize.group_for`). Storage: 12 bits per
quad (two 4-bit codes, a 4-bit index = 2 bits per kept weight) + 16 bits per ``2 g`` inputs,
3.06 bits per weight at g128 against int4 g128's 4.13.

Selection, per quad of each row:

- ``magnitude`` (no suffix): the two largest ``|w|``; the kept weights rounded to nearest.
  Rows are independent, so it streams like the other round-to-nearest schemes;
- ``wanda`` (Sun et al. 2023): the two largest ``|w_k| * ||x_k||``, the input's norm over the
  calibration tokens (``sqrt(H[k, k])`` of the GPTQ Hessian ``H = 2 X^T X / n``); rounded to
  nearest;
- ``sparsegpt`` (Frantar & Alistarh 2023), with GPTQ's quantization in the same pass: columns
  left to right over the upper Cholesky factor ``U`` of ``H^-1``; at each quad the two of
  largest ``w^2 / U[k, k]^2`` (the optimal-brain-surgeon saliency on the weights as updated so
  far) are kept; each column becomes its int4 value (kept) or 0 (pruned) and its error
  ``(w - w_hat) / U[k, k]`` is spread over the later columns (lazy batch updates as in
  :mod:`passes.quantization.gptq`). A group's scale is chosen at its first column from the
  weights the same saliency would keep then.

The Hessians are those of GPTQ (:func:`passes.quantization.gptq.capture_hessians`: the float
model on the calibration text), so pruning one layer does not change the next one's inputs.
"""

from __future__ import annotations

import re

import numpy as np

from compiler.errors import NpuccError

__all__ = ["METHODS", "SPARSE_SCHEMES", "parse_sparse_scheme", "quantize_sparse",
           "sparse_bytes", "top2_positions", "wanda_scores", "sparsegpt_quantize"]

METHODS = ("rtn", "wanda", "sparsegpt")     # rtn: magnitude selection, round to nearest
SPARSE_SCHEMES = ("int4-g128-2:4", "int4-g32-2:4", "int4-g128-2:4-wanda",
                  "int4-g128-2:4-sparsegpt", "int4-g32-2:4-sparsegpt")


def parse_sparse_scheme(text: str):
    """``int4-gN-2:4[-wanda|-sparsegpt]`` -> a :class:`compiler.llm.quantize.Scheme` with
    ``sparse=True``; an error naming the valid forms otherwise."""
    from compiler.llm.quantize import Scheme

    m = re.fullmatch(r"int4-g(\d+)-2:4(?:-(magnitude|wanda|sparsegpt))?", text)
    if m is None or int(m.group(1)) < 8 or int(m.group(1)) % 4:
        raise NpuccError(f"unknown 2:4 scheme {text!r}: write int4-g<N>-2:4 with N a multiple "
                         f"of 4 (>= 8) kept weights per scale, optionally -wanda or -sparsegpt "
                         f"for the selection (default: magnitude), e.g. "
                         f"{', '.join(SPARSE_SCHEMES)}")
    method = {None: "rtn", "magnitude": "rtn"}.get(m.group(2), m.group(2))
    return Scheme(4, int(m.group(1)), method, sparse=True)


def sparse_bytes(n: int, k: int, group: int) -> int:
    """Bytes ``dense_wq24`` stores for an ``[N, K]`` projection (``group`` kept weights per
    scale): codes ``K/4``, index ``K/8`` and f16 scales ``K/(2 group)`` per row."""
    return n * (k // 4 + k // 8 + 2 * (k // (2 * group)))


def top2_positions(score: np.ndarray) -> np.ndarray:
    """Per quad of ``score[N, K]`` the positions ``a < b`` of its two largest entries (ties:
    the lower position), as i8 ``[N, K/2]`` (pairs)."""
    n, k = score.shape
    s = np.asarray(score).reshape(n, k // 4, 4)
    rank = np.zeros(s.shape, np.int8)    # entries above it, ties counted for the lower position
    for i in range(4):
        for j in range(4):
            if j != i:
                rank[..., i] += (s[..., j] >= s[..., i]) if j < i else (s[..., j] > s[..., i])
    keep = rank < 2
    a = keep.argmax(-1)
    b = 3 - keep[..., ::-1].argmax(-1)
    return np.stack([a, b], -1).reshape(n, k // 2).astype(np.int8)


def wanda_scores(w: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``|w| * ||x||`` per weight: the input norms from the Hessian's diagonal (``H[k, k] =
    2 sum x_k^2 / n``, proportional to the squared norm)."""
    return np.abs(w) * np.sqrt(np.maximum(np.diag(hessian), 0.0))[None, :]


def _kept(w: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The entries of ``w[N, K]`` at the kept positions ``pos[N, K/2]`` -> ``[N, K/2]``."""
    cols = pos.astype(np.int64) + 4 * (np.arange(pos.shape[1]) // 2)[None, :]
    return np.take_along_axis(w, cols, axis=1)


def quantize_sparse(w: np.ndarray, scheme, hessian: np.ndarray | None = None,
                    prefix: str = "weight") -> tuple[dict[str, np.ndarray], int]:
    """One ``[N, K]`` projection as ``dense_wq24`` stores it: ``({"wq": u8 [N, K/4],
    "idx": u8 [N, K/8], "scales": f16 [N, K/(2g)]}, g)`` with ``g`` kept weights per scale.
    Rows are independent (the Hessian is the input's), so a block of rows gives those rows."""
    from compiler.ir.ops.quant_sparse import pack_sparse24
    from compiler.llm.quantize import group_for
    from passes.quantization.gptq import quantize_rtn

    n, k = w.shape
    if k % 8:
        raise NpuccError(f"{prefix}: 2:4 sparsity needs K a multiple of 8, got K={k}")
    g = group_for(k // 2, scheme, prefix)
    if g % 4:
        raise NpuccError(f"{prefix}: K={k} leaves {k // 2} kept weights per row, which no "
                         f"group of a multiple of 4 divides")
    if scheme.method != "rtn" and hessian is None:
        raise NpuccError(f"{prefix}: 2:4 {scheme.method} needs the Hessian of the input")
    w = np.asarray(w, np.float32)
    if scheme.method == "sparsegpt":
        q, s, pos = sparsegpt_quantize(w, hessian, g)
    else:
        pos = top2_positions(np.abs(w) if scheme.method == "rtn" else wanda_scores(w, hessian))
        q, s = quantize_rtn(_kept(w, pos), 4, g)
    wq, idx = pack_sparse24(q, pos)
    return {"wq": wq, "idx": idx, "scales": s}, g


def sparsegpt_quantize(w: np.ndarray, H: np.ndarray, group: int, *, damp: float = 0.01,
                       block: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SparseGPT 2:4 with int4 GPTQ (module docstring): ``(q i8 [N, K/2] kept codes, scales
    f16 [N, K/(2 group)], positions i8 [N, K/2])``."""
    from passes.quantization.gptq import damped_inverse_factor, group_scales

    n, k = w.shape
    W, U = damped_inverse_factor(w, H, damp, "SparseGPT")
    span = 2 * group                                   # inputs per scale
    block = max(span, (block // span) * span)
    Q = np.zeros((n, k), np.int8)
    S = np.zeros((n, k // span), np.float16)
    P = np.zeros((n, k // 2), np.int8)
    keep = np.zeros((n, 4), bool)
    rows = np.arange(n)[:, None]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
        d2 = np.square(np.diag(U1))[None, :]
        for i in range(i2 - i1):
            col = i1 + i
            if col % span == 0:    # the group's scale, from what the saliency keeps now
                pos = top2_positions(np.square(W1[:, i:i + span]) / d2[:, i:i + span])
                s16 = group_scales(_kept(W1[:, i:i + span], pos)[:, None, :], 4)[:, 0]
                S[:, col // span] = s16
                scale = s16.astype(np.float64)
            if col % 4 == 0:       # this quad's two kept inputs
                pos = top2_positions(np.square(W1[:, i:i + 4]) / d2[:, i:i + 4])
                P[:, col // 2:col // 2 + 2] = pos
                keep[:] = False
                keep[rows, pos] = True
            q = np.clip(np.rint(W1[:, i] / scale), -8, 7)
            kept = keep[:, col % 4]
            Q[:, col] = np.where(kept, q, 0).astype(np.int8)
            err = (W1[:, i] - np.where(kept, q * scale, 0.0)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return _kept(Q, P), S, P
