"""MiniLM-L6's int8 dense (qdense) kernels one by one, hot and with operands as cold as
inside the model, in GMAC/s and % of this CPU's int8 peak.

    python bench/minilm_int8_dense.py [--threads=2] [--copies 16] [--turns 12] [--calls 16]

Inside the int8 model each qdense reads weights last touched a whole forward pass earlier (6
layers of 1.8 MB int8 weights) and an activation and a result buffer that other kernels used
in between: timed back to back on one set of operands, the same kernel finds them in L2 and
runs 10-25% faster than the model's profile says. Here each kernel runs "hot" (one operand
set) and "cold" (``--copies`` sets of weights, activation and result, taken in turn: several
MB, past L2). The kernels are the four MiniLM shapes as the int8 pipeline builds them: u8
activation, per-channel i8 weights, f32 result, and the FFN's first dense with GELU and its
result quantized to u8 per channel (the SmoothQuant-folded scales). Kernels and modes take
turns (``--calls`` calls each, ``--turns`` turns); per call the median and the best turn.
Kernels are loaded through ``runtime.pool.load_library`` as a package's are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

THREADS = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), 2))
os.environ["TVM_NUM_THREADS"] = str(THREADS)
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

import numpy as np  # noqa: E402

from bench.common import cpu_header  # noqa: E402
from bench.quant_int8_kernels import args_for, int8_peak, qdense_request  # noqa: E402

SHAPES = (("QKV", 384, 1152, "none"), ("attention out", 384, 384, "none"),
          ("FFN up +GELU -> u8", 384, 1536, "gelu"), ("FFN down", 1536, 384, "none"))
ROWS = 128


def request(k: int, n: int, act: str, cpu):
    """The qdense request of one MiniLM dense layer (see the module docstring)."""
    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType

    req = qdense_request(ROWS, k, n, cpu)
    if act == "none":
        return req
    rng = np.random.default_rng(3)
    ys = (rng.random(n) * 0.05 + 0.02).astype(np.float32)
    yz = np.full(n, 12, np.uint8)
    consts = {**req.const_inputs, 6: ys, 7: yz}
    attrs = get_op("qdense").normalize_attrs({"out_dtype": "u8", "activation": act})
    types = req.input_types + [TensorType.of(ys), TensorType.of(yz)]
    return type(req)("qdense", attrs, types, [TensorType((1, ROWS, n), "u8")], consts, cpu)


def operand_sets(req, impl, copies: int) -> list[list]:
    """``copies`` independent sets of the kernel's arguments (operands, then the result)."""
    import tvm

    base = args_for(req, impl)
    sets = []
    for _ in range(copies):
        out = [tvm.runtime.tensor(np.zeros(t.shape, t.np_dtype)) for t in req.output_types]
        sets.append([tvm.runtime.tensor(np.array(a, copy=True)) for a in base] + out)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="threads per kernel (--threads=N)")
    ap.add_argument("--copies", type=int, default=16, help="operand sets of the cold mode")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--calls", type=int, default=16, help="calls per kernel and turn")
    args = ap.parse_args()
    import tvm

    from runtime.pool import load_library
    from targets.kernels.base import get_kernel_builder
    from targets.tvm_codegen import compile_funcs, host_cpu

    print(cpu_header(), flush=True)
    cpu = host_cpu()
    peak = int8_peak(cpu, threads=THREADS)["per_core"][THREADS] * THREADS
    built = []
    for name, k, n, act in SHAPES:
        req = request(k, n, act, cpu)
        built.append((name, k, n, req, get_kernel_builder("qdense")(req)))
    lib_path = Path(tempfile.mkdtemp(prefix="minilm-int8-dense-")) / "k.so"
    lib = load_library(tvm, compile_funcs({f"q{i}": b[4].prim_func for i, b in
                                           enumerate(built)}, cpu, lib_path))
    runs = {}
    for i, (name, _, _, req, impl) in enumerate(built):
        sets = operand_sets(req, impl, args.copies)
        runs[(name, "hot")] = (lib[f"q{i}"], sets[:1])
        runs[(name, "cold")] = (lib[f"q{i}"], sets)
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for _ in range(args.turns):
        for key, (fn, sets) in runs.items():
            fn(*sets[-1])
            t0 = time.perf_counter()
            for j in range(args.calls):
                fn(*sets[j % len(sets)])
            times[key].append((time.perf_counter() - t0) / args.calls * 1e6)
    print(f"{THREADS} thread(s); int8 peak {peak:.0f} GMAC/s; load {os.getloadavg()[0]:.1f}")
    print(f"{'qdense':22}{'M x K -> N':>18}  {'mode':5}{'us (median)':>12}{'best':>8}"
          f"{'GMAC/s':>8}{'% peak':>8}  note")
    for name, k, n, _, impl in built:
        for mode in ("hot", "cold"):
            ts = times[(name, mode)]
            med = statistics.median(ts)
            g = ROWS * k * n / med / 1e3
            print(f"{name:22}{f'{ROWS} x {k} -> {n}':>18}  {mode:5}{med:12.1f}{min(ts):8.1f}"
                  f"{g:8.0f}{100 * g / peak:7.0f}%  {impl.note}")


if __name__ == "__main__":
    main()
