"""fuse-conv-blocks and its kernels: conv2d_fused (input channel scale, residual, NCHW input
with NHWC result) and squeeze_excite against the ops' numpy references, and the depthwise-heavy
torchvision models (MobileNetV2, MobileNetV3-small, EfficientNet-B0) through the host pipeline
against onnxruntime, with the fused graph checked (no squeeze-excitation pool, channel
multiply, residual add or input transpose left)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernel_harness import Case, assert_matches_reference, run_cases

RNG = np.random.default_rng(0)


def _r(*shape, lo=-1.0, hi=1.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def _conv_cases() -> list[Case]:
    nhwc = {"layout": "NHWC", "kernel_layout": "OHWI"}
    x24 = _r(2, 7, 9, 24)
    return [
        # 1x1 projection with a per-sample channel scale (batch 2: two different gates)
        Case("conv2d_fused", [x24, _r(40, 1, 1, 24), _r(40), _r(2, 1, 1, 24, lo=0.0)],
             {**nhwc, "input_scale": True}, consts=(1,)),
        # scale and residual together (EfficientNet's projection), with a NaN pixel
        Case("conv2d_fused", [np.where(np.arange(x24.size).reshape(x24.shape) == 77, np.nan,
                                       x24).astype(np.float32), _r(24, 1, 1, 24), _r(24),
                              _r(2, 1, 1, 24, lo=0.0), _r(2, 7, 9, 24)],
             {**nhwc, "input_scale": True, "residual": True}, consts=(1,)),
        # 3x3 residual + relu (ResNet: relu after the add), 64 channels: the Winograd path
        Case("conv2d_fused", [_r(1, 14, 14, 64), _r(64, 3, 3, 64), _r(64), _r(1, 14, 14, 64)],
             {**nhwc, "pads": [1, 1, 1, 1], "residual": True, "activation": "relu"},
             consts=(1,)),
        # 3x3 stride 2 residual, direct conv, odd channels
        Case("conv2d_fused", [_r(1, 9, 9, 12), _r(20, 3, 3, 12), _r(20), _r(1, 5, 5, 20)],
             {**nhwc, "pads": [1, 1, 1, 1], "strides": [2, 2], "residual": True}, consts=(1,)),
        # the stem: NCHW model input read by the conv, NHWC result
        Case("conv2d_fused", [_r(1, 3, 17, 17), _r(16, 3, 3, 3), _r(16)],
             {"kernel_layout": "OHWI", "pads": [1, 1, 1, 1], "strides": [2, 2],
              "activation": "relu6", "out_layout": "NHWC"}, consts=(1,)),
        # many output channels: the scale is a stage over the input (NHWC, and NCHW)
        Case("conv2d_fused", [_r(2, 5, 5, 24), _r(96, 1, 1, 24), _r(96), _r(2, 1, 1, 24)],
             {**nhwc, "input_scale": True}, consts=(1,)),
        Case("conv2d_fused", [_r(1, 8, 3, 3), _r(64, 8, 1, 1), _r(64), _r(1, 8, 1, 1),
                              _r(1, 64, 3, 3)], {"input_scale": True, "residual": True},
             consts=(1,)),
        # NCHW throughout, scale + residual, OIHW weight given at run time
        Case("conv2d_fused", [_r(1, 8, 5, 5), _r(8, 8, 1, 1), _r(8), _r(1, 8, 1, 1),
                              _r(1, 8, 5, 5)], {"input_scale": True, "residual": True}),
    ]


def _se_cases() -> list[Case]:
    x = _r(1, 14, 14, 120)
    x[0, 3, 4, 7] = np.nan  # NaN in one channel: NaN gate for that channel's hidden units
    return [
        Case("squeeze_excite", [_r(1, 56, 56, 16), _r(16, 8), _r(8), _r(8, 16), _r(16)],
             {"layout": "NHWC", "activation": "relu", "gate": "hard_sigmoid"},
             consts=(1, 2, 3, 4)),
        Case("squeeze_excite", [x, _r(120, 32), _r(32), _r(32, 120), _r(120)],
             {"layout": "NHWC", "activation": "silu", "gate": "sigmoid"},
             consts=(1, 2, 3, 4)),
        Case("squeeze_excite", [_r(2, 7, 7, 96), _r(96, 4), _r(4), _r(4, 96), _r(96)],
             {"layout": "NHWC", "activation": "relu6", "gate": "sigmoid"},
             consts=(1, 2, 3, 4)),
        Case("squeeze_excite", [_r(2, 40, 6, 6), _r(40, 10), _r(10), _r(10, 40), _r(40)],
             {"layout": "NCHW", "activation": "relu", "gate": "hard_sigmoid"},
             consts=(1, 2, 3, 4)),
    ]


def _run(cases: list[Case], tmp_path, cpu: str | None) -> list[list[np.ndarray]]:
    if cpu is None:
        return run_cases(cases, tmp_path)
    import platform

    from targets.tvm_codegen import host_cpu

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{cpu} code runs on x86-64 hosts only")
    return run_cases(cases, tmp_path, host_cpu(cpu))


@pytest.mark.slow
@pytest.mark.parametrize("cpu", [None, "x86-64-v3"], ids=["host", "x86-64-v3"])
def test_fused_kernels_match_reference(tmp_path, cpu):
    """On the detected host and built for the AVX2 level (16 vector registers: the other
    register budget and vector width)."""
    convs = _conv_cases()
    cases = convs + _se_cases()
    got = _run(cases, tmp_path, cpu)
    for i, (case, res) in enumerate(zip(cases, got, strict=True)):
        assert_matches_reference(f"case {i} {case.op}", case, res, atol=1e-4)
    # NaN in, NaN out, and only where the NaN reaches: one pixel's outputs; every gate
    assert np.isnan(got[1][0]).sum() == 24 and np.isnan(got[len(convs) + 1][0]).sum() == 120


def test_bad_operands_are_refused_naming_them():
    from compiler.errors import OpError
    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType

    op = get_op("conv2d_fused")
    attrs = op.normalize_attrs({"layout": "NHWC", "kernel_layout": "OHWI",
                                "input_scale": True})
    t = TensorType
    with pytest.raises(OpError, match=r"scale must be \[1, 1, 1, 8\]"):
        op.infer([t((1, 4, 4, 8), "f32"), t((4, 1, 1, 8), "f32"), t((4,), "f32"),
                  t((1, 4, 4, 8), "f32")], attrs)
    with pytest.raises(OpError, match="x, w, b, scale: 4 operands, got 3"):
        op.infer([t((1, 4, 4, 8), "f32"), t((4, 1, 1, 8), "f32"), t((4,), "f32")], attrs)
    se = get_op("squeeze_excite")
    with pytest.raises(OpError, match=r"w2 must be \[2, 8\]"):
        se.infer([t((1, 4, 4, 8), "f32"), t((8, 2), "f32"), t((2,), "f32"), t((8, 2), "f32"),
                  t((8,), "f32")], se.normalize_attrs({"layout": "NHWC"}))


# -- the torchvision models ---------------------------------------------------------------

# (model, squeeze_excite, conv2d_fused, depthwise_pointwise nodes) at 64x64: MobileNetV2's
# residual projections are depthwise_pointwise nodes with their depthwise convs (only the
# stem is a conv2d_fused), V3-small's two blocks without squeeze-excitation too
MODELS = {"mobilenet_v2": (0, 1, 17), "mobilenet_v3_small": (9, 10, 2),
          "efficientnet_b0": (16, 17, 0)}


def _export(name: str, tmp_path, size: int = 64):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from examples.vision import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None).eval()
    for mod in model.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["images"], dynamo=False,
                      opset_version=17)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    return path, x.numpy(), want


def _host_graph(path):
    from compiler.frontends import from_onnx
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    return run_pipeline(from_onnx(str(path)), load_target("host").default_pipeline)


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_host_pipeline_fuses_the_blocks_and_matches_onnxruntime(name, tmp_path):
    from compiler.ir import interpret

    path, x, want = _export(name, tmp_path)
    g = _host_graph(path)
    ops = g.op_counts()
    se, fused, dwpw = MODELS[name]
    assert ops.get("squeeze_excite", 0) == se and ops.get("conv2d_fused", 0) == fused, ops
    assert ops.get("depthwise_pointwise", 0) == dwpw, ops
    # what is left: the classifier's pool, no channel multiply, residual add or transpose
    assert ops.get("global_avg_pool") == 1 and not {"mul", "add", "transpose"} & set(ops), ops
    got = interpret(g, {g.inputs[0].name: x})[0]
    assert _rel(got, want) <= 1e-4


@pytest.mark.slow
def test_compiled_mobilenet_v3_small_matches_onnxruntime_and_keeps_nan(tmp_path):
    from compiler import compile as npucc_compile

    path, x, want = _export("mobilenet_v3_small", tmp_path)
    m = npucc_compile(path, target="host", progress=False)
    assert {"squeeze_excite", "conv2d_fused"} <= {n.op for n in m.graph.nodes}
    got = m.run({m.input_names[0]: x})[0]
    assert _rel(got, want) <= 1e-4
    bad = x.copy()
    bad[0, 1, 20, 30] = np.nan
    assert np.isnan(m.run({m.input_names[0]: bad})[0]).all()


@pytest.mark.slow
def test_compiled_mobilenet_v2_with_depthwise_pointwise_matches_onnxruntime(tmp_path):
    """The host pipeline's fuse-conv-blocks{depthwise_pointwise=true}: every depthwise conv of
    MobileNetV2 (17, each read by its 1x1 projection) is fused with it, and the compiled model
    still matches."""
    from compiler import compile as npucc_compile
    from targets.description import load_target

    path, x, want = _export("mobilenet_v2", tmp_path)
    assert "fuse-conv-blocks{depthwise_pointwise=true}" in load_target("host").default_pipeline
    m = npucc_compile(path, target="host", progress=False)
    ops = [n.op for n in m.graph.nodes]
    assert ops.count("depthwise_pointwise") == 17, ops
    assert not [n for n in m.graph.nodes if n.op == "conv2d" and n.attrs["groups"] > 1]
    assert _rel(m.run({m.input_names[0]: x})[0], want) <= 1e-4


def test_quantized_compile_keeps_the_projections_out_of_the_float_fused_kernel():
    """The host pipeline fuses depthwise + 1x1 convs into a float kernel; when compile()
    quantizes, the pipeline it runs turns that rule off, so the 1x1 projections can become
    qconv2d (and says so in its text)."""
    from compiler.driver import CompileOptions, compile_pipeline
    from compiler.pass_base import PassContext
    from targets.description import load_target

    desc = load_target("host")
    assert "depthwise_pointwise=true" in desc.default_pipeline

    def text(**opts):
        o = CompileOptions(**opts)
        return compile_pipeline(desc.default_pipeline, o, desc, PassContext(target=desc))

    assert "fuse-conv-blocks{depthwise-pointwise=true}" in text()
    quantized = text(quantize="int8")
    assert "fuse-conv-blocks" in quantized and "depthwise-pointwise=true" not in quantized
    assert quantized.index("fuse-conv-blocks") < quantized.index("quantize")
