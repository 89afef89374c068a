"""``dense_wq`` for one row (token-by-token decoding): a GEMV that reads the packed int4 /
int8 weights once, at memory speed.

Same operands, same packed layout as the GEMM of :mod:`targets.kernels.quant_weight`
(weights ``[ceil(N/nb), K/2, nb]`` u8 for int4 — byte ``j`` of a row holds k = 2j in its low
nibble and 2j + 1 in its high one — or ``[.., K, nb]`` i8, scales ``[ceil(N/nb), K/g, nb]``
f16), so a prefill GEMM and a decode GEMV over the same weight read one array.

One n-panel of ``nb`` outputs per parallel iteration, streamed once from memory. Per group of
``g`` inputs the panel's raw codes are dotted with x in f32 (``part[nb] += x[k] * f32(u)``,
vectorised over the panel), and the group is finished once: ``acc += scale * (part - z *
sum(x over the group))`` with z = 8 for int4 codes ``u = q + 8`` (z = 0 for int8) — the zero
point and the scale cost one multiply-add per group instead of two operations per weight.
The group sums of x are computed once per call; with ``asym`` the group's offset adds
``offset * sum(x over the group)``. Numerics: f32 throughout, the same products as the
reference in another summation order.
"""

from __future__ import annotations

import numpy as np

from targets.kernels.base import KernelImpl, KernelRequest

__all__ = ["dense_wq_gemv", "dense_wq_lowbit"]


def dense_wq_gemv(req: KernelRequest, nb: int, transforms: dict) -> KernelImpl:
    """The GEMV kernel for a constant-weight ``dense_wq`` whose x has one row."""
    from tvm.script import tirx as T

    bits, g = int(req.attrs["bits"]), int(req.attrs["group_size"])
    k = req.input_types[0].shape[-1]
    n = req.input_types[1].shape[0]
    panels = -(-n // nb)
    groups = k // g
    has_bias = len(req.input_types) == (5 if req.attrs.get("asym", False) else 4)
    act = req.attrs.get("activation", "none")
    if act not in ("none", None):
        raise NotImplementedError(f"dense_wq GEMV with activation {act}")
    xshape = req.input_types[0].shape
    zero = 8.0 if bits == 4 else 0.0
    wdt, kw = ("uint8", k // 2) if bits == 4 else ("int8", k)

    @T.prim_func
    def gemv4(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
              s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
              out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        xs = T.alloc_buffer((groups,), "float32")
        for gi in range(groups):
            xs[gi] = T.float32(0)
            for kk in range(g):
                xs[gi] = xs[gi] + xf[gi * g + kk]
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32", scope="local")
            part = T.alloc_buffer((nb,), "float32", scope="local")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                for j in T.vectorized(nb):
                    part[j] = T.float32(0)
                for kb in range(g // 2):
                    for j in T.vectorized(nb):
                        part[j] = part[j] \
                            + xf[gi * g + kb * 2] * T.Cast(
                                "float32", T.bitwise_and(w[p, gi * (g // 2) + kb, j],
                                                         T.uint8(15))) \
                            + xf[gi * g + kb * 2 + 1] * T.Cast(
                                "float32", T.shift_right(w[p, gi * (g // 2) + kb, j],
                                                         T.uint8(4)))
                for j in T.vectorized(nb):
                    acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) \
                        * (part[j] - T.float32(zero) * xs[gi])
            for j in range(nb):
                if p * nb + j < n:
                    of[p * nb + j] = acc[j] + b[p * nb + j]

    @T.prim_func
    def gemv4a(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
               s: T.Buffer((panels, groups, nb), "float16"),
               c: T.Buffer((panels, groups, nb), "float32"), b: T.Buffer((n,), "float32"),
               out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        xs = T.alloc_buffer((groups,), "float32")
        for gi in range(groups):
            xs[gi] = T.float32(0)
            for kk in range(g):
                xs[gi] = xs[gi] + xf[gi * g + kk]
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32", scope="local")
            part = T.alloc_buffer((nb,), "float32", scope="local")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                for j in T.vectorized(nb):
                    part[j] = T.float32(0)
                for kb in range(g // 2):
                    for j in T.vectorized(nb):
                        part[j] = part[j] \
                            + xf[gi * g + kb * 2] * T.Cast(
                                "float32", T.bitwise_and(w[p, gi * (g // 2) + kb, j],
                                                         T.uint8(15))) \
                            + xf[gi * g + kb * 2 + 1] * T.Cast(
                                "float32", T.shift_right(w[p, gi * (g // 2) + kb, j],
                                                         T.uint8(4)))
                for j in T.vectorized(nb):
                    acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) \
                        * (part[j] - T.float32(8) * xs[gi]) + c[p, gi, j] * xs[gi]
            for j in range(nb):
                if p * nb + j < n:
                    of[p * nb + j] = acc[j] + b[p * nb + j]

    @T.prim_func
    def gemv8(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
              s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
              out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32", scope="local")
            part = T.alloc_buffer((nb,), "float32", scope="local")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                for j in T.vectorized(nb):
                    part[j] = T.float32(0)
                for kk in range(g):
                    for j in T.vectorized(nb):
                        part[j] = part[j] + xf[gi * g + kk] \
                            * T.Cast("float32", w[p, gi * g + kk, j])
                for j in T.vectorized(nb):
                    acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) * part[j]
            for j in range(nb):
                if p * nb + j < n:
                    of[p * nb + j] = acc[j] + b[p * nb + j]

    asym = bool(req.attrs.get("asym", False))
    func = gemv4a if asym else gemv4 if bits == 4 else gemv8
    # one signature: x, w, s, (offsets,) b, out
    extra = [] if has_bias else [np.zeros(n, np.float32)]
    return KernelImpl(func, transforms, extra_const_inputs=extra,
                      note=f"dense_wq int{bits} g{g} GEMV K={k} N={n}: {nb}-wide panels, "
                           f"scale once per group")


def dense_wq_lowbit(req: KernelRequest, nb: int, transforms: dict) -> KernelImpl:
    """3-bit and 2-bit ``dense_wq`` (asymmetric: scales and offsets per group) for any number
    of rows M, over the same ``[ceil(N/nb), K*bits/8, nb]`` panels as the int4 GEMV.

    Per n-panel (parallel), per word of 8 (3-bit: 3 bytes) or 4 (2-bit: 1 byte) codes, the
    panel's ``nb`` words are assembled and decoded once into ``per x nb`` f32 codes in
    registers; every row then accumulates ``x[r, k] * f32(u)``; the group is finished once
    per row as in :func:`dense_wq_gemv` with ``z = 2^(bits-1)``: ``acc += d * (part - z *
    sum(x over the group)) + c * sum(x over the group)``. Decode (M=1) thus reads each packed
    byte once per token; prefill (M=chunk) decodes each panel word once for all rows."""
    from tvm.script import tirx as T

    bits, g = int(req.attrs["bits"]), int(req.attrs["group_size"])
    xshape = req.input_types[0].shape
    k = xshape[-1]
    m = int(np.prod(xshape[:-1], dtype=np.int64))
    n = req.input_types[1].shape[0]
    panels, groups = -(-n // nb), k // g
    per = 8 if bits == 3 else 4                  # codes per word
    nby = per * bits // 8                        # bytes per word
    wpg = g // per                               # words per group
    if g % per or req.attrs.get("activation", "none") not in ("none", None):
        raise NotImplementedError(f"dense_wq int{bits} with group {g} / activation")
    kw, zero, mask = k * bits // 8, float(1 << (bits - 1)), (1 << bits) - 1
    cdt = "float16" if req.input_types[3].dtype == "f16" else "float32"
    has_bias = len(req.input_types) == 5

    @T.prim_func
    def lowbit(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), "uint8"),
               s: T.Buffer((panels, groups, nb), "float16"),
               c: T.Buffer((panels, groups, nb), cdt), b: T.Buffer((n,), "float32"),
               out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((m, k), "float32", data=x.data)
        of = T.decl_buffer((m, n), "float32", data=out.data)
        xs = T.alloc_buffer((m, groups), "float32")
        for r, gi in T.grid(m, groups):
            xs[r, gi] = T.float32(0)
            for kk in range(g):
                xs[r, gi] = xs[r, gi] + xf[r, gi * g + kk]
        for p in T.parallel(panels):
            acc = T.alloc_buffer((m, nb), "float32", scope="local")
            part = T.alloc_buffer((m, nb), "float32", scope="local")
            word = T.alloc_buffer((nb,), "uint32", scope="local")
            dq = T.alloc_buffer((per, nb), "float32", scope="local")
            for r in range(m):
                for j in T.vectorized(nb):
                    acc[r, j] = T.float32(0)
            for gi in range(groups):
                for r in range(m):
                    for j in T.vectorized(nb):
                        part[r, j] = T.float32(0)
                for wi in range(wpg):
                    for j in T.vectorized(nb):
                        word[j] = T.uint32(0)
                    for t in T.unroll(nby):
                        for j in T.vectorized(nb):
                            word[j] = T.bitwise_or(word[j], T.shift_left(
                                T.Cast("uint32", w[p, (gi * wpg + wi) * nby + t, j]),
                                T.Cast("uint32", 8 * t)))
                    for i in T.unroll(per):
                        for j in T.vectorized(nb):
                            dq[i, j] = T.Cast("float32", T.bitwise_and(
                                T.shift_right(word[j], T.Cast("uint32", bits * i)),
                                T.uint32(mask)))
                    for r in range(m):
                        for i in T.unroll(per):
                            for j in T.vectorized(nb):
                                part[r, j] = part[r, j] + xf[r, gi * g + wi * per + i] * dq[i, j]
                for r in range(m):
                    for j in T.vectorized(nb):
                        acc[r, j] = acc[r, j] + T.Cast("float32", s[p, gi, j]) \
                            * (part[r, j] - T.float32(zero) * xs[r, gi]) \
                            + T.Cast("float32", c[p, gi, j]) * xs[r, gi]
            for r in range(m):
                for j in range(nb):
                    if p * nb + j < n:
                        of[r, p * nb + j] = acc[r, j] + b[p * nb + j]

    extra = [] if has_bias else [np.zeros(n, np.float32)]
    return KernelImpl(lowbit, transforms, extra_const_inputs=extra,
                      note=f"dense_wq int{bits} g{g} M={m} K={k} N={n}: {nb}-wide panels, "
                           f"{per} codes per {nby}-byte word decoded once for all rows")
