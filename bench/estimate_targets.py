"""Roofline estimates (targets/cost_model.py) of MobileNetV1 and ResNet-50 on every built-in
target, printed next to the public figures we hold them against (TARGET-FACTS.md: Paddle-Lite
on a Mate 30 5G / Kirin 990 5G: MobileNetV1 2.43 ms on the NPU, 34.66 ms on the CPU).

    python bench/estimate_targets.py

MobileNetV1 (1.0, 224) is built here layer by layer with random weights (only shapes matter);
ResNet-50 is onnx's light_resnet50 through our importer and each target's default pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from compiler.ir import Graph, TensorType, verify
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline
from targets.cost_model import estimate, format_estimate
from targets.description import list_targets, load_target

PUBLIC = {"mobilenet_v1": "Kirin 990 5G, Paddle-Lite: 2.43 ms NPU, 34.66 ms CPU",
          "resnet50": "no public Kirin 990 figure in TARGET-FACTS"}


def mobilenet_v1(res: int = 224) -> Graph:
    """MobileNetV1 1.0: conv 3x3/2 + 13 depthwise-separable blocks + pool + fc, NCHW, fused
    BN (conv bias) and ReLU6, as after our canonicalize + fusion passes."""
    rng = np.random.default_rng(0)
    g = Graph("mobilenet_v1")
    x = g.add_input("x", TensorType((1, 3, res, res), "f32"))

    def conv(x, cin, cout, k, stride, groups):
        w = g.add_weight("w", rng.standard_normal((cout, cin // groups, k, k)).astype("f4"))
        b = g.add_weight("b", np.zeros(cout, "f4"))
        p = k // 2
        return g.add("conv2d", x, w, b, strides=[stride, stride], pads=[p, p, p, p],
                     groups=groups, activation="relu6")

    y = conv(x, 3, 32, 3, 2, 1)
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]
    c = 32
    for cout, s in cfg:
        y = conv(y, c, c, 3, s, c)        # depthwise
        y = conv(y, c, cout, 1, 1, 1)     # pointwise
        c = cout
    y = g.add("global_avg_pool", y)
    y = g.add("reshape", y, shape=[1, c])
    w = g.add_weight("fc", rng.standard_normal((1000, c)).astype("f4"))
    y = g.add("softmax", g.add("dense", y, w))
    g.outputs = [y]
    verify(g)
    return g


def resnet50() -> Graph:
    import onnx

    from compiler.frontends import from_onnx
    from examples.models import light_model_path

    return from_onnx(onnx.version_converter.convert_version(
        onnx.load(str(light_model_path("resnet50"))), 17))


def main() -> None:
    models = {"mobilenet_v1": mobilenet_v1(), "resnet50": resnet50()}
    for mname, g0 in models.items():
        print(f"== {mname}   (public: {PUBLIC[mname]})")
        for tname in list_targets():
            t = load_target(tname)
            g = run_pipeline(g0.copy(), t.default_pipeline, PassContext(target=t))
            est = estimate(g, t)
            print(format_estimate(est, top=3))
            if t.npu is not None:  # the same graph with every node on the CPU
                for n in g.nodes:
                    n.device = None if n.op == "const" else "cpu"
                print(f"  all on the CPU ({t.cpu.threads} threads): "
                      f"{estimate(g, t)['latency_ms']:.2f} ms")


if __name__ == "__main__":
    main()
