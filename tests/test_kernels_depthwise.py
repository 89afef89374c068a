"""Depthwise conv2d kernels (targets/kernels/depthwise.py) against the op's numpy reference:
wide and narrow maps (the two tile shapes of ``dw_tiles``), channel counts that are not a
multiple of the SIMD lanes, stride 2, the CPU epilogues (silu / hard_swish / hard_sigmoid),
NCHW input, a runtime weight; built for the detected host, for an AVX2-only x86-64-v3 (also
run here: a subset of this CPU) and for the Cortex-A76 (compiled, not run)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from targets.host import cpu_info_for
from targets.kernels.base import CpuInfo, KernelRequest, get_kernel_builder
from targets.kernels.conv_common import conv_geom
from targets.kernels.depthwise import ACC_VECTORS, dw_tiles
from targets.tvm_codegen import host_cpu

HOST = host_cpu()
AVX2 = cpu_info_for({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
                    num_cores=2)
A76 = cpu_info_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                    "mattr": ["+neon", "+dotprod", "+fullfp16"]}, num_cores=4)

_rng = np.random.default_rng(0)

# (h, w, channels, k, stride, activation, layout, constant weight)
CASES = [
    (28, 28, 48, 3, 1, "relu6", "NHWC", True),        # wide map: 2 vectors x 4 columns
    (56, 56, 72, 3, 2, "relu", "NHWC", True),          # 72 channels: 8-wide vectors
    (14, 14, 240, 5, 1, "hard_swish", "NHWC", True),   # narrow: 1 vector x 7 columns
    (7, 7, 96, 5, 1, "silu", "NHWC", True),            # narrow: the whole row
    (14, 14, 88, 5, 2, "hard_sigmoid", "NHWC", True),
    (9, 11, 24, 3, 1, "sigmoid", "NHWC", False),       # runtime weight (wpack stage)
    (12, 12, 32, 3, 2, "silu", "NCHW", True),          # NCHW: the transposing pad stage
    (20, 20, 16, 3, 1, "none", "NHWC", True),
    (7, 7, 960, 3, 1, "relu6", "NHWC", True),        # 423k MACs: parallel over 7 x 60 tiles
]


def _case(h, w, c, k, s, act, layout, const, cpu: CpuInfo):
    x = _rng.standard_normal((1, c, h, w) if layout == "NCHW" else (1, h, w, c)) \
        .astype(np.float32)
    wt = (_rng.standard_normal((c, k, k, 1)) * 0.3).astype(np.float32)
    b = _rng.standard_normal(c).astype(np.float32)
    attrs = get_op("conv2d").normalize_attrs({
        "layout": layout, "kernel_layout": "OHWI", "groups": c, "strides": [s, s],
        "pads": [k // 2] * 4, "activation": act})
    ref = get_op("conv2d").reference([x, wt, b], attrs)[0]
    consts = {1: wt, 2: b} if const else {2: b}
    req = KernelRequest("conv2d", attrs, [TensorType.of(a) for a in (x, wt, b)],
                        [TensorType.of(ref)], consts, cpu, "dw")
    return req, [x, wt, b], ref


def _build(cpu: CpuInfo):
    import tvm

    funcs, runs = {}, []
    for i, case in enumerate(CASES):
        req, ins, ref = _case(*case, cpu)
        impl = get_kernel_builder("conv2d")(req)
        assert impl.note.startswith("depthwise"), impl.note
        funcs[f"c{i}"] = impl.prim_func.with_attr("global_symbol", f"c{i}")
        args = [impl.weight_transforms[j](a) if j in impl.weight_transforms else a
                for j, a in enumerate(ins)]
        runs.append((f"c{i}", args, ref, impl.note))
    return tvm.compile(tvm.IRModule(funcs), tvm.target.Target(cpu.tvm_target)), runs


@pytest.mark.parametrize("cpu", [HOST, AVX2], ids=["host", "x86-64-v3"])
def test_depthwise_matches_reference(cpu):
    import tvm

    ex, runs = _build(cpu)
    bad = []
    for name, args, ref, note in runs:
        out = tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype))
        ex[name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        err = float(np.abs(out.numpy() - ref).max() / max(1.0, float(np.abs(ref).max())))
        if err > 1e-5:
            bad.append(f"{name} ({note}): relative error {err:.2e}")
    assert not bad, "\n".join(bad)


def test_depthwise_builds_for_cortex_a76():
    ex, _ = _build(A76)
    assert ex is not None


@pytest.mark.parametrize("cpu", [HOST, AVX2, A76], ids=["host", "x86-64-v3", "a76"])
def test_tiles_follow_the_vector_width(cpu):
    """Tiles come from the CPU's lanes: wide maps two vectors of channels, narrow maps
    (a row in at most two tiles) one vector and half or all of the row; never more than
    ``ACC_VECTORS`` accumulators."""
    lanes = cpu.lanes("f32")

    def tiles(h, c, k=3, s=1):
        g = conv_geom((1, h, h, c), "NHWC", (c, k, k, 1), "OHWI",
                      {"groups": c, "strides": [s, s], "pads": [k // 2] * 4})
        return dw_tiles(g, cpu, "f32")

    cb, owb, owp = tiles(56, 8 * lanes)
    assert (cb, owb, owp) == (2 * lanes, ACC_VECTORS // 2, 56)
    assert tiles(14, 8 * lanes, 5) == (lanes, 7, 14)
    assert tiles(7, 8 * lanes, 5) == (lanes, 7, 7)
    assert tiles(28, 8 * lanes, 5, 2) == (lanes, 7, 14)
    for h, c in ((112, 16), (56, 72), (28, 88), (14, 120), (7, 1152)):
        cb, owb, _ = tiles(h, c)
        assert c % cb == 0 and owb * max(1, cb // lanes) <= ACC_VECTORS, (h, c, cb, owb)


def test_other_cpu_kind_gets_other_tiles():
    """The AVX2 build is not the AVX-512 one: half the channels per vector."""
    wide = dataclasses.replace(AVX2, simd_bits=512)
    g = conv_geom((1, 14, 14, 256), "NHWC", (256, 5, 5, 1), "OHWI",
                  {"groups": 256, "pads": [2, 2, 2, 2]})
    assert dw_tiles(g, AVX2, "f32")[0] == 8 and dw_tiles(g, wide, "f32")[0] == 16


@pytest.mark.parametrize("cpu", [HOST, AVX2, A76], ids=["host", "x86-64-v3", "a76"])
def test_small_maps_split_over_rows_and_channel_tiles(cpu):
    """A 7x7x960 depthwise (well under a million MACs) is one parallel loop over rows x
    channel tiles when the CPU has cores to share it (the launcher times whether sharing pays);
    on one core it has none."""
    import re

    for cores in (cpu.num_cores, 1):
        c = dataclasses.replace(cpu, num_cores=max(2, cores) if cores > 1 else 1)
        req, _, _ = _case(7, 7, 960, 3, 1, "relu6", "NHWC", True, c)
        impl = get_kernel_builder("conv2d")(req)
        cb = dw_tiles(conv_geom((1, 7, 7, 960), "NHWC", (960, 3, 3, 1), "OHWI",
                                {"groups": 960, "pads": [1] * 4}), c, "f32")[0]
        par = re.findall(r"T\.parallel\((\d+)\)", impl.prim_func.script())
        assert par == ([str(7 * 960 // cb)] if c.num_cores > 1 else []), (c.num_cores, par)


@pytest.mark.parametrize("cpu", [HOST, AVX2, A76], ids=["host", "x86-64-v3", "a76"])
def test_tile_accumulators_are_not_a_workspace(cpu):
    """The register tile of an NHWC depthwise with constant weights is a stack alloca that
    LLVM keeps in registers, not a ``TVMBackendAllocWorkspace`` buffer (a "local" scope in the
    parallel body was one: LLVM stored the accumulators between window steps, 2x slower)."""
    import tvm

    for case in (CASES[0], CASES[2], CASES[3]):
        req, _, _ = _case(*case, cpu)
        impl = get_kernel_builder("conv2d")(req)
        mod = tvm.IRModule({"k": impl.prim_func.with_attr("global_symbol", "k")})
        lib = tvm.compile(mod, tvm.target.Target(cpu.tvm_target)).mod
        asm = (lib.imports[0] if lib.imports else lib).inspect_source("asm")
        assert "TVMBackendParallelLaunch" in asm, case
        assert "TVMBackendAllocWorkspace" not in asm, f"{impl.note}: workspace accumulators"
