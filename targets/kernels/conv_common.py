"""Geometry, weight packing and tile choice shared by the conv kernels (conv.py).

Everything here is plain Python/numpy (no TVM), so it is cheap to import and easy to test.

Packed weight layout (what the conv inner loop reads): ``[NB, KH, KW, ICg, ob]`` where ``ob``
output channels (one or two SIMD vectors) form a block, each group's ``OCg`` output channels are
zero-padded to ``OCgp = ceil(OCg/ob)*ob``, and ``NB = groups * OCgp / ob``. Block ``blk``
belongs to group ``blk // nb_g`` (``nb_g = OCgp / ob``). Depthwise convs use ``[KH, KW, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.errors import OpError
from compiler.ir.ops.nn import conv_out_size, kernel_dims
from targets.kernels.base import CpuInfo

__all__ = ["ConvGeom", "ConvTiles", "conv_geom", "conv_tiles", "to_oihw", "pack_conv_weight",
           "pack_dw_weight", "pick_width", "transpose_weight_to_conv", "vector_registers",
           "accumulator_registers", "KERNEL_LAYOUTS", "LAYOUTS"]

KERNEL_LAYOUTS = ("OIHW", "OHWI", "HWIO")
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class ConvGeom:
    """A 2-D convolution, layout-free. ``pads`` = top, left, bottom, right."""

    n: int
    h: int
    w: int
    ic: int
    oc: int
    kh: int
    kw: int
    oh: int
    ow: int
    sh: int = 1
    sw: int = 1
    dh: int = 1
    dw: int = 1
    pt: int = 0
    pl: int = 0
    pb: int = 0
    pr: int = 0
    groups: int = 1

    @property
    def icg(self) -> int:
        return self.ic // self.groups

    @property
    def ocg(self) -> int:
        return self.oc // self.groups

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.ic == self.oc

    @property
    def macs(self) -> int:
        return self.n * self.oh * self.ow * self.oc * self.icg * self.kh * self.kw


def _pair(v: Any, default: int, what: str, label: str) -> tuple[int, int]:
    v = [default, default] if v is None else list(v)
    if len(v) != 2 or any(int(x) < 1 for x in v):
        raise OpError(f"{label}: {what} must be two positive ints, got {v}")
    return int(v[0]), int(v[1])


def conv_geom(x_shape: tuple[int, ...], layout: str, w_shape: tuple[int, ...],
              kernel_layout: str, attrs: dict[str, Any], label: str = "conv2d") -> ConvGeom:
    """The geometry of a conv2d node (CATALOGUE semantics); raises OpError on bad attributes."""
    if layout not in LAYOUTS:
        raise OpError(f"{label}: layout {layout!r} not supported; use one of {LAYOUTS}")
    if kernel_layout not in KERNEL_LAYOUTS:
        raise OpError(f"{label}: kernel_layout {kernel_layout!r} not supported; "
                      f"use one of {KERNEL_LAYOUTS}")
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise OpError(f"{label}: needs 4-D input and weight, got {list(x_shape)} and "
                      f"{list(w_shape)}")
    if layout == "NCHW":
        n, ic, h, w = x_shape
    else:
        n, h, w, ic = x_shape
    oc, icg, kh, kw = kernel_dims(tuple(w_shape), kernel_layout)
    groups = int(attrs.get("groups", 1))
    if groups < 1 or ic % groups or oc % groups or icg * groups != ic:
        raise OpError(f"{label}: groups={groups} does not fit {ic} input channels, "
                      f"{oc} output channels and weight {list(w_shape)} ({kernel_layout})")
    sh, sw = _pair(attrs.get("strides"), 1, "strides", label)
    dh, dw = _pair(attrs.get("dilations"), 1, "dilations", label)
    pads = list(attrs.get("pads") or [0, 0, 0, 0])
    if len(pads) != 4 or any(int(p) < 0 for p in pads):
        raise OpError(f"{label}: pads must be 4 non-negative ints [top, left, bottom, right], "
                      f"got {pads}")
    pt, pl, pb, pr = (int(p) for p in pads)
    oh = conv_out_size(h, kh, sh, pt + pb, dh)
    ow = conv_out_size(w, kw, sw, pl + pr, dw)
    if oh < 1 or ow < 1:
        raise OpError(f"{label}: kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit the "
                      f"padded {h + pt + pb}x{w + pl + pr} input")
    return ConvGeom(n, h, w, ic, oc, kh, kw, oh, ow, sh, sw, dh, dw, pt, pl, pb, pr, groups)


def to_oihw(w: np.ndarray, kernel_layout: str) -> np.ndarray:
    """Any supported kernel layout -> ``[OC, ICg, KH, KW]``."""
    if kernel_layout == "OIHW":
        return w
    if kernel_layout == "OHWI":
        return w.transpose(0, 3, 1, 2)
    return w.transpose(3, 2, 0, 1)  # HWIO


def transpose_weight_to_conv(w: np.ndarray, groups: int) -> np.ndarray:
    """ConvTranspose weight ``[IC, OCg, KH, KW]`` -> the equivalent conv weight
    ``[OC, ICg, KH, KW]`` (per group, in/out swapped, kernel flipped)."""
    ic, ocg, kh, kw = w.shape
    icg = ic // groups
    w = w.reshape(groups, icg, ocg, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    return np.ascontiguousarray(w.reshape(groups * ocg, icg, kh, kw))


def pack_conv_weight(w_oihw: np.ndarray, groups: int, ob: int) -> np.ndarray:
    """``[OC, ICg, KH, KW]`` -> ``[NB, KH, KW, ICg, ob]`` (module docstring)."""
    oc, icg, kh, kw = w_oihw.shape
    ocg = oc // groups
    ocgp = -(-ocg // ob) * ob
    wg = np.zeros((groups, ocgp, icg, kh, kw), w_oihw.dtype)
    wg[:, :ocg] = w_oihw.reshape(groups, ocg, icg, kh, kw)
    nb = groups * ocgp // ob
    return np.ascontiguousarray(wg.reshape(nb, ob, icg, kh, kw).transpose(0, 3, 4, 2, 1))


def pack_dw_weight(w_oihw: np.ndarray) -> np.ndarray:
    """Depthwise ``[C, 1, KH, KW]`` -> ``[KH, KW, C]``."""
    return np.ascontiguousarray(w_oihw[:, 0].transpose(1, 2, 0))


@dataclass(frozen=True)
class ConvTiles:
    """Register tile of the conv micro-kernel: ``owb`` output columns x ``ob`` channels."""

    ob: int          # output channels per block (vectorised)
    owb: int         # output columns per register tile (unrolled)
    nb_g: int        # blocks per group
    owp: int         # output width padded to a multiple of owb
    blocks_outer: bool  # loop order: weight blocks outside rows (weights bigger than input)


def pick_width(ow: int, owb_max: int) -> int:
    """Columns per register tile: a divisor of ``ow`` near ``owb_max``, else least padding."""
    if ow <= owb_max:
        return ow
    best, best_cost = owb_max, None
    for cand in range(owb_max, max(1, owb_max // 2) - 1, -1):
        cost = -(-ow // cand) * cand
        if best_cost is None or cost < best_cost:
            best, best_cost = cand, cost
    return best


def vector_registers(cpu: CpuInfo) -> int:
    """Architectural SIMD registers: 32 on AArch64 and with AVX-512 (zmm0-31), else 16."""
    return 32 if cpu.arch == "aarch64" or cpu.has("avx512f") else 16


def accumulator_registers(cpu: CpuInfo) -> int:
    """Registers a conv/GEMM register tile may hold accumulators in: 14 of 32 (more measured
    no faster on AVX-512), all but 4 of 16 (two weight vectors, the broadcast, one spare).
    Measured on an AMD EPYC (Zen 4), x86-64-v3 build, 2 threads, loaded machine: a 7x16 tile
    spills, 4x16 took 1x1 256->64 @56 from 1.03 to 0.68 ms and 3x3/2 128->128 @56 from 2.16
    to 1.25 ms (both tiles built and timed in turn in one process)."""
    return min(14, vector_registers(cpu) - 4)


def conv_tiles(g: ConvGeom, cpu: CpuInfo, dtype: str = "f32", acc_regs: int | None = None
               ) -> ConvTiles:
    """Tile sizes for the NHWC register-tiled conv.

    ``ob`` is two SIMD vectors when the group's channels are a multiple of two, one when
    they are a multiple of one (no padded channels: with 16 lanes 80, 112, 144 and 240
    channels as 5, 7, 9 and 15 one-vector blocks of 14 columns instead of two-vector blocks
    of 7 padded to 96, 128, 160 and 256 — EfficientNet-B0 / MobileNetV2 1x1 convs to those
    channels 0.70-0.95x, three alternating runs on a 2-core AVX-512 x86 host, load ~3.5),
    two padded up when there are many channels, else one, else a smaller power of two
    dividing them (24 channels: 3 blocks of 8), else padded up; ``owb`` keeps
    ``owb * ob / lanes`` accumulators near ``acc_regs`` (default
    :func:`accumulator_registers`).
    """
    lanes = cpu.lanes(dtype)
    acc_regs = accumulator_registers(cpu) if acc_regs is None else acc_regs
    ocg = g.ocg
    if ocg % (2 * lanes) == 0 or (ocg > 4 * lanes and ocg % lanes):
        ob = 2 * lanes
    elif ocg % lanes == 0 or ocg > 2 * lanes:
        ob = lanes
    else:  # a power of two: LLVM turns <24 x float> into scalar code (30x slower, measured)
        ob = next((p for p in (lanes // 2, lanes // 4) if p >= 4 and ocg % p == 0), 0)
        if not ob:
            ob = lanes if ocg > lanes else 1 << (ocg - 1).bit_length()  # pad up
    vecs = -(-ob // lanes)
    owb = pick_width(g.ow, max(1, acc_regs // vecs))
    owp = -(-g.ow // owb) * owb
    nb_g = -(-ocg // ob)
    w_bytes = g.groups * nb_g * ob * g.icg * g.kh * g.kw
    x_bytes = g.h * g.w * g.ic * g.n
    return ConvTiles(ob, owb, nb_g, owp, w_bytes > x_bytes)
