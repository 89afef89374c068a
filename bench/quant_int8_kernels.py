"""int8 vs float kernels on the layers of real models: ResNet-50 convs, MiniLM dense layers.

    python bench/quant_int8_kernels.py [--models resnet50,minilm] [--repeat 20]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,minilm")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    import tvm

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
        lib = tvm.runtime.load_module(str(compile_funcs(
            funcs, cpu, Path(tempfile.mkdtemp()) / "k.so")))
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
