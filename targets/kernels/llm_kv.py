"""Kernels of the quantized KV cache (:mod:`compiler.ir.ops.llm_kv`), written as TIR like
``kv_write`` and ``cached_attention`` (:mod:`targets.kernels.llm`), for the same reasons:
the write touches only the rows at ``pos``, the attention reads only ``pos + t + 1`` rows.

- ``kv_write_q`` quantizes each new row when it writes it: per (token, kv head, group) one
  pass for the range (``max|x|``, or min and max), then the codes, ``x * (1 / scale)``
  rounded to nearest-even (``nearbyint``, as ``np.rint``): the rule of
  :func:`compiler.ir.ops.llm_kv.quantize_kv_rows`, so the codes are the reference's.
- ``cached_attention_q`` reads codes and scales where ``cached_attention`` reads floats:
  for a key row, ``lanes`` partial sums of ``scale_g * q . code`` (4-bit codes: byte ``j``
  gives the low nibble of value ``j`` and the high nibble of value ``j + group/2``, two
  vector loads of q per byte vector) plus ``min_g * sum(q over group g)`` (computed once per
  query); for a value row, the softmax weight times the row's group scale, times the int8
  codes, accumulated over ``Dh`` in a vector. Codes are converted to f32 in registers; no
  float copy of the cache exists.
"""

from __future__ import annotations

from compiler.ir.ops.llm_kv import split_attention_inputs
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.llm import attention_macros, dot_lanes, padded_scores

__all__: list[str] = []


@register_kernel("kv_write_q")
def kv_write_q(req: KernelRequest) -> KernelImpl:
    from tvm.script import tirx as T

    bits, group = int(req.attrs["bits"]), int(req.attrs["group"])
    tn, hkv, dh = req.input_types[-2].shape
    c = req.input_types[0].shape[0]
    ng, half = dh // group, group // 2

    @T.prim_func
    def q8(codes: T.Buffer((c, hkv, dh), "int8"), scales: T.Buffer((c, hkv, ng), "float32"),
           new: T.Buffer((tn, hkv, dh), "float32"), pos: T.Buffer((1,), "int32"),
           ocodes: T.Buffer((c, hkv, dh), "int8"), oscales: T.Buffer((c, hkv, ng), "float32")):
        for t, h, g in T.grid(tn, hkv, ng):
            if pos[0] + t < c:
                amax = T.alloc_buffer((1,), "float32")
                inv = T.alloc_buffer((1,), "float32")
                amax[0] = T.float32(0)
                for e in range(group):
                    amax[0] = T.max(amax[0], T.fabs(new[t, h, g * group + e]))
                oscales[pos[0] + t, h, g] = amax[0] / T.float32(127)
                inv[0] = T.Select(amax[0] > T.float32(0),
                                  T.float32(1) / (amax[0] / T.float32(127)), T.float32(0))
                for e in range(group):
                    ocodes[pos[0] + t, h, g * group + e] = T.Cast("int8", T.max(T.min(
                        T.nearbyint(new[t, h, g * group + e] * inv[0]), T.float32(127)),
                        T.float32(-127)))

    @T.prim_func
    def q4(codes: T.Buffer((c, hkv, dh // 2), "uint8"), scales: T.Buffer((c, hkv, ng), "float32"),
           mins: T.Buffer((c, hkv, ng), "float32"), new: T.Buffer((tn, hkv, dh), "float32"),
           pos: T.Buffer((1,), "int32"), ocodes: T.Buffer((c, hkv, dh // 2), "uint8"),
           oscales: T.Buffer((c, hkv, ng), "float32"), omins: T.Buffer((c, hkv, ng), "float32")):
        for t, h, g in T.grid(tn, hkv, ng):
            if pos[0] + t < c:
                lo = T.alloc_buffer((1,), "float32")
                hi = T.alloc_buffer((1,), "float32")
                inv = T.alloc_buffer((1,), "float32")
                lo[0] = new[t, h, g * group]
                hi[0] = new[t, h, g * group]
                for e in range(group):
                    lo[0] = T.min(lo[0], new[t, h, g * group + e])
                    hi[0] = T.max(hi[0], new[t, h, g * group + e])
                oscales[pos[0] + t, h, g] = (hi[0] - lo[0]) / T.float32(15)
                omins[pos[0] + t, h, g] = lo[0]
                inv[0] = T.Select(hi[0] > lo[0],
                                  T.float32(1) / ((hi[0] - lo[0]) / T.float32(15)),
                                  T.float32(0))
                for j in range(half):
                    ocodes[pos[0] + t, h, g * half + j] = T.bitwise_or(
                        T.Cast("uint8", T.max(T.min(T.nearbyint(
                            (new[t, h, g * group + j] - lo[0]) * inv[0]), T.float32(15)),
                            T.float32(0))),
                        T.shift_left(T.Cast("uint8", T.max(T.min(T.nearbyint(
                            (new[t, h, g * group + half + j] - lo[0]) * inv[0]),
                            T.float32(15)), T.float32(0))), T.uint8(4)))

    return KernelImpl(q8 if bits == 8 else q4,
                      note=f"kv_write_q {tn} rows of {hkv}x{dh}, {bits}-bit groups of {group}")


@register_kernel("cached_attention_q")
def cached_attention_q(req: KernelRequest) -> KernelImpl:
    from tvm.script import tirx as T

    kb, kg, vg = int(req.attrs["k_bits"]), int(req.attrs["k_group"]), int(req.attrs["v_group"])
    qt, _, _, _ = split_attention_inputs(req.input_types, kb)
    tn, hq, dh = qt.shape
    c, hkv, _ = req.input_types[-2].shape
    rep, pairs = hq // hkv, tn * hq
    kng, vng, half = dh // kg, dh // vg, kg // 2
    lanes = dot_lanes(req, half if kb == 4 else kg)
    chunks = (half if kb == 4 else kg) // lanes
    scale = float(req.attrs["scale"])
    neg = -3.0e38
    cpad = padded_scores(c)
    tree_sum, exp_scores = attention_macros(lanes)

    @T.macro
    def weighted_values(s, n, th, acc, tot, vc, vs, out):
        """out = sum_j s[j] * dequant(V[j]) / sum_j s[j], V read as int8 codes x group scales."""
        tot[0] = T.float32(0)
        for d in T.vectorized(dh):
            acc[d] = T.float32(0)
        for j in range(n):
            tot[0] = tot[0] + s[j]
            for g in range(vng):
                for d in T.vectorized(vg):
                    acc[g * vg + d] = acc[g * vg + d] + s[j] * vs[j, th % hq // rep, g] \
                        * T.Cast("float32", vc[j, th % hq // rep, g * vg + d])
        for d in T.vectorized(dh):
            out[th // hq, th % hq * dh + d] = acc[d] / tot[0]

    @T.prim_func
    def k4(q: T.Buffer((tn, hq, dh), "float32"), kc: T.Buffer((c, hkv, dh // 2), "uint8"),
           ks: T.Buffer((c, hkv, kng), "float32"), km: T.Buffer((c, hkv, kng), "float32"),
           vc: T.Buffer((c, hkv, dh), "int8"), vs: T.Buffer((c, hkv, vng), "float32"),
           pos: T.Buffer((1,), "int32"), out: T.Buffer((tn, hq * dh), "float32")):
        for th in T.parallel(pairs):
            s = T.alloc_buffer((cpad,), "float32")
            part = T.alloc_buffer((lanes,), "float32")
            acc = T.alloc_buffer((dh,), "float32")
            qs = T.alloc_buffer((kng,), "float32")
            mx = T.alloc_buffer((1,), "float32")
            dot = T.alloc_buffer((1,), "float32")
            tot = T.alloc_buffer((1,), "float32")
            n = T.min(pos[0] + th // hq, c - 1) + 1
            for g in range(kng):
                qs[g] = T.float32(0)
                for e in range(kg):
                    qs[g] = qs[g] + q[th // hq, th % hq, g * kg + e]
            mx[0] = T.float32(neg)
            for j in range(n):
                dot[0] = T.float32(0)
                for g in range(kng):   # per group: sum q * code, then * scale + min * sum q
                    for lane in T.vectorized(lanes):
                        part[lane] = T.float32(0)
                    for ch in range(chunks):
                        for lane in T.vectorized(lanes):
                            part[lane] = part[lane] \
                                + q[th // hq, th % hq, g * kg + ch * lanes + lane] * T.Cast(
                                    "float32", T.bitwise_and(
                                        kc[j, th % hq // rep, g * half + ch * lanes + lane],
                                        T.uint8(15))) \
                                + q[th // hq, th % hq, g * kg + half + ch * lanes + lane] \
                                * T.Cast("float32", T.shift_right(
                                    kc[j, th % hq // rep, g * half + ch * lanes + lane],
                                    T.uint8(4)))
                    tree_sum(part)
                    dot[0] = dot[0] + part[0] * ks[j, th % hq // rep, g] \
                        + km[j, th % hq // rep, g] * qs[g]
                s[j] = dot[0] * T.float32(scale)
                mx[0] = T.max(mx[0], s[j])
            exp_scores(s, n, mx)
            weighted_values(s, n, th, acc, tot, vc, vs, out)

    @T.prim_func
    def k8(q: T.Buffer((tn, hq, dh), "float32"), kc: T.Buffer((c, hkv, dh), "int8"),
           ks: T.Buffer((c, hkv, kng), "float32"),
           vc: T.Buffer((c, hkv, dh), "int8"), vs: T.Buffer((c, hkv, vng), "float32"),
           pos: T.Buffer((1,), "int32"), out: T.Buffer((tn, hq * dh), "float32")):
        for th in T.parallel(pairs):
            s = T.alloc_buffer((cpad,), "float32")
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
                for g, ch in T.grid(kng, chunks):
                    for lane in T.vectorized(lanes):
                        part[lane] = part[lane] + ks[j, th % hq // rep, g] \
                            * q[th // hq, th % hq, g * kg + ch * lanes + lane] \
                            * T.Cast("float32", kc[j, th % hq // rep, g * kg + ch * lanes + lane])
                tree_sum(part)
                dot[0] = part[0]
                s[j] = dot[0] * T.float32(scale)
                mx[0] = T.max(mx[0], s[j])
            exp_scores(s, n, mx)
            weighted_values(s, n, th, acc, tot, vc, vs, out)

    return KernelImpl(k4 if kb == 4 else k8,
                      note=f"cached_attention_q T={tn} {hq}/{hkv} heads x {dh}, context {c}, "
                           f"K {kb}-bit g{kg}, V 8-bit g{vg}, {lanes}-lane dots")
