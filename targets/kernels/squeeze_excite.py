"""``squeeze_excite``: a squeeze-excitation gate in one kernel (CATALOGUE, nn_fused.py).

``gate(act(mean_hw(x) @ w1 + b1) @ w2 + b2)``: three stages of one PrimFunc instead of a
global pool and two 1x1 convs on a 1x1 map (three launches, two tiny tensors through the
arena).

- ``mean``: channel sums, vectorised over channels (a channel vector per pass over the map,
  NHWC; NCHW sums each channel's plane), parallel over channel vectors when the map is big.
- ``fc1`` / ``fc2``: outer-product form, the reduction outside and the output channels
  vectorised; ``w1``/``b1``/``w2``/``b2`` are zero-padded at compile time to whole vectors
  (``Cr``, ``C`` up to a multiple of ``lanes``), so a 4- or 120-wide layer is still vector
  code. Padded hidden units meet zero rows of ``w2`` and add nothing.
- The gate is written in the result's layout, ``[N, 1, 1, C]`` or ``[N, C, 1, 1]``.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import OpError
from targets.kernels._te import accumulator_dtype, activation, tvm_dtype
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel
from targets.kernels.conv import accumulate_in_registers

__all__ = ["squeeze_excite"]

# channel sums run on several threads above this many input elements (a parallel launch
# costs microseconds; a 14x14x240 map sums in about that)
_PARALLEL_MIN = 200_000
# accumulator vectors of one FC tile (registers; 8 leaves room on a 16-register ISA)
_FC_VECTORS = 8


def _pad_to(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, arr.dtype)
    out[tuple(slice(0, d) for d in arr.shape)] = arr
    return out


@register_kernel("squeeze_excite")
def squeeze_excite(req: KernelRequest) -> KernelImpl:
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    label = f"squeeze_excite {req.node_label}".strip()
    a = req.attrs
    layout = str(a.get("layout", "NCHW"))
    xt = req.input_types[0]
    if xt.rank != 4 or layout not in ("NCHW", "NHWC"):
        raise OpError(f"{label}: needs a 4-D NCHW or NHWC input, got {xt} ({layout})")
    n, c, h, w = (xt.shape if layout == "NCHW" else
                  (xt.shape[0], xt.shape[3], xt.shape[1], xt.shape[2]))
    cr = req.input_types[1].shape[1]
    dtype = tvm_dtype(xt.dtype)
    acc = accumulator_dtype(dtype)
    lanes = req.cpu.lanes(str(xt.dtype))
    crp, cp = -(-cr // lanes) * lanes, -(-c // lanes) * lanes
    X = te.placeholder(xt.shape, dtype, name="in0")
    W1 = te.placeholder((c, crp), dtype, name="in1")
    B1 = te.placeholder((crp,), dtype, name="in2")
    W2 = te.placeholder((crp, cp), dtype, name="in3")
    B2 = te.placeholder((cp,), dtype, name="in4")
    rh, rw = te.reduce_axis((0, h), "rh"), te.reduce_axis((0, w), "rw")

    def pixel(b, ch, y, x):
        return X[b, ch, y, x] if layout == "NCHW" else X[b, y, x, ch]

    M = te.compute((n, c), lambda b, ch: te.sum(pixel(b, ch, rh, rw).astype(acc), axis=[rh, rw]),
                   name="mean")
    inv = tirx.const(1.0 / (h * w), acc)
    rc = te.reduce_axis((0, c), "rc")
    H = te.compute((n, crp), lambda b, j: te.sum(M[b, rc] * W1[rc, j].astype(acc), axis=rc),
                   name="fc1")
    A = te.compute((n, crp), lambda b, j: activation(
        H[b, j] * inv + B1[j].astype(acc), str(a.get("activation", "none")),
        float(a.get("clip_min", 0.0)), float(a.get("clip_max", 6.0))), name="act1")
    rj = te.reduce_axis((0, crp), "rj")
    G = te.compute((n, cp), lambda b, ch: te.sum(A[b, rj] * W2[rj, ch].astype(acc), axis=rj),
                   name="fc2")
    gate = str(a.get("gate", "sigmoid"))

    def out_body(b, i1, i2, i3):
        ch = i1 if layout == "NCHW" else i3
        return activation(G[b, ch] + B2[ch].astype(acc), gate).astype(dtype)

    oshape = (n, c, 1, 1) if layout == "NCHW" else (n, 1, 1, c)
    out = te.compute(oshape, out_body, name="out")
    sch = Schedule(te.create_prim_func([X, W1, B1, W2, B2, out]))
    _schedule(sch, layout, lanes, req.cpu.num_cores > 1 and xt.size >= _PARALLEL_MIN)
    note = f"squeeze_excite {layout} {h}x{w}x{c} -> {cr} -> {c}"
    return KernelImpl(sch.mod["main"], {
        1: lambda v: _pad_to(v, (c, crp)), 2: lambda v: _pad_to(v, (crp,)),
        3: lambda v: _pad_to(v, (crp, cp)), 4: lambda v: _pad_to(v, (cp,))}, note=note)


def _vector(sch, block, loop, lanes: int):
    """Split ``loop`` into vectors of ``lanes`` (or fewer that divide it); the inner loop."""
    ext = int(sch.get(loop).extent)
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and ext % v == 0), 0)
    if not vec:
        return loop, None
    return sch.split(loop, [None, vec])


def _schedule_fc(sch, blk, lanes: int) -> None:
    """``out[b, j] = sum_r a[b, r] * w[r, j]``: up to ``_FC_VECTORS`` vectors of ``j`` per
    tile accumulate in registers (independent FMA chains, one broadcast of ``a[b, r]`` each),
    written once after the reduction."""
    b, j, r = sch.get_loops(blk)
    vecs = int(sch.get(j).extent) // lanes
    per = max(d for d in range(1, min(vecs, _FC_VECTORS) + 1) if vecs % d == 0)
    jo, jm, ji = sch.split(j, [None, per, lanes])
    sch.reorder(b, jo, r, jm, ji)
    accumulate_in_registers(sch, blk, jo, jm, ji, r, parallel=False)


def _schedule(sch, layout: str, lanes: int, par: bool) -> None:
    mean = sch.get_sblock("mean")
    b, ch, ry, rx = sch.get_loops(mean)
    if layout == "NHWC":
        co, ci = _vector(sch, mean, ch, lanes)
        if ci is not None:
            sch.reorder(b, co, ry, rx, ci)
            outer = sch.fuse(b, co)
            if par:  # parallel and vectorize before decompose_reduction (TVM's order)
                sch.parallel(outer)
            sch.vectorize(ci)
            sch.decompose_reduction(mean, ry)
        elif par:
            sch.parallel(sch.fuse(b, co))
    elif par:
        sch.parallel(sch.fuse(b, ch))
    for name in ("fc1", "fc2"):
        _schedule_fc(sch, sch.get_sblock(name), lanes)
    act1 = sch.get_sblock("act1")
    _, j = sch.get_loops(act1)
    _, ji = sch.split(j, [None, lanes])
    sch.vectorize(ji)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    last = loops[1] if layout == "NCHW" else loops[3]
    _, vi = _vector(sch, out, last, lanes)
    if vi is not None and layout == "NHWC":
        sch.vectorize(vi)
