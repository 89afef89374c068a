"""conv2d / conv_transpose2d / pooling kernels against the ops' numpy references.

All kernels of one test are built into one ``tvm.compile`` and called as the runtime calls
them: operands (constant ones through the builder's weight transform), then the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.host import cpu_info_for
from targets.kernels.base import CpuInfo, KernelRequest, get_kernel_builder
from targets.tvm_codegen import host_cpu

HOST = host_cpu()   # this machine, detected (or NPUCC_HOST_CPU's level)
A76 = cpu_info_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                    "mattr": ["+neon", "+dotprod", "+fullfp16"]}, num_cores=4)

Case = tuple[str, list[np.ndarray], dict[str, Any], tuple[int, ...]]  # op, inputs, attrs, consts

_rng = np.random.default_rng(0)


def _r(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _request(case: Case, cpu: CpuInfo, i: int) -> tuple[KernelRequest, list[np.ndarray]]:
    op, inputs, attrs, consts = case
    opdef = get_op(op)
    attrs = opdef.normalize_attrs(attrs)
    ref = [np.asarray(r) for r in opdef.reference(inputs, attrs)]
    req = KernelRequest(op, attrs, [TensorType.of(a) for a in inputs],
                        [TensorType.of(r) for r in ref], {j: inputs[j] for j in consts if j < len(inputs)}, cpu,
                        f"case{i}")
    return req, ref


def _build(cases: list[Case], cpu: CpuInfo):
    import tvm

    funcs, impls = {}, []
    for i, case in enumerate(cases):
        req, ref = _request(case, cpu, i)
        impl = get_kernel_builder(case[0])(req)
        funcs[f"case{i}"] = impl.prim_func.with_attr("global_symbol", f"case{i}")
        impls.append((req, impl, ref))
    ex = tvm.compile(tvm.IRModule(funcs), tvm.target.Target(cpu.tvm_target))
    return ex, impls


def _check(cases: list[Case], rtol: float = 1e-4) -> None:
    import tvm

    ex, impls = _build(cases, HOST)
    bad = []
    for i, (case, (_req, impl, ref)) in enumerate(zip(cases, impls, strict=True)):
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(case[1])]
        targs = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
        out = tvm.runtime.tensor(np.zeros(ref[0].shape, ref[0].dtype))
        ex[f"case{i}"](*targs, out)
        got = out.numpy()
        scale = max(1.0, float(np.abs(ref[0]).max()))
        if not np.allclose(got, ref[0], rtol=rtol, atol=rtol * scale):
            err = float(np.abs(got - ref[0]).max())
            bad.append(f"case{i} {case[0]} {case[2]} ({impl.note}): max abs err {err:.3g}")
    assert not bad, "\n".join(bad)


def _conv(n, c, h, w, oc, k, *, layout="NHWC", kl="OHWI", groups=1, bias=True,
          const=True, **attrs) -> Case:
    kh, kw = (k, k) if isinstance(k, int) else k
    x = _r(n, c, h, w) if layout == "NCHW" else _r(n, h, w, c)
    wo = _r(oc, c // groups, kh, kw)
    wt = {"OIHW": wo, "OHWI": wo.transpose(0, 2, 3, 1), "HWIO": wo.transpose(2, 3, 1, 0)}[kl]
    inputs = [x, np.ascontiguousarray(wt)] + ([_r(oc)] if bias else [])
    consts = (1, 2) if const else ()
    return ("conv2d", inputs, {"layout": layout, "kernel_layout": kl, "groups": groups,
                               **attrs}, consts)


P1 = {"pads": [1, 1, 1, 1]}


def test_conv2d_nhwc():
    _check([
        _conv(1, 16, 10, 10, 32, 3, activation="relu", **P1),
        _conv(1, 6, 9, 11, 20, (3, 2), kl="HWIO", strides=[2, 2], pads=[1, 0, 2, 1],
              activation="relu6"),
        _conv(1, 64, 7, 7, 48, 1, kl="OIHW", bias=False),                 # 1x1 GEMM
        _conv(2, 24, 8, 8, 40, 1, strides=[2, 2], activation="clip", clip_min=-0.5,
              clip_max=0.7),
        _conv(1, 3, 23, 23, 16, 7, strides=[2, 2], pads=[3, 3, 3, 3], activation="sigmoid"),
        _conv(1, 8, 13, 13, 32, 3, dilations=[2, 2], pads=[2, 2, 2, 2], activation="gelu"),
        _conv(1, 8, 13, 17, 5, 3, activation="gelu_tanh"),               # OC below one vector
        _conv(1, 32, 15, 15, 64, 3, strides=[2, 2], **P1),
        _conv(1, 40, 14, 14, 80, 1, activation="silu"),   # 5 one-vector blocks (16 lanes)
        _conv(1, 24, 9, 9, 144, 3, **P1),                  # 9 blocks, 14-column tiles
    ])


@pytest.mark.parametrize("cpu", [HOST, A76], ids=["host", "a76"])
def test_conv_blocks_avoid_padded_channels(cpu):
    """Channels that are a multiple of one vector but not of two are one-vector blocks (no
    padded channels, twice the columns); multiples of two vectors are two-vector blocks; many
    channels that are no multiple of a vector are two-vector blocks padded up."""
    from targets.kernels.conv_common import (
        accumulator_registers,
        conv_geom,
        conv_tiles,
        pick_width,
    )

    lanes = cpu.lanes("f32")

    def tiles(oc, hw=14):
        return conv_tiles(conv_geom((1, hw, hw, 32), "NHWC", (oc, 1, 1, 32), "OHWI", {}), cpu)

    for k in (5, 7, 9, 15):
        t = tiles(k * lanes)
        assert (t.ob, t.nb_g) == (lanes, k), (k, t)
        assert t.owb == pick_width(14, accumulator_registers(cpu)), t
    t = tiles(6 * lanes)
    assert (t.ob, t.nb_g, t.owb) == (2 * lanes, 3, pick_width(14, accumulator_registers(cpu) // 2))
    t = tiles(8 * lanes + lanes // 2)   # 8.5 vectors: two-vector blocks, padded
    assert (t.ob, t.nb_g) == (2 * lanes, 5)


def test_conv2d_groups_and_depthwise():
    _check([
        _conv(1, 32, 12, 12, 32, 3, groups=32, activation="relu6", **P1),
        _conv(1, 24, 12, 12, 24, 3, groups=24, strides=[2, 2], pads=[0, 1, 1, 1]),
        _conv(2, 48, 9, 9, 48, 5, kl="HWIO", groups=48, pads=[2, 2, 2, 2], bias=False),
        _conv(1, 16, 12, 12, 32, 3, groups=4, activation="sigmoid", **P1),
        _conv(1, 12, 12, 12, 18, 3, groups=3, activation="relu", **P1),  # per-group padding
        _conv(1, 8, 10, 10, 16, 3, groups=8, **P1),                      # channel multiplier 2
        _conv(1, 16, 12, 12, 16, 3, layout="NCHW", kl="OIHW", groups=16, strides=[2, 2],
              pads=[0, 1, 1, 1]),
        _conv(1, 64, 48, 48, 64, 3, groups=64, **P1),                    # parallel
        _conv(1, 64, 48, 48, 64, 3, layout="NCHW", kl="OIHW", groups=64, **P1),
    ])


def test_conv2d_odd_shapes():
    _check([
        _conv(1, 1, 5, 5, 1, 3, **P1),                                   # one channel
        _conv(3, 4, 1, 1, 8, 1),                                         # 1x1 image, batch 3
        _conv(1, 5, 15, 3, 7, (11, 2), pads=[5, 0, 5, 1], kl="HWIO"),    # wide kernel, W 3
        _conv(1, 8, 9, 16, 16, 2, strides=[3, 4], layout="NCHW", kl="OIHW"),
        _conv(2, 6, 7, 9, 33, 3, strides=[1, 2], dilations=[3, 1], pads=[3, 1, 3, 1]),
        _conv(1, 2, 6, 6, 4, 3, groups=2, **P1),                         # tiny groups
    ])


def test_conv2d_nchw_and_runtime_weights():
    _check([
        _conv(1, 8, 10, 10, 32, 3, layout="NCHW", kl="OIHW", **P1),
        _conv(1, 32, 16, 16, 64, 3, layout="NCHW", kl="OIHW", activation="relu", **P1),
        _conv(2, 12, 11, 9, 18, 3, layout="NCHW", kl="OIHW", groups=3, dilations=[2, 1],
              pads=[2, 1, 2, 1], activation="relu"),
        _conv(1, 8, 10, 10, 32, 3, const=False, activation="relu", **P1),
        _conv(1, 16, 12, 12, 16, 3, groups=16, const=False, bias=False, **P1),
        _conv(1, 12, 12, 12, 18, 3, layout="NCHW", kl="OIHW", groups=3, const=False),
        _conv(1, 6, 8, 8, 20, 3, kl="HWIO", const=False, strides=[2, 2], **P1),
    ])


def test_conv2d_f16():
    """f16 convs sum in f32 (bias and activation there) and round once, like the reference."""
    cases = [_conv(1, 16, 10, 10, 32, 3, activation="relu", **P1),
             _conv(1, 24, 9, 9, 24, 3, groups=24, activation="relu6", **P1),
             _conv(1, 8, 8, 8, 20, 1, layout="NCHW", kl="OIHW")]
    for _, inputs, _, _ in cases:
        inputs[:] = [a.astype(np.float16) for a in inputs]
    _check(cases, rtol=2e-3)


def _convt(n, c, h, w, ocg, k, *, groups=1, bias=True, const=True, **attrs) -> Case:
    inputs = [_r(n, c, h, w), _r(c, ocg, k, k)] + ([_r(ocg * groups)] if bias else [])
    return ("conv_transpose2d", inputs, {"groups": groups, **attrs},
            (1, 2) if const else ())


def test_conv_transpose2d():
    _check([
        _convt(1, 8, 5, 5, 16, 3, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        _convt(1, 4, 6, 7, 3, 3),
        _convt(2, 8, 4, 4, 6, 4, groups=2, strides=[2, 2], pads=[1, 0, 1, 2], bias=False),
        _convt(1, 4, 5, 5, 8, 3, dilations=[2, 2], strides=[3, 3], const=False),
        _convt(1, 6, 5, 5, 4, 3, groups=3, pads=[2, 2, 2, 2], const=False),
    ])


def _pool(op, layout, n, c, h, w, **attrs) -> Case:
    x = _r(n, c, h, w) if layout == "NCHW" else _r(n, h, w, c)
    return (op, [x], {"layout": layout, **attrs}, ())


def test_pools():
    cases = []
    for lay in ("NHWC", "NCHW"):
        cases += [
            _pool("max_pool2d", lay, 1, 32, 12, 12, kernel=[3, 3], strides=[2, 2], pads=P1["pads"]),
            _pool("max_pool2d", lay, 2, 5, 9, 10, kernel=[3, 2], strides=[2, 2], ceil_mode=True),
            _pool("max_pool2d", lay, 1, 16, 11, 11, kernel=[2, 2], dilations=[2, 2],
                  pads=[1, 1, 0, 0]),
            _pool("avg_pool2d", lay, 1, 32, 12, 12, kernel=[3, 3], strides=[2, 2],
                  pads=P1["pads"], count_include_pad=True),
            _pool("avg_pool2d", lay, 1, 7, 10, 9, kernel=[3, 3], strides=[2, 2],
                  pads=[1, 1, 1, 1], ceil_mode=True),
            _pool("avg_pool2d", lay, 1, 16, 7, 7, kernel=[7, 7]),
            _pool("avg_pool2d", lay, 1, 6, 10, 10, kernel=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1],
                  ceil_mode=True, count_include_pad=True),
            _pool("global_avg_pool", lay, 2, 48, 7, 7),
            _pool("global_max_pool", lay, 1, 20, 5, 6),
            _pool("global_avg_pool", lay, 1, 10, 3, 3),
        ]
    cases += [  # big enough to run in parallel
        _pool("max_pool2d", "NHWC", 1, 64, 72, 72, kernel=[3, 3], strides=[2, 2], pads=[1] * 4),
        _pool("avg_pool2d", "NCHW", 1, 64, 72, 72, kernel=[2, 2], strides=[2, 2]),
        _pool("avg_pool2d", "NHWC", 1, 40, 7, 7, kernel=[7, 7], strides=[1, 1]),
        _pool("global_avg_pool", "NHWC", 1, 4096, 9, 9),
        _pool("global_max_pool", "NHWC", 1, 4096, 9, 9),
        _pool("global_max_pool", "NCHW", 1, 4096, 9, 9),
    ]
    cases += [("global_avg_pool", [_r(2, 6, 9)], {"layout": "NCHW"}, ()),
              ("global_max_pool", [_r(2, 9, 6)], {"layout": "NHWC"}, ())]
    _check(cases)


def test_aarch64_builds():
    """The same schedules compile for the Cortex-A76 (NEON, 4 f32 lanes); not run here."""
    cases = [
        _conv(1, 16, 14, 14, 32, 3, activation="relu", **P1),
        _conv(1, 64, 7, 7, 48, 1),
        _conv(1, 32, 12, 12, 32, 3, groups=32, **P1),
        _conv(1, 8, 10, 10, 16, 3, layout="NCHW", kl="OIHW", const=False, **P1),
        _convt(1, 8, 5, 5, 16, 3, strides=[2, 2], pads=[1, 1, 1, 1]),
        _pool("max_pool2d", "NHWC", 1, 32, 12, 12, kernel=[3, 3], strides=[2, 2]),
        _pool("avg_pool2d", "NCHW", 1, 8, 12, 12, kernel=[2, 2], strides=[2, 2]),
        _pool("global_avg_pool", "NHWC", 1, 64, 7, 7),
    ]
    ex, _ = _build(cases, A76)
    assert ex is not None


@pytest.mark.parametrize("cpu", [HOST, A76], ids=["host", "a76"])
def test_conv_tile_is_not_a_workspace(cpu):
    """The register tile of an NHWC conv with constant weights and no pad stage is a stack
    alloca LLVM keeps in registers, not a ``TVMBackendAllocWorkspace`` buffer (what the "local"
    scope in a parallel body became; EfficientNet/MobileNet 1x1 convs 3-16% faster without)."""
    # (widths the tiles divide on every vector width: no pad stage, which is a workspace)
    for case in (_conv(1, 576, 12, 12, 96, 1), _conv(1, 16, 56, 56, 96, 1, activation="silu")):
        ex, _ = _build([case], cpu)
        asm = (ex.mod.imports[0] if ex.mod.imports else ex.mod).inspect_source("asm")
        assert "TVMBackendParallelLaunch" in asm
        assert "TVMBackendAllocWorkspace" not in asm


@pytest.mark.parametrize("attrs", [
    {"layout": "NCWH"}, {"kernel_layout": "IOHW"}, {"groups": 3},
])
def test_conv2d_bad_attrs(attrs):
    from compiler.errors import NpuccError

    x, w = _r(1, 8, 8, 8), _r(8, 3, 3, 8)
    req = KernelRequest("conv2d", {"layout": "NHWC", "kernel_layout": "OHWI", **attrs},
                        [TensorType.of(x), TensorType.of(w)], [TensorType((1, 6, 6, 8), "f32")],
                        {1: w}, HOST)
    with pytest.raises(NpuccError):
        get_kernel_builder("conv2d")(req)


@pytest.mark.parametrize("window", [(1, 5), (5, 1), (1, 1)])
def test_pool_windows_with_unit_extent(window):
    """compute_at drops unit-extent window loops (LRN lowers to a 1xk NHWC avg pool)."""
    from compiler import compile
    from compiler.ir import Graph, TensorType, interpret

    for op in ("avg_pool2d", "max_pool2d"):
        g = Graph("p")
        x = g.add_input("x", TensorType((1, 64, 96, 1), "f32"))
        pads = [window[0] // 2, window[1] // 2] * 2
        attrs = dict(kernel=list(window), layout="NHWC", pads=pads)
        if op == "avg_pool2d":
            attrs["count_include_pad"] = True
        g.outputs = [g.add(op, x, **attrs)]
        m = compile(g, progress=False)
        xv = np.random.default_rng(0).random((1, 64, 96, 1), dtype=np.float32)
        np.testing.assert_allclose(m(xv)[0], interpret(g, [xv])[0], rtol=1e-5, atol=1e-6)


def test_padded_column_tile_clamps_its_reads_instead_of_a_pad_stage():
    """A 1x1 conv on a 14- or 7-wide map built for x86-64-v3 (16 registers: 5- and 6-column
    tiles that pad the row) reads the padded columns clamped to the last one, with no padded
    copy of the input (a pad stage, a workspace buffer); a conv with real zero padding keeps
    its stage. Numerics against the reference on this (x86-64) host."""
    import platform

    import tvm

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64-v3 code runs on x86-64 hosts only")
    v3 = host_cpu("x86-64-v3")
    cases = [_conv(1, 64, 14, 14, 96, 1, activation="relu6"), _conv(1, 96, 7, 7, 160, 1),
             _conv(1, 16, 14, 14, 32, 3, **P1)]
    ex, impls = _build(cases, v3)
    notes = [impl.note for _, impl, _ in impls]
    assert ["clamped columns" in n for n in notes] == [True, True, False], notes
    assert ["pad stage" in n for n in notes] == [False, False, True], notes
    for i, (case, (_req, impl, ref)) in enumerate(zip(cases, impls, strict=True)):
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(case[1])]
        out = tvm.runtime.tensor(np.zeros(ref[0].shape, ref[0].dtype))
        ex[f"case{i}"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-4, atol=1e-4, err_msg=notes[i])
    one = _build(cases[:1], v3)[0]
    asm = (one.mod.imports[0] if one.mod.imports else one.mod).inspect_source("asm")
    assert "TVMBackendAllocWorkspace" not in asm
