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

__all__ = ["dense_wq_gemv", "dense_wq_lowbit", "dense_wq_gemv_x8", "has_dot_gemv", "group_sums_macro",
           "store_panel_macro"]


def group_sums_macro(groups: int, g: int):
    """TIR macro ``group_sums(src, xs)``: ``xs[gi] = sum(src[gi * g : (gi + 1) * g])``."""
    from tvm.script import tirx as T

    @T.macro
    def group_sums(src, xs):
        for gi in range(groups):
            xs[gi] = T.float32(0)
            for kk in range(g):
                xs[gi] = xs[gi] + src[gi * g + kk]

    return group_sums


def store_panel_macro(nb: int, n: int):
    """TIR macro ``store(of, acc, b, p)``: panel ``p``'s ``nb`` sums plus bias into the
    output, the last panel's columns past ``n`` left out."""
    from tvm.script import tirx as T

    @T.macro
    def store(of, acc, b, p):
        for j in range(nb):
            if p * nb + j < n:
                of[p * nb + j] = acc[j] + b[p * nb + j]

    return store


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
    act8 = int(req.attrs.get("act_bits", 0)) == 8
    if act8 and has_dot_gemv(req.cpu, nb, k, g):
        return dense_wq_gemv_x8(req, nb, transforms)
    group_sums = group_sums_macro(groups, g)

    @T.macro
    def int4_part(part, xf, w, p, gi):
        """part[j] = the group's raw codes of panel column j dotted with x (u = q + 8)."""
        for j in T.vectorized(nb):
            part[j] = T.float32(0)
        for kb in range(g // 2):
            for j in T.vectorized(nb):
                part[j] = part[j] \
                    + xf[gi * g + kb * 2] * T.Cast(
                        "float32", T.bitwise_and(w[p, gi * (g // 2) + kb, j], T.uint8(15))) \
                    + xf[gi * g + kb * 2 + 1] * T.Cast(
                        "float32", T.shift_right(w[p, gi * (g // 2) + kb, j], T.uint8(4)))
    store = store_panel_macro(nb, n)

    @T.macro
    def stage_input(xin, xf):
        """xf = the input (act_bits=8: rounded to int8 codes per block of 32, times the
        block's step, as the op's reference does; CPUs without the integer-dot kernel)."""
        if act8:
            for bi in range(k // 32):
                amax = T.alloc_buffer((1,), "float32")
                amax[0] = T.float32(0)
                for kk in range(32):
                    amax[0] = T.max(amax[0], T.fabs(xin[bi * 32 + kk]))
                for kk in range(32):
                    xf[bi * 32 + kk] = T.round(xin[bi * 32 + kk] * T.if_then_else(
                        amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))) \
                        * (amax[0] / T.float32(127))
        else:
            for kk in range(k):
                xf[kk] = xin[kk]

    @T.prim_func
    def gemv4(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
              s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
              out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xin = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        xf = T.alloc_buffer((k,), "float32")
        stage_input(xin, xf)
        xs = T.alloc_buffer((groups,), "float32")
        group_sums(xf, xs)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            part = T.alloc_buffer((nb,), "float32")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                int4_part(part, xf, w, p, gi)
                for j in T.vectorized(nb):
                    acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) \
                        * (part[j] - T.float32(zero) * xs[gi])
            store(of, acc, b, p)

    @T.prim_func
    def gemv4a(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
               s: T.Buffer((panels, groups, nb), "float16"),
               c: T.Buffer((panels, groups, nb), "float32"), b: T.Buffer((n,), "float32"),
               out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xin = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        xf = T.alloc_buffer((k,), "float32")
        stage_input(xin, xf)
        xs = T.alloc_buffer((groups,), "float32")    # of the (quantized) input
        xo = T.alloc_buffer((groups,), "float32")    # of the f32 input: the offsets'
        group_sums(xf, xs)
        group_sums(xin, xo)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            part = T.alloc_buffer((nb,), "float32")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                int4_part(part, xf, w, p, gi)
                for j in T.vectorized(nb):
                    acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) \
                        * (part[j] - T.float32(8) * xs[gi]) + c[p, gi, j] * xo[gi]
            store(of, acc, b, p)

    @T.prim_func
    def gemv8(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, kw, nb), wdt),
              s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
              out: T.Buffer(xshape[:-1] + (n,), "float32")):
        xf = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            part = T.alloc_buffer((nb,), "float32")
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
            store(of, acc, b, p)

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
            acc = T.alloc_buffer((m, nb), "float32")
            part = T.alloc_buffer((m, nb), "float32")
            word = T.alloc_buffer((nb,), "uint32")
            dq = T.alloc_buffer((per, nb), "float32")
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


def has_dot_gemv(cpu, nb: int, k: int, g: int) -> bool:
    """Whether :func:`dense_wq_gemv_x8` can run well: AVX512-VNNI (``vpdpbusd``) and VBMI
    (``vpermt2b``), 32-wide panels, whole 32-input blocks inside a group."""
    return (cpu.arch == "x86_64" and cpu.has("avx512vnni", "avx512bw", "avx512vbmi")
            and nb == 32 and k % 32 == 0 and g % 32 == 0)


def dense_wq_gemv_x8(req: KernelRequest, nb: int, transforms: dict) -> KernelImpl:
    """The int4 GEMV with the input quantized to int8 (``act_bits=8``) and integer dot
    products (``vpdpbusd``), as llama.cpp's Q4 x Q8 dot: per block of 32 inputs
    ``dx = max|x| / 127``, ``x8 = round(x / dx)``; per block and column ``sum (u - 8) * x8`` in
    int32, then ``acc += scale * dx * that`` in f32 (asym: ``+ offset * sum(x over the
    group)`` with the f32 sums).

    Same packed weights as :func:`dense_wq_gemv` (``[panels, K/2, 32]`` u8, read once). Four
    panel rows (128 bytes) are transposed in registers by two byte permutations
    (``vpermt2b``) so that dword ``c`` holds column ``c``'s bytes of the 4 rows; masking out
    the low and the high nibbles gives, per column, 4 codes at even k and 4 at odd k, which
    one ``vpdpbusd`` each multiplies by the 4 matching input codes (one broadcast dword) and
    adds to the column's int32 sum: 4 ``vpdpbusd`` per 256 weights, no int-to-float conversion
    per weight (the f32 GEMV converts every nibble)."""
    from tvm.script import tirx as T

    g = int(req.attrs["group_size"])
    k = req.input_types[0].shape[-1]
    n = req.input_types[1].shape[0]
    xshape = req.input_types[0].shape
    asym = bool(req.attrs.get("asym", False))
    has_bias = len(req.input_types) == (5 if asym else 4)
    panels, groups, blocks, bpg, half = -(-n // nb), k // g, k // 32, g // 32, nb // 2
    # out byte 4c + r <- byte (row r, column c) of 4 rows x 32 columns, columns c0 .. c0 + 15
    perms = [[32 * (q % 4) + c0 + q // 4 for q in range(64)] for c0 in (0, half)]
    vdot = "llvm.x86.avx512.vpdpbusd.512"
    group_sums = group_sums_macro(groups, g)
    store = store_panel_macro(nb, n)

    @T.macro
    def quantize_x(xf, x8, xq, dx, sx):
        """x8: the input codes; xq[quad, h]: the codes at k = 8 quad + 2r + h (r = 0..3) as
        the bytes of one dword; dx[b]: the block's step; sx[b] = 8 * sum(x8 over block b)."""
        for bi in range(blocks):
            dx[bi] = T.float32(0)
            for kk in range(32):
                dx[bi] = T.max(dx[bi], T.fabs(xf[bi * 32 + kk]))
            sx[bi] = 0
            for kk in range(32):
                x8[bi * 32 + kk] = T.Cast("int32", T.round(xf[bi * 32 + kk] * T.if_then_else(
                    dx[bi] > T.float32(0), T.float32(127) / dx[bi], T.float32(0))))
                sx[bi] = sx[bi] + x8[bi * 32 + kk] * 8
            dx[bi] = dx[bi] / T.float32(127)
        for qd, h in T.grid(k // 8, 2):
            xq[qd, h] = T.bitwise_or(
                T.bitwise_or(T.bitwise_and(x8[qd * 8 + h], 255),
                             T.shift_left(T.bitwise_and(x8[qd * 8 + 2 + h], 255), 8)),
                T.bitwise_or(T.shift_left(T.bitwise_and(x8[qd * 8 + 4 + h], 255), 16),
                             T.shift_left(x8[qd * 8 + 6 + h], 24)))

    @T.macro
    def dot_quad(w, xq, ia, p, qd, a0, perm):
        """Columns perm's 16 of 4 rows (quad qd) into ia[a0] (low nibbles), ia[a0 + 1]."""
        wv = T.reinterpret(T.Shuffle([w.vload([p, qd * 4, 0], "uint8x64"),
                                      w.vload([p, qd * 4 + 2, 0], "uint8x64")], perm),
                           dtype="int32x16")
        ia[a0, T.ramp(0, 1, half)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(vdot), ia.vload([a0, 0], "int32x16"),
            T.reinterpret(T.bitwise_and(wv, T.broadcast(T.int32(0x0F0F0F0F), half)),
                          dtype="int8x64"),
            T.reinterpret(T.broadcast(xq[qd, 0], half), dtype="int8x64"), dtype="int32x16")
        ia[a0 + 1, T.ramp(0, 1, half)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(vdot), ia.vload([a0 + 1, 0], "int32x16"),
            T.reinterpret(T.bitwise_and(T.shift_right(wv, T.broadcast(T.int32(4), half)),
                                        T.broadcast(T.int32(0x0F0F0F0F), half)),
                          dtype="int8x64"),
            T.reinterpret(T.broadcast(xq[qd, 1], half), dtype="int8x64"), dtype="int32x16")

    @T.macro
    def panel_group(w, xq, dx, sx, gs, ia, p, gi):
        """gs[j] = sum over the group's blocks of dx * sum (u - 8) * x8 for column j."""
        for j in T.vectorized(nb):
            gs[j] = T.float32(0)
        for bb in range(bpg):
            for a in T.unroll(4):
                for i in T.vectorized(half):
                    ia[a, i] = 0
            for rq in range(4):   # 4 quads of 4 rows: the block's 32 inputs
                dot_quad(w, xq, ia, p, (gi * bpg + bb) * 4 + rq, 0, perms[0])
                dot_quad(w, xq, ia, p, (gi * bpg + bb) * 4 + rq, 2, perms[1])
            for hc in T.unroll(2):
                for i in T.vectorized(half):
                    gs[hc * half + i] = gs[hc * half + i] + dx[gi * bpg + bb] * T.Cast(
                        "float32", ia[2 * hc, i] + ia[2 * hc + 1, i] - sx[gi * bpg + bb])

    @T.macro
    def x8_body(x, w, s, c, b, out):
        """The whole kernel; ``c`` (the offsets) is None without asym."""
        xf = T.decl_buffer((k,), "float32", data=x.data)
        of = T.decl_buffer((n,), "float32", data=out.data)
        x8 = T.alloc_buffer((k,), "int32")
        xq = T.alloc_buffer((k // 8, 2), "int32")
        dx = T.alloc_buffer((blocks,), "float32")
        sx = T.alloc_buffer((blocks,), "int32")
        xs = T.alloc_buffer((groups,), "float32")    # f32 input sums: the offsets'
        quantize_x(xf, x8, xq, dx, sx)
        if c is not None:
            group_sums(xf, xs)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            gs = T.alloc_buffer((nb,), "float32")
            ia = T.alloc_buffer((4, half), "int32")
            for j in T.vectorized(nb):
                acc[j] = T.float32(0)
            for gi in range(groups):
                panel_group(w, xq, dx, sx, gs, ia, p, gi)
                if c is not None:
                    for j in T.vectorized(nb):
                        acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) * gs[j] \
                            + c[p, gi, j] * xs[gi]
                else:
                    for j in T.vectorized(nb):
                        acc[j] = acc[j] + T.Cast("float32", s[p, gi, j]) * gs[j]
            store(of, acc, b, p)

    @T.prim_func
    def gemv_x8(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, k // 2, nb), "uint8"),
                s: T.Buffer((panels, groups, nb), "float16"), b: T.Buffer((n,), "float32"),
                out: T.Buffer(xshape[:-1] + (n,), "float32")):
        x8_body(x, w, s, None, b, out)

    @T.prim_func
    def gemv_x8a(x: T.Buffer(xshape, "float32"), w: T.Buffer((panels, k // 2, nb), "uint8"),
                 s: T.Buffer((panels, groups, nb), "float16"),
                 c: T.Buffer((panels, groups, nb), "float32"), b: T.Buffer((n,), "float32"),
                 out: T.Buffer(xshape[:-1] + (n,), "float32")):
        x8_body(x, w, s, c, b, out)

    extra = [] if has_bias else [np.zeros(n, np.float32)]
    return KernelImpl(gemv_x8a if asym else gemv_x8, transforms, extra_const_inputs=extra,
                      note=f"dense_wq int4 g{g} x int8 input GEMV K={k} N={n}: vpdpbusd on "
                           f"4-row transposed panels, input blocks of 32")
