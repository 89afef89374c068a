"""Normalisation, softmax and friends: softmax, log_softmax, layer_norm, batch_norm,
instance_norm, lrn, prelu, pad, resize.

softmax / log_softmax / layer_norm over the last axis (the transformer case) get a row
schedule: rows parallel across cores, each row's statistics computed right before it is
written (compute_at the row loop), every reduction rfactor-ed over SIMD lanes so max, sum
and exp vectorise, the output pass vectorised. Other axes use the generic schedule.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.ir.ops.add_norm import split_operands
from compiler.ir.ops.nn_resize import resize_axis
from compiler.ir.ops.quant import qrange
from targets.kernels._te import (
    PARALLEL_MIN,
    broadcast_index,
    fast_exp,
    generic,
    placeholders,
    prim_func,
    tvm_dtype,
)
from targets.kernels._te import (
    load as _load,
)
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest, register_kernel
from targets.kernels.norm_rows import tree_row_schedule, tree_stats, tree_width

__all__: list[str] = []


def row_schedule(cpu: CpuInfo, blocks: list[str], n_rows_dims: int, length: int,
                  lanes: int, row_buffers: frozenset[str] = frozenset(),
                  out_length: int | None = None):
    """Schedule ``out`` row by row. ``blocks`` (consumers first) are computed per row:
    reductions (row statistics) rfactor-ed over ``lanes`` when the row length allows, names
    in ``row_buffers`` are row-sized intermediates, vectorised. ``out_length``: the output's
    row when the intermediates' rows are padded to ``length`` (the output pass then stays a
    plain loop unless it divides too)."""

    def schedule(sch) -> None:
        from targets.kernels._te import inline_all

        inline_all(sch, keep=row_buffers)
        out = sch.get_sblock("out")
        loops = sch.get_loops(out)
        rows = loops[:n_rows_dims]
        k = loops[-1]
        n_rows = math.prod(int(sch.get(lp).extent) for lp in rows) if rows else 1
        # at least two vectors a row: with one, the split's outer loop has extent 1 and
        # compute_at drops it, so the rfactor block has no loop pair to reorder
        vec = lanes if lanes > 1 and length % lanes == 0 and length >= 2 * lanes else 0
        if vec and (out_length is None or out_length % vec == 0):
            _, kv = sch.split(k, [None, vec])
            sch.vectorize(kv)
        if not rows:
            return
        r = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        if cpu.num_cores > 1 and n_rows * length >= PARALLEL_MIN and n_rows >= 2:
            sch.parallel(r)
        order, rfs = [], []  # consumers first: compute_at puts each before its first reader
        for name in blocks:
            blk = sch.get_sblock(name)
            order.append(blk)
            if vec and name not in row_buffers:
                _, ki = sch.split(sch.get_loops(blk)[-1], [None, vec])
                rf = sch.rfactor(ki, factor_axis=0)
                order.append(rf)
                rfs.append(rf)
        for blk in order:
            sch.compute_at(blk, r)
        if not vec:
            return
        for name in row_buffers:
            _, bv = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, vec])
            sch.vectorize(bv)
        for rf in rfs:
            rl = sch.get_loops(rf)
            # rf block: ..., ki (spatial), ko (reduce) -> ko outside, ki vectorised
            sch.reorder(rl[-1], rl[-2])
            sch.vectorize(rl[-2])
            sch.decompose_reduction(rf, rl[-1])
    return schedule


def _last_axis(req: KernelRequest) -> bool:
    x = req.input_types[0]
    return x.rank >= 1 and req.attrs.get("axis", -1) % x.rank == x.rank - 1


@register_kernel("softmax", "log_softmax")
def softmax(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt = req.input_types[0]
    dt = tvm_dtype(xt.dtype)
    axis = req.attrs["axis"] % xt.rank
    n = xt.shape[axis]
    stat_shape = tuple(d for i, d in enumerate(xt.shape) if i != axis)
    lanes = req.cpu.lanes(xt.dtype)
    # softmax rows of a length that is not whole vectors (ViT: 197 tokens) would run scalar:
    # the row is first copied into a row buffer padded with -inf to whole vectors (exp gives
    # 0 there), the max, exp and sum run over it vectorised; only the scaled output has the
    # row's length
    pad = -(-n // lanes) * lanes if (req.op == "softmax" and _last_axis(req) and lanes > 1
                                     and n % lanes and n >= 2 * lanes) else n
    src_x = X
    if pad != n:
        src_x = te.compute(xt.shape[:-1] + (pad,), lambda *i: tirx.Select(
            i[-1] < n, _load(X, i[:-1] + (tirx.min(i[-1], n - 1),)),
            tirx.const(-math.inf, dt)), name="rowx")

    def at(i, k):
        src = list(i)
        src.insert(axis, k)
        return _load(src_x, src)

    def stat_idx(i):
        return tuple(v for j, v in enumerate(i) if j != axis)

    def row_max(*i):
        k = te.reduce_axis((0, pad), "k")
        # te.max may drop a NaN, but exp(NaN - m) is NaN and so is the row's sum: a NaN row
        # still gives NaN (and rfactor needs a built-in reducer)
        return te.max(at(i, k), axis=k)

    mx = te.compute(stat_shape, row_max, name="rowmax")

    def shifted(i, k):
        m = _load(mx, i)
        # a row of -inf: max replaced by 0 (as the reference); NaN and +inf rows give NaN,
        # as in onnxruntime (inf - inf)
        m = tirx.Select(m == tirx.const(-math.inf, dt), tirx.const(0, dt), m)
        return at(i, k) - m

    if req.op == "softmax":
        # exp once per element into a row buffer, summed, then scaled by 1/sum
        ex = te.compute(xt.shape[:-1] + (pad,) if pad != n else xt.shape,
                        lambda *i: fast_exp(shifted(stat_idx(i), i[axis])), name="rowexp")

        def row_sum(*i):
            k = te.reduce_axis((0, pad), "k")
            src = list(i)
            src.insert(axis, k)
            return te.sum(_load(ex, src), axis=k)
    else:
        def row_sum(*i):
            k = te.reduce_axis((0, n), "k")
            return te.sum(fast_exp(shifted(i, k)), axis=k)

    s = te.compute(stat_shape, row_sum, name="rowsum")
    one = tirx.const(1.0, dt)
    if req.op == "softmax":
        def body(*i):
            return _load(ex, i) * (one / _load(s, stat_idx(i)))
    else:
        def body(*i):
            si = stat_idx(i)
            return shifted(si, i[axis]) - te.log(_load(s, si))
    Y = te.compute(xt.shape, body, name="out")
    if _last_axis(req):
        blocks = ["rowsum", "rowexp", "rowmax"] if req.op == "softmax" \
            else ["rowsum", "rowmax"]
        bufs = {"rowexp"} if req.op == "softmax" else set()
        if pad != n:
            blocks, bufs = blocks + ["rowx"], bufs | {"rowx"}
        sched = row_schedule(req.cpu, blocks, xt.rank - 1, pad, lanes, frozenset(bufs), n)
        note = (f"{req.op} rows of {n}, row-parallel, vectorised"
                f"{f' (padded to {pad})' if pad != n else ''}")
    else:
        sched, note = generic(req.cpu, xt.dtype), f"{req.op} over axis {axis}"
    return KernelImpl(prim_func([X, Y], sched), note=note)


@register_kernel("layer_norm", "add_layer_norm")
def layer_norm(req: KernelRequest) -> KernelImpl:
    """layer_norm, or add_layer_norm: the residual add inlined into every read of a row, and
    (with y_scale, y_zp) the quantized result written beside the f32 one by the same loop."""
    from tvm import te, tirx

    ins = placeholders(req)
    xt = req.input_types[0]
    if req.op == "add_layer_norm":
        has_bias, quantized = split_operands(len(ins))
        X = te.compute(xt.shape, lambda *i: ins[0][i] + ins[1][i], name="residual_add")
        norm, norm_t = ins[2:3 + has_bias], req.input_types[2:3 + has_bias]
    else:
        quantized = False
        X, norm, norm_t = ins[0], ins[1:], req.input_types[1:]
    dt = tvm_dtype(xt.dtype)
    axis = req.attrs["axis"] % xt.rank
    eps = float(req.attrs["epsilon"])
    normed = xt.shape[axis:]
    count = math.prod(normed)
    stat_shape = xt.shape[:axis]

    def row_sum(fn):
        def body(*i):
            ks = [te.reduce_axis((0, d), f"k{j}") for j, d in enumerate(normed)]
            return te.sum(fn(i, ks), axis=ks)
        return body

    inv_n = tirx.const(1.0 / max(count, 1), dt)
    lanes = req.cpu.lanes(xt.dtype)
    width = tree_width(count, lanes) if axis == xt.rank - 1 else 0
    if width:
        mean, var = tree_stats(lambda row, k: _load(X, [*row, k]), stat_shape, count, width,
                               dt)
    else:
        mean = te.compute(stat_shape, row_sum(lambda i, ks: _load(X, list(i) + ks)),
                          name="mean")

    def centred(i, ks):
        return _load(X, list(i) + list(ks)) - _load(mean, i) * inv_n

    if not width:
        var = te.compute(stat_shape, row_sum(lambda i, ks: centred(i, ks) * centred(i, ks)),
                         name="var")

    def body(*i):
        row, inner = i[:axis], i[axis:]
        y = centred(row, inner) * te.rsqrt(_load(var, row) * inv_n + tirx.const(eps, dt))
        for p, t in zip(norm, norm_t, strict=True):
            v = _load(p, broadcast_index(inner, normed, t.shape))
            y = y * v if p is norm[0] else y + v
        return y

    outs = [te.compute(xt.shape, body, name="out")]
    transforms = {}
    if quantized:
        s, z = ins[-2], ins[-1]
        lo, hi = qrange(req.output_types[1].dtype)
        Y = outs[0]
        # a constant y_scale is passed as its reciprocal (a multiply per vector instead of a
        # divide; results may move one step at a rounding boundary, as the f32 rows already
        # may against the reference)
        s_at = len(ins) - 2
        if s_at in req.const_inputs:
            transforms[s_at] = _reciprocal

        def quant(*i):
            # as the quantize kernel: tirx.round is LLVM's nearbyint (half to even)
            at = (i[-1],) if req.input_types[-1].rank else ()
            scaled = Y[i] * s[at] if transforms else Y[i] / s[at]
            q = tirx.round(scaled) + z[at].astype("float32")
            q = te.min(te.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
            return q.astype(tvm_dtype(req.output_types[1].dtype))
        outs.append(te.compute(xt.shape, quant, name="quantized"))
    what = req.op + (" +quantize" if quantized else "")
    if width:
        n_rows = math.prod(stat_shape)
        rows = tree_row_schedule(req.cpu, xt.rank - 1, width, lanes,
                                 n_rows * count >= PARALLEL_MIN and n_rows >= 2)
        sched = _then_quantized_rows(rows, lanes, count) if quantized else rows
        note = f"{what} rows of {count}, row-parallel, {width // lanes}-vector statistics"
    elif axis == xt.rank - 1:
        rows = row_schedule(req.cpu, ["var", "mean"], xt.rank - 1, count, lanes)
        sched = _then_quantized_rows(rows, lanes, count) if quantized else rows
        note = f"{what} rows of {count}, row-parallel, vectorised"
    else:
        sched, note = generic(req.cpu, xt.dtype), f"{what} over axes {axis}.."
    return KernelImpl(prim_func([*ins, *outs], sched), transforms, note=note)


def _reciprocal(scale: np.ndarray) -> np.ndarray:
    """``1 / y_scale`` in f32, as the kernel would compute it."""
    return np.float32(1.0) / np.asarray(scale, np.float32)


def _then_quantized_rows(rows, lanes: int, length: int):
    """After the row schedule of ``out``: each row of ``quantized`` (which reads ``out``) is
    written right after that row of ``out``, vectorised, while the row is in L1."""
    def schedule(sch) -> None:
        rows(sch)
        q = sch.get_sblock("quantized")
        sch.reverse_compute_at(q, sch.get_loops(sch.get_sblock("out"))[0])
        if lanes > 1 and length % lanes == 0:
            _, v = sch.split(sch.get_loops(q)[-1], [None, lanes])
            sch.vectorize(v)
    return schedule


@register_kernel("batch_norm")
def batch_norm(req: KernelRequest) -> KernelImpl:
    """Folded at compile time into ``x * a + b`` when the statistics are constants."""
    from tvm import te

    xt = req.input_types[0]
    axis = req.attrs["axis"] % xt.rank
    eps = float(req.attrs["epsilon"])
    ins = placeholders(req)
    X, scale, bias, mean, var = ins

    def body(*i):
        c = i[axis]
        inv = _load(scale, [c]) * te.rsqrt(_load(var, [c]) + eps)
        return _load(X, i) * inv + (_load(bias, [c]) - _load(mean, [c]) * inv)

    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, xt.dtype)), note="batch_norm")


@register_kernel("instance_norm")
def instance_norm(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    ins = placeholders(req)
    X, scale, bias = ins
    xt = req.input_types[0]
    dt = tvm_dtype(xt.dtype)
    nchw = req.attrs["layout"] == "NCHW"
    caxis = 1 if nchw else xt.rank - 1
    sp_axes = list(range(2, xt.rank)) if nchw else list(range(1, xt.rank - 1))
    count = math.prod(xt.shape[a] for a in sp_axes)
    stat_shape = (xt.shape[0], xt.shape[caxis])
    inv_n = tirx.const(1.0 / max(count, 1), dt)

    def full(nc, sp):
        idx = [nc[0], nc[1], *sp] if nchw else [nc[0], *sp, nc[1]]
        return _load(X, idx)

    def red(fn, name):
        def body(n, c):
            ks = [te.reduce_axis((0, xt.shape[a]), f"k{a}") for a in sp_axes]
            return te.sum(fn((n, c), ks), axis=ks)
        return te.compute(stat_shape, body, name=name)

    mean = red(lambda nc, ks: full(nc, ks), "mean")

    def centred(nc, ks):
        return full(nc, ks) - _load(mean, nc) * inv_n

    var = red(lambda nc, ks: centred(nc, ks) * centred(nc, ks), "var")

    def body(*i):
        nc = (i[0], i[caxis])
        sp = [i[a] for a in sp_axes]
        y = centred(nc, sp) * te.rsqrt(_load(var, nc) * inv_n + tirx.const(
            float(req.attrs["epsilon"]), dt))
        return y * _load(scale, [nc[1]]) + _load(bias, [nc[1]])

    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([*ins, Y], generic(req.cpu, xt.dtype)), note="instance_norm")


@register_kernel("lrn")
def lrn(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt = req.input_types[0]
    dt = tvm_dtype(xt.dtype)
    size = int(req.attrs["size"])
    lo = (size - 1) // 2
    C = xt.shape[1]
    alpha, beta, bias = (float(req.attrs[k]) for k in ("alpha", "beta", "bias"))

    def sq(*i):
        j = te.reduce_axis((0, size), "j")
        c = i[1] + j - lo
        src = list(i)
        src[1] = te.min(te.max(c, 0), C - 1)
        v = _load(X, src)
        inside = tirx.And(c >= 0, c < C)
        return te.sum(tirx.Select(inside, v * v, tirx.const(0, dt)), axis=j)

    S = te.compute(xt.shape, sq, name="sqsum")

    def body(*i):
        base = tirx.const(bias, dt) + tirx.const(alpha / size, dt) * _load(S, i)
        return _load(X, i) / te.power(base, tirx.const(beta, dt))

    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([X, Y], generic(req.cpu, xt.dtype)), note=f"lrn size {size}")


@register_kernel("prelu")
def prelu(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    X, S = placeholders(req)
    xt, st = req.input_types
    dt = tvm_dtype(xt.dtype)

    def body(*i):
        x = _load(X, i)
        return tirx.Select(x < tirx.const(0, dt), x * _load(S, broadcast_index(i, xt.shape,
                                                                                st.shape)), x)

    Y = te.compute(xt.shape, body, name="out")
    return KernelImpl(prim_func([X, S, Y], generic(req.cpu, xt.dtype)), note="prelu")


@register_kernel("pad")
def pad(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    r = xt.rank
    pads = req.attrs["pads"]
    mode = req.attrs["mode"]
    dt = tvm_dtype(xt.dtype)
    val = np.asarray(req.attrs["value"]).astype(xt.np_dtype).item()
    begin = pads[:r]
    # after cropping (negative pads), the kept input range on each axis starts at crop_b
    crop_b = [max(0, -p) for p in begin]
    kept = [xt.shape[i] - crop_b[i] - max(0, -pads[i + r]) for i in range(r)]
    pad_b = [max(0, p) for p in begin]

    def src_of(i, d):
        j = i - pad_b[d]  # position in the kept range
        n = kept[d]
        if mode == "edge":
            j = te.min(te.max(j, 0), n - 1)
        elif mode == "reflect":
            if n > 1:
                period = 2 * (n - 1)
                j = tirx.floormod(j, period)
                j = tirx.Select(j >= n, period - j, j)
            else:
                j = tirx.const(0, "int32") * j
        elif mode == "wrap":
            j = tirx.floormod(j, n)
        return j + crop_b[d]

    def body(*i):
        if mode == "constant":
            inside = None
            src = []
            for d in range(r):
                j = i[d] - pad_b[d]
                cond = tirx.And(j >= 0, j < kept[d])
                inside = cond if inside is None else tirx.And(inside, cond)
                src.append(te.min(te.max(j, 0), max(kept[d] - 1, 0)) + crop_b[d])
            if inside is None:
                return _load(X, src)
            return tirx.Select(inside, _load(X, src), tirx.const(val, dt))
        return _load(X, [src_of(i[d], d) for d in range(r)])

    Y = te.compute(out.shape, body, name="out")
    return KernelImpl(prim_func([X, Y], generic(req.cpu, xt.dtype)), note=f"pad {mode}")


def _resize_tables(req: KernelRequest) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per resized axis: (axis, taps[out_len, T] int32, weights[out_len, T] f32), from the
    op's own reference applied to an identity matrix (so every mode matches it)."""

    xt, out = req.input_types[0], req.output_types[0]
    tables = []
    for axis, (n_in, n_out, s) in enumerate(zip(xt.shape, out.shape, req.attrs["scales"],
                                                strict=True)):
        if n_in == n_out and s == 1.0:
            continue
        R = np.asarray(resize_axis(np.eye(n_in), 0, n_out, s, req.attrs))  # [out, in]
        T = max(1, int((np.abs(R) > 0).sum(axis=1).max()))
        taps = np.zeros((n_out, T), np.int32)
        wts = np.zeros((n_out, T), np.float32)
        for o in range(n_out):
            nz = np.nonzero(R[o])[0]
            taps[o, :len(nz)] = nz
            wts[o, :len(nz)] = R[o, nz]
        tables.append((axis, taps, wts))
    return tables


@register_kernel("resize")
def resize(req: KernelRequest) -> KernelImpl:
    from tvm import te

    (X,) = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    dt = tvm_dtype(xt.dtype)
    tables = _resize_tables(req)
    nearest = req.attrs["mode"] == "nearest"
    tabs, extra = [], []
    for axis, taps, wts in tables:
        TI = te.placeholder(taps.shape, "int32", name=f"taps{axis}")
        TW = te.placeholder(wts.shape, "float32", name=f"w{axis}")
        tabs.append((axis, TI, TW, taps.shape[1]))
        extra += [taps] if nearest else [taps, wts]

    def body(*i):
        src = list(i)
        if not tabs:
            return _load(X, src)
        if nearest:
            for axis, TI, _, _ in tabs:
                src[axis] = _load(TI, [i[axis], 0])
            return _load(X, src)
        ks = [te.reduce_axis((0, T), f"t{axis}") for axis, _, _, T in tabs]
        w = None
        for (axis, TI, TW, _), k in zip(tabs, ks, strict=True):
            src[axis] = _load(TI, [i[axis], k])
            wk = _load(TW, [i[axis], k])
            w = wk if w is None else w * wk
        v = _load(X, src).astype("float32") * w
        return te.sum(v, axis=ks).astype(dt) if ks else v.astype(dt)

    Y = te.compute(out.shape, body, name="out")
    params = [X]
    for _, TI, TW, _ in tabs:
        params += [TI] if nearest else [TI, TW]
    impl = KernelImpl(prim_func([*params, Y], generic(req.cpu, xt.dtype)),
                      note=f"resize {req.attrs['mode']} over axes {[t[0] for t in tables]}")
    impl.extra_const_inputs = extra
    return impl
