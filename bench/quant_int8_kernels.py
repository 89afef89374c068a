"""int8 vs float kernels on the layers of real models: ResNet-50 convs, MiniLM dense layers.

    python bench/quant_int8_kernels.py [--models resnet50,minilm] [--repeat 20] [--peak]

``--peak`` prints only this CPU's int8 dot-product peak (:func:`int8_peak`, GMAC/s per core
at 1 thread and at 2): on CPUs with AVX512-VNNI a tight loop of ``vpdpbusd`` on 12
independent zmm accumulators (no memory traffic but one L1-resident operand), built through
TVM like every kernel; elsewhere the best of the MiniLM qdense shapes built by the kernel
registry (then a lower bound on the peak). ``bench/quant_minilm.py`` divides MiniLM's dense
MACs by it for the dense-work floor.

For every conv2d / dense node of the model after the host pipeline (NHWC, OHWI), the float
kernel npucc builds for it and the int8 kernel (qconv2d / qdense: u8 activations, i8
per-channel weights, f32 result) for the same shape are built into one library and timed
alternately in one process (median of ``--repeat``, 2 threads). Prints per-model totals over
all nodes and the ratio float / int8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare


def model_graph(name: str):
    from compiler.frontends import from_onnx
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    if name == "resnet50":
        import onnx

        from examples.models import cache_dir
        from examples.random_weights import light_onnx

        path = cache_dir() / "light_resnet50-random-seed0-logits.onnx"
        if not path.exists():
            onnx.save(light_onnx("resnet50", seed=0), str(path))
    else:
        from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs

        model, tok = minilm()
        path = export_onnx(model, minilm_inputs(tok, MINILM_SENTENCES[:1], seq=128))
    g = from_onnx(str(path))
    return run_pipeline(g, load_target("host").default_pipeline)


def int8_request(req):
    """The qconv2d / qdense request with the float request's shapes."""
    from compiler.ir.types import TensorType
    from targets.kernels.base import KernelRequest

    rng = np.random.default_rng(0)
    xt, wt = req.input_types[0], req.input_types[1]
    n_out = wt.shape[0]
    x = TensorType(xt.shape, "u8")
    w = rng.integers(-127, 128, wt.shape).astype(np.int8)
    consts = {1: w, 2: np.zeros(n_out, np.int32), 3: np.asarray(0.02, np.float32),
              4: np.asarray(128, np.uint8),
              5: (rng.random(n_out) * 0.01 + 1e-3).astype(np.float32)}
    attrs = dict(req.attrs, out_dtype="f32")
    op = "qconv2d" if req.op == "conv2d" else "qdense"
    types = [x, TensorType.of(w)] + [TensorType.of(consts[i]) for i in (2, 3, 4, 5)]
    return KernelRequest(op, attrs, types, [req.output_types[0]], consts, req.cpu,
                         req.node_label)


def args_for(req, impl) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for i, t in enumerate(req.input_types):
        if i in req.const_inputs:
            a = req.const_inputs[i]
            a = impl.weight_transforms[i](a) if i in impl.weight_transforms else a
        elif t.dtype == "u8":
            a = rng.integers(0, 256, t.shape).astype(np.uint8)
        else:
            a = rng.standard_normal(t.shape).astype(t.np_dtype)
        out.append(np.require(a, requirements="C"))
    return out + list(impl.extra_const_inputs)


PEAK_CHAINS = 12   # independent accumulators: more than vpdpbusd's latency x throughput


def vnni_peak_kernel(threads: int, iters: int):
    """``threads`` parallel tasks, each ``iters`` x PEAK_CHAINS ``vpdpbusd`` (64 u8 x i8 MACs
    each) into register accumulators; the sums are stored so nothing is dead code."""
    from tvm.script import tirx as T

    from targets.kernels.vnni import VNNI_LLVM_INTRIN

    chains = PEAK_CHAINS

    @T.prim_func(s_tir=True)
    def peak(a: T.Buffer((128,), "int8"), out: T.Buffer((threads, chains * 16), "int32")):
        for t in T.parallel(threads):
            acc = T.alloc_buffer((chains * 16,), "int32")   # default scope: an alloca LLVM promotes
            for j in T.unroll(chains):
                acc[T.ramp(j * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
            for _r in T.serial(iters):
                for j in T.unroll(chains):
                    acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(VNNI_LLVM_INTRIN),
                        acc.vload([j * 16], dtype="int32x16"),
                        a.vload([0], dtype="int8x64"), a.vload([64], dtype="int8x64"),
                        dtype="int32x16")
            for j in T.serial(chains * 16):
                out[t, j] = acc[j]
    return peak


def _best_ms(fn, args, repeat: int, calls: int = 5) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - t) / calls)
    return 1e3 * best


def int8_peak(cpu=None, threads: int = 2, repeat: int = 60) -> dict:
    """This CPU's int8 multiply-accumulate peak, GMAC/s per core at 1 and ``threads`` threads
    (best of ``repeat`` calls, ~0.13 ms per task: on a shared machine some fall between
    other processes' time slices), and how it was measured."""
    import tvm

    from runtime.pool import load_library
    from targets.kernels.vnni import has_vnni
    from targets.tvm_codegen import compile_funcs, host_cpu

    cpu = cpu or host_cpu()
    tmp = Path(tempfile.mkdtemp(prefix="int8-peak-"))
    if not has_vnni(cpu):
        return _qdense_peak(cpu, threads, repeat, tmp)
    iters = 40000   # ~0.13 ms per task: long against a launch, so both threads really run
    funcs = {f"peak{t}": vnni_peak_kernel(t, iters) for t in (1, threads)}
    lib = load_library(tvm, compile_funcs(funcs, cpu, tmp / "peak.so"))
    a = tvm.runtime.tensor(np.ones(128, np.int8))
    per_core = {}
    for t in (1, threads):
        out = tvm.runtime.tensor(np.zeros((t, PEAK_CHAINS * 16), np.int32))
        ms = _best_ms(lib[f"peak{t}"], [a, out], repeat, calls=1)
        if int(out.numpy()[0, 0]) != iters * 4:   # 4 products of 1 x 1 per lane and step
            raise RuntimeError("the vpdpbusd peak kernel computed a wrong sum")
        per_core[t] = iters * PEAK_CHAINS * 64 / (ms * 1e-3) / 1e9
    return {"per_core": per_core, "how": f"tight vpdpbusd loop ({PEAK_CHAINS} zmm accumulators)"}


def _qdense_peak(cpu, threads: int, repeat: int, tmp: Path) -> dict:
    """Without VNNI: the best GMAC/s of the MiniLM qdense shapes (registry kernels) at the
    process's thread count, as a per-core figure; a lower bound on the true peak."""
    import tvm

    from runtime.pool import load_library
    from targets.kernels.base import get_kernel_builder
    from targets.tvm_codegen import compile_funcs

    best = 0.0
    for m, k, n in MINILM_DENSE_SHAPES:
        req = qdense_request(m, k, n, cpu)
        impl = get_kernel_builder("qdense")(req)
        lib = load_library(tvm, compile_funcs({"q": impl.prim_func}, cpu, tmp / f"q{k}_{n}.so"))
        args = [tvm.runtime.tensor(a) for a in args_for(req, impl)]
        out = tvm.runtime.tensor(np.zeros(req.output_types[0].shape, np.float32))
        ms = _best_ms(lib["q"], [*args, out], repeat)
        best = max(best, m * k * n / (ms * 1e-3) / 1e9)
    return {"per_core": {threads: best / threads},
            "how": "best MiniLM qdense shape (no AVX512-VNNI: a lower bound on the peak)"}


MINILM_DENSE_SHAPES = ((128, 384, 384), (128, 384, 1536), (128, 1536, 384))


def qdense_request(m: int, k: int, n: int, cpu):
    """A qdense request [1, m, k] u8 x [n, k] i8 (per-channel scales) -> f32."""
    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType
    from targets.kernels.base import KernelRequest

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    consts = {1: w, 2: np.zeros(n, np.int32), 3: np.asarray(0.02, np.float32),
              4: np.asarray(128, np.uint8), 5: (rng.random(n) * 0.01 + 1e-3).astype(np.float32)}
    types = [TensorType((1, m, k), "u8")] + [TensorType.of(consts[i]) for i in range(1, 6)]
    return KernelRequest("qdense", get_op("qdense").normalize_attrs({"out_dtype": "f32"}),
                         types, [TensorType((1, m, n), "f32")], consts, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,minilm")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--peak", action="store_true", help="print the int8 peak only")
    args = ap.parse_args()
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if args.peak:
        os.environ.setdefault("TVM_NUM_THREADS", "2")
        from bench.common import cpu_header

        print(cpu_header())
        pk = int8_peak()
        print(f"int8 peak ({pk['how']}): " + ", ".join(
            f"{t} thread{'s' * (t > 1)} {g:.0f} GMAC/s per core" for t, g in
            pk["per_core"].items()) + f"; load {os.getloadavg()[0]:.1f}")
        return
    import tvm

    from runtime.pool import load_library
    from targets.kernels.base import get_kernel_builder
    from targets.tvm_codegen import compile_funcs, host_cpu, request_for

    cpu = host_cpu()
    for name in args.models.split(","):
        g = model_graph(name)
        nodes = [n for n in g.nodes if n.op in ("conv2d", "dense")]
        funcs, calls = {}, []
        built: dict[str, tuple[str, object]] = {}
        for n in nodes:
            fr = request_for(g, n, cpu)
            pair = []
            for req in (fr, int8_request(fr)):
                if req.key not in built:
                    sym = f"k{len(built)}_{req.op}"
                    impl = get_kernel_builder(req.op)(req)
                    built[req.key] = (sym, impl)
                    funcs[sym] = impl.prim_func
                sym, impl = built[req.key]
                pair.append((sym, req, impl))
            calls.append(pair)
        lib = load_library(tvm, compile_funcs(funcs, cpu, Path(tempfile.mkdtemp()) / "k.so"))
        totals = [0.0, 0.0]
        vnni = sum("VNNI" in impl.note for _, impl in built.values())
        for pair in calls:
            prepared = []
            for sym, req, impl in pair:
                targs = [tvm.runtime.tensor(a) for a in args_for(req, impl)]
                out = tvm.runtime.tensor(np.zeros(req.output_types[0].shape,
                                                  req.output_types[0].np_dtype))
                prepared.append((lib[sym], targs, out))
            for f, targs, out in prepared:
                f(*targs, out)
            ts: list[list[float]] = [[], []]
            for _ in range(args.repeat):
                for j, (f, targs, out) in enumerate(prepared):
                    t = time.perf_counter()
                    f(*targs, out)
                    ts[j].append(time.perf_counter() - t)
            for j in (0, 1):
                totals[j] += 1e3 * statistics.median(ts[j])
        print(f"{name}: {len(nodes)} conv2d/dense nodes ({len(built)} kernels, {vnni} VNNI); "
              f"float kernels {totals[0]:.2f} ms, int8 kernels {totals[1]:.2f} ms -> "
              f"int8 {totals[0] / totals[1]:.2f}x faster")


if __name__ == "__main__":
    main()
