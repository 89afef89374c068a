"""The ``embed_wq`` kernel: token rows gathered from a group-wise int4 / int3 / int2 table
(:mod:`compiler.ir.ops.embed_q`).

The table's codes, scales and offsets are packed at compile time exactly as ``dense_wq``
packs a weight (``pack_nk`` into ``[ceil(V/nb), bytes per row, nb]`` panels, ``nb`` from
:func:`targets.kernels.linalg.gemm_tiles`), so a tied embedding whose output projection is
``dense_wq`` over the same arrays is stored once in the package (the package keeps identical
arrays once, by content).

A row's codes are a little-endian bit stream (code ``d`` at bit ``bits * d``), so for every
bit width the code is two neighbouring bytes of the row's panel column shifted and masked; the
work is ``T x D`` such lookups, nothing next to the output projection's cost.
"""

from __future__ import annotations

import numpy as np

from targets.kernels._te import generic, prim_func
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__ = ["table_panel"]


def table_panel(req: KernelRequest, rows: int) -> int:
    """Rows per packed panel: what ``dense_wq`` uses for an ``N = rows`` weight."""
    from targets.kernels.linalg import gemm_tiles

    return gemm_tiles(req, 1, rows)[1]


@register_kernel("embed_wq")
def embed_wq(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    from targets.kernels.linalg import pack_nk

    bits, g = int(req.attrs["bits"]), int(req.attrs["group_size"])
    asym = bool(req.attrs.get("asym", False))
    ids_t, wq_t = req.input_types[0], req.input_types[1]
    v, kw = wq_t.shape
    d = kw * 8 // bits
    nb = table_panel(req, v)
    panels = -(-v // nb)
    t = int(np.prod(ids_t.shape, dtype=np.int64))
    Ids = te.placeholder((t,), "int32", name="in0")
    W = te.placeholder((panels, kw, nb), "uint8", name="in1")
    S = te.placeholder((panels, d // g, nb), "float16", name="in2")
    args = [Ids, W, S]
    if asym:
        cdt = "float16" if req.input_types[3].dtype == "f16" else "float32"
        args.append(te.placeholder((panels, d // g, nb), cdt, name="in3"))
    zero = float(1 << (bits - 1))
    mask = (1 << bits) - 1

    def body(i, k):
        r = te.max(te.min(Ids[i], v - 1), 0)
        p, j = r // nb, r % nb
        bit = k * bits
        lo = W[p, bit // 8, j].astype("uint32")
        if bits == 3:   # a code may straddle two bytes (never past its 3-byte word)
            hi = W[p, te.min(bit // 8 + 1, kw - 1), j].astype("uint32")
            lo = tirx.bitwise_or(lo, tirx.shift_left(hi, tirx.const(8, "uint32")))
        u = tirx.bitwise_and(tirx.shift_right(lo, (bit % 8).astype("uint32")),
                             tirx.const(mask, "uint32"))
        val = (u.astype("float32") - tirx.const(zero, "float32")) \
            * S[p, k // g, j].astype("float32")
        return val + args[3][p, k // g, j].astype("float32") if asym else val

    Y = te.compute((t, d), body, name="out")
    pack = {i: (lambda a, nb=nb: pack_nk(np.asarray(a), nb)) for i in (1, 2, 3)[:3 if asym
                                                                                  else 2]}
    return KernelImpl(prim_func([*args, Y], generic(req.cpu, "f32")), pack,
                      note=f"embed_wq int{bits} g{g}: {t} tokens of {d} from {nb}-row panels "
                           f"(dense_wq's layout)")
