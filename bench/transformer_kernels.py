"""Our f32 dense and fused attention kernels at DeiT-tiny, MiniLM and GPT-2-bench shapes, in
GMAC/s, dense beside onnxruntime's MatMul + Add (+ Gelu) on the same operands.

    python bench/transformer_kernels.py [--threads 2] [--calls 400] [--cpu x86-64-v3]

Our kernels are built for the detected CPU (or ``--cpu``) and loaded as packages load them
(``runtime.pool.load_library``: npucc's parallel launcher, ``--threads`` threads; a plain
``tvm.runtime.load_module`` ran parallel loops on one thread). onnxruntime runs a one-node-chain
model with ``intra_op_num_threads`` = threads, its other settings at their defaults. The
engines take turns in 8 blocks of calls; printed per shape: the median and the best call (ms),
GMAC/s of the best (the host is shared: the best is the closest to what the code can do), and
ours / onnxruntime of the medians and of the bests. Each kernel's result is checked against
the op's numpy reference first. ``--threads 1`` times CPU time of the calling thread (robust to
other processes on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

# (label, M, K, N, activation): the four denses of a DeiT-tiny block (197 tokens), MiniLM's
# (128 tokens), GPT-2 bench's (64 tokens)
DENSE = [("deit qkv", 197, 192, 576, "none"), ("deit proj", 197, 192, 192, "none"),
         ("deit fc1+gelu", 197, 192, 768, "gelu"), ("deit fc2", 197, 768, 192, "none"),
         ("minilm qkv", 128, 384, 1152, "none"), ("minilm fc1+gelu", 128, 384, 1536, "gelu"),
         ("minilm fc2", 128, 1536, 384, "none"), ("gpt2 fc1", 64, 256, 1024, "gelu")]
# (label, tokens, heads, head_dim, padding mask, causal)
ATTENTION = [("deit 197 tok 3x64", 197, 3, 64, False, False),
             ("minilm 128 tok 12x32 mask", 128, 12, 32, True, False),
             ("gpt2 64 tok 8x32 causal", 64, 8, 32, False, True)]


def cases(rng):
    """(label, op, inputs, attrs, constant operands, MACs) per kernel."""
    import numpy as np

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)
    out = [(f"dense {lb} {m}x{k}x{n}", "dense", [f(1, m, k), f(n, k), f(n)],
            {"activation": act}, (1, 2), m * k * n) for lb, m, k, n, act in DENSE]
    for lb, s, h, d, masked, causal in ATTENTION:
        qkv = f(1, s, 3 * h * d)
        ins = [qkv] * 3
        if masked:
            mask = np.zeros((1, 1, 1, s), np.float32)
            mask[..., s * 3 // 4:] = np.finfo(np.float32).min
            ins.append(mask)
        macs = h * s * s * d * (1 if causal else 2)   # q.k and p.v; causal: half of each
        out.append((f"attention {lb}", "attention", ins,
                    {"heads": h, "head_dim": d, "scale": d ** -0.5, "causal": causal,
                     "k_offset": h * d, "v_offset": 2 * h * d}, (), macs))
    return out


def build_ours(specs, cpu_name: str | None, tmp: str):
    """Each case's kernel in one library, loaded through the pool: [(call, relative error)]."""
    import numpy as np
    import tvm

    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType
    from runtime.pool import load_library
    from targets.kernels.base import KernelRequest, get_kernel_builder
    from targets.tvm_codegen import compile_funcs, host_cpu

    cpu = host_cpu(cpu_name)
    funcs, calls = {}, []
    for i, (_, op, inputs, attrs, consts, _) in enumerate(specs):
        attrs = get_op(op).normalize_attrs(attrs)
        ref = [np.asarray(r, np.float32) for r in get_op(op).reference(inputs, attrs)]
        req = KernelRequest(op, attrs, [TensorType.of(a) for a in inputs],
                            [TensorType.of(r) for r in ref], {j: inputs[j] for j in consts}, cpu)
        impl = get_kernel_builder(op)(req)
        funcs[f"b{i}"] = impl.prim_func
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(inputs)] + list(impl.extra_const_inputs)
        calls.append((args, ref))
    lib = load_library(tvm, compile_funcs(funcs, cpu, Path(tmp) / "bench.so"), require=True)
    out = []
    for i, (args, ref) in enumerate(calls):
        targs = [tvm.runtime.tensor(np.require(a, requirements="C")) for a in args]
        touts = [tvm.runtime.tensor(np.zeros_like(r)) for r in ref]
        fn = lib[f"b{i}"]
        fn(*targs, *touts)
        err = max(float(np.max(np.abs(t.numpy() - r)) / (np.abs(r).max() + 1e-30))
                  for t, r in zip(touts, ref, strict=True))
        out.append((lambda fn=fn, a=targs + touts: fn(*a), err))
    return out


def ort_dense(inputs, act: str, threads: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x, w, b = inputs
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("Add", ["y0", "b"], ["y" if act == "none" else "y1"])]
    if act == "gelu":
        nodes.append(helper.make_node("Gelu", ["y1"], ["y"], domain="com.microsoft"))
    g = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
         numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x})


def time_ms(fns, calls: int, clock, blocks: int = 8) -> list[list[float]]:
    """Each callable's call times (ms), the callables taking turns in ``blocks`` blocks."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(blocks):
        for i, f in enumerate(fns):
            for _ in range(3):
                f()
            for _ in range(max(1, calls // blocks)):
                t = clock()
                f()
                times[i].append(1e3 * (clock() - t))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=400, help="timed calls per kernel and engine")
    ap.add_argument("--cpu", default=None, help="a CPU level for our kernels (default: detected)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)   # read when the library is loaded
    import numpy as np

    from bench.common import cpu_header

    specs = cases(np.random.default_rng(0))
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="transformer-kernels-") as tmp:
        ours = build_ours(specs, args.cpu, tmp)
        print(cpu_header())
        print(f"threads={args.threads} calls={args.calls} cpu={args.cpu or 'detected'} "
              f"load={os.getloadavg()[0]:.1f} clock={'thread CPU' if args.threads == 1 else 'wall'}")
        head = (f"{'kernel':40s} {'median':>7s} {'best':>7s} {'GMAC/s':>7s} | {'ort med':>7s} "
                f"{'best':>7s} {'/ort med':>8s} {'best':>6s}  rel.err")
        print(head + "\n" + "-" * len(head))
        for (name, op, inputs, attrs, _, macs), (fn, err) in zip(specs, ours, strict=True):
            fns = [fn] + ([ort_dense(inputs, attrs["activation"], args.threads)]
                          if op == "dense" else [])
            t = time_ms(fns, args.calls, clock)
            med, best = [float(np.median(x)) for x in t], [min(x) for x in t]
            row = f"{name:40s} {med[0]:7.3f} {best[0]:7.3f} {macs / best[0] / 1e6:7.1f} |"
            if len(t) > 1:
                row += (f" {med[1]:7.3f} {best[1]:7.3f} {med[0] / med[1]:8.2f} "
                        f"{best[0] / best[1]:6.2f}")
            else:
                row += " " * 33
            print(f"{row}  {err:.1e}", flush=True)
        print(f"load after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
