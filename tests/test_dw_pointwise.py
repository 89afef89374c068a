"""depthwise_pointwise (a depthwise conv and the 1x1 conv reading it, one kernel): the kernel
against the op's numpy reference on the detected host and built for x86-64-v3 (16 vector
registers, 8 lanes: other tiles, a padded row), the reference against the two convs it
replaces, the channel-group split of short maps, and the errors that name what is wrong.
The pass's rewrite: tests/filecheck/fuse-conv-blocks-depthwise-pointwise.ir; MobileNetV2
through it against onnxruntime: tests/test_fuse_conv_blocks.py."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import OpError
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.kernels.conv_common import ConvGeom, ConvTiles
from targets.kernels.dw_pointwise import row_splits
from tests.kernel_harness import Case, assert_matches_reference, reference, run_cases

RNG = np.random.default_rng(0)
NHWC = {"layout": "NHWC", "kernel_layout": "OHWI"}


def _r(*shape):
    return RNG.uniform(-1.0, 1.0, shape).astype(np.float32)


def _case(x, c, oc, attrs, residual=False, weight_layout="OHWI") -> Case:
    wd, wp = _r(c, 3, 3, 1), _r(oc, 1, 1, c)
    if weight_layout == "HWIO":
        wd, wp = wd.transpose(1, 2, 3, 0), wp.transpose(1, 2, 3, 0)
    n, h, w = x.shape[:3]
    out = reference(Case("depthwise_pointwise", [x, wd, _r(c), wp, _r(oc)],
                         {**NHWC, **attrs, "kernel_layout": weight_layout}))[0]
    res = [_r(*out.shape)] if residual else []
    return Case("depthwise_pointwise", [x, wd, _r(c), wp, _r(oc), *res],
                {**NHWC, **attrs, "kernel_layout": weight_layout, "residual": residual},
                consts=(1, 3))


def _cases() -> list[Case]:
    nan = _r(2, 9, 9, 24)
    nan[1, 4, 4, 5] = np.nan
    return [
        # MobileNetV2's 14x14 block: relu6 depthwise, linear projection
        _case(_r(1, 14, 14, 64), 64, 96, {"pads": [1, 1, 1, 1], "dw_activation": "relu6"}),
        # a 7x7 map (channel-block groups per row on a multi-core host), residual + relu
        _case(_r(1, 7, 7, 32), 32, 320, {"pads": [1, 1, 1, 1], "dw_activation": "relu6",
                                         "activation": "relu"}, residual=True),
        # 7x7 with an odd block count per channel-block group (groups of 3 and 2 blocks of
        # 32 on a 2-core AVX-512 host)
        _case(_r(1, 7, 7, 48), 48, 160, {"pads": [1, 1, 1, 1], "dw_activation": "relu6"},
              residual=True),
        # stride 2, odd output channels (padded block), clip, HWIO weights
        _case(_r(1, 11, 11, 24), 24, 40, {"pads": [1, 1, 1, 1], "strides": [2, 2],
                                          "dw_activation": "clip", "dw_clip_min": -0.5,
                                          "dw_clip_max": 0.5}, weight_layout="HWIO"),
        # dilation 2, no padding on the right, batch 2 with a NaN pixel
        _case(nan, 24, 16, {"pads": [2, 2, 0, 0], "dilations": [2, 2]}),
        # tile dimensions of 1 (the depthwise result as a whole stage): SSDlite's heads on a
        # 1x1 map, 25 (odd) channels
        _case(_r(1, 1, 1, 64), 64, 24, {"pads": [1, 1, 1, 1], "dw_activation": "relu6"}),
        _case(_r(1, 5, 5, 25), 25, 16, {"pads": [1, 1, 1, 1]}),
    ]


def _run(cases, tmp_path: Path, cpu: str | None):
    if cpu is None:
        return run_cases(cases, tmp_path)
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{cpu} code runs on x86-64 hosts only")
    from targets.tvm_codegen import host_cpu

    return run_cases(cases, tmp_path, host_cpu(cpu))


@pytest.mark.parametrize("cpu", [None, "x86-64-v3"], ids=["host", "x86-64-v3"])
def test_kernel_matches_reference(tmp_path, cpu):
    cases = _cases()
    got = _run(cases, tmp_path, cpu)
    for i, (case, res) in enumerate(zip(cases, got, strict=True)):
        assert_matches_reference(f"case {i}", case, res, atol=1e-4)
    # the NaN pixel reaches the outputs whose dilated 3x3 window holds it: input row 4 is
    # output row y + 2 * ry - 2 for ry = 0, 1, 2 -> rows (and columns) 6, 4, 2 of sample 1,
    # all 16 channels; nothing in sample 0
    nan_at = np.argwhere(np.isnan(got[4][0]).any(axis=3))
    assert sorted(map(tuple, nan_at)) == [(1, y, x) for y in (2, 4, 6) for x in (2, 4, 6)]
    assert np.isnan(got[4][0]).sum() == 9 * 16


def test_reference_is_the_two_convs():
    c = _cases()[1]
    x, wd, bd, wp, bp, res = c.inputs
    conv = get_op("conv2d")
    d = conv.reference([x, wd, bd], conv.normalize_attrs(
        {**NHWC, "pads": [1, 1, 1, 1], "groups": 32, "activation": "relu6"}))[0]
    want = np.maximum(conv.reference([d, wp, bp], conv.normalize_attrs(NHWC))[0] + res, 0)
    np.testing.assert_allclose(reference(c)[0], want, rtol=1e-6, atol=1e-6)


def test_short_maps_split_the_channel_blocks_when_the_recompute_is_cheap():
    g7 = ConvGeom(1, 7, 7, 960, 960, 3, 3, 7, 7, pt=1, pl=1, pb=1, pr=1, groups=960)
    # 7 rows on 2 cores: 10 blocks of 32 split in 2 (2 x 7 tasks; the depthwise row made
    # twice costs 9 of the 1x1 conv's 320 MACs per channel)
    assert row_splits(g7, ConvTiles(32, 7, 10, 7, True), cores=2) == 2
    # 5 blocks: groups of 3 and 2
    assert row_splits(g7, ConvTiles(32, 7, 5, 7, True), cores=2) == 2
    # 4 cores want 16 tasks: 3 groups, but 2 more depthwise rows (18 MACs per channel) cost
    # more than a tenth of 2 blocks of 32 channels
    assert row_splits(g7, ConvTiles(32, 7, 10, 7, True), cores=4) == 3
    assert row_splits(g7, ConvTiles(32, 7, 2, 7, True), cores=4) == 1
    # enough rows, or one core: no split
    g14 = ConvGeom(1, 14, 14, 576, 576, 3, 3, 14, 14, pt=1, pl=1, pb=1, pr=1, groups=576)
    assert row_splits(g14, ConvTiles(32, 7, 10, 14, True), cores=2) == 1
    assert row_splits(g7, ConvTiles(32, 7, 10, 7, True), cores=1) == 1


def test_bad_operands_and_requests_are_refused_naming_them():
    from targets.kernels.base import KernelRequest, get_kernel_builder
    from targets.tvm_codegen import host_cpu

    op = get_op("depthwise_pointwise")
    attrs = op.normalize_attrs({**NHWC, "pads": [1, 1, 1, 1]})
    t = TensorType
    x, wd, bd, bp = t((1, 4, 4, 8), "f32"), t((8, 3, 3, 1), "f32"), t((8,), "f32"), \
        t((4,), "f32")
    with pytest.raises(OpError, match=r"w_pw must be a 1x1 weight \(OHWI\)"):
        op.infer([x, wd, bd, t((4, 3, 3, 8), "f32"), bp], attrs)
    with pytest.raises(OpError, match=r"w_dw must be a depthwise weight for 8 channels"):
        op.infer([x, t((8, 3, 3, 2), "f32"), bd, t((4, 1, 1, 8), "f32"), bp], attrs)
    with pytest.raises(OpError, match="b_pw, residual: 6 operands, got 5"):
        op.infer([x, wd, bd, t((4, 1, 1, 8), "f32"), bp],
                 op.normalize_attrs({**NHWC, "residual": True}))
    types = [x, wd, bd, t((4, 1, 1, 8), "f32"), bp]
    req = KernelRequest("depthwise_pointwise", attrs, types, op.infer(types, attrs), {},
                        host_cpu(), "blk")
    with pytest.raises(OpError, match=r"both weights must be constants.*"
                                      r"depthwise_pointwise=false"):
        get_kernel_builder("depthwise_pointwise")(req)


def test_cost_model_counts_both_convs():
    """The cost model prices a depthwise_pointwise node as a conv doing the depthwise window
    and the 1x1 product (not as an elementwise op over its result)."""
    from compiler.ir import Graph
    from targets.cost_model import node_flops, op_class

    g = Graph("b")
    x = g.add_input("x", TensorType((1, 14, 14, 64), "f32"))
    ws = [g.add_const(_r(*s)) for s in ((64, 3, 3, 1), (64,), (96, 1, 1, 64), (96,))]
    node = g.make_node("depthwise_pointwise", [x, *ws], {"pads": [1, 1, 1, 1]})
    assert op_class(node) == "conv"
    assert node_flops(node) == 2.0 * 196 * 64 * (9 + 96)
