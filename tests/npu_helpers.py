"""Small graphs and comparisons shared by the NPU numerics / export / device tests."""

from __future__ import annotations

import numpy as np

from compiler.ir.graph import Graph
from compiler.ir.types import TensorType


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def small_cnn(seed: int = 0, *, res: int = 16, with_layer_norm: bool = False) -> Graph:
    """x f32[1,3,R,R] (NCHW) -> conv3x3+relu -> depthwise conv3x3+relu -> add (residual) ->
    global_avg_pool -> reshape -> dense -> [layer_norm (a CPU op on kirin990) -> dense] ->
    outputs (softmax, logits). He-scaled random weights."""
    rng = np.random.default_rng(seed)
    g = Graph("small_cnn")
    x = g.add_input("x", TensorType((1, 3, res, res), "f32"))

    def w(name: str, *shape: int, fan_in: int) -> object:
        return g.add_weight(name, (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
                            .astype(np.float32))

    def b(name: str, n: int) -> object:
        return g.add_weight(name, rng.uniform(-0.2, 0.2, n).astype(np.float32))

    c1 = g.add("conv2d", x, w("c1.w", 16, 3, 3, 3, fan_in=27), b("c1.b", 16),
               pads=[1, 1, 1, 1], activation="relu")
    c2 = g.add("conv2d", c1, w("c2.w", 16, 1, 3, 3, fan_in=9), b("c2.b", 16),
               pads=[1, 1, 1, 1], groups=16, activation="relu")
    s = g.add("add", c2, c1)
    p = g.add("global_avg_pool", s)
    f = g.add("reshape", p, shape=[1, 16])
    y = g.add("dense", f, w("fc.w", 32, 16, fan_in=16), b("fc.b", 32))
    if with_layer_norm:
        y = g.add("layer_norm", y, g.add_weight("ln.g", np.ones(32, np.float32)),
                  g.add_weight("ln.b", np.zeros(32, np.float32)))
        y = g.add("dense", y, w("fc2.w", 10, 32, fan_in=32), b("fc2.b", 10),
                  activation="relu")
    sm = g.add("softmax", y)
    g.outputs = [sm, y]
    y.name = "logits"
    g.claim_name("logits")
    return g


def image(seed: int = 1, res: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, res, res))
            .astype(np.float32)}
