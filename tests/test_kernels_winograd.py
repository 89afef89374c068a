"""Winograd F(2,3) / F(4,3) conv kernels against the conv2d reference, and the rule choosing them.

Error bar: max abs error over the output's max magnitude <= 1e-4 (issue 18). Each case prints
its F(2,3) and F(4,3) errors (``pytest -s``): F(4,3)'s larger transform coefficients cost about
one decimal digit in f32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.ir import interpret
from compiler.ir.graph import Graph
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.host import cpu_info_for
from targets.kernels.base import KernelRequest
from targets.kernels.conv_common import conv_geom
from targets.kernels.winograd import (
    winograd_conv2d,
    winograd_matrices,
    winograd_tile,
    winograd_weight,
)
from targets.tvm_codegen import host_cpu

HOST = host_cpu()
_rng = np.random.default_rng(7)


@pytest.mark.parametrize("m", [2, 4])
def test_transform_identity(m):
    """A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of one tile (float64)."""
    at, g_mat, bt = winograd_matrices(m)
    a = m + 2
    d, w = _rng.standard_normal((a, a)), _rng.standard_normal((3, 3))
    y = at @ ((g_mat @ w @ g_mat.T) * (bt @ d @ bt.T)) @ at.T
    ref = np.array([[(d[i:i + 3, j:j + 3] * w).sum() for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, atol=1e-12)
    u = winograd_weight(w[None, None].astype(np.float32), m, 4)
    assert u.shape == (a, a, 1, 1, 4)
    np.testing.assert_allclose(u[:, :, 0, 0, 0], g_mat @ w @ g_mat.T, rtol=1e-6)
    assert not u[..., 1:].any()  # output channels padded with zeros
    with pytest.raises(ValueError, match=r"F\(3,3\) not available"):
        winograd_matrices(3)


def _case(n, c, h, w, oc, *, layout="NHWC", kl="OHWI", bias=True, cpu=HOST, **attrs):
    x = _rng.standard_normal((n, c, h, w) if layout == "NCHW" else (n, h, w, c)).astype("f4")
    wo = (_rng.standard_normal((oc, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    wt = {"OIHW": wo, "OHWI": wo.transpose(0, 2, 3, 1), "HWIO": wo.transpose(2, 3, 1, 0)}[kl]
    inputs = [x, np.ascontiguousarray(wt)] + ([_rng.standard_normal(oc).astype("f4")]
                                               if bias else [])
    opdef = get_op("conv2d")
    attrs = opdef.normalize_attrs({"layout": layout, "kernel_layout": kl, **attrs})
    ref = np.asarray(opdef.reference(inputs, attrs)[0])
    req = KernelRequest("conv2d", attrs, [TensorType.of(a) for a in inputs],
                        [TensorType.of(ref)], {j: inputs[j] for j in range(1, len(inputs))},
                        cpu)
    return req, inputs, ref


CASES = [  # (n, c, h, w, oc, attrs)
    (1, 32, 14, 14, 64, {"pads": [1, 1, 1, 1], "activation": "relu"}),
    (2, 16, 9, 11, 48, {"pads": [1, 1, 1, 1]}),                       # ragged tiles, OC % ob
    (1, 16, 10, 7, 32, {"pads": [0, 2, 1, 0], "kl": "HWIO", "bias": False}),  # asymmetric
    (1, 32, 8, 8, 32, {"layout": "NCHW", "kl": "OIHW", "activation": "relu6"}),  # no padding
    (1, 512, 7, 7, 64, {"pads": [1, 1, 1, 1], "activation": "sigmoid"}),  # long reductions
    # a 64 KiB L2: the transformed tensors spill, so one row of tiles at a time
    (1, 16, 16, 15, 32, {"pads": [1, 1, 1, 1], "activation": "relu",
                         "cpu": dataclasses.replace(HOST, l2_bytes=64 * 1024)}),
]


def test_winograd_matches_reference():
    import tvm

    funcs, runs = {}, []
    for i, (n, c, h, w, oc, attrs) in enumerate(CASES):
        attrs = dict(attrs)
        layout, kl = attrs.pop("layout", "NHWC"), attrs.pop("kl", "OHWI")
        req, inputs, ref = _case(n, c, h, w, oc, layout=layout, kl=kl,
                                 bias=attrs.pop("bias", True), **attrs)
        g = conv_geom(req.input_types[0].shape, layout, req.input_types[1].shape, kl, req.attrs)
        for m in (2, 4):
            impl = winograd_conv2d(req, g, layout, kl, m)
            assert f"winograd F({m},3)" in impl.note
            assert ("by rows" in impl.note) == (i == len(CASES) - 1), impl.note
            funcs[f"c{i}m{m}"] = impl.prim_func.with_attr("global_symbol", f"c{i}m{m}")
            runs.append((f"c{i}m{m}", impl, inputs, ref))
    ex = tvm.compile(tvm.IRModule(funcs), tvm.target.Target(HOST.tvm_target))
    bad = []
    for name, impl, inputs, ref in runs:
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(inputs)]
        out = tvm.runtime.tensor(np.zeros_like(ref))
        ex[name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
        print(f"{name} {impl.note}: relative error {err:.2e}")
        if not err <= 1e-4:
            bad.append(f"{name} ({impl.note}): relative error {err:.3g}")
    assert not bad, "\n".join(bad)


def _geom(ic, h, oc, **attrs):
    attrs = {"pads": [1, 1, 1, 1], **attrs}
    k = attrs.pop("k", 3)
    groups = attrs.get("groups", 1)
    return conv_geom((1, h, h, ic), "NHWC", (oc, k, k, ic // groups), "OHWI", attrs)


@pytest.mark.parametrize("level", ["host", "x86-64-v3", "a76"])
def test_rule(level):
    """Winograd for ResNet's 3x3 stride-1 convs down to 14x14 maps (F(4,3) on the larger
    maps), the direct conv at 7x7 512 channels; never Winograd for strides, dilations, groups, f16, runtime weights or too few
    channels."""
    cpu = {"host": HOST,
           "x86-64-v3": cpu_info_for({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}),
           "a76": cpu_info_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                "mcpu": "cortex-a76", "mattr": ["+neon"]}, num_cores=4)}[level]
    for ic, h, oc in [(64, 56, 64), (128, 28, 128), (64, 16, 64)]:
        assert winograd_tile(_geom(ic, h, oc), cpu, "f32", True) == 4, (ic, h, oc)
    # F(4,3)'s 4x weight against F(2,3)'s 1.8x: either, by the ISA's width
    assert winograd_tile(_geom(256, 14, 256), cpu, "f32", True) in (2, 4)
    # 4 or 16 tiles: on 256- and 512-bit x86 the transformed weights (4x or 1.8x the direct
    # conv's) cost more to stream than the multiplies saved; NEON's narrower FMAs still gain
    assert winograd_tile(_geom(512, 7, 512), cpu, "f32", True) == (4 if level == "a76" else 0)
    assert winograd_tile(_geom(64, 56, 64, strides=[2, 2]), cpu, "f32", True) == 0
    assert winograd_tile(_geom(64, 56, 64, dilations=[2, 2], pads=[2] * 4), cpu, "f32",
                         True) == 0
    assert winograd_tile(_geom(64, 56, 64, groups=2), cpu, "f32", True) == 0
    assert winograd_tile(_geom(64, 56, 64, k=1, pads=[0] * 4), cpu, "f32", True) == 0
    assert winograd_tile(_geom(64, 56, 64), cpu, "f16", True) == 0
    assert winograd_tile(_geom(64, 56, 64), cpu, "f32", False) == 0
    assert winograd_tile(_geom(3, 56, 64), cpu, "f32", True) == 0     # stem: 3 channels
    assert winograd_tile(_geom(64, 56, 6), cpu, "f32", True) == 0


def _graph() -> Graph:
    g = Graph("wino")
    x = g.add_input("x", TensorType((1, 16, 16, 64), "f32"))
    w = g.add_weight("w", (0.1 * _rng.standard_normal((64, 3, 3, 64))).astype(np.float32))
    b = g.add_weight("b", (0.1 * _rng.standard_normal(64)).astype(np.float32))
    g.outputs = [g.add("conv2d", x, w, b, layout="NHWC", kernel_layout="OHWI",
                       pads=[1, 1, 1, 1], activation="relu", name="conv")]
    return g


def test_compiled_model_reports_winograd(tmp_path):
    """Through compile(): the 3x3 conv's kernel note names Winograd and the package's outputs
    match the reference interpreter."""
    from compiler import compile

    g = _graph()
    x = {"x": _rng.standard_normal((1, 16, 16, 64)).astype(np.float32)}
    (want,) = interpret(g, x)
    m = compile(g, "host", pipeline="canonicalize", progress=False, work_dir=tmp_path)
    notes = [k.note for k in m.library.kernels.values()]
    assert any("winograd F(4,3)" in n for n in notes), notes
    (got,) = m.run(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
