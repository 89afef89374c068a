"""Shared helpers for kernel builders: dtypes, placeholders, activations, generic schedules.

Every function here imports TVM lazily (``import tvm`` is slow), so importing a kernel
family module stays cheap until a kernel is actually built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from compiler.ir.types import TensorType
from targets.kernels.base import CpuInfo, KernelRequest

log = logging.getLogger(__name__)

__all__ = ["tvm_dtype", "placeholders", "activation", "schedule_generic", "prim_func",
           "broadcast_index", "const", "PARALLEL_MIN", "expr", "dtype_of",
           "fast_exp", "fast_erf", "fast_tanh", "fast_sigmoid", "fast_silu", "accumulator_dtype",
           "keep_nan", "is_nan", "nan_max", "nan_min", "nan_max_reducer", "nan_min_reducer"]

_TVM_DTYPES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8", "i4": "int4",
    "u64": "uint64", "u32": "uint32", "u16": "uint16", "u8": "uint8", "u4": "uint4",
    "bool": "bool",
}

# Below this many output elements a kernel runs on one thread (a parallel launch costs µs).
PARALLEL_MIN = 16384


def tvm_dtype(dtype: str) -> str:
    return _TVM_DTYPES[dtype]


def accumulator_dtype(tvm_dt: str) -> str:
    """What sums of products of ``tvm_dt`` accumulate in: float32 for float16/bfloat16 (an
    fp16 NPU's matrix unit accumulates in f32 and rounds the result once), else ``tvm_dt``."""
    return "float32" if tvm_dt in ("float16", "bfloat16") else tvm_dt


def placeholders(req: KernelRequest, types: dict[int, TensorType] | None = None) -> list:
    """One ``te.placeholder`` per operand, named ``in<i>``; ``types`` overrides (packed)."""
    from tvm import te

    out = []
    for i, t in enumerate(req.input_types):
        t = (types or {}).get(i, t)
        out.append(te.placeholder(t.shape, tvm_dtype(t.dtype), name=f"in{i}"))
    return out


def const(value: float | int | bool, dtype: str):
    """A TIR constant of IR ``dtype`` (infinite bounds clamp to the dtype's range)."""
    from tvm import tirx

    td = dtype if dtype in _TVM_DTYPES.values() else tvm_dtype(dtype)
    if isinstance(value, float) and not math.isfinite(value):
        return tirx.max_value(td) if value > 0 else tirx.min_value(td)
    return tirx.const(value, td)


def broadcast_index(idx: Sequence[Any], out_shape: Sequence[int], in_shape: Sequence[int]
                    ) -> list[Any]:
    """Map an output index to the index of a numpy-broadcast operand of ``in_shape``."""
    off = len(out_shape) - len(in_shape)
    return [0 if d == 1 and out_shape[off + j] != 1 else idx[off + j]
            for j, d in enumerate(in_shape)]


def expr(v):
    """A TIR expression from a TE tensor slice (``T[i]``) or an expression."""
    return v.asobject() if hasattr(v, "asobject") else v


def load(X, idx):
    """``X[idx]`` as a TIR expression; an empty index reads a 0-d tensor."""
    idx = tuple(idx)
    return expr(X[idx] if idx else X[()])


def dtype_of(v) -> str:
    return str(expr(v).ty)


_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
          1.6666665459e-1, 5.0000001201e-1)


def _let(x, fn):
    """``fn(v)`` with ``v`` bound to ``x`` once (a tree would repeat ``x`` per use)."""
    from tvm import tirx

    x = expr(x)
    if isinstance(x, tirx.Var | tirx.IntImm | tirx.FloatImm):
        return fn(x)
    v = tirx.Var("t", dtype_of(x))
    return tirx.Let(v, x, fn(v))


# -- NaN propagation ---------------------------------------------------------------------------
# TVM lowers max(a, b) to a compare-and-select that returns b when a is NaN, so max(x, 0) turns
# NaN into 0 (relu, clip, max-pool, softmax's row max). A NaN in the input must reach the output,
# as in onnxruntime and numpy: these helpers make the NaN win explicitly, never by operand order
# (the simplifier may reorder operands). Integer values pass through unchanged.
def _is_float(v) -> bool:
    return dtype_of(v).startswith(("float", "bfloat"))


_NAN_BITS = {"float16": ("int16", 0x7FFF, 0x7C00), "bfloat16": ("int16", 0x7FFF, 0x7F80),
             "float32": ("int32", 0x7FFFFFFF, 0x7F800000),
             "float64": ("int64", 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def is_nan(x):
    """``x`` is NaN, as an integer test on its bits (exponent all ones, mantissa not zero).

    ``tirx.isnan`` in a Select over a loop TVM vectorises made the vectoriser give up: LLVM then
    vectorised the scalar loop with gathers and scatters (relu on 56x56x256 f32 took 0.69 ms on
    one Zen 4 core, 0.09 ms with this test; clip, hard_sigmoid and binary max alike)."""
    from tvm import tirx

    x = expr(x)
    bits = _NAN_BITS.get(dtype_of(x))
    if bits is None:
        return tirx.isnan(x)
    idt, mask, inf = bits
    return tirx.reinterpret(idt, x) & tirx.const(mask, idt) > tirx.const(inf, idt)


def keep_nan(x, y):
    """``y``, except NaN where ``x`` is NaN (for a function of ``x`` that would drop it)."""
    from tvm import tirx

    x = expr(x)
    return tirx.Select(is_nan(x), x.astype(dtype_of(y)), y) if _is_float(x) else y


def nan_max(a, b):
    """max(a, b) that is NaN when either is NaN."""
    from tvm import te, tirx

    a, b = expr(a), expr(b)
    if not _is_float(a):
        return te.max(a, b)
    return tirx.Select(is_nan(a), a, tirx.Select(is_nan(b), b, te.max(a, b)))


def nan_min(a, b):
    """min(a, b) that is NaN when either is NaN."""
    from tvm import te, tirx

    a, b = expr(a), expr(b)
    if not _is_float(a):
        return te.min(a, b)
    return tirx.Select(is_nan(a), a, tirx.Select(is_nan(b), b, te.min(a, b)))


def _nan_reducer(is_max: bool):
    from tvm import te, tirx

    def combine(a, b):
        if not _is_float(a):
            return te.max(a, b) if is_max else te.min(a, b)
        better = a > b if is_max else a < b
        return tirx.Select(tirx.Or(tirx.isnan(a), better), a, b)

    def identity(dt):
        return tirx.min_value(dt) if is_max else tirx.max_value(dt)

    return te.comm_reducer(combine, identity, name="nan_max" if is_max else "nan_min")


def nan_max_reducer():
    """A max reduction (``r(expr, axis=k)``) whose result is NaN if any element is NaN."""
    return _nan_reducer(True)


def nan_min_reducer():
    """A min reduction whose result is NaN if any element is NaN."""
    return _nan_reducer(False)


def fast_exp(x):
    """exp for f32 that LLVM vectorises (Cephes polynomial, ~1 ulp); te.exp otherwise."""
    from tvm import te

    x = expr(x)
    if dtype_of(x) != "float32":
        return te.exp(x)
    return _let(x, _fast_exp)


def _fast_exp(x):
    from tvm import te, tirx

    dt = "float32"

    def c(v):
        return tirx.const(v, dt)
    # below -87 the result is 0 (as exp underflows), never a denormal: denormals in later
    # kernels (softmax of masked attention -> P @ V) cost ~100x per operation on x86
    xc = te.min(te.max(x, c(-87.0)), c(88.3))
    # NaN stays NaN and exp overflows to +inf past log(FLT_MAX), as exp does
    return tirx.Select(is_nan(x), x, tirx.Select(
        x > c(88.72284), c(math.inf),
        tirx.Select(x < c(-87.0), c(0.0), _let(xc, lambda x: _exp_core(x, c)))))


def _exp_core(x, c):
    from tvm import te

    n = te.floor(x * c(1.4426950408889634) + c(0.5))
    return _let(n, lambda n: _exp_poly(x, n, c))


def _exp_poly(x, n, c):
    from tvm import tirx

    dt = "float32"
    r = x - n * c(0.693359375) + n * c(2.12194440e-4)
    return _let(r, lambda r: _exp_tail(r, n, c, dt, tirx))


def _exp_tail(r, n, c, dt, tirx):
    p = c(_EXP_P[0])
    for coef in _EXP_P[1:]:
        p = p * r + c(coef)
    y = p * r * r + r + c(1.0)
    two_n = tirx.reinterpret(dt, tirx.shift_left(n.astype("int32") + 127, 23))
    return y * two_n


def fast_erf(x, finite: bool = False):
    """erf for f32 as a rational polynomial (Eigen's; abs error < 1e-6) that vectorises.
    ``finite``: the caller knows ``x`` is never NaN (an integer accumulator times finite
    scales), so the NaN guard (a compare and a blend per vector) is left out."""
    from tvm import te

    x = expr(x)
    if dtype_of(x) != "float32":
        return te.erf(x)
    return _let(x, lambda v: _fast_erf(v, finite))


def _fast_erf(x, finite: bool = False):
    from tvm import te, tirx

    dt = "float32"

    def c(v):
        return tirx.const(v, dt)
    xc = te.min(te.max(x, c(-4.0)), c(4.0))
    y = _let(xc, lambda x: _erf_poly(x, c))
    return y if finite else keep_nan(x, y)


def _erf_poly(x, c):
    x2 = x * x
    p = c(_ERF_ALPHA[0])
    for coef in _ERF_ALPHA[1:]:
        p = p * x2 + c(coef)
    p = p * x
    q = c(_ERF_BETA[0])
    for coef in _ERF_BETA[1:]:
        q = q * x2 + c(coef)
    return p / q


def fast_tanh(x):
    """tanh via fast_exp: sign(x) * (1 - 2 / (exp(2|x|) + 1))."""
    from tvm import te

    x = expr(x)
    if dtype_of(x) != "float32":
        return te.tanh(x)
    return _let(x, _fast_tanh)


def _fast_tanh(x):
    from tvm import te, tirx

    dt = "float32"
    one = tirx.const(1.0, dt)
    a = te.abs(x)
    t = one - tirx.const(2.0, dt) / (fast_exp(a * tirx.const(2.0, dt)) + one)
    x2 = x * x
    small = x * (one + x2 * (tirx.const(-1.0 / 3.0, dt) + x2 * tirx.const(2.0 / 15.0, dt)))
    return _let(t, lambda t: tirx.Select(a < tirx.const(0.0625, dt), small,
                                         tirx.Select(x < tirx.const(0.0, dt), -t, t)))


def fast_sigmoid(x):
    from tvm import te, tirx

    x = expr(x)
    if dtype_of(x) != "float32":
        return te.sigmoid(x)
    one = tirx.const(1.0, "float32")
    return one / (one + fast_exp(-x))


def fast_silu(x):
    """x * sigmoid(x) for f32 as ``x / (1 + exp(-x))`` with exp's clamps but not its NaN and
    overflow selects: a NaN x stays NaN through the division, +inf gives +inf, x below -87
    gives a tiny normal number (never a denormal), and -inf gives NaN as x * sigmoid(x) does.
    x * fast_sigmoid(x) otherwise. (EfficientNet-B0's SiLU epilogues, one AVX-512 x86
    thread, loaded machine: 1x1 16->96 @112 0.93 -> 0.70 ms, dw3x3 144 @56 0.31 -> 0.23.)"""
    x = expr(x)
    if dtype_of(x) != "float32":
        return x * fast_sigmoid(x)
    return _let(x, _fast_silu)


def _fast_silu(x):
    from tvm import te, tirx

    def c(v):
        return tirx.const(v, "float32")
    t = te.min(te.max(c(0.0) - x, c(-87.0)), c(88.3))
    y = x / (c(1.0) + _let(t, lambda t: _exp_core(t, c)))
    return tirx.Select(x < c(-3.4e38), c(math.nan), y)


def activation(v, kind: str, clip_min: float = 0.0, clip_max: float = 6.0):
    """Apply a fused-op activation (CATALOGUE: none relu relu6 clip sigmoid gelu gelu_tanh silu
    hard_swish hard_sigmoid)."""
    from tvm import te, tirx

    v = expr(v)
    dt = dtype_of(v)
    one = tirx.const(1.0, dt)
    half = tirx.const(0.5, dt)
    if kind == "none":
        return v
    if kind == "relu":
        return keep_nan(v, te.max(v, tirx.const(0, dt)))
    if kind == "relu6":
        return keep_nan(v, te.min(te.max(v, tirx.const(0, dt)), tirx.const(6, dt)))
    if kind == "clip":
        return keep_nan(v, te.min(te.max(v, const(float(clip_min), dt)),
                                  const(float(clip_max), dt)))
    if kind == "sigmoid":
        return fast_sigmoid(v)
    if kind == "silu":
        return fast_silu(v)
    if kind in ("hard_swish", "hard_sigmoid"):
        hs = te.min(te.max(v * tirx.const(1.0 / 6.0, dt) + half, tirx.const(0, dt)), one)
        return keep_nan(v, hs if kind == "hard_sigmoid" else v * hs)
    if kind == "gelu":
        return half * v * (one + fast_erf(v * tirx.const(1.0 / math.sqrt(2.0), dt)))
    if kind == "gelu_tanh":
        c = tirx.const(math.sqrt(2.0 / math.pi), dt)
        return half * v * (one + fast_tanh(c * (v + tirx.const(0.044715, dt) * v * v * v)))
    raise ValueError(f"unknown activation {kind!r}")


def prim_func(args: list, schedule: Callable[[Any], None] | None = None):
    """``te.create_prim_func(args)``, scheduled by ``schedule(sch)`` (default: generic)."""
    from tvm import te
    from tvm.s_tir import Schedule

    func = te.create_prim_func(args)
    sch = Schedule(func)
    (schedule or schedule_generic)(sch)
    return sch.mod["main"]


def _is_output(sch, block) -> bool:
    from tvm.s_tir.schedule import analysis  # noqa: F401

    root = sch.get_sblock("root") if _has_root(sch) else None
    outs = sch.get_output_blocks(root) if root is not None else []
    return any(sch.get(o).same_as(sch.get(block)) for o in outs)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _iter_types(sch, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def inline_all(sch, keep: set[str] | frozenset[str] = frozenset()) -> list:
    """Inline every non-output, non-reduction block (except those named in ``keep``);
    returns the blocks that remain."""
    root = sch.get_sblock("root")
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(root):
            if _is_output(sch, b) or any(t != 0 for t in _iter_types(sch, b)) \
                    or sch.get(b).name_hint in keep:
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # noqa: BLE001 (not inlinable: keep it)
                continue
    return list(sch.get_child_blocks(root))


def schedule_block_simple(sch, block, cpu: CpuInfo | None, lanes: int = 0) -> None:
    """Fuse the spatial loops of ``block``, parallelise the outer part, vectorise the inner.

    Reduction loops (if any) stay innermost and serial. Vectorisation is applied only when
    the block is purely spatial and its innermost extent is a multiple of ``lanes``.
    """
    loops = sch.get_loops(block)
    types = _iter_types(sch, block)
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    if any(e == 0 for e in extents):
        return
    n_spatial = 0
    for t in types:
        if t != 0:
            break
        n_spatial += 1
    n_spatial = min(n_spatial, len(loops))
    if n_spatial == 0:
        return
    total = math.prod(extents[:n_spatial])
    reduce_work = math.prod(extents[n_spatial:])
    inner = extents[n_spatial - 1]
    vec = lanes if (lanes > 1 and n_spatial == len(loops) and inner % lanes == 0) else 0
    spatial = list(loops[:n_spatial])
    if vec:
        io, iv = sch.split(spatial[-1], [None, vec])
        sch.vectorize(iv)
        spatial[-1] = io
    cores = cpu.num_cores if cpu is not None else 1
    if cores > 1 and total * reduce_work >= PARALLEL_MIN and total // max(vec, 1) >= 2:
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        sch.parallel(fused)


def schedule_generic(sch, cpu: CpuInfo | None = None, lanes: int = 0) -> None:
    """Inline elementwise producers; give each remaining block a simple parallel schedule."""
    for b in inline_all(sch):
        try:
            schedule_block_simple(sch, b, cpu, lanes)
        except Exception as e:  # noqa: BLE001 (leave the block unscheduled: still correct)
            log.debug("block %s left serial and unvectorised: %s", sch.get(b).name_hint,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)


def generic(cpu: CpuInfo, dtype: str = "f32") -> Callable[[Any], None]:
    """A ``schedule(sch)`` closure for :func:`prim_func` with this CPU's SIMD lanes."""
    lanes = cpu.lanes(dtype) if dtype != "bool" else 0
    return lambda sch: schedule_generic(sch, cpu, lanes)
