"""Fake quantization in torch with exactly the arithmetic of our quantize passes.

Each function returns the dequantized float tensor the compiled integer graph computes with,
and passes gradients straight through the rounding (STE). The forward values are bit-equal
to the numpy of ``passes/quantization`` on the same float32 inputs:

- :func:`fake_quant_act`: per tensor, asymmetric, ``scale = f32((hi - lo) / (qhi - qlo))``
  and ``zp = clip(rint(qlo - lo / scale))`` (``insert.activation_params``), then
  ``(clip(rint(x / scale) + zp) - zp) * scale`` (the ``quantize`` / ``dequantize`` ops);
  with ``lo``/``hi`` as tensors that require grad, the range is learned (LSQ+ style: the
  gradient reaches the range through the scale and the clipped elements, scaled by
  ``1 / sqrt(numel * qhi)``);
- :func:`fake_quant_weight_int8`: symmetric per output channel, ``scale = max|w| / 127``,
  ``q = clip(rint(w / scale), -127, 127)`` (``insert.quantize_weight``); a learned
  ``scale`` (LSQ) is used where it is below ``max|w| / 127`` (clipping), so that snapping the
  weight to its grid gives the compiler back the same scale (:mod:`compiler.compress.qat`);
- :func:`fake_quant_bias`: ``rint(b / (x_scale * w_scale))`` in float64 (``lower-quantized``'s
  int32 bias) times the product;
- :func:`fake_quant_weight_int4`: group-wise over the input axis, ``d = f16(m / -8)`` with
  ``m`` the signed largest-magnitude weight of the group, ``q = clip(rint(w / d), -8, 7)``
  (``gptq.group_scales`` / ``quantize_with_scales``, llama.cpp Q4_0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from compiler.ir.ops.quant import qrange
from passes.quantization.insert import activation_params

__all__ = ["fake_quant_act", "fake_quant_weight_int8", "fake_quant_bias",
           "fake_quant_weight_int4", "act_params", "int8_weight_scale",
           "int4_group_scales"]


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _exact(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward pass."""
    return surrogate + (value.to(surrogate.dtype) - surrogate).detach()


def act_params(lo: float, hi: float, dtype: str = "u8") -> tuple[float, int]:
    """(scale as float32-exact float, zero point) the quantize pass derives from [lo, hi]."""
    scale, zp = activation_params(float(lo), float(hi), dtype)
    return float(scale), int(zp)


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


def fake_quant_act(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   dtype: str = "u8") -> torch.Tensor:
    """Per-tensor asymmetric fake quantization of ``x`` on the range [lo, hi] (0 included)."""
    qlo, qhi = qrange(dtype)
    scale_v, zp_v = act_params(float(lo.detach()), float(hi.detach()), dtype)
    learn = lo.requires_grad or hi.requires_grad
    if learn:
        g = 1.0 / math.sqrt(max(x.numel(), 1) * qhi)
        lo_g, hi_g = _grad_scale(torch.clamp(lo, max=0.0), g), _grad_scale(
            torch.clamp(hi, min=0.0), g)
        scale = _exact((hi_g - lo_g) / (qhi - qlo), torch.tensor(scale_v, dtype=torch.float32))
        zp = _exact(qlo - lo_g / scale, torch.tensor(float(zp_v)))
    else:
        scale = torch.tensor(scale_v, dtype=torch.float32, device=x.device)
        zp = torch.tensor(float(zp_v), device=x.device)
    q = torch.clamp(_ste_round(x / scale) + zp, qlo, qhi)
    return (q - zp) * scale


def int8_weight_scale(w: torch.Tensor, learned: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel (axis 0) scales: ``max|w| / 127``, or the learned one where it is
    smaller (with the learned tensor's gradient)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    if learned is None:
        return scale
    g = 1.0 / math.sqrt(max(w[0].numel(), 1) * 127)
    s = _grad_scale(learned, g)
    return torch.where(s.detach() < scale, s, scale + 0 * s)


def fake_quant_weight_int8(w: torch.Tensor, learned: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Symmetric per-output-channel int8 (-127..127) fake quantization of ``w`` (axis 0)."""
    scale = int8_weight_scale(w, learned).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(_ste_round(w / scale), -127, 127)
    return q * scale


def fake_quant_bias(b: torch.Tensor, x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """The int32 bias ``lower-quantized`` makes, dequantized: ``rint(b / (sx*sw)) * sx*sw``."""
    prod64 = np.float64(np.float32(x_scale)) * w_scale.detach().double()
    q = torch.clamp(torch.round(b.detach().double() / prod64), -(2**31), 2**31 - 1)
    prod32 = torch.tensor(np.float32(x_scale), dtype=torch.float32) * w_scale.detach()
    return _exact(b, q.float() * prod32)


def int4_group_scales(wg: torch.Tensor) -> torch.Tensor:
    """``gptq.group_scales`` for ``wg[N, G, g]``: f16 ``m / -8`` as float32 ``[N, G]``."""
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(wg, -1, idx)[..., 0]
    d = torch.clamp(m / -8.0, -65504.0, 65504.0)
    d16 = d.half()
    tiny = (d16 == 0) & (d != 0)
    d16 = torch.where(tiny, torch.sign(d).half() * torch.tensor(6e-8, dtype=torch.float16), d16)
    d16 = torch.where(d == 0, torch.ones_like(d16), d16)
    return d16.float()


def fake_quant_weight_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Group-wise int4 fake quantization of a Linear weight ``w[N, K]`` (groups along K)."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    d = int4_group_scales(wg.detach())[..., None]
    q = torch.clamp(_ste_round(wg / d), -8, 7)
    return (q * d).reshape(n, k)
