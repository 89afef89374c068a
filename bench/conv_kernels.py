"""Conv kernels vs onnxruntime and torch, side by side in one run (2 threads each).

Shapes: every conv of ResNet-50 (the light_resnet50 ONNX test model, batch 1, 224x224; count =
how often the shape occurs), every conv of MobileNetV2 (1x1 and stem, then depthwise) and every
depthwise conv of EfficientNet-B0 (3x3 and 5x5, SiLU). Our kernels run NHWC with compile-time
packed weights, bias and a fused activation, which is what the graph passes deliver, from a
library loaded as packages load theirs (``runtime.pool.load_library``: npucc's launcher);
onnxruntime runs a Conv + activation NCHW model (Relu, Clip, or x * Sigmoid(x), which it fuses
to QuickGelu), torch ``conv2d`` + the activation.

    python bench/conv_kernels.py [--cpu x86-64-v3] [--only resnet|mobilenet|efficientnet]
                                 [--threads 2] [--rounds 30] [--no-torch]

Every number is the best batch over ``--rounds`` rounds in which the three frameworks take
turns, so a machine shared with other work slows them alike; still, compare ratios, not times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

import numpy as np  # noqa: E402

THREADS = 2

# (count, C_in, H, C_out, K, stride, pad) — NCHW ResNet-50 v1.5, batch 1, 224x224 input
RESNET50 = [
    (1, 3, 224, 64, 7, 2, 3),
    (1, 64, 56, 64, 1, 1, 0), (3, 64, 56, 64, 3, 1, 1), (4, 64, 56, 256, 1, 1, 0),
    (2, 256, 56, 64, 1, 1, 0), (1, 256, 56, 128, 1, 1, 0), (1, 128, 56, 128, 3, 2, 1),
    (4, 128, 28, 512, 1, 1, 0), (1, 256, 56, 512, 1, 2, 0), (3, 512, 28, 128, 1, 1, 0),
    (3, 128, 28, 128, 3, 1, 1), (1, 512, 28, 256, 1, 1, 0), (1, 256, 28, 256, 3, 2, 1),
    (6, 256, 14, 1024, 1, 1, 0), (1, 512, 28, 1024, 1, 2, 0), (5, 1024, 14, 256, 1, 1, 0),
    (5, 256, 14, 256, 3, 1, 1), (1, 1024, 14, 512, 1, 1, 0), (1, 512, 14, 512, 3, 2, 1),
    (3, 512, 7, 2048, 1, 1, 0), (1, 1024, 14, 2048, 1, 2, 0), (2, 2048, 7, 512, 1, 1, 0),
    (2, 512, 7, 512, 3, 1, 1),
]
# (count, C, H, stride) — MobileNetV2 depthwise 3x3 convs, pad 1
MOBILENET_DW = [
    (1, 32, 112, 1), (1, 96, 112, 2), (1, 144, 56, 1), (1, 144, 56, 2), (2, 192, 28, 1),
    (1, 192, 28, 2), (4, 384, 14, 1), (2, 576, 14, 1), (1, 576, 14, 2), (3, 960, 7, 1),
]

# (count, C_in, H, C_out, K, stride, pad) — MobileNetV2's other convs (stem and 1x1)
MOBILENET_PW = [
    (1, 3, 224, 32, 3, 2, 1), (1, 32, 112, 16, 1, 1, 0), (1, 16, 112, 96, 1, 1, 0),
    (1, 96, 56, 24, 1, 1, 0), (2, 24, 56, 144, 1, 1, 0), (1, 144, 56, 24, 1, 1, 0),
    (1, 144, 28, 32, 1, 1, 0), (3, 32, 28, 192, 1, 1, 0), (2, 192, 28, 32, 1, 1, 0),
    (1, 192, 14, 64, 1, 1, 0), (4, 64, 14, 384, 1, 1, 0), (3, 384, 14, 64, 1, 1, 0),
    (1, 384, 14, 96, 1, 1, 0), (3, 96, 14, 576, 1, 1, 0), (2, 576, 14, 96, 1, 1, 0),
    (1, 576, 7, 160, 1, 1, 0), (3, 160, 7, 960, 1, 1, 0), (2, 960, 7, 160, 1, 1, 0),
    (1, 960, 7, 320, 1, 1, 0), (1, 320, 7, 1280, 1, 1, 0),
]

# (count, C, H, K, stride) — EfficientNet-B0 depthwise convs, pad K // 2, SiLU
EFFICIENTNET_DW = [
    (1, 32, 112, 3, 1), (1, 96, 112, 3, 2), (1, 144, 56, 3, 1), (1, 144, 56, 5, 2),
    (1, 240, 28, 5, 1), (1, 240, 28, 3, 2), (2, 480, 14, 3, 1), (1, 480, 14, 5, 1),
    (2, 672, 14, 5, 1), (1, 672, 14, 5, 2), (3, 1152, 7, 5, 1), (1, 1152, 7, 3, 1),
]


def _resnet_shapes():
    for cnt, ic, h, oc, k, s, p in RESNET50:
        yield ("resnet", f"{k}x{k}/{s} {ic}->{oc} @{h}", cnt, ic, h, oc, k, s, p, 1)


def _mobilenet_shapes():
    for cnt, ic, h, oc, k, s, p in MOBILENET_PW:
        yield ("mobilenet", f"{k}x{k}/{s} {ic}->{oc} @{h}", cnt, ic, h, oc, k, s, p, 1)
    for cnt, c, h, s in MOBILENET_DW:
        yield ("mobilenet", f"dw3x3/{s} {c} @{h}", cnt, c, h, c, 3, s, 1, c)


def _efficientnet_shapes():
    for cnt, c, h, k, s in EFFICIENTNET_DW:
        yield ("efficientnet", f"dw{k}x{k}/{s} {c} @{h}", cnt, c, h, c, k, s, k // 2, c)


def _activation(model: str, groups: int) -> str:
    """The activation fused after each conv of the bench: the models' own."""
    if model == "efficientnet":
        return "silu"
    return "relu6" if groups > 1 else "relu"


def _batch(fn, seconds: float = 0.003) -> tuple[int, float]:
    """Calls per batch of about ``seconds`` (after a warm-up), and that first estimate."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(seconds / one)), one


def measure(fns: list[list], rounds: int) -> list[list[float]]:
    """Best seconds per call of every ``fns[shape][framework]``. The frameworks of one shape
    are timed in turn, round after round, so a busy machine hurts them alike."""
    batches = [[_batch(f) for f in row] for row in fns]
    best = [[b[1] for b in row] for row in batches]
    for _ in range(rounds):
        for i, row in enumerate(fns):
            for j, f in enumerate(row):
                number = batches[i][j][0]
                t0 = time.perf_counter()
                for _ in range(number):
                    f()
                best[i][j] = min(best[i][j], (time.perf_counter() - t0) / number)
    return best


def prepare_tvm(shapes, cpu_name: str | None) -> list[tuple]:
    import dataclasses
    import tempfile

    import tvm

    from compiler.ir.types import TensorType
    from runtime.pool import load_library
    from targets.kernels.base import KernelRequest, get_kernel_builder
    from targets.tvm_codegen import export_with_launcher, host_cpu

    base = host_cpu(cpu_name)   # detected, or the named level
    cpu = dataclasses.replace(base, tvm_target={**base.tvm_target, "num-cores": THREADS},
                              num_cores=THREADS)
    rng = np.random.default_rng(0)
    funcs, calls = {}, []
    for i, (model, _, _, ic, h, oc, k, s, p, g) in enumerate(shapes):
        x = rng.standard_normal((1, h, h, ic)).astype(np.float32)
        w = rng.standard_normal((oc, k, k, ic // g)).astype(np.float32) * 0.05
        b = rng.standard_normal(oc).astype(np.float32)
        oh = (h + 2 * p - k) // s + 1
        act = _activation(model, g)
        req = KernelRequest("conv2d", {"strides": [s, s], "pads": [p] * 4, "dilations": [1, 1],
                                       "groups": g, "layout": "NHWC", "kernel_layout": "OHWI",
                                       "activation": act, "clip_min": 0.0, "clip_max": 6.0},
                            [TensorType.of(x), TensorType.of(w), TensorType.of(b)],
                            [TensorType((1, oh, oh, oc), "f32")], {1: w, 2: b}, cpu)
        impl = get_kernel_builder("conv2d")(req)
        funcs[f"k{i}"] = impl.prim_func.with_attr("global_symbol", f"k{i}")
        wp = impl.weight_transforms[1](w) if 1 in impl.weight_transforms else w
        args = [tvm.runtime.tensor(a) for a in (x, wp, b)]
        args.append(tvm.runtime.tensor(np.zeros((1, oh, oh, oc), np.float32)))
        calls.append((args, impl.note))
    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule(funcs), tvm.target.Target(cpu.tvm_target))
    with tempfile.TemporaryDirectory(prefix="conv-kernels-") as tmp:
        export_with_launcher(ex, f"{tmp}/k.so")
        lib = load_library(tvm, f"{tmp}/k.so")
    print(f"built {len(funcs)} kernels in {time.perf_counter() - t0:.1f} s", flush=True)
    return [(lambda f=lib[f"k{i}"], args=args: f(*args), note)
            for i, (args, note) in enumerate(calls)]


def prepare_ort(shapes) -> list:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    res = []
    for model, _, _, ic, h, oc, k, s, p, g in shapes:
        w = (rng.standard_normal((oc, ic // g, k, k)) * 0.05).astype(np.float32)
        b = rng.standard_normal(oc).astype(np.float32)
        conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[s, s], pads=[p] * 4,
                                group=g, kernel_shape=[k, k])
        act = _activation(model, g)
        if act == "silu":
            tail = [helper.make_node("Sigmoid", ["c"], ["sg"]),
                    helper.make_node("Mul", ["c", "sg"], ["y"])]
        elif act == "relu6":
            tail = [helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
        else:
            tail = [helper.make_node("Relu", ["c"], ["y"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        if act == "relu6":
            inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                      numpy_helper.from_array(np.array(6, np.float32), "hi")]
        graph = helper.make_graph(
            [conv, *tail], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, ic, h, h])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        x = rng.standard_normal((1, ic, h, h)).astype(np.float32)
        res.append(lambda sess=sess, x=x: sess.run(None, {"x": x}))
    return res


def prepare_torch(shapes) -> list:
    import torch

    torch.set_num_threads(THREADS)
    torch.set_grad_enabled(False)
    res = []
    for model, _, _, ic, h, oc, k, s, p, g in shapes:
        x = torch.randn(1, ic, h, h)
        w = torch.randn(oc, ic // g, k, k) * 0.05
        b = torch.randn(oc)
        if _activation(model, g) == "silu":
            def fn(x=x, w=w, b=b, s=s, p=p, g=g):
                return torch.nn.functional.silu(torch.nn.functional.conv2d(x, w, b, s, p, 1, g))
        elif g > 1:
            def fn(x=x, w=w, b=b, s=s, p=p, g=g):
                return torch.nn.functional.conv2d(x, w, b, s, p, 1, g).clamp_(0, 6)
        else:
            def fn(x=x, w=w, b=b, s=s, p=p):
                return torch.relu_(torch.nn.functional.conv2d(x, w, b, s, p))
        res.append(fn)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default=None,
                    help="a CPU level for our kernels (default: the detected CPU)")
    ap.add_argument("--only", choices=["resnet", "mobilenet", "efficientnet"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(THREADS)
    sets = {"resnet": _resnet_shapes, "mobilenet": _mobilenet_shapes,
            "efficientnet": _efficientnet_shapes}
    shapes = [sh for name, make in sets.items() if args.only in (None, name) for sh in make()]
    tv = prepare_tvm(shapes, args.cpu)
    fns = [[f] for f, _ in tv]
    for row, f in zip(fns, prepare_ort(shapes), strict=True):
        row.append(f)
    if not args.no_torch:
        for row, f in zip(fns, prepare_torch(shapes), strict=True):
            row.append(f)
    best = measure(fns, args.rounds)
    nan = float("nan")
    tv = [(b[0], note) for b, (_, note) in zip(best, tv, strict=True)]
    on = [b[1] for b in best]
    th = [b[2] if len(b) > 2 else nan for b in best]
    from bench.common import cpu_header

    print(cpu_header())
    print(f"{THREADS} thread(s), cpu {args.cpu or 'detected'}")
    print(f"{'shape':28} {'n':>2} {'npucc ms':>9} {'ort ms':>8} {'torch ms':>8} "
          f"{'x ort':>6} {'x torch':>7}  GFLOP/s  schedule")
    sums: dict[str, list[float]] = {}
    for sh, (t, note), o, p in zip(shapes, tv, on, th, strict=True):
        model, name, cnt, ic, h, oc, k, s, pad, g = sh
        oh = (h + 2 * pad - k) // s + 1
        gflops = 2 * oh * oh * oc * (ic // g) * k * k / t / 1e9
        print(f"{name:28} {cnt:2d} {t * 1e3:9.3f} {o * 1e3:8.3f} {p * 1e3:8.3f} "
              f"{t / o:6.2f} {t / p:7.2f}  {gflops:7.1f}  {note}")
        acc = sums.setdefault(model, [0.0, 0.0, 0.0])
        acc[0] += cnt * t
        acc[1] += cnt * o
        acc[2] += cnt * p
    for model, (t, o, p) in sums.items():
        print(f"sum over {model} convs (weighted by count): npucc {t * 1e3:.2f} ms, "
              f"onnxruntime {o * 1e3:.2f} ms, torch {p * 1e3:.2f} ms -> "
              f"{t / o:.2f}x ort, {t / p:.2f}x torch")


if __name__ == "__main__":
    main()
