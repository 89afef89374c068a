"""Our dense / attention-matmul / softmax / layer_norm kernels vs onnxruntime and torch,
side by side in one run, 2 threads each, at MiniLM-L6 (seq 128) shapes.

Each engine computes the same thing: onnxruntime runs a one-node model (MatMul+Add for
dense, which it fuses; MatMul; Softmax; LayerNormalization), torch the matching functional
call, ours the kernel from the registry (packed weights, fused bias/activation). Timings are
medians of ``--runs`` calls, engines interleaved round by round so background load hits all.

    python bench/minilm_kernels.py [--runs 200] [--cpu x86-64-v3] [--threads=2] [--spin]

``--cpu`` builds our kernels for a named CPU level instead of the detected one (they must
still run here). (Named minilm_kernels, not kernels: a bench module called ``kernels``
shadows the PyPI package of that name, which transformers imports when installed.)

TVM splits a parallel loop statically between its threads, so on a machine shared with other
work one descheduled thread stalls the whole kernel: medians then swing far more than the
best-of-N (printed too); compare on an idle machine, or with --threads=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

THREADS = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), 2))
os.environ["TVM_NUM_THREADS"] = str(THREADS)  # TVM's default here is 1 (cores / 2)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
if "--spin" not in sys.argv:  # idle worker threads sleep in all three engines (fair on a
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # shared, loaded machine)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SPIN = "--spin" in sys.argv
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

import numpy as np  # noqa: E402

from bench.common import cpu_header  # noqa: E402


def cases(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    out = []
    for k, n, act in [(384, 384, "none"), (384, 1536, "none"), (1536, 384, "none"),
                      (384, 1536, "gelu")]:
        out.append((f"dense 128x{k} -> {n}" + (" +gelu" if act != "none" else ""), "dense",
                    [f(1, 128, k), f(n, k), f(n)], {"activation": act}, (1, 2)))
    out.append(("attn QK^T 12x128x32 @ 32x128", "matmul",
                [f(1, 12, 128, 32), f(1, 12, 32, 128)], {}, ()))
    out.append(("attn PV 12x128x128 @ 128x32", "matmul",
                [f(1, 12, 128, 128), f(1, 12, 128, 32)], {}, ()))
    out.append(("softmax 12x128x128", "softmax", [f(1, 12, 128, 128)], {}, ()))
    out.append(("layer_norm 128x384", "layer_norm", [f(1, 128, 384), f(384), f(384)], {}, ()))
    return out


def onnx_session(op, inputs, attrs):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = inputs[0]
    inits, nodes = [], []
    if op == "dense":
        w, b = inputs[1], inputs[2]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
                 numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]),
                 helper.make_node("Add", ["y0", "b"], ["y1" if attrs["activation"] != "none"
                                                       else "y"])]
        if attrs["activation"] == "gelu":
            nodes.append(helper.make_node("Gelu", ["y1"], ["y"], domain="com.microsoft"))
        feeds = {"x": x}
        in_names = ["x"]
    elif op == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "z"], ["y"])]
        feeds = {"x": x, "z": inputs[1]}
        in_names = ["x", "z"]
    elif op == "softmax":
        nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]
        feeds, in_names = {"x": x}, ["x"]
    else:
        inits = [numpy_helper.from_array(inputs[1], "g"), numpy_helper.from_array(inputs[2], "bb")]
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "bb"], ["y"], axis=-1,
                                  epsilon=1e-5)]
        feeds, in_names = {"x": x}, ["x"]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds[n].shape))
         for n in in_names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    if not SPIN:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def torch_fn(op, inputs, attrs):
    import torch

    torch.set_num_threads(THREADS)
    t = [torch.from_numpy(a) for a in inputs]
    F = torch.nn.functional
    if op == "dense":
        if attrs["activation"] == "gelu":
            return lambda: F.gelu(F.linear(t[0], t[1], t[2]))
        return lambda: F.linear(t[0], t[1], t[2])
    if op == "matmul":
        return lambda: torch.matmul(t[0], t[1])
    if op == "softmax":
        return lambda: torch.softmax(t[0], -1)
    return lambda: F.layer_norm(t[0], (t[0].shape[-1],), t[1], t[2])


def build_ours(specs, cpu_name, tmp):
    import tvm

    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType
    from targets.kernels.base import KernelRequest, get_kernel_builder
    from targets.tvm_codegen import compile_funcs, host_cpu

    cpu = host_cpu(cpu_name)
    funcs, calls = {}, []
    for i, (_, op, inputs, attrs, consts) in enumerate(specs):
        attrs = get_op(op).normalize_attrs(attrs)
        ref = get_op(op).reference(inputs, attrs)
        req = KernelRequest(op, attrs, [TensorType.of(a) for a in inputs],
                            [TensorType.of(np.asarray(r)) for r in ref],
                            {j: inputs[j] for j in consts}, cpu)
        impl = get_kernel_builder(op)(req)
        funcs[f"b{i}"] = impl.prim_func
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(inputs)] + list(impl.extra_const_inputs)
        calls.append((args, ref, impl.note))
    lib = tvm.runtime.load_module(str(compile_funcs(funcs, cpu, Path(tmp) / "bench.so")))
    out = []
    for i, (args, ref, note) in enumerate(calls):
        targs = [tvm.runtime.tensor(np.require(a, requirements="C")) for a in args]
        touts = [tvm.runtime.tensor(np.zeros_like(np.asarray(r))) for r in ref]
        fn = lib[f"b{i}"]
        fn(*targs, *touts)
        err = max(float(np.max(np.abs(t.numpy() - r) / (np.abs(r).max() + 1e-30)))
                  for t, r in zip(touts, ref, strict=True))
        out.append((lambda fn=fn, a=targs + touts: fn(*a), err, note))
    return out


def time_ms(fns, runs, rounds=5):
    """Engines take turns in ``rounds`` blocks of runs/rounds calls (after 3 warm-up calls
    per block), so slow drifts in background load hit all of them; (medians, minima) in ms."""
    times = [[] for _ in fns]
    per = max(1, runs // rounds)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            for _ in range(3):
                f()
            for _ in range(per):
                t = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t)
    return ([1e3 * float(np.median(t)) for t in times], [1e3 * float(np.min(t)) for t in times])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", default="2", help="threads per engine (--threads=N)")
    ap.add_argument("--cpu", default=None,
                    help="a CPU level for our kernels (default: the detected CPU)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--spin", action="store_true",
                    help="let idle worker threads spin (each engine's default)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    specs = cases(rng)
    with tempfile.TemporaryDirectory() as tmp:
        ours = build_ours(specs, args.cpu, tmp)
        print(cpu_header())
        print(f"threads={THREADS} runs={args.runs} cpu={args.cpu or 'detected'} spin={SPIN} "
              f"load={os.getloadavg()[0]:.1f}")
        head = (f"{'kernel':32s} {'ours':>7s} {'ort':>7s} {'torch':>7s} {'/ort':>5s} "
                f"{'/torch':>6s} | best: {'ours':>7s} {'ort':>7s} {'/ort':>5s} | GF/s   err")
        print("median ms of each engine (ratios ours/other), then the best run")
        print(head)
        print("-" * len(head))
        tot = np.zeros(5)
        for (name, op, inputs, attrs, _), (fn, err, _note) in zip(specs, ours, strict=True):
            fns = [fn, onnx_session(op, inputs, attrs)]
            if not args.no_torch:
                fns.append(torch_fn(op, inputs, attrs))
            med, best = time_ms(fns, args.runs)
            if args.no_torch:
                med.append(float("nan"))
            tot += [med[0], med[1], med[2], best[0], best[1]]
            flops = 0.0
            if op in ("dense", "matmul"):
                a, b = inputs[0], inputs[1]
                k = a.shape[-1]
                n = b.shape[0] if op == "dense" else b.shape[-1]
                flops = 2.0 * (a.size // k) * k * n
            gfs = f"{flops / best[0] / 1e6:4.0f}" if flops else "   -"
            print(f"{name:32s} {med[0]:7.3f} {med[1]:7.3f} {med[2]:7.3f} {med[0] / med[1]:5.2f} "
                  f"{med[0] / med[2]:6.2f} | best: {best[0]:7.3f} {best[1]:7.3f} "
                  f"{best[0] / best[1]:5.2f} | {gfs}  {err:.0e}")
        print(f"{'total':32s} {tot[0]:7.3f} {tot[1]:7.3f} {tot[2]:7.3f} {tot[0] / tot[1]:5.2f} "
              f"{tot[0] / tot[2]:6.2f} | best: {tot[3]:7.3f} {tot[4]:7.3f} {tot[3] / tot[4]:5.2f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
