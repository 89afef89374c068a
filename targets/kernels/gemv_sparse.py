"""``dense_wq24``: 2:4-sparse int4 weights (:mod:`compiler.ir.ops.quant_sparse`) read in their
compact form, for any number of rows (decode M = 1, prefill M = chunk).

The constant operands are packed at compile time into n-panels of ``nb`` outputs like the
``dense_wq`` GEMV (:mod:`targets.kernels.gemv_q`): codes ``[ceil(N/nb), K/4, nb]`` u8 (one
byte = a quad's two kept codes), index ``[.., K/8, nb]`` u8 (one byte = two quads' 4-bit
patterns), scales ``[.., K/(2g), nb]`` f16. Per n-panel (parallel), per pair of quads, the
panel's ``nb`` code bytes and pattern bytes are decoded once into f32 codes ``q = u - 8`` and
the pattern byte; every row then selects its ``x[4j + a]`` and ``x[4j + b]`` per lane with
two bit tests and two blends each, on the pattern byte itself (``a`` is 0..2: bit 1 picks
x2, else bit 0 x1, else x0; ``b`` is 1..3: bit 3 picks x3 or x2 by bit 2, else x1), and
accumulates two multiply-adds per quad: half the multiply-adds of the dense int4 GEMV, and
12 bits read per 4 weights instead of 16. The scale is applied once per group of ``g`` kept
weights. No dense weight is ever formed. Numerics: f32, the reference's products in another
summation order.
"""

from __future__ import annotations

import numpy as np

from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.linalg import gemm_tiles, pack_nk

__all__ = ["dense_wq24"]


@register_kernel("dense_wq24")
def dense_wq24(req: KernelRequest) -> KernelImpl:
    """The compact-storage kernel for a ``dense_wq24`` with constant weights."""
    from tvm.script import tirx as T

    if not all(i in req.const_inputs for i in (1, 2, 3)):
        raise NotImplementedError("dense_wq24 needs constant weights, index and scales")
    g = int(req.attrs["group_size"])
    xshape = req.input_types[0].shape
    k = xshape[-1]
    m = int(np.prod(xshape[:-1], dtype=np.int64))
    n = req.input_types[1].shape[0]
    _, nb = gemm_tiles(req, m, n)
    panels, groups = -(-n // nb), k // (2 * g)
    pairs = g // 4                       # pairs of quads per group (g kept = g/2 quads)
    has_bias = len(req.input_types) == 5

    @T.prim_func
    def sparse24(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, k // 4, nb), "uint8"),
                 ix: T.Buffer((panels, k // 8, nb), "uint8"),
                 s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
                 out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((m, k), "float32", data=x.data)
        of = T.decl_buffer((m, n), "float32", data=out.data)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((m, nb), "float32")
            part = T.alloc_buffer((m, nb), "float32")
            code = T.alloc_buffer((4, nb), "float32")
            pat = T.alloc_buffer((nb,), "int32")
            for r in range(m):
                for j in T.vectorized(nb):
                    acc[r, j] = T.float32(0)
            for gi in range(groups):
                for r in range(m):
                    for j in T.vectorized(nb):
                        part[r, j] = T.float32(0)
                for pi in range(pairs):
                    for j in T.vectorized(nb):
                        pat[j] = T.Cast("int32", ix[p, gi * pairs + pi, j])
                    for h in T.unroll(2):   # quad 2 * (gi * pairs + pi) + h
                        for j in T.vectorized(nb):
                            code[2 * h, j] = T.Cast("float32", T.Cast("int32", T.bitwise_and(
                                w[p, (gi * pairs + pi) * 2 + h, j], T.uint8(15))) - 8)
                            code[2 * h + 1, j] = T.Cast("float32", T.Cast("int32", T.shift_right(
                                w[p, (gi * pairs + pi) * 2 + h, j], T.uint8(4))) - 8)
                    for r in range(m):
                        for h in T.unroll(2):
                            for j in T.vectorized(nb):
                                # a = bits 0-1 of the quad's nibble (0..2), b = bits 2-3 (1..3)
                                part[r, j] = part[r, j] + code[2 * h, j] * T.Select(
                                    T.bitwise_and(pat[j], 2 << (4 * h)) != 0,
                                    xf[r, ((gi * pairs + pi) * 2 + h) * 4 + 2],
                                    T.Select(T.bitwise_and(pat[j], 1 << (4 * h)) != 0,
                                             xf[r, ((gi * pairs + pi) * 2 + h) * 4 + 1],
                                             xf[r, ((gi * pairs + pi) * 2 + h) * 4])) \
                                    + code[2 * h + 1, j] * T.Select(
                                        T.bitwise_and(pat[j], 8 << (4 * h)) != 0,
                                        T.Select(T.bitwise_and(pat[j], 4 << (4 * h)) != 0,
                                                 xf[r, ((gi * pairs + pi) * 2 + h) * 4 + 3],
                                                 xf[r, ((gi * pairs + pi) * 2 + h) * 4 + 2]),
                                        xf[r, ((gi * pairs + pi) * 2 + h) * 4 + 1])
                for r in range(m):
                    for j in T.vectorized(nb):
                        acc[r, j] = acc[r, j] + T.Cast("float32", s[p, gi, j]) * part[r, j]
            for r in range(m):
                for j in range(nb):
                    if p * nb + j < n:
                        of[r, p * nb + j] = acc[r, j] + b[p * nb + j]

    pack = {i: (lambda a: pack_nk(np.asarray(a), nb)) for i in (1, 2, 3)}
    extra = [] if has_bias else [np.zeros(n, np.float32)]
    return KernelImpl(sparse24, pack, extra_const_inputs=extra,
                      note=f"dense_wq24 g{g} M={m} K={k} N={n}: {nb}-wide panels, 2 kept "
                           f"int4 codes + a 4-bit pattern per quad decoded once for all rows")
