"""The ``attention`` kernel (:mod:`compiler.ir.ops.attention`): one pass over each head, no
``[B, H, S, Sk]`` score tensor in memory, no transposes.

Written as TIR (like ``cached_attention`` in :mod:`targets.kernels.llm`): the loop structure is
the schedule.

- The keys of every head are first copied once into ``kt[B*H, D, Skp]`` (transposed, padded
  to whole vectors; a parallel loop over batch x head), so the q.k products run as
  ``R x lanes`` register tiles (``R = 4`` query rows, ``lanes`` keys; a broadcast q value
  times a vector of ``kt``), no horizontal sums. (Copied per query block, with 4 x cores
  iterations, DeiT-tiny's attention took 0.92 ms a layer against 0.67 ms; 8-row tiles for
  32-wide heads spilled and were slower: 0.59 against 0.39 ms for MiniLM's. Measured on a
  2-core AVX-512 x86 host, other jobs running.)
- Then parallel over (batch, head, query block): blocks per head are chosen so that the
  number of iterations is a multiple of the cores and at least ``8 x cores`` (MiniLM: 12
  heads x 2 blocks of 64 rows; DeiT-tiny: 3 heads x 6 blocks of 36), so the launcher's chunks
  split evenly over 2 threads and a descheduled thread leaves small pieces behind.
- Per tile of ``R`` query rows: the scores ``sc[R, Skp]`` (scale, mask, causal -inf, padding
  -inf), the row max (vector partial maxima, a row of -inf taken as 0 as softmax does), the exp
  (``fast_exp``, NaN kept) and its sum in vectors, then ``P @ V`` accumulated over the keys
  into ``R x D`` outputs (vectors over the head's columns, which are contiguous in ``v``), each
  row divided by its sum once when written.

Causal: a tile scores and reads only the key blocks up to its last visible key (GPT-2 bench
decoder layer 0.056 -> 0.050 ms). Every buffer is in the default scope (TVM served ``local``
with a workspace alloc/free per parallel iteration; see :mod:`targets.kernels.llm_kv`). The
vector width is the CPU's (``CpuInfo.lanes``).
"""

from __future__ import annotations

import math

from targets.kernels._te import fast_exp
from targets.kernels.base import STACK_ALLOCA_BYTES, KernelImpl, KernelRequest, register_kernel

__all__ = ["parallel_iterations", "value_chunk", "attention_prim_func", "attention_params"]

ROWS = 4    # query rows per register tile
HALF = ROWS // 2


def parallel_iterations(tiles: int, cores: int) -> int:
    """Iterations of the parallel tile loop: ``8 x cores`` (the launcher's chunks per thread
    times the threads, so each chunk is one iteration), or one per tile if there are fewer.
    Iteration ``i`` takes tiles ``i, i + its, i + 2 its, ...`` of the flattened (batch, head,
    row tile) list: the counts differ by at most one, and a causal head's short early tiles and
    long late ones are dealt round-robin rather than in blocks."""
    return max(1, min(tiles, 8 * max(cores, 1)))


def value_chunk(d: int, lanes: int) -> int:
    """Columns of ``P @ V`` accumulated at once: ``ROWS x chunk`` outputs held in registers
    (16 vectors: a 64-wide head on AVX-512). Each half of the tile (``HALF x chunk`` floats)
    must stay under :data:`STACK_ALLOCA_BYTES`, else TVM serves it from its workspace pool and
    LLVM, unable to prove it does not alias the inputs, stores the accumulators to memory after
    every FMA (a head too wide for that and not a multiple of the chunk still works, slower)."""
    chunk = 4 * lanes
    while HALF * chunk * 4 >= STACK_ALLOCA_BYTES and chunk > lanes:
        chunk -= lanes
    return chunk if d % chunk == 0 and d > chunk else d


def attention_params(req: KernelRequest) -> tuple:
    """An attention-shaped request (``attention``, ``qattention``) unpacked: ``batch, queries,
    keys, heads, head_dim, (q_offset, k_offset, v_offset), scale, causal, has_mask, (mb, mh,
    ms)``, the last three 0 or 1: 0 where the mask broadcasts along batch / head / query (its
    index there is 0; all 0 without a mask)."""
    a = req.attrs
    bsz, s = req.input_types[0].shape[:2]
    sk = req.input_types[1].shape[1]
    has_mask = len(req.input_types) == 4
    mshape = req.input_types[3].shape if has_mask else (1, 1, 1, sk)
    return (bsz, s, sk, int(a["heads"]), int(a["head_dim"]),
            (int(a["q_offset"]), int(a["k_offset"]), int(a["v_offset"])), float(a["scale"]),
            bool(a["causal"]), has_mask, tuple(int(x > 1) for x in mshape[:3]))


@register_kernel("attention")
def attention(req: KernelRequest) -> KernelImpl:
    from tvm import tirx
    from tvm.script import tirx as T

    bsz, s, sk, h, d, (oq, ok, ov), scale, causal, has_mask, (mb, mh, ms) = \
        attention_params(req)
    lanes = req.cpu.lanes("f32")
    skp = -(-sk // lanes) * lanes
    kblocks = skp // lanes
    tiles = -(-s // ROWS)                       # row tiles per head
    total = bsz * h * tiles
    its = parallel_iterations(total, req.cpu.num_cores)
    per = -(-total // its)
    dc = value_chunk(d, lanes)
    # query i sees keys 0..i + cshift (causal), or all of them
    cshift = sk - s if causal else sk
    neg = -math.inf

    # a tile's coordinates from its flat index g (inlined expressions, never variables: TVM
    # 0.27 keeps an assigned scalar of a parallel body in a workspace buffer)
    def bat(g):
        return g // (h * tiles)

    def head(g):
        return g // tiles % h

    def row0(g):
        return g % tiles * ROWS

    def nblk(g):
        # causal: key blocks past the tile's last visible key are neither scored nor read
        return tirx.min(kblocks, (row0(g) + ROWS + cshift + lanes - 1) // lanes)

    def nkeys(g):
        return tirx.min(sk, row0(g) + ROWS + cshift)

    @T.macro
    def score(sc, acc, mask, g, r, j, ln):
        if has_mask:
            sc[r, j] = T.Select(
                j <= T.min(sk - 1, row0(g) + r + cshift), acc[r, ln] * T.float32(scale)
                + mask[bat(g) * mb, head(g) * mh, T.min(row0(g) + r, s - 1) * ms,
                       T.min(j, sk - 1)],
                T.float32(neg))
        else:
            sc[r, j] = T.Select(j <= T.min(sk - 1, row0(g) + r + cshift),
                                acc[r, ln] * T.float32(scale), T.float32(neg))

    @T.macro
    def softmax_row(sc, acc, mx, tot, r, nb):
        for ln in T.vectorized(lanes):
            acc[r, ln] = T.float32(neg)
        for jb in range(nb):
            for ln in T.vectorized(lanes):
                acc[r, ln] = T.max(acc[r, ln], sc[r, jb * lanes + ln])
        mx[r] = T.float32(neg)
        for ln in range(lanes):
            mx[r] = T.max(mx[r], acc[r, ln])
        # a row of -inf (every key masked): max 0, exp 0, sum 0, 0/0 = NaN as softmax gives
        mx[r] = T.Select(mx[r] == T.float32(neg), T.float32(0), mx[r])
        for ln in T.vectorized(lanes):
            acc[r, ln] = T.float32(0)
        for jb in range(nb):
            for ln in T.vectorized(lanes):
                sc[r, jb * lanes + ln] = fast_exp(sc[r, jb * lanes + ln] - mx[r])
                acc[r, ln] = acc[r, ln] + sc[r, jb * lanes + ln]
        tot[r] = T.float32(0)
        for ln in range(lanes):
            tot[r] = tot[r] + acc[r, ln]

    @T.macro
    def scores(q, kt, mask, sc, acc, g):
        for jb in range(nblk(g)):
            for r, ln in T.grid(ROWS, lanes):
                acc[r, ln] = T.float32(0)
            for dd in range(d):
                for r in T.unroll(ROWS):
                    for ln in T.vectorized(lanes):
                        acc[r, ln] = acc[r, ln] + q[
                            bat(g), T.min(row0(g) + r, s - 1), oq + head(g) * d + dd
                        ] * kt[bat(g) * h + head(g), dd, jb * lanes + ln]
            for r in T.unroll(ROWS):
                for ln in T.vectorized(lanes):
                    score(sc, acc, mask, g, r, jb * lanes + ln, ln)

    @T.macro
    def weighted_values(v, out, sc, tot, oa, ob, g):
        # rows 0..HALF-1 accumulate in oa, the others in ob (two buffers under the limit)
        for c in range(d // dc):
            for r, dd in T.grid(HALF, dc):
                oa[r, dd] = T.float32(0)
                ob[r, dd] = T.float32(0)
            for j in range(nkeys(g)):
                for r in T.unroll(HALF):
                    for dd in T.vectorized(dc):
                        oa[r, dd] = oa[r, dd] + sc[r, j] * v[
                            bat(g), j, ov + head(g) * d + c * dc + dd]
                        ob[r, dd] = ob[r, dd] + sc[r + HALF, j] * v[
                            bat(g), j, ov + head(g) * d + c * dc + dd]
            for r in range(HALF):
                if row0(g) + r < s:
                    for dd in T.vectorized(dc):
                        out[bat(g), row0(g) + r, head(g) * d + c * dc + dd] = oa[r, dd] * (
                            T.float32(1) / tot[r])
                if row0(g) + r + HALF < s:
                    for dd in T.vectorized(dc):
                        out[bat(g), row0(g) + r + HALF, head(g) * d + c * dc + dd] = ob[
                            r, dd] * (T.float32(1) / tot[r + HALF])

    @T.macro
    def head_block(q, k, v, mask, out):
        kt = T.alloc_buffer((bsz * h, d, skp), "float32")
        for x in T.parallel(bsz * h * kblocks):
            for j, dd in T.grid(lanes, d):
                kt[x // kblocks, dd, x % kblocks * lanes + j] = T.Select(
                    x % kblocks * lanes + j < sk,
                    k[x // kblocks // h, T.min(x % kblocks * lanes + j, sk - 1),
                      ok + x // kblocks % h * d + dd], T.float32(0))
        for it in T.parallel(its):
            sc = T.alloc_buffer((ROWS, skp), "float32")
            acc = T.alloc_buffer((ROWS, lanes), "float32")
            oa = T.alloc_buffer((HALF, dc), "float32")
            ob = T.alloc_buffer((HALF, dc), "float32")
            mx = T.alloc_buffer((ROWS,), "float32")
            tot = T.alloc_buffer((ROWS,), "float32")
            for u in range(per):
                if it + u * its < total:
                    scores(q, kt, mask, sc, acc, it + u * its)
                    for r in T.unroll(ROWS):
                        softmax_row(sc, acc, mx, tot, r, nblk(it + u * its))
                    weighted_values(v, out, sc, tot, oa, ob, it + u * its)

    func = attention_prim_func(head_block, req)
    return KernelImpl(func, note=(
        f"attention {h} heads x {d}, {s} queries x {sk} keys, {total} tiles of {ROWS} rows "
        f"dealt to {its} parallel iterations, {ROWS}x{lanes} score tiles, {ROWS}x{dc} value "
        f"tiles"
        f"{', masked' if has_mask else ''}{', causal' if causal else ''}"))


def attention_prim_func(body, req: KernelRequest):
    """The prim_func of an attention-shaped kernel (``attention``, ``qattention``): f32
    ``q, k, v[, mask] -> out[B, S, H*D]`` as ``req`` types them, its body the TIR macro
    ``body(q, k, v, mask, out)`` (without a mask, ``q`` stands in for it, never read)."""
    from tvm.script import tirx as T

    qt, kt_, vt = req.input_types[:3]
    bsz, s, nq = qt.shape
    sk, nk, nv = kt_.shape[1], kt_.shape[2], vt.shape[2]
    hd = req.output_types[0].shape[2]
    if len(req.input_types) == 4:
        bm, hm, sm, _ = req.input_types[3].shape

        @T.prim_func
        def func(q: T.Buffer((bsz, s, nq), "float32"), k: T.Buffer((bsz, sk, nk), "float32"),
                 v: T.Buffer((bsz, sk, nv), "float32"),
                 mask: T.Buffer((bm, hm, sm, sk), "float32"),
                 out: T.Buffer((bsz, s, hd), "float32")):
            T.func_attr({"tir.noalias": True})
            body(q, k, v, mask, out)
    else:
        @T.prim_func
        def func(q: T.Buffer((bsz, s, nq), "float32"), k: T.Buffer((bsz, sk, nk), "float32"),
                 v: T.Buffer((bsz, sk, nv), "float32"),
                 out: T.Buffer((bsz, s, hd), "float32")):
            T.func_attr({"tir.noalias": True})
            body(q, k, v, q, out)
    return func
