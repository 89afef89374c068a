"""MobileNetV3 / EfficientNet building blocks through ``compile(target="host")`` against
onnxruntime: conv + hard_swish, depthwise + SiLU, squeeze-excitation with hardsigmoid and
sigmoid, in the epilogues the host pipeline fuses (fuse-conv-act's silu / hard_swish /
hard_sigmoid). The fused graph is checked too: no separate activation nodes are left."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


class _Block(torch.nn.Module):
    """expand 1x1 -> depthwise kxk -> squeeze-excitation -> project 1x1 (+ residual)."""

    def __init__(self, c: int, e: int, k: int, stride: int, act, gate):
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.expand = torch.nn.Sequential(torch.nn.Conv2d(c, e, 1, bias=False), bn(e), act())
        self.dw = torch.nn.Sequential(
            torch.nn.Conv2d(e, e, k, stride, k // 2, groups=e, bias=False), bn(e), act())
        self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(e, 8, 1),
                                      torch.nn.ReLU(), torch.nn.Conv2d(8, e, 1), gate())
        self.project = torch.nn.Sequential(torch.nn.Conv2d(e, c, 1, bias=False), bn(c))
        self.residual = stride == 1

    def forward(self, x):
        y = self.dw(self.expand(x))
        y = self.project(y * self.se(y))
        return x + y if self.residual else y


def _model(act, gate) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16), act(),
        _Block(16, 48, 3, 1, act, gate), _Block(16, 64, 5, 2, act, gate),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    for mod in m.modules():   # non-trivial batch-norm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name,act,gate", [
    ("mobilenet_v3", torch.nn.Hardswish, torch.nn.Hardsigmoid),
    ("efficientnet", torch.nn.SiLU, torch.nn.Sigmoid),
])
def test_block_matches_onnxruntime(tmp_path, name, act, gate):
    from compiler import compile as npucc_compile

    model = _model(act, gate)
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False, opset_version=17)
    import onnx

    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    m = npucc_compile(path, target="host", progress=False)
    got = m.run({m.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    ops = [n.op for n in m.graph.nodes]
    acts = sorted({n.attrs["activation"] for n in m.graph.nodes
                   if n.op in ("conv2d", "conv2d_fused")})
    gates = {(n.attrs["activation"], n.attrs["gate"]) for n in m.graph.nodes
             if n.op == "squeeze_excite"}
    assert not {"hard_swish", "hard_sigmoid", "sigmoid"} & set(ops), ops
    # the two squeeze-excitation blocks are squeeze_excite nodes, their channel multiplies
    # the projection convs' input scales (fuse-conv-blocks)
    assert ops.count("mul") == 0 and ops.count("squeeze_excite") == 2, ops
    hs = act is torch.nn.Hardswish
    assert acts == (["hard_swish", "none"] if hs else ["none", "silu"]), acts
    assert gates == {("relu", "hard_sigmoid" if hs else "sigmoid")}, gates
