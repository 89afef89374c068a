"""The ``qattention`` kernel (:mod:`compiler.ir.ops.attention_q`): attention whose two products
run on 8-bit integers, quantized from the f32 operands inside the kernel.

TIR with the structure of the f32 ``attention`` kernel (:mod:`targets.kernels.attention`):

- First, parallel over (batch, head): every query and key row quantized per row (scale
  ``max|row| / 127``, the row's maximum one vector reduction; a NaN or infinity makes it NaN;
  values multiplied by ``127 / max``), every value column over the keys. Queries are stored
  as u8 (``q8 + 128``: the int8 dot product multiplies u8 by i8); keys row by row, then as
  ``k8[B*H, D/4, Skp, 4]`` (a transpose of 32-bit words: 16 keys per 64 bytes, 4 consecutive
  head columns per key) with ``128 * sum_d k8`` per key to take the +128 back out; values as
  ``v8[B*H, Skp/4, Dv, 4]`` (16 head columns per 64 bytes, each column's 4 consecutive keys
  packed into one word by vector shifts). With a padding mask (one row for every query, not
  causal), the key blocks whose mask is provably far below the head's best (BERT's
  ``finfo.min`` padding) are marked dead (:func:`dead_blocks` inside the builder).
- Then parallel over (batch, head, tile of ``ROWS`` query rows), tiles dealt as in the f32
  kernel (:func:`targets.kernels.attention.parallel_iterations`). Per tile, per pair of
  16-key blocks not both dead: ``ROWS x 32`` int32 score accumulators (one 4-byte broadcast
  of a query row and one 64-byte load of keys per dot step), scores scaled and masked into
  f32; the row max; per block, unless every score is below the max - 6.25 (its u8
  probabilities all round to 0), ``fast_exp`` and the probabilities stored as u8
  ``round(e * 255)`` and summed; then ``ROWS x dc`` int32 value accumulators over the live
  blocks (a 4-byte broadcast of 4 probabilities per dot step), each output column scaled by
  ``s_v / sum`` once. The skipped blocks are exactly the ones whose u8 probabilities are 0:
  the results are those of computing everything. MiniLM's sentences (a dozen tokens padded
  to 128) leave one live block of eight.

The dot step is the AVX512-VNNI ``vpdpbusd`` where the CPU has it (``vnni.has_vnni``: 16
lanes of 4 u8 x i8 products), else the same sums as plain int32 vector code (AVX2, Arm: one
arithmetic, the same results, no special instruction). The accumulators are default-scope
buffers under ``STACK_ALLOCA_BYTES`` inside the parallel body (stack allocas LLVM keeps in
registers); the scores row block ``sc`` is the one larger buffer, as in the f32 kernel.
"""

from __future__ import annotations

import math

from compiler.ir.ops.attention_q import AMAX_FLOOR, P_LEVELS
from targets.kernels._te import fast_exp
from targets.kernels.attention import (
    attention_params,
    attention_prim_func,
    parallel_iterations,
)
from targets.kernels.base import STACK_ALLOCA_BYTES, KernelImpl, KernelRequest, register_kernel
from targets.kernels.vnni import VNNI_LLVM_INTRIN, has_vnni

__all__ = ["value_chunk_q", "ROWS", "KEYS"]

ROWS = 4        # query rows per register tile
KEYS = 16       # keys per score vector, head columns per value vector (16 int32 lanes)
FLT_MAX = 3.4028234663852886e38
# exp(x) * 255 < 0.5 below this: the probability's u8 is 0 (ln(0.5 / 255) = -6.2344)
SKIP_BELOW = -6.25


def value_chunk_q(dv: int) -> int:
    """Value columns accumulated at once: the largest multiple of 16 dividing ``dv`` whose
    ``ROWS x chunk`` int32 tile stays under :data:`STACK_ALLOCA_BYTES`."""
    best = KEYS
    for c in range(KEYS, dv + 1, KEYS):
        if dv % c == 0 and ROWS * c * 4 < STACK_ALLOCA_BYTES:
            best = c
    return best


def _dot_macros(vnni: bool):
    """``dot(acc, ao, a, ai, b, bi)``: ``acc[ao + l] += sum_t a[ai + t] * b[bi + 4 l + t]`` for
    16 lanes l and t < 4 (a u8, b i8, acc i32; flat buffers)."""
    from tvm.script import tirx as T

    @T.macro
    def vnni_dot(acc, ao, a, ai, b, bi):
        acc[T.ramp(ao, 1, KEYS)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(VNNI_LLVM_INTRIN),
            acc.vload([ao], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(a.vload([ai], "uint8x4"), dtype="int32"),
                                      KEYS), dtype="int8x64"),
            b.vload([bi], dtype="int8x64"),
            dtype="int32x16")

    @T.macro
    def plain_dot(acc, ao, a, ai, b, bi):
        for ln in T.vectorized(KEYS):
            acc[ao + ln] = acc[ao + ln] + T.Cast("int32", a[ai]) * T.Cast(
                "int32", b[bi + ln * 4]) + T.Cast("int32", a[ai + 1]) * T.Cast(
                "int32", b[bi + ln * 4 + 1]) + T.Cast("int32", a[ai + 2]) * T.Cast(
                "int32", b[bi + ln * 4 + 2]) + T.Cast("int32", a[ai + 3]) * T.Cast(
                "int32", b[bi + ln * 4 + 3])

    return vnni_dot if vnni else plain_dot


@register_kernel("qattention")
def qattention(req: KernelRequest) -> KernelImpl:
    from tvm import tirx
    from tvm.script import tirx as T

    bsz, s, sk, h, d, (oq, ok, ov), scale, causal, has_mask, (mb, mh, ms) = \
        attention_params(req)
    vnni = has_vnni(req.cpu)
    dot = _dot_macros(vnni)
    d4 = -(-d // 4)
    dq = d4 * 4                                  # q, k columns padded to whole 4-byte groups
    dv = -(-d // KEYS) * KEYS                    # value columns padded to whole vectors
    skp = -(-sk // (2 * KEYS)) * 2 * KEYS      # keys padded to whole pairs of blocks
    kblocks = skp // KEYS
    tiles = -(-s // ROWS)
    total = bsz * h * tiles
    bh_n = bsz * h
    its = parallel_iterations(total, req.cpu.num_cores)
    per = -(-total // its)
    dc = value_chunk_q(dv)
    cshift = sk - s if causal else sk
    trim = has_mask and ms == 0 and not causal     # dead_blocks applies
    neg, inf, nan = -math.inf, math.inf, math.nan
    rchunks = -(-d // KEYS)                      # a row's max: its chunks of 16 columns

    def bat(g):
        return g // (h * tiles)

    def bh(g):
        return g // tiles

    def row0(g):
        return g % tiles * ROWS

    def nblk(g):
        return tirx.min(kblocks, (row0(g) + ROWS + cshift + KEYS - 1) // KEYS)

    def finite_abs(x):
        # |x|, or +inf for a NaN or an infinity (the row's scale then becomes NaN)
        return T.Select(T.abs(x) <= T.float32(FLT_MAX), T.abs(x), T.float32(inf))

    def hmax(buf, o):
        # the largest of buf[o .. o + 16] by one integer vector reduction: a float's bits,
        # negative ones flipped, order as int32 (LLVM's float max reduction is NaN-exact and
        # slow; a NaN here is its row's, whose result is NaN anyway)
        bits = tirx.reinterpret("int32x16", buf.vload([o], "float32x16"))
        top = tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax",
                                         bits ^ ((bits >> 31) & 0x7FFFFFFF))
        return tirx.reinterpret("float32", top ^ ((top >> 31) & 0x7FFFFFFF))

    def hsum(buf, o):
        return tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add",
                                          buf.vload([o], "int32x16"))

    def no_nan(x):
        return T.Select(tirx.isnan(x), T.float32(inf), x)

    def q_i8(x, inv):
        # the symmetric int8 value of x, inv = 127 / max|row|, as f32 (0 for a non-finite x)
        return T.Select(T.abs(x) <= T.float32(FLT_MAX), T.max(T.min(T.round(
            x * inv), T.float32(127)), T.float32(-127)), T.float32(0))

    def inverse(amax):
        # 127 / max(amax, floor) in f32, as the reference (0 for a non-finite row: inf)
        return T.float32(127) / T.max(amax, T.float32(AMAX_FLOOR))

    def v_i8(v, vi, x, j, c):
        # value row j, column c of head x as int32 (0 past the keys or the head's columns)
        return T.Select(tirx.all(j < sk, c < d), T.Cast("int32", q_i8(
            v[x // h, T.min(j, sk - 1), ov + x % h * d + T.min(c, d - 1)],
            vi[c])), 0)

    def word(b0, b1, b2, b3):
        # four int8 values as the bytes of one int32, b0 lowest (little endian)
        return (b0 & 255) | ((b1 & 255) << 8) | ((b2 & 255) << 16) | (b3 << 24)

    @T.macro
    def row_scale(src, b, row, col, rv, rs):
        # rs[0] = max|src[b, row, col .. col + d]| / 127 (NaN for a non-finite value), rs[1]
        # the inverse the values are multiplied by: 16-lane
        # partial maxima over the row's chunks of 16, then one vector reduction
        for ln in T.vectorized(KEYS):
            rv[ln] = T.Select(ln < d, finite_abs(src[b, row, col + T.min(ln, d - 1)]),
                              T.float32(0))
        for ch in range(1, rchunks):
            for ln in T.vectorized(KEYS):
                rv[ln] = T.max(rv[ln], T.Select(ch * KEYS + ln < d, finite_abs(
                    src[b, row, col + T.min(ch * KEYS + ln, d - 1)]), T.float32(0)))
        rs[0] = T.Select(hmax(rv, 0) == T.float32(inf), T.float32(nan),
                         hmax(rv, 0) / T.float32(127))
        rs[1] = inverse(hmax(rv, 0))

    @T.macro
    def dead_blocks(mask, qs, ks, dead, mm, x):
        # A key block whose mask values are all far below the best mask value of the head can
        # hold no probability: s_j - max <= mb - M + 2 B, with B = 127^2 D max s_q max s_k
        # |scale| bounding |q8.k8 s_q s_k scale|; below -6.25 (with margin) every e8 is 0.
        # Only for a mask shared by every query (padding) and no causal triangle, where some
        # key with the best mask value is seen by every row; NaN anywhere keeps blocks live.
        mm[0] = T.float32(0)
        for i in range(s):
            mm[0] = T.max(mm[0], no_nan(qs[x * s + i]))
        mm[1] = T.float32(0)
        for j in range(sk):
            mm[1] = T.max(mm[1], no_nan(ks[x * skp + j]))
        mm[2] = T.float32(2 * 127 * 127 * d * abs(scale)) * mm[0] * mm[1] + T.float32(7)
        mm[3] = T.float32(neg)
        for j in range(sk):
            mm[3] = T.max(mm[3], T.Select(tirx.isnan(mask[x // h * mb, x % h * mh, 0, j]),
                                          T.float32(neg), mask[x // h * mb, x % h * mh, 0, j]))
        for jb in range(kblocks):
            mm[4] = T.float32(-FLT_MAX)
            for jj in range(KEYS):
                if jb * KEYS + jj < sk:
                    mm[4] = T.max(mm[4], no_nan(mask[x // h * mb, x % h * mh, 0,
                                                     jb * KEYS + jj]))
            dead[x * kblocks + jb] = T.Select(
                mm[4] + mm[2] + T.float32(1e-6) * (T.abs(mm[4]) + T.abs(mm[3])) < mm[3], 1, 0)

    @T.macro
    def pack_head(q, k, v, mask, q8, qs, kb, kbw, k8, k8w, kz, ks, v8w, vs, dead, x):
        rv = T.alloc_buffer((KEYS,), "float32")
        mm = T.alloc_buffer((5,), "float32")
        rs = T.alloc_buffer((2,), "float32")
        vm = T.alloc_buffer((dv,), "float32")
        vi = T.alloc_buffer((dv,), "float32")
        ones = T.alloc_buffer((4,), "uint8")
        kacc = T.alloc_buffer((KEYS,), "int32")
        for i in range(s):
            row_scale(q, x // h, i, oq + x % h * d, rv, rs)
            qs[x * s + i] = rs[0]
            for dd in T.vectorized(dq):
                q8[(x * s + i) * dq + dd] = T.Cast("uint8", T.Select(dd < d, q_i8(
                    q[x // h, i, oq + x % h * d + T.min(dd, d - 1)], rs[1]), T.float32(0))
                    + T.float32(128))
        for j in range(skp):
            if j < sk:
                row_scale(k, x // h, j, ok + x % h * d, rv, rs)
                ks[x * skp + j] = rs[0]
                for dd in T.vectorized(dq):
                    kb[(x * skp + j) * dq + dd] = T.Cast("int8", T.Select(dd < d, q_i8(
                        k[x // h, j, ok + x % h * d + T.min(dd, d - 1)], rs[1]),
                        T.float32(0)))
            else:
                ks[x * skp + j] = T.float32(0)
                for dd in T.vectorized(dq):
                    kb[(x * skp + j) * dq + dd] = T.int8(0)
        # the 4-byte groups of 16 keys side by side: a transpose of 32-bit words
        for jb in range(kblocks):
            for dd in range(d4):
                for ln in T.vectorized(KEYS):
                    k8w[(x * d4 + dd) * skp + jb * KEYS + ln] = kbw[
                        (x * skp + jb * KEYS + ln) * d4 + dd]
            # 128 * sum_d k8 per key: the dot product with 4 bytes of ones
            for t in range(4):
                ones[t] = T.uint8(1)
            for ln in T.vectorized(KEYS):
                kacc[ln] = 0
            for dd in range(d4):
                dot(kacc, 0, ones, 0, k8, ((x * d4 + dd) * skp + jb * KEYS) * 4)
            for ln in T.vectorized(KEYS):
                kz[x * skp + jb * KEYS + ln] = kacc[ln] * 128
        if trim:
            dead_blocks(mask, qs, ks, dead, mm, x)
        for c in T.vectorized(dv):
            vm[c] = T.float32(0)
        for j in range(sk):
            for c in T.vectorized(dv):
                vm[c] = T.max(vm[c], T.Select(c < d, finite_abs(
                    v[x // h, j, ov + x % h * d + T.min(c, d - 1)]), T.float32(0)))
        for c in T.vectorized(dv):
            vs[x * dv + c] = T.Select(vm[c] == T.float32(inf), T.float32(nan),
                                      vm[c] / T.float32(127))
            vi[c] = inverse(vm[c])
        # 16 columns x 4 keys per 64 bytes: each column's 4 keys packed into one word
        for j4 in range(skp // 4):
            for c in T.vectorized(dv):
                v8w[(x * (skp // 4) + j4) * dv + c] = word(
                    v_i8(v, vi, x, j4 * 4, c), v_i8(v, vi, x, j4 * 4 + 1, c),
                    v_i8(v, vi, x, j4 * 4 + 2, c), v_i8(v, vi, x, j4 * 4 + 3, c))

    @T.macro
    def score(qs, kz, ks, mask, sc, acc, g, r, p, jb, ln):
        if has_mask:
            sc[r * skp + jb * KEYS + ln] = T.Select(
                jb * KEYS + ln <= T.min(sk - 1, row0(g) + r + cshift),
                T.Cast("float32", acc[(r * 2 + p) * KEYS + ln] - kz[bh(g) * skp + jb * KEYS
                                                                    + ln])
                * (qs[bh(g) * s + T.min(row0(g) + r, s - 1)]
                   * ks[bh(g) * skp + jb * KEYS + ln] * T.float32(scale))
                + mask[bat(g) * mb, bh(g) % h * mh, T.min(row0(g) + r, s - 1) * ms,
                       T.min(jb * KEYS + ln, sk - 1)],
                T.float32(neg))
        else:
            sc[r * skp + jb * KEYS + ln] = T.Select(
                jb * KEYS + ln <= T.min(sk - 1, row0(g) + r + cshift),
                T.Cast("float32", acc[(r * 2 + p) * KEYS + ln] - kz[bh(g) * skp + jb * KEYS
                                                                    + ln])
                * (qs[bh(g) * s + T.min(row0(g) + r, s - 1)]
                   * ks[bh(g) * skp + jb * KEYS + ln] * T.float32(scale)),
                T.float32(neg))

    @T.macro
    def score_pair(q8, qs, k8, kz, ks, mask, sc, acc, g, jp):
        for ln in T.vectorized(ROWS * 2 * KEYS):
            acc[ln] = 0
        for dd in range(d4):
            for r in T.unroll(ROWS):
                for p in T.unroll(2):
                    dot(acc, (r * 2 + p) * KEYS, q8,
                        (bh(g) * s + T.min(row0(g) + r, s - 1)) * dq + dd * 4, k8,
                        ((bh(g) * d4 + dd) * skp + (jp * 2 + p) * KEYS) * 4)
        for r in T.unroll(ROWS):
            for p in T.unroll(2):
                for ln in T.vectorized(KEYS):
                    score(qs, kz, ks, mask, sc, acc, g, r, p, jp * 2 + p, ln)

    @T.macro
    def scores(q8, qs, k8, kz, ks, mask, sc, acc, dead, g):
        # two key blocks at a time: 2 x ROWS independent accumulator chains hide the dot
        # product's latency; a pair of dead blocks (dead_blocks) is not scored
        for jp in range((nblk(g) + 1) // 2):
            if trim:
                if dead[bh(g) * kblocks + jp * 2] + dead[bh(g) * kblocks + jp * 2 + 1] == 2:
                    for r in T.unroll(ROWS):
                        for ln in T.vectorized(2 * KEYS):
                            sc[r * skp + jp * 2 * KEYS + ln] = T.float32(neg)
                else:
                    score_pair(q8, qs, k8, kz, ks, mask, sc, acc, g, jp)
            else:
                score_pair(q8, qs, k8, kz, ks, mask, sc, acc, g, jp)

    @T.macro
    def softmax_tile(sc, ep, part, esum, nanc, blk, mx, tot, live, nb):
        for r in T.unroll(ROWS):
            for ln in T.vectorized(KEYS):
                part[r * KEYS + ln] = T.float32(neg)
                nanc[r * KEYS + ln] = 0
                esum[r * KEYS + ln] = 0
            for jb in range(nb):
                for ln in T.vectorized(KEYS):
                    part[r * KEYS + ln] = T.max(part[r * KEYS + ln],
                                                sc[r * skp + jb * KEYS + ln])
                    # the max may drop a NaN: the row's NaN scores are counted here
                    nanc[r * KEYS + ln] = nanc[r * KEYS + ln] + T.Select(
                        tirx.isnan(sc[r * skp + jb * KEYS + ln]), 1, 0)
            # a row of -inf (every key masked): max 0, every e8 0, sum 0, 0/0 = NaN
            mx[r] = T.Select(hmax(part, r * KEYS) == T.float32(neg), T.float32(0),
                             hmax(part, r * KEYS))
        for jb in range(nb):
            # a block whose every score is below max - 6.25 has every e8 = round(e * 255) = 0
            # (exp(-6.25) * 255 < 0.5): it is skipped here and in P @ V
            # (a NaN is not below: its block is computed, its row's result NaN by nanc)
            for ln in T.vectorized(KEYS):
                blk[ln] = T.Select(sc[jb * KEYS + ln] - mx[0] < T.float32(SKIP_BELOW), 0, 1)
            for r in T.unroll(ROWS - 1):
                for ln in T.vectorized(KEYS):
                    blk[ln] = blk[ln] | T.Select(sc[(r + 1) * skp + jb * KEYS + ln]
                                                 - mx[r + 1] < T.float32(SKIP_BELOW), 0, 1)
            live[jb] = T.Select(hsum(blk, 0) > 0, 1, 0)
            if live[jb] == 1:
                for r in T.unroll(ROWS):
                    for ln in T.vectorized(KEYS):
                        ep[r * skp + jb * KEYS + ln] = T.Cast("uint8", T.max(T.round(fast_exp(
                            sc[r * skp + jb * KEYS + ln] - mx[r]) * T.float32(P_LEVELS)),
                            T.float32(0)))
                        esum[r * KEYS + ln] = esum[r * KEYS + ln] + T.Cast(
                            "int32", ep[r * skp + jb * KEYS + ln])
        for r in T.unroll(ROWS):
            tot[r] = T.Cast("float32", hsum(esum, r * KEYS)) + T.Select(
                hsum(nanc, r * KEYS) > 0, T.float32(nan), T.float32(0))

    @T.macro
    def weighted_values(v8, vs, out, ep, tot, oacc, live, g):
        for c in range(dv // dc):
            for ln in T.vectorized(ROWS * dc):
                oacc[ln] = 0
            for jb in range(nblk(g)):
                if live[jb] == 1:
                    for j4 in range(KEYS // 4):
                        for r in T.unroll(ROWS):
                            for cv in T.unroll(dc // KEYS):
                                dot(oacc, r * dc + cv * KEYS, ep, r * skp + jb * KEYS + j4 * 4,
                                    v8, ((bh(g) * (skp // 4) + jb * (KEYS // 4) + j4) * dv
                                         + c * dc + cv * KEYS) * 4)
            for r in range(ROWS):
                if row0(g) + r < s:
                    if dv == d:
                        for cc in T.vectorized(dc):
                            out[bat(g), row0(g) + r, bh(g) % h * d + c * dc + cc] = T.Cast(
                                "float32", oacc[r * dc + cc]) * vs[bh(g) * dv + c * dc + cc] \
                                * (T.float32(1) / tot[r])
                    else:
                        for cc in range(dc):
                            if c * dc + cc < d:
                                out[bat(g), row0(g) + r, bh(g) % h * d + c * dc + cc] = T.Cast(
                                    "float32", oacc[r * dc + cc]) * vs[
                                        bh(g) * dv + c * dc + cc] * (T.float32(1) / tot[r])

    @T.macro
    def body(q, k, v, mask, out):
        q8 = T.alloc_buffer((bh_n * s * dq,), "uint8")
        qs = T.alloc_buffer((bh_n * s,), "float32")
        kb = T.alloc_buffer((bh_n * skp * dq,), "int8")
        kbw = T.decl_buffer((bh_n * skp * d4,), "int32", data=kb.data)
        k8 = T.alloc_buffer((bh_n * d4 * skp * 4,), "int8")
        k8w = T.decl_buffer((bh_n * d4 * skp,), "int32", data=k8.data)
        kz = T.alloc_buffer((bh_n * skp,), "int32")
        ks = T.alloc_buffer((bh_n * skp,), "float32")
        v8 = T.alloc_buffer((bh_n * skp * dv,), "int8")
        v8w = T.decl_buffer((bh_n * skp // 4 * dv,), "int32", data=v8.data)
        vs = T.alloc_buffer((bh_n * dv,), "float32")
        dead = T.alloc_buffer((bh_n * kblocks,), "int32")
        for x in T.parallel(bh_n):
            pack_head(q, k, v, mask, q8, qs, kb, kbw, k8, k8w, kz, ks, v8w, vs, dead, x)
        for it in T.parallel(its):
            sc = T.alloc_buffer((ROWS * skp,), "float32")
            ep = T.alloc_buffer((ROWS * skp,), "uint8")
            acc = T.alloc_buffer((ROWS * 2 * KEYS,), "int32")
            oacc = T.alloc_buffer((ROWS * dc,), "int32")
            part = T.alloc_buffer((ROWS * KEYS,), "float32")
            esum = T.alloc_buffer((ROWS * KEYS,), "int32")
            nanc = T.alloc_buffer((ROWS * KEYS,), "int32")
            live = T.alloc_buffer((kblocks,), "int32")
            blk = T.alloc_buffer((KEYS,), "int32")
            mx = T.alloc_buffer((ROWS,), "float32")
            tot = T.alloc_buffer((ROWS,), "float32")
            for u in range(per):
                if it + u * its < total:
                    scores(q8, qs, k8, kz, ks, mask, sc, acc, dead, it + u * its)
                    softmax_tile(sc, ep, part, esum, nanc, blk, mx, tot, live, nblk(it + u * its))
                    weighted_values(v8, vs, out, ep, tot, oacc, live, it + u * its)

    func = attention_prim_func(body, req)

    return KernelImpl(func, note=(
        f"qattention {h} heads x {d}, {s} queries x {sk} keys, int8 dot products "
        f"({'vpdpbusd' if vnni else 'int32 vector code'}), {total} tiles of {ROWS} rows dealt "
        f"to {its} parallel iterations, {ROWS}x{dc} value tiles"
        f"{', masked' if has_mask else ''}{', causal' if causal else ''}"))
