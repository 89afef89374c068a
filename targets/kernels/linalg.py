"""dense / matmul / gemm kernels: one register-tiled GEMM micro-kernel for all three.

Layout and schedule (x86 AVX-512 numbers; everything scales with ``cpu.lanes``):

- A constant right-hand side is packed at compile time to ``[Np/nb, K, nb]`` (``nb`` = two
  SIMD vectors, ``Np`` = N rounded up to ``nb``, padding columns zero), so the inner loop
  reads ``nb`` contiguous weights per k.
- The output is tiled ``mr`` rows x ``nb`` columns; each tile accumulates in a ``[mr, nb]``
  stack buffer (registers once LLVM promotes it) over the full K, rows unrolled, the ``nb``
  axis vectorised. Bias, alpha/beta and the activation run on the tile as it is
  written out (epilogue fusion).
- (batch, n-panel, m-tile) loops are fused and parallel across ``cpu.num_cores``; for a fixed
  n-panel the packed weights (K x nb) stay in L1/L2 while the m-tiles stream past.

Leading batch dims of ``dense`` are flattened into M; ``matmul`` batch dims (numpy
broadcasting) stay batch dims of the tile loop nest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.ir.types import TensorType
from targets.kernels._te import (
    accumulator_dtype,
    activation,
    broadcast_index,
    dtype_of,
    expr,
    placeholders,
    schedule_generic,
    tvm_dtype,
)
from targets.kernels.base import STACK_ALLOCA_BYTES, KernelImpl, KernelRequest, register_kernel

__all__ = ["pack_nk", "gemm_tiles"]


def gemm_tiles(req: KernelRequest, M: int, N: int) -> tuple[int, int]:
    """(mr, nb): rows per register tile, columns per packed panel.

    The ``mr x nb`` accumulator tile stays under :data:`STACK_ALLOCA_BYTES` (f32 sums), so it
    is a stack slot LLVM keeps in registers, not a workspace buffer allocated and freed for
    every tile (with 8 x 32 tiles, exactly 1 KiB, DeiT-tiny's 197x192x576 dense ran 0.404 ms
    on one thread against 0.386 ms under the limit). Among the rows that fit, a divisor of
    ``M`` (preferring 8, then 4, 6, 7, 5), else the count that pads ``M`` least. The tile
    also leaves 4 of the CPU's vector registers free (two weight vectors, the broadcast, one
    spare): an x86-64-v3 build's 8 x 2 ymm tile spilled (MiniLM's 128x384x1152 at 18.5
    GMAC/s on one thread of an AMD EPYC (Zen 4) host, 54 with 6 x 2); 32-register ISAs keep 8 rows."""
    from targets.kernels.conv_common import vector_registers

    lanes = req.cpu.lanes("f32")
    nb = lanes if N <= lanes else 2 * lanes
    most = max(1, min((STACK_ALLOCA_BYTES - 1) // (nb * 4),
                      (vector_registers(req.cpu) - 4) // (nb // lanes)))
    if M <= min(8, most):
        return max(M, 1), nb
    fits = [mr for mr in (8, 4, 6, 7, 5) if mr <= most] or [most]
    for mr in fits:
        if M % mr == 0:
            return mr, nb
    return min(sorted(fits, reverse=True), key=lambda mr: -(-M // mr) * mr), nb


def pack_nk(w_nk: np.ndarray, nb: int) -> np.ndarray:
    """``[N, K]`` -> ``[ceil(N/nb), K, nb]`` with zero padding columns."""
    n, k = w_nk.shape
    np_ = -(-n // nb) * nb
    padded = np.zeros((np_, k), w_nk.dtype)
    padded[:n] = w_nk
    return np.ascontiguousarray(padded.reshape(np_ // nb, nb, k).transpose(0, 2, 1))


def _pack_in_kernel(batch: tuple[int, ...], K: int, N: int, nb: int, read: Callable):
    """A packing stage run inside the kernel: ``Bpack[batch..., Np/nb, K, nb]`` from
    ``read(bidx, k, n)`` (n < N), zero padded. For a non-constant right operand whose columns
    are strided (dense / gemm with trans_b) or not a multiple of ``nb``: the micro-kernel then
    reads ``nb`` contiguous values per k, never a gather. Costs O(K*N) per batch."""
    from tvm import te, tirx

    def body(*i):
        bi, p, k, j = list(i[:len(batch)]), i[-3], i[-2], i[-1]
        n = p * nb + j
        v = read(bi, k, te.min(n, N - 1))
        return tirx.Select(n < N, v, tirx.const(0, dtype_of(v))) if N % nb else v

    return te.compute(tuple(batch) + (-(-N // nb), K, nb), body, name="Bpack")


def ravel_index(idx, shape) -> Any:
    flat: Any = 0
    for i, d in zip(idx, shape, strict=True):
        flat = flat * d + i
    return flat


def unravel(flat, shape) -> list[Any]:
    out = []
    for d in reversed(shape):
        out.append(flat % d if d != 1 else 0)
        flat = flat // d
    return list(reversed(out))


def gemm_func(
    req: KernelRequest, ins: list, out_type: TensorType, *,
    batch: tuple[int, ...], n_mdims: int, M: int, K: int, N: int, nb: int, mr: int,
    a_at: Callable, b_at: Callable, epilogue: Callable,
):
    """Build + schedule ``out[batch..., m-dims..., n] = epilogue(sum_k a*b, idx)``.

    ``a_at(bidx, m, k)`` / ``b_at(bidx, k, n)`` read operands (m may exceed M-1 and n N-1 in
    padded tiles: clamp or read padding). The accumulator is ``C[batch..., Mp, Np]``.
    """
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    out_dt = tvm_dtype(out_type.dtype)
    acc_dt = accumulator_dtype(out_dt)  # f16/bf16: f32 sums (like an fp16 NPU's cube), rounded once
    Mp = -(-M // mr) * mr
    Np = -(-N // nb) * nb
    nbat = len(batch)
    mshape = out_type.shape[nbat:nbat + n_mdims]

    if K > 0:
        k = te.reduce_axis((0, K), "k")

        def c_body(*i):
            bi, m, n = list(i[:nbat]), i[nbat], i[nbat + 1]
            return te.sum(a_at(bi, m, k).astype(acc_dt) * b_at(bi, k, n).astype(acc_dt), axis=k)
    else:
        def c_body(*i):
            return tirx.const(0, acc_dt)
    C = te.compute(tuple(batch) + (Mp, Np), c_body, name="C")

    def out_body(*idx):
        bi = list(idx[:nbat])
        m = ravel_index(idx[nbat:nbat + n_mdims], mshape) if n_mdims else 0
        n = idx[-1]
        v = expr(epilogue(C[tuple(bi) + (m, n)], idx))
        return v if dtype_of(v) == out_dt else v.astype(out_dt)

    Y = te.compute(out_type.shape, out_body, name="out")
    func = te.create_prim_func([*ins, Y])
    if out_type.size == 0 or K == 0:
        return func
    try:
        return _schedule_gemm(Schedule(func), req, nbat=nbat, n_mdims=n_mdims, K=K, nb=nb,
                              mr=mr, work=math.prod(out_type.shape) * K)
    except Exception:  # noqa: BLE001  (a shape the tiling cannot express: still compile)
        sch = Schedule(func)
        schedule_generic(sch, req.cpu, 0)
        return sch.mod["main"]


def _schedule_gemm(sch, req: KernelRequest, *, nbat: int, n_mdims: int, K: int, nb: int,
                   mr: int, work: int):
    """The register-tiled schedule of :func:`gemm_func`'s blocks (raises when a loop nest
    cannot take it; the caller then falls back to a generic schedule)."""
    try:
        pblk = sch.get_sblock("Bpack")
    except Exception:  # noqa: BLE001  (no in-kernel packing stage)
        pblk = None
    if pblk is not None:
        pl = sch.get_loops(pblk)
        size = math.prod(int(sch.get(x).extent) for x in pl)
        sch.vectorize(pl[-1])
        outer_p = sch.fuse(*pl[:-2]) if len(pl) > 3 else pl[0]
        if req.cpu.num_cores > 1 and size >= 1 << 16:
            sch.parallel(outer_p)
    cblk, oblk = sch.get_sblock("C"), sch.get_sblock("out")
    loops = sch.get_loops(oblk)
    bl = loops[:nbat]
    ml = loops[nbat:nbat + n_mdims]
    nl = loops[-1]
    outer = []
    if bl:
        outer.append(sch.fuse(*bl) if len(bl) > 1 else bl[0])
    no, ni = sch.split(nl, [None, nb])
    outer.append(no)
    if ml:
        mf = sch.fuse(*ml) if len(ml) > 1 else ml[0]
        mo, mi = sch.split(mf, [None, mr])
        outer.append(mo)
        sch.reorder(*outer, mi, ni)
    else:
        sch.reorder(*outer, ni)
    target = sch.get(outer[-1])
    prefix = 1 + next(i for i, lp in enumerate(sch.get_loops(oblk))
                      if sch.get(lp).same_as(target))
    sch.compute_at(cblk, outer[-1])   # global scope: a stack slot (see STACK_ALLOCA_BYTES)
    # C's own loops: (batch: unit, dropped) m (dropped when mr == 1), n, k (dropped if K == 1)
    own = sch.get_loops(cblk)[prefix:]
    ck = own[-1] if K > 1 else None
    spatial = own[:-1] if K > 1 else own
    cn = spatial[-1]
    cm = spatial[-2] if mr > 1 and len(spatial) >= 2 else None
    if ck is not None:
        sch.reorder(ck, *([cm] if cm is not None else []), cn)
    if cm is not None:
        sch.unroll(cm)
    sch.vectorize(cn)
    sch.vectorize(ni)
    if req.cpu.num_cores > 1 and work >= 1 << 16:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    init = sch.decompose_reduction(cblk, ck if ck is not None else (cm or cn))
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def bias_act(req: KernelRequest, bias_at: Callable | None) -> Callable:
    kind = req.attrs.get("activation", "none")
    lo, hi = req.attrs.get("clip_min", 0.0), req.attrs.get("clip_max", 6.0)

    def epilogue(acc, idx):
        v = acc
        if bias_at is not None:
            v = v + bias_at(idx)
        return activation(v, kind, lo, hi)
    return epilogue


@register_kernel("dense")
def dense(req: KernelRequest) -> KernelImpl:
    xt, wt = req.input_types[0], req.input_types[1]
    out = req.output_types[0]
    N, K = wt.shape
    lead = xt.shape[:-1]
    M = math.prod(lead)
    mr, nb = gemm_tiles(req, M, N)
    batch: tuple[int, ...] = ()
    if len(lead) > 1 and lead[-1] % mr:
        # the tiles would straddle rows of the last leading dim, which the loop nest cannot
        # express compactly: the other leading dims become batch dims of the tile loops
        batch, lead, M = lead[:-1], lead[-1:], lead[-1]
        mr, nb = gemm_tiles(req, M, N)
    packed = 1 in req.const_inputs
    types = {}
    if packed:
        types[1] = TensorType((-(-N // nb), K, nb), wt.dtype)
    ins = placeholders(req, types)
    X, W = ins[0], ins[1]

    def a_at(bi, m, k):
        if M != (-(-M // mr) * mr):
            from tvm import te
            m = te.min(m, M - 1)
        return X[tuple(bi) + tuple(unravel(m, lead)) + (k,)]

    if not packed:  # weights computed at run time: pack them inside the kernel
        W = _pack_in_kernel((), K, N, nb, lambda bi, k, n: W[n, k])

    def b_at(bi, k, n):
        return W[n // nb, k, n % nb]

    bias_at = (lambda idx: ins[2][idx[-1]]) if len(ins) > 2 else None
    func = gemm_func(req, ins, out, batch=batch, n_mdims=len(lead), M=M, K=K, N=N, nb=nb,
                      mr=mr, a_at=a_at, b_at=b_at, epilogue=bias_act(req, bias_at))
    transforms = {1: (lambda w, nb=nb: pack_nk(np.asarray(w), nb))} if packed else {}
    return KernelImpl(func, transforms,
                      note=f"dense batch={list(batch)} M={M} K={K} N={N}: {mr}x{nb} tiles"
                           + (", packed weights" if packed else ", packed in the kernel"))


@register_kernel("matmul")
def matmul(req: KernelRequest) -> KernelImpl:
    at, bt = req.input_types
    out = req.output_types[0]
    a_shape = at.shape if at.rank >= 2 else (1,) + at.shape
    if bt.rank < 2:
        return _matvec(req)
    K, N = bt.shape[-2], bt.shape[-1]
    M = a_shape[-2]
    n_mdims = 1 if at.rank >= 2 else 0
    batch = out.shape[:out.rank - 1 - n_mdims]
    mr, nb = gemm_tiles(req, M, N)
    packed = 1 in req.const_inputs and bt.rank == 2
    types = {1: TensorType((-(-N // nb), K, nb), bt.dtype)} if packed else {}
    ins = placeholders(req, types)
    A, B = ins
    Mp = -(-M // mr) * mr

    def a_at(bi, m, k):
        from tvm import te
        if Mp != M:
            m = te.min(m, M - 1)
        if at.rank == 1:
            return A[k]
        return A[tuple(broadcast_index(bi, batch, at.shape[:-2])) + (m, k)]

    bbatch = bt.shape[:-2]
    repack = not packed and N % nb != 0
    if repack:  # ragged last panel: pack B inside the kernel (no clamped gathers)
        B = _pack_in_kernel(bbatch, K, N, nb,
                            lambda bi, k, n: ins[1][tuple(bi) + (k, n)])

    def b_at(bi, k, n):
        if packed:
            return B[n // nb, k, n % nb]
        bb = tuple(broadcast_index(bi, batch, bbatch))
        if repack:
            return B[bb + (n // nb, k, n % nb)]
        return B[bb + (k, n)]

    func = gemm_func(req, ins, out, batch=batch, n_mdims=n_mdims, M=M, K=K, N=N, nb=nb,
                      mr=mr, a_at=a_at, b_at=b_at, epilogue=lambda acc, idx: acc)
    transforms = {1: (lambda w, nb=nb: pack_nk(np.asarray(w).T, nb))} if packed else {}
    return KernelImpl(func, transforms,
                      note=f"matmul batch={list(batch)} M={M} K={K} N={N}: {mr}x{nb} tiles")


def _matvec(req: KernelRequest) -> KernelImpl:
    """matmul with a 1-D right operand: a reduction per output element."""
    from tvm import te

    from targets.kernels._te import generic, prim_func

    at, bt = req.input_types
    out = req.output_types[0]
    A, B = placeholders(req)
    K = bt.shape[0]
    k = te.reduce_axis((0, K), "k")
    odt = tvm_dtype(out.dtype)
    dt = accumulator_dtype(odt)

    def body(*idx):
        if at.rank == 1:
            return te.sum(A[k].astype(dt) * B[k].astype(dt), axis=k)
        ai = broadcast_index(idx[:-1], out.shape[:-1], at.shape[:-2])
        return te.sum(A[tuple(ai) + (idx[-1], k)].astype(dt) * B[k].astype(dt), axis=k)

    Y = te.compute(out.shape, body, name="acc" if dt != odt else "out")
    if dt != odt:
        Y = te.compute(out.shape, lambda *i: Y[i].astype(odt), name="out")
    return KernelImpl(prim_func([A, B, Y], generic(req.cpu, out.dtype)), note="matvec")


@register_kernel("gemm")
def gemm(req: KernelRequest) -> KernelImpl:
    at, bt = req.input_types[0], req.input_types[1]
    out = req.output_types[0]
    ta, tb = req.attrs.get("trans_a", False), req.attrs.get("trans_b", False)
    alpha, beta = float(req.attrs.get("alpha", 1.0)), float(req.attrs.get("beta", 1.0))
    M, K = (at.shape[1], at.shape[0]) if ta else at.shape
    N = bt.shape[0] if tb else bt.shape[1]
    mr, nb = gemm_tiles(req, M, N)
    packed = 1 in req.const_inputs
    types = {1: TensorType((-(-N // nb), K, nb), bt.dtype)} if packed else {}
    ins = placeholders(req, types)
    A, B = ins[0], ins[1]
    Mp = -(-M // mr) * mr

    def a_at(bi, m, k):
        from tvm import te
        if Mp != M:
            m = te.min(m, M - 1)
        return A[k, m] if ta else A[m, k]

    if not packed and (tb or N % nb):  # strided or ragged: pack inside the kernel
        B = _pack_in_kernel((), K, N, nb,
                            lambda bi, k, n: ins[1][n, k] if tb else ins[1][k, n])
        packed_rt = True
    else:
        packed_rt = False

    def b_at(bi, k, n):
        if packed or packed_rt:
            return B[n // nb, k, n % nb]
        return B[k, n]

    def epilogue(acc, idx):
        from tvm import tirx
        acc = expr(acc)
        dt = dtype_of(acc)
        v = acc if alpha == 1.0 else acc * tirx.const(alpha, dt)
        if len(ins) > 2 and beta != 0.0:
            c = ins[2][tuple(broadcast_index(idx, out.shape, req.input_types[2].shape))]
            v = v + (c if beta == 1.0 else c * tirx.const(beta, dt))
        return v

    func = gemm_func(req, ins, out, batch=(), n_mdims=1, M=M, K=K, N=N, nb=nb, mr=mr,
                      a_at=a_at, b_at=b_at, epilogue=epilogue)

    def pack(w, nb=nb, tb=tb):
        w = np.asarray(w)
        return pack_nk(w if tb else w.T, nb)

    return KernelImpl(func, {1: pack} if packed else {},
                      note=f"gemm M={M} K={K} N={N}: {mr}x{nb} tiles")
