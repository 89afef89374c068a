"""Kernels for the weight-only quantized ops: dense_wq, gather_q, norm_f16.

``dense_wq`` is the float GEMM micro-kernel of :mod:`targets.kernels.linalg` (register tiles
``mr x nb``, full-K accumulation in a local tile, epilogue fusion) with the weight operand
decoded inside the K loop: constant weights are packed at compile time to
``[ceil(N/nb), K/2, nb]`` u8 (int4, two k per byte, low nibble = even k) or ``[.., K, nb]`` i8
and the scales to ``[ceil(N/nb), K/g, nb]`` f16, so for each k the inner loop loads ``nb``
contiguous bytes, shifts/masks them to nibbles, converts, multiplies by the group's scale and
accumulates. When several row tiles read the same n-panel (M > mr), each panel is decoded once
into a ``[K, nb]`` f32 scratch inside the parallel n-panel loop (computed at that loop: one
panel at a time, in L1/L2) and the row tiles stream past it; for M <= mr (GEMV, token-by-token
decoding) the decode stays in the K loop. No dequantised weight tensor exists; the weights
stay 4 (8) bits in memory.

``gather_q``: one output element = one i16 load, a convert and a multiply by the row's
scale. ``norm_f16``: the reference's numerics (input rounded to f16, f32 statistics, result
rounded to f16), row-scheduled like layer_norm when the normalised axes are the trailing ones.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.ir.types import TensorType
from targets.kernels._te import expr, generic, placeholders, prim_func
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.linalg import bias_act, gemm_func, gemm_tiles, pack_nk, unravel

__all__: list[str] = []


@register_kernel("dense_wq")
def dense_wq(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    xt, wt = req.input_types[0], req.input_types[1]
    out = req.output_types[0]
    bits, g = int(req.attrs["bits"]), int(req.attrs["group_size"])
    N = wt.shape[0]
    K = xt.shape[-1]
    lead = xt.shape[:-1]
    M = math.prod(lead)
    mr, nb = gemm_tiles(req, M, N)
    asym = bool(req.attrs.get("asym", False))
    packed = 1 in req.const_inputs and 2 in req.const_inputs and (3 in req.const_inputs
                                                                   or not asym)
    pack = {i: (lambda a, nb=nb: pack_nk(np.asarray(a), nb)) for i in (1, 2, 3)[:3 if asym
                                                                                  else 2]}
    if bits in (2, 3):
        if not packed:
            raise NotImplementedError(f"dense_wq int{bits} needs constant weights")
        from targets.kernels.gemv_q import dense_wq_lowbit

        # 3/2-bit words: every row count (decode and prefill) runs the word-decoding kernel
        return dense_wq_lowbit(req, nb, pack)
    if packed and M == 1 and req.attrs.get("activation", "none") == "none" and K % 2 == 0 \
            and g % 2 == 0:
        from targets.kernels.gemv_q import dense_wq_gemv

        # token-by-token decoding: one pass over the packed weights (same layout as below)
        return dense_wq_gemv(req, nb, pack)
    if req.attrs.get("act_bits", 0):
        raise NotImplementedError("dense_wq act_bits=8 runs only as the one-row GEMV over "
                                  "constant weights (targets/kernels/gemv_q.py)")
    types = {}
    if packed:
        types[1] = TensorType((-(-N // nb), wt.shape[1], nb), wt.dtype)
        types[2] = TensorType((-(-N // nb), K // g, nb), "f16")
        if asym:
            types[3] = TensorType((-(-N // nb), K // g, nb), "f32")
    ins = placeholders(req, types)
    X, W, S = ins[0], ins[1], ins[2]
    Mp = -(-M // mr) * mr

    def a_at(bi, m, k):
        if M != Mp:
            m = te.min(m, M - 1)
        return X[tuple(unravel(m, lead)) + (k,)]

    def w_at(n, kk):
        return W[n // nb, kk, n % nb] if packed else W[te.min(n, N - 1), kk]

    def s_at(n, grp):
        return S[n // nb, grp, n % nb] if packed else S[te.min(n, N - 1), grp]

    def b_at(bi, k, n):
        if bits == 4:
            byte = expr(w_at(n, k // 2))
            shift = ((k % 2) * 4).astype("uint8")
            q = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
            qf = q.astype("int32").astype("float32") - tirx.const(8.0, "float32")
        else:
            qf = expr(w_at(n, k)).astype("float32")
        w = qf * expr(s_at(n, k // g)).astype("float32")
        if asym:
            grp = k // g
            off = ins[3][n // nb, grp, n % nb] if packed else ins[3][te.min(n, N - 1), grp]
            w = w + expr(off)
        return w

    nb_ = 4 if asym else 3
    bias_at = (lambda idx: ins[nb_][idx[-1]]) if len(ins) > nb_ else None
    epilogue = bias_act(req, bias_at)
    if packed and M > mr:  # several row tiles read each panel: decode it once per panel
        func = _panel_gemm(req, ins, out, lead, M, K, N, nb, mr, a_at, b_at, epilogue)
        how = "panel decoded once per n-panel into a [K, nb] f32 scratch"
    else:
        func = gemm_func(req, ins, out, batch=(), n_mdims=len(lead), M=M, K=K, N=N, nb=nb,
                          mr=mr, a_at=a_at, b_at=b_at, epilogue=epilogue)
        how = "decoded in the K loop"
    transforms = pack if packed else {}
    return KernelImpl(func, transforms,
                      note=f"dense_wq int{bits} g{g} M={M} K={K} N={N}: {mr}x{nb} tiles, {how}")


def _panel_gemm(req: KernelRequest, ins: list, out: TensorType, lead: tuple[int, ...], M: int,
                K: int, N: int, nb: int, mr: int, a_at, b_at, epilogue):
    """The GEMM of :func:`targets.kernels.linalg._gemm_func` with the weight panel of each
    n-panel decoded (unpack + scale) once into a ``[K, nb]`` f32 buffer that every row tile of
    that panel then reads; parallel over n-panels."""
    from tvm import te
    from tvm.s_tir import Schedule

    Mp = -(-M // mr) * mr
    Np = -(-N // nb) * nb
    Wd = te.compute((Np // nb, K, nb), lambda p, k, j: b_at([], k, p * nb + j), name="Wd")
    k = te.reduce_axis((0, K), "k")
    C = te.compute((Mp, Np), lambda m, n: te.sum(
        expr(a_at([], m, k)).astype("float32") * Wd[n // nb, k, n % nb], axis=k), name="C")
    nm = len(lead)

    def out_body(*idx):
        from targets.kernels.linalg import ravel_index
        m = ravel_index(idx[:nm], lead) if nm else 0
        return expr(epilogue(C[m, idx[-1]], idx)).astype("float32")

    Y = te.compute(out.shape, out_body, name="out")
    sch = Schedule(te.create_prim_func([*ins, Y]))
    wblk, cblk, oblk = sch.get_sblock("Wd"), sch.get_sblock("C"), sch.get_sblock("out")
    loops = sch.get_loops(oblk)
    mf = sch.fuse(*loops[:-1]) if nm > 1 else loops[0]
    mo, mi = sch.split(mf, [None, mr])
    no, ni = sch.split(loops[-1], [None, nb])
    sch.reorder(no, mo, mi, ni)
    sch.compute_at(cblk, mo)
    sch.set_scope(cblk, 0, "local")
    cm, cn, ck = sch.get_loops(cblk)[2:]
    sch.reorder(ck, cm, cn)
    sch.unroll(cm)
    sch.vectorize(cn)
    sch.vectorize(ni)
    sch.compute_at(wblk, no)
    sch.vectorize(sch.get_loops(wblk)[-1])
    if req.cpu.num_cores > 1 and Np // nb >= 2 and M * N * K >= 1 << 16:
        sch.parallel(no)
    init = sch.decompose_reduction(cblk, ck)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


@register_kernel("gather_q")
def gather_q(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    T, S, Idx = placeholders(req)
    tt, it, out = req.input_types[0], req.input_types[2], req.output_types[0]
    V = tt.shape[0]

    def body(*o):
        iv = expr(Idx[tuple(o[:it.rank])] if it.rank else Idx[()]).astype("int32")
        iv = tirx.Select(iv < 0, iv + V, iv)
        iv = te.min(te.max(iv, 0), V - 1)
        return T[iv, o[-1]].astype("float32") * S[iv]

    Y = te.compute(out.shape, body, name="out")
    lanes = req.cpu.lanes("f32")
    if tt.shape[1] % lanes or out.rank < 2:
        return KernelImpl(prim_func([T, S, Idx, Y], generic(req.cpu, "f32")),
                          note=f"gather_q rows of {tt.shape[1]}")
    return KernelImpl(prim_func([T, S, Idx, Y], _gathered_rows(req.cpu, lanes)),
                      note=f"gather_q rows of {tt.shape[1]}, one index per row")


def _gathered_rows(cpu, lanes: int):
    """One task per gathered row (its index read, wrapped and clamped once), the row copied
    in whole vectors: the generic schedule's fused loop recomputed the index per vector."""
    def schedule(sch) -> None:
        blk = sch.get_sblock("out")
        loops = sch.get_loops(blk)
        _, v = sch.split(loops[-1], [None, lanes])
        sch.vectorize(v)
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if cpu.num_cores > 1 and int(sch.get(rows).extent) >= 2:
            sch.parallel(rows)
    return schedule


@register_kernel("norm_f16")
def norm_f16(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    X, Sc, B = placeholders(req)
    xt = req.input_types[0]
    rank = xt.rank
    axes = sorted(a % rank for a in req.attrs["axes"])
    eps = float(req.attrs["epsilon"])
    f32 = "float32"

    def xh(idx):
        return expr(X[tuple(idx)]).astype("float16").astype(f32)

    def param(P, t, idx):
        from targets.kernels._te import broadcast_index
        pi = broadcast_index(list(idx), xt.shape, t.shape)
        return expr(P[tuple(pi)] if pi else P[()]).astype(f32)

    kept = [a for a in range(rank) if a not in axes]
    stat_shape = tuple(xt.shape[a] for a in kept)
    count = math.prod(xt.shape[a] for a in axes) if axes else 1

    def full(stat_idx, red_idx):
        idx = [None] * rank
        for a, v in zip(kept, stat_idx, strict=True):
            idx[a] = v
        for a, v in zip(axes, red_idx, strict=True):
            idx[a] = v
        return idx

    if axes:
        inv_n = tirx.const(1.0 / count, f32)

        def red(fn, name):
            def body(*si):
                ks = [te.reduce_axis((0, xt.shape[a]), f"k{a}") for a in axes]
                return te.sum(fn(si, ks), axis=ks)
            return te.compute(stat_shape, body, name=name)

        mean = red(lambda si, ks: xh(full(si, ks)), "mean")

        def centred(si, ks):
            return xh(full(si, ks)) - expr(mean[tuple(si)]) * inv_n

        var = red(lambda si, ks: centred(si, ks) * centred(si, ks), "var")

    def body(*i):
        if axes:
            si = [i[a] for a in kept]
            ri = [i[a] for a in axes]
            y = centred(si, ri) / te.sqrt(expr(var[tuple(si)]) * inv_n + tirx.const(eps, f32))
        else:
            y = xh(i)
        y = y * param(Sc, req.input_types[1], i) + param(B, req.input_types[2], i)
        return y.astype("float16").astype(f32)

    Y = te.compute(xt.shape, body, name="out")
    trailing = bool(axes) and axes == list(range(rank - len(axes), rank))
    if trailing:
        from targets.kernels.nn_misc import row_schedule

        sched = row_schedule(req.cpu, ["var", "mean"], rank - len(axes), count,
                              req.cpu.lanes("f32"))
        note = f"norm_f16 rows of {count}, row-parallel"
    else:
        sched, note = generic(req.cpu, "f32"), f"norm_f16 axes {axes}"
    return KernelImpl(prim_func([X, Sc, B, Y], sched), note=note)
