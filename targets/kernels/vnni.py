"""The x86 int8 micro-kernel: AVX-512 VNNI ``vpdpbusd`` GEMM tiles for qdense and qconv2d.

Chosen by capability (``has_vnni``: the CPU's features include avx512vnni), never by CPU
name; every other CPU takes the generic kernels of ``quant.py``. ``vpdpbusd`` multiplies 64
u8 activations by 64 i8 weights and adds groups of 4 into 16 int32 lanes. Weights are packed
at compile time to ``[N/16, K/4 + 1, 16, 4]`` (i8; convs flatten their taps into K): for an
output-channel block and 4 consecutive k, the 64 bytes one ``vpdpbusd`` reads; the extra last
k-row holds the 16 per-channel weight sums as int32 bytes, which the epilogue needs for the
zero-point term ``sum_k (x - zp) w = sum_k x w - zp * sum_k w``. i8 activations are read as
u8 with the sign bit flipped (``x ^ 0x80 = x + 128``) and zero point + 128.

The register tile is ``mr`` rows x ``16 * nv`` channels of int32 accumulators; each k-step
broadcasts 4 activation bytes of a row and issues ``nv`` vpdpbusd. The tile is a default-scope
buffer of under 1 KiB inside the parallel body: TVM lowers that to a stack alloca, which LLVM
promotes to zmm registers for the whole task (zeroed, accumulated and read by the epilogue
without touching memory). A ``local``-scope buffer there, or one of 1 KiB or more, becomes a
``TVMBackendAllocWorkspace`` call per task (and the intrinsic body has no scalar ``local``
either): with K=384 those calls and the store/reload around them cost a fifth of the kernel
(128x384 -> 384 at one thread: 60% -> 80% of the vpdpbusd peak). The LLVM intrinsic takes ``<64 x i8>`` operands in LLVM 22 (the
``<16 x i32>`` form TVM's own ``dot_16x4_vnni`` uses fails to build there).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from compiler.ir.types import TensorType
from targets.kernels._te import placeholders
from targets.kernels.base import STACK_ALLOCA_BYTES, CpuInfo, KernelImpl, KernelRequest
from targets.kernels.int8_epilogue import channel_stages, epilogue, mult_shift_stage

__all__ = ["has_vnni", "pack_vnni", "pack_conv_vnni", "vnni_qdense", "vnni_qconv",
           "VNNI_INTRIN", "VNNI_LLVM_INTRIN"]

VNNI_INTRIN = "npucc_vnni_u8i8i32_16x4"
VNNI_LLVM_INTRIN = "llvm.x86.avx512.vpdpbusd.512"   # 16 x (4 u8 . 4 i8) into 16 int32


def has_vnni(cpu: CpuInfo) -> bool:
    """Whether the CPU has the 512-bit ``vpdpbusd`` this micro-kernel issues (AVX512-VNNI).
    CPUs without it (AVX2-only, AVX-VNNI's 256-bit form, Arm) take the generic kernel."""
    return cpu.arch == "x86_64" and cpu.has("avx512vnni", "avx512bw")


@functools.cache
def _register_intrin() -> str:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # no named temporary: TVMScript makes it a scalar ``local`` buffer (a workspace
            # call per task inside a parallel loop)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(VNNI_LLVM_INTRIN),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"),
                                                        dtype="int32"), 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, desc, impl)
    return VNNI_INTRIN


def pack_vnni(w_nk: np.ndarray, nb: int = 16) -> np.ndarray:
    """i8 ``[N, K]`` (K % 4 == 0) -> ``[Np/16, K/4 + 1, 16, 4]`` with N padded to ``nb`` (zero
    channels); the last k-row holds each channel's int32 weight sum as 4 little-endian
    bytes."""
    w = np.asarray(w_nk, np.int8)
    n, k = w.shape
    npad = -(-n // nb) * nb
    full = np.zeros((npad, k), np.int8)
    full[:n] = w
    body = full.reshape(npad // 16, 16, k // 4, 4).transpose(0, 2, 1, 3)
    sums = full.astype(np.int32).sum(axis=1).astype("<i4")
    tail = sums.view(np.int8).reshape(npad // 16, 1, 16, 4)
    return np.ascontiguousarray(np.concatenate([body, tail], axis=1))


def _panel(n_ch: int, k: int = 0, l1d_bytes: int = 0) -> int:
    """Output channels per register tile: 64 (four zmm) where the channels are whole panels
    of 64 and one panel's ``k`` weight bytes per channel fit in ``l1d_bytes`` (a qdense with
    panels outermost then reads its weights from L1 for every row tile); else 32 (two zmm)
    unless there are at most 16."""
    if n_ch % 64 == 0 and 0 < 64 * k <= l1d_bytes:
        return 64
    return 32 if n_ch > 16 else 16


def _pick_mr(rows: int, nv: int) -> int:
    """Rows per register tile: the most (at most 7) that divide ``rows`` and keep the
    ``mr x nv`` zmm tile under ``base.STACK_ALLOCA_BYTES`` (MiniLM's 128 rows: 4; a conv's
    56, 28, 14 or 7 output columns: 7)."""
    limit = min(7, (STACK_ALLOCA_BYTES - 1) // (64 * nv))
    for mr in (7, 6, 5, 4, 3, 2):
        if mr <= limit and rows % mr == 0:
            return mr
    return 1


# -- VNNI GEMM-shaped kernels ---------------------------------------------------------------
def _u8_view(req: KernelRequest, x):
    """The activation as u8: itself, or (i8) a stage with the sign bit flipped (x + 128)."""
    from tvm import te

    if req.input_types[0].dtype == "u8":
        return x
    return te.compute(x.shape, lambda *i: (x[i] ^ te.const(-128, "int8")).astype("uint8"),
                      name="xflip")


def _vnni_kernel(req: KernelRequest, ins: list, *, rows_shape: tuple[int, ...], n_ch: int,
                 k4: int, a_at, taps: tuple[int, ...], w_at, nb: int,
                 cols_outer: bool = False):
    """VNNI build of ``out[rows..., n]`` reducing over ``taps`` x (4 * k4).

    ``a_at(rows, taps_axes, k)`` is the u8 activation (a buffer access, for tensorization),
    ``w_at(n, taps_axes, k)`` the packed weight access; ``nb`` channels per register tile
    (:func:`_panel`, as packed). ``cols_outer``: tiles ordered by column panel, then rows
    (one panel's weights stay in L1 across the row tiles, and each thread's chunks read only
    their share of the weights); else by rows, then panels.
    """
    from tvm import te
    from tvm.s_tir import Schedule

    intrin = _register_intrin()
    out_t = req.output_types[0]
    nv = nb // 16
    per_channel = req.input_types[5].rank == 1
    rax = [te.reduce_axis((0, t), f"t{i}") for i, t in enumerate(taps)]
    kax = te.reduce_axis((0, k4 * 4), "k")
    npad = -(-n_ch // nb) * nb

    def c_body(*idx):
        rows, n = idx[:-1], idx[-1]
        return te.sum(a_at(rows, rax, kax).astype("int32")
                      * w_at(n, rax, kax).astype("int32"), axis=[*rax, kax])
    C = te.compute(tuple(rows_shape) + (npad,), c_body, name="C")
    W = ins[1]
    pre = channel_stages(req, ins, n_ch, per_channel,
                         lambda n: _wsum(W, n, int(W.shape[1]) - 1))
    ms = mult_shift_stage(req, ins, n_ch, per_channel)

    def out_body(*idx):
        n = idx[-1]
        mult_shift = (ms[0][n], ms[1][n]) if ms is not None else None
        return epilogue(req, C[idx], n, ins, None, per_channel, mult_shift, pre)
    Y = te.compute(out_t.shape, out_body, name="out")
    sch = Schedule(te.create_prim_func([*ins, Y]))
    cblk, oblk = sch.get_sblock("C"), sch.get_sblock("out")
    loops = sch.get_loops(oblk)
    rloops, nl = loops[:-1], loops[-1]
    mr = _pick_mr(rows_shape[-1], nv)
    no, ni = sch.split(nl, [None, nb])
    ro, ri = sch.split(rloops[-1], [None, mr])
    outer = [no, *rloops[:-1], ro] if cols_outer else [*rloops[:-1], ro, no]
    sch.reorder(*outer, ri, ni)
    sch.compute_at(cblk, outer[-1])   # default scope: the tile is a stack alloca (above)
    work = out_t.size * math.prod(taps) * k4 * 4
    if req.cpu.num_cores > 1 and work >= 1 << 16:
        sch.parallel(sch.fuse(*outer))
    else:
        sch.fuse(*outer)
    own = sch.get_loops(cblk)[1:]  # under the fused outer loop: [m (if mr > 1)], n, taps, k
    nred = 1 + sum(t > 1 for t in taps)  # unit reduction loops are not materialised
    spatial, red = own[:len(own) - nred], own[len(own) - nred:]
    cn = spatial[-1]
    cm = [spatial[-2]] if len(spatial) >= 2 else []
    cnv, cn16 = sch.split(cn, [nv, 16])
    cko, cki = sch.split(red[-1], [None, 4])
    sch.reorder(*red[:-1], cko, *cm, cnv, cn16, cki)
    for lp in cm:
        sch.unroll(lp)
    sch.unroll(cnv)
    init = sch.decompose_reduction(cblk, red[0] if len(red) > 1 else cko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(cn16, intrin)
    sch.vectorize(sch.get_loops(oblk)[-1])
    sch.unroll(sch.get_loops(oblk)[-2])   # constant tile indices: the epilogue reads registers
    return sch.mod["main"]


def _wsum(W, n, row: int):
    """Channel n's weight sum: 4 bytes of the packed sums row, little endian."""
    from tvm import tirx

    v = tirx.const(0, "int32")
    for j in range(4):
        byte = W[n // 16, row, n % 16, j].astype("uint8").astype("int32")
        v = v | (byte << tirx.const(8 * j, "int32"))
    return v


def pack_conv_vnni(w_ohwi: np.ndarray, nb: int = 16) -> np.ndarray:
    """i8 OHWI -> ``[Op/16, KH*KW*C4 + 1, 16, 4]``: O padded to ``nb``, input channels to a
    multiple of 4 (zero weights), taps flattened (kh, kw, c4); the last row holds the channel
    sums as int32 bytes (as :func:`pack_vnni`)."""
    w = np.asarray(w_ohwi, np.int8)
    o, kh, kw, c = w.shape
    cp = -(-c // 4) * 4
    full = np.zeros((o, kh, kw, cp), np.int8)
    full[..., :c] = w
    return pack_vnni(full.reshape(o, kh * kw * cp), nb)


def vnni_qconv(req: KernelRequest) -> KernelImpl | None:
    """The VNNI build of a qconv2d, or None where it does not apply (no VNNI, not NHWC/OHWI,
    grouped, weights not constant)."""
    a = req.attrs
    if not (has_vnni(req.cpu) and a["layout"] == "NHWC" and a["kernel_layout"] == "OHWI"
            and a["groups"] == 1 and 1 in req.const_inputs):
        return None
    from tvm import te, tirx

    xt, wt = req.input_types[0], req.input_types[1]
    out_t = req.output_types[0]
    o, kh, kw, c = wt.shape
    c4 = -(-c // 4)
    n_, h, w_, _ = xt.shape
    pt, pl, pb, pr = a["pads"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    nb = _panel(o)
    packed = TensorType((-(-o // nb) * nb // 16, kh * kw * c4 + 1, 16, 4), "i8")
    ins = placeholders(req, {1: packed})
    X, W, zp = ins[0], ins[1], ins[4]
    i8x = xt.dtype == "i8"
    need_pad = any(a["pads"]) or c % 4 != 0
    if need_pad or i8x:
        zp_u8 = (zp[()].astype("int32") + (128 if i8x else 0)).astype("uint8")

        def pad_body(b, y, x, ch):
            iy, ix = y - pt, x - pl
            inb = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w_, ch < c)
            v = X[b, te.min(te.max(iy, 0), h - 1), te.min(te.max(ix, 0), w_ - 1),
                  te.min(ch, c - 1)]
            v = (v ^ te.const(-128, "int8")).astype("uint8") if i8x else v
            return tirx.Select(inb, v, zp_u8)
        Xp = te.compute((n_, h + pt + pb, w_ + pl + pr, c4 * 4), pad_body, name="xpad")
    else:
        Xp = X

    def a_at(rows, rax, k):
        b, y, x = rows
        return Xp[b, y * sh + rax[0] * dh, x * sw + rax[1] * dw, k]

    def w_at(n, rax, k):
        return W[n // 16, (rax[0] * kw + rax[1]) * c4 + k // 4, n % 16, k % 4]

    func = _vnni_kernel(req, ins, rows_shape=tuple(out_t.shape[:3]), n_ch=o, k4=c4,
                        a_at=a_at, taps=(kh, kw), w_at=w_at, nb=nb)
    return KernelImpl(func, {1: lambda w, nb=nb: pack_conv_vnni(w, nb)},
                      note=f"qconv2d VNNI {kh}x{kw}/{sh} {c}->{o}"
                           + (" padded copy" if need_pad else ""))




def vnni_qdense(req: KernelRequest) -> KernelImpl | None:
    """The VNNI build of a qdense, or None where it does not apply (no VNNI, K not a multiple
    of 4, weights not constant)."""
    xt, wt = req.input_types[0], req.input_types[1]
    N, K = wt.shape
    M = math.prod(xt.shape[:-1])
    if not (has_vnni(req.cpu) and K % 4 == 0 and 1 in req.const_inputs and M > 0):
        return None
    k4 = K // 4
    nb = _panel(N, K, req.cpu.l1d_bytes)
    ins = placeholders(req, {1: TensorType((-(-N // nb) * nb // 16, k4 + 1, 16, 4), "i8")})
    X, W = _u8_view(req, ins[0]), ins[1]
    lead = xt.shape[:-1] or (1,)

    def a_at(rows, rax, k):
        return X[(*rows, k)] if xt.shape[:-1] else X[k]

    def w_at(n, rax, k):
        return W[n // 16, k // 4, n % 16, k % 4]

    # panels outermost: one panel's weights stay in L1 across the row tiles and each thread's
    # chunks read only their share of the weights (a property of any cache hierarchy; the
    # MiniLM figures, weights cold as inside the model: bench/minilm_int8_dense.py)
    func = _vnni_kernel(req, ins, rows_shape=tuple(lead), n_ch=N, k4=k4, a_at=a_at, taps=(),
                        w_at=w_at, nb=nb, cols_outer=True)
    return KernelImpl(func, {1: lambda w, nb=nb: pack_vnni(w, nb)},
                      note=f"qdense VNNI M={M} K={K} N={N}, tiles {_pick_mr(lead[-1], nb // 16)}"
                           f"x{nb} by panel"
                           + (" (i8 x flipped to u8)" if xt.dtype == "i8" else ""))
