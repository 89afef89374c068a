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

__all__ = ["dense_wq_gemv"]


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
