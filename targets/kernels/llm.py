"""Kernels for the decoder-LLM ops (:mod:`compiler.ir.ops.llm`).

``rms_norm``, ``silu_mul``, ``rope`` and ``positions`` are TE computes with the generic
schedule (rows parallel, inner axis vectorised). ``kv_write`` and ``cached_attention`` are
written as TIR directly because they need what TE cannot say:

- ``kv_write`` writes only the ``T`` rows at ``pos`` of its result buffer, which the runtime
  binds to the cache operand's buffer (the static KV cache, updated in place); the other
  ``C - T`` rows are never touched, so a decode step costs ``Hkv * Dh`` stores per layer.
- ``cached_attention`` loops over ``min(pos + t, C - 1) + 1`` keys, a bound read from the
  ``pos`` buffer at run time: a decode step at position p reads p + 1 cache rows, not C.
  One (token, head) pair per parallel iteration; scores in a local ``[C]`` buffer, the q.k
  dot products with ``lanes`` partial sums (SIMD, then a tree of vector adds), softmax in f32
  with the exp of 16 scores at a time (:func:`attention_macros`), the value sum vectorised
  over ``Dh``.
"""

from __future__ import annotations

import numpy as np

from targets.kernels._te import expr, fast_exp, fast_sigmoid, generic, placeholders, prim_func
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__ = ["dot_lanes", "attention_macros", "padded_scores"]


@register_kernel("rms_norm")
def rms_norm(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    X, W = placeholders(req)
    xt = req.input_types[0]
    d = xt.shape[-1]
    rows = xt.shape[:-1]
    eps = float(req.attrs["epsilon"])

    def ss_body(*r):
        k = te.reduce_axis((0, d), "k")
        return te.sum(X[(*r, k)] * X[(*r, k)], axis=k)

    ss = te.compute(rows, ss_body, name="ss")

    def body(*i):
        inv = tirx.rsqrt(ss[i[:-1]] / tirx.const(float(d), "float32")
                         + tirx.const(eps, "float32"))
        return X[i] * inv * W[i[-1]]

    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([X, W, Y], generic(req.cpu, "f32")),
                      note=f"rms_norm rows of {d}")


@register_kernel("silu_mul")
def silu_mul(req: KernelRequest) -> KernelImpl:
    from tvm import te

    G, U = placeholders(req)
    Y = te.compute(req.output_types[0].shape,
                   lambda *i: G[i] * fast_sigmoid(expr(G[i])) * U[i], name="out")
    return KernelImpl(prim_func([G, U, Y], generic(req.cpu, "f32")), note="silu(gate) * up")


@register_kernel("rope")
def rope(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    X, P, Cos, Sin = placeholders(req)
    _, _, dh = req.input_types[0].shape
    half = dh // 2
    last = req.input_types[2].shape[0] - 1

    def body(t, h, i):
        p = te.min(P[0] + t, last)
        j = tirx.Select(i < half, i, i - half)
        other = tirx.Select(i < half, -X[t, h, te.min(i + half, dh - 1)],
                            X[t, h, te.max(i - half, 0)])
        return X[t, h, i] * Cos[p, j] + other * Sin[p, j]

    Y = te.compute(req.input_types[0].shape, body, name="out")
    return KernelImpl(prim_func([X, P, Cos, Sin, Y], generic(req.cpu, "f32")),
                      note=f"rope head_dim {dh}")


@register_kernel("positions")
def positions(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (P,) = placeholders(req)
    limit = int(req.attrs["limit"])
    Y = te.compute((int(req.attrs["count"]),), lambda t: te.min(P[0] + t, limit - 1),
                   name="out")
    return KernelImpl(prim_func([P, Y], generic(req.cpu, "i32")), note="positions")


@register_kernel("kv_write")
def kv_write(req: KernelRequest) -> KernelImpl:
    from tvm.script import tirx as T

    c, hkv, dh = req.input_types[0].shape
    tn = req.input_types[1].shape[0]

    @T.prim_func
    def func(cache: T.Buffer((c, hkv, dh), "float32"), new: T.Buffer((tn, hkv, dh), "float32"),
             pos: T.Buffer((1,), "int32"), out: T.Buffer((c, hkv, dh), "float32")):
        for t in range(tn):
            if pos[0] + t < c:
                for h in range(hkv):
                    for d in T.vectorized(dh):
                        out[pos[0] + t, h, d] = new[t, h, d]

    return KernelImpl(func, note=f"kv_write {tn} rows of {hkv}x{dh} in place")


def dot_lanes(req: KernelRequest, dh: int) -> int:
    """f32 lanes of a dot product over ``dh`` values: the CPU's vector, halved until it
    divides ``dh``."""
    lanes = req.cpu.lanes("f32")
    while lanes > 1 and dh % lanes:
        lanes //= 2
    return lanes


def attention_macros(lanes: int):
    """TIR macros the attention kernels share: ``tree_sum(part)`` leaves the sum of the
    ``lanes`` partial sums in ``part[0]`` (a tree of vector adds: 4 steps for 16 lanes, not
    16 dependent scalar adds); ``exp_scores(s, n, mx)`` turns ``s[:n]`` into ``exp(s - mx)``
    16 scores at a time (``fast_exp``'s polynomial: one libm call per key cost more than the
    dot product; ``s`` is padded to whole vectors)."""
    from tvm.script import tirx as T

    @T.macro
    def tree_sum(part):
        if lanes >= 16:
            for lane in T.vectorized(8):
                part[lane] = part[lane] + part[lane + 8]
        if lanes >= 8:
            for lane in T.vectorized(4):
                part[lane] = part[lane] + part[lane + 4]
        if lanes >= 4:
            for lane in T.vectorized(2):
                part[lane] = part[lane] + part[lane + 2]
        if lanes >= 2:
            part[0] = part[0] + part[1]

    @T.macro
    def exp_scores(s, n, mx):
        for jb in range((n + 15) // 16):
            for lane in T.vectorized(16):
                s[jb * 16 + lane] = fast_exp(s[jb * 16 + lane] - mx[0])

    return tree_sum, exp_scores


def padded_scores(c: int) -> int:
    """Scores buffer length for ``c`` keys: whole vectors of 16 for ``exp_scores``."""
    return -(-c // 16) * 16


@register_kernel("cached_attention")
def cached_attention(req: KernelRequest) -> KernelImpl:
    from tvm.script import tirx as T

    tn, hq, dh = req.input_types[0].shape
    c, hkv, _ = req.input_types[1].shape
    rep = hq // hkv
    scale = float(req.attrs["scale"])
    lanes = dot_lanes(req, dh)
    tree_sum, exp_scores = attention_macros(lanes)
    chunks = dh // lanes
    pairs = tn * hq
    neg = -3.0e38

    @T.prim_func
    def func(q: T.Buffer((tn, hq, dh), "float32"), k: T.Buffer((c, hkv, dh), "float32"),
             v: T.Buffer((c, hkv, dh), "float32"), pos: T.Buffer((1,), "int32"),
             out: T.Buffer((tn, hq * dh), "float32")):
        for th in T.parallel(pairs):
            s = T.alloc_buffer((padded_scores(c),), "float32")
            part = T.alloc_buffer((lanes,), "float32")
            acc = T.alloc_buffer((dh,), "float32")
            mx = T.alloc_buffer((1,), "float32")
            dot = T.alloc_buffer((1,), "float32")
            tot = T.alloc_buffer((1,), "float32")
            n = T.min(pos[0] + th // hq, c - 1) + 1
            mx[0] = T.float32(neg)
            for j in range(n):
                for lane in T.vectorized(lanes):
                    part[lane] = T.float32(0)
                for ch in range(chunks):
                    for lane in T.vectorized(lanes):
                        part[lane] = part[lane] + q[th // hq, th % hq, ch * lanes + lane] \
                            * k[j, th % hq // rep, ch * lanes + lane]
                tree_sum(part)
                dot[0] = part[0]
                s[j] = dot[0] * T.float32(scale)
                mx[0] = T.max(mx[0], s[j])
            exp_scores(s, n, mx)
            tot[0] = T.float32(0)
            for d in T.vectorized(dh):
                acc[d] = T.float32(0)
            for j in range(n):
                tot[0] = tot[0] + s[j]
                for d in T.vectorized(dh):
                    acc[d] = acc[d] + s[j] * v[j, th % hq // rep, d]
            for d in T.vectorized(dh):
                out[th // hq, th % hq * dh + d] = acc[d] / tot[0]

    return KernelImpl(func, note=f"cached_attention T={tn} {hq}/{hkv} heads x {dh}, "
                                 f"context {c}, {lanes}-lane dots")


TABLE_DTYPES = {"f32": "float32", "i8": "int8", "i16": "int16"}


def _table_panel(req: KernelRequest) -> int:
    """Rows per panel of a tied embedding table, ``[ceil(V/nb), D, nb]`` (``pack_nk``): the
    same for ``embed_rows`` and ``dense_rows`` of one compile, so both read one array."""
    return 2 * req.cpu.lanes("f32")


@register_kernel("dense_rows")
def dense_rows(req: KernelRequest) -> KernelImpl:
    """The output projection over a tied table packed as ``[P, D, nb]`` panels of ``nb``
    vocabulary rows: one panel per parallel iteration, read once for all x rows, ``nb``
    outputs accumulated in a vector (no horizontal sums), i8 converted in the loop, the row
    scale applied once per output."""
    from tvm.script import tirx as T

    from targets.kernels.linalg import pack_nk

    m, k = req.input_types[0].shape
    n = req.input_types[1].shape[0]
    wdt = TABLE_DTYPES[req.input_types[1].dtype]
    nb = _table_panel(req)
    panels = -(-n // nb)

    @T.prim_func
    def plain(x: T.Buffer((m, k), "float32"), w: T.Buffer((panels, k, nb), wdt),
              out: T.Buffer((m, n), "float32")):
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            for i in range(m):
                for j in T.vectorized(nb):
                    acc[j] = T.float32(0)
                for kk in range(k):
                    for j in T.vectorized(nb):
                        acc[j] = acc[j] + x[i, kk] * T.Cast("float32", w[p, kk, j])
                for j in range(nb):
                    if p * nb + j < n:
                        out[i, p * nb + j] = acc[j]

    @T.prim_func
    def scaled(x: T.Buffer((m, k), "float32"), w: T.Buffer((panels, k, nb), wdt),
               rs: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        for p in T.parallel(panels):
            acc = T.alloc_buffer((nb,), "float32")
            for i in range(m):
                for j in T.vectorized(nb):
                    acc[j] = T.float32(0)
                for kk in range(k):
                    for j in T.vectorized(nb):
                        acc[j] = acc[j] + x[i, kk] * T.Cast("float32", w[p, kk, j])
                for j in range(nb):
                    if p * nb + j < n:
                        out[i, p * nb + j] = acc[j] * rs[p * nb + j]

    func = scaled if len(req.input_types) == 3 else plain
    return KernelImpl(func, {1: lambda a, nb=nb: pack_nk(np.asarray(a), nb)},
                      note=f"dense_rows M={m} K={k} N={n} {wdt}: {nb}-row table panels")


@register_kernel("embed_rows")
def embed_rows(req: KernelRequest) -> KernelImpl:
    """Token rows gathered from the packed table ``[P, D, nb]`` (stride ``nb`` per element:
    D loads per token, nothing next to the projection's cost)."""
    from tvm import te

    from targets.kernels.linalg import pack_nk

    t = req.input_types[0].shape[0]
    v, d = req.input_types[1].shape
    nb = _table_panel(req)
    Ids = te.placeholder((t,), "int32", name="in0")
    wdt = TABLE_DTYPES[req.input_types[1].dtype]
    Tab = te.placeholder((-(-v // nb), d, nb), wdt, name="in1")
    args = [Ids, Tab]
    if len(req.input_types) == 3:
        Rs = te.placeholder((v,), "float32", name="in2")
        args.append(Rs)

    def body(i, j):
        r = te.max(te.min(Ids[i], v - 1), 0)
        val = Tab[r // nb, j, r % nb].astype("float32")
        return val * Rs[r] if len(args) == 3 else val

    Y = te.compute((t, d), body, name="out")
    return KernelImpl(prim_func([*args, Y], generic(req.cpu, "f32")),
                      {1: lambda a, nb=nb: pack_nk(np.asarray(a), nb)},
                      note=f"embed_rows {t} tokens of {d} from {nb}-row table panels")
