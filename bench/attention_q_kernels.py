"""The int8 attention kernel (``qattention``) against the f32 one at MiniLM's shape.

    python bench/attention_q_kernels.py [--rounds 10] [--repeat 30] [--valid 11,128]

One MiniLM-L6 layer's attention (12 heads x 32, 128 tokens, BERT's padding mask with
``--valid`` real tokens; the bench sentences of ``bench/quant_minilm.py`` have about a dozen)
built for the detected host, both kernels in one library loaded as packages are
(``runtime.pool.load_library``), called in turns (``--rounds`` rounds of ``--repeat`` calls
each, the best call of a round kept). Prints ms per layer (median of rounds and their range),
x 6 for the whole model, and the int8 / f32 ratio (median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from bench.common import cpu_header  # noqa: E402

B, S, H, D = 1, 128, 12, 32
LAYERS = 6


def build(work: Path):
    """Both kernels in one library: {op: callable(mask tensor)}, and the mask setter."""
    import tvm

    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType
    from runtime.pool import load_library
    from targets.kernels.base import KernelRequest, get_kernel_builder
    from targets.tvm_codegen import compile_funcs, host_cpu

    cpu = host_cpu()
    x, m = TensorType((B, S, 3 * H * D), "f32"), TensorType((1, 1, 1, S), "f32")
    out = TensorType((B, S, H * D), "f32")
    attrs = {"heads": H, "head_dim": D, "scale": D ** -0.5, "k_offset": H * D,
             "v_offset": 2 * H * D}
    funcs = {}
    for op in ("attention", "qattention"):
        req = KernelRequest(op, get_op(op).normalize_attrs(attrs), [x, x, x, m], [out], {}, cpu)
        funcs[op] = get_kernel_builder(op)(req).prim_func
    lib = load_library(tvm, compile_funcs(funcs, cpu, work / "attention.so"), require=True)
    rng = np.random.default_rng(0)
    xa = tvm.runtime.tensor(rng.standard_normal(x.shape).astype(np.float32))
    oa = tvm.runtime.tensor(np.zeros(out.shape, np.float32))
    return {op: (lambda mask, f=lib[op]: f(xa, xa, xa, mask, oa)) for op in funcs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--valid", default="11,128", help="real tokens of 128 (comma list)")
    args = ap.parse_args()
    print(cpu_header(), flush=True)
    import tvm

    with tempfile.TemporaryDirectory(prefix="attention-q-") as tmp:
        calls = build(Path(tmp))
        print(f"MiniLM attention, {H} heads x {D}, {S} tokens, 2 threads (TVM_NUM_THREADS or "
              f"the pool's default); ms per layer, median of {args.rounds} rounds (range)")
        for valid in (int(v) for v in args.valid.split(",")):
            mask = tvm.runtime.tensor(np.where(np.arange(S) < valid, 0, np.finfo(
                np.float32).min).astype(np.float32).reshape(1, 1, 1, S))
            best: dict[str, list[float]] = {op: [] for op in calls}
            for _ in range(args.rounds):
                for op, call in calls.items():
                    for _ in range(3):
                        call(mask)
                    ts = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        call(mask)
                        ts.append(time.perf_counter() - t)
                    best[op].append(1e3 * min(ts))
            ratio = statistics.median(q / f for q, f in zip(best["qattention"],
                                                            best["attention"], strict=True))
            for op, ms in best.items():
                med = statistics.median(ms)
                print(f"  {valid:3d} real tokens  {op:10s} {med:.4f} ms ({min(ms):.4f}-"
                      f"{max(ms):.4f}), x{LAYERS} = {LAYERS * med:.3f} ms")
            print(f"  {valid:3d} real tokens  qattention / attention = {ratio:.2f}")


if __name__ == "__main__":
    main()
