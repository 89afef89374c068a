"""Quantization-aware training: ``prepare_qat`` → the user's training loop → ``convert``.

```python
qm = prepare_qat(model, QATConfig(linear="int4", group_size=32), calibration=batches)
train(qm, ...)                         # any torch loop; fake quantization in forward
conv = convert(qm)                     # a float module + the quantize= config with the ranges
m = conv.compile(example_inputs=(x,), target="host")   # our integer package
```

``prepare_qat`` copies the module, folds every ``BatchNorm2d`` that follows a ``Conv2d`` in an
``nn.Sequential`` into the conv (running statistics: the compiler folds them the same way,
so the weights the fake quantizer sees are the ones the quantize pass sees), and wraps each
``Conv2d`` (groups=1) and ``Linear`` in a module that fake-quantizes like our passes
(:mod:`compiler.compress.fake_quant`):

- int8 (``conv2d``/``linear="int8"``): the activation operand per tensor (u8 or i8, range from
  the calibration batches' min/max, then a moving average of batch min/max while training,
  or learned with ``learn_scales=True``), the weight per output channel symmetric (learned
  clipping scales with ``learn_scales``), the bias as the int32 the integer op adds;
- int4 (``linear="int4"``): weight-only, groups of ``group_size`` along the inputs.

``convert`` gives the float module (folded, weights snapped to their grid when scales were
learned) and the ``quantize=`` mapping for ``compile``: the same precisions, SmoothQuant off,
and every activation range under ``activation_ranges`` keyed by the module path (which is the
node name ``from_torch`` gives). ``compile`` then builds the integer graph PTQ would build,
with these ranges instead of calibrated ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compiler.compress.fake_quant import (
    act_params,
    fake_quant_act,
    fake_quant_bias,
    fake_quant_weight_int4,
    fake_quant_weight_int8,
    int8_weight_scale,
)
from compiler.errors import NpuccError
from passes.quantization.weight_only import effective_group

__all__ = ["QATConfig", "QuantConv2d", "QuantLinear", "prepare_qat", "calibrate_qat",
           "convert", "Converted", "fold_batchnorm"]

PRECISIONS = ("int8", "int4", "float")


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize how. ``conv``: "int8" | "float"; ``linear``: "int8" | "int4" |
    "float"; ``activations``: "u8" | "i8"; ``group_size``: int4 groups along K;
    ``learn_scales``: learn activation ranges and weight clipping scales (LSQ);
    ``momentum``: moving-average weight of a new batch's min/max when ranges are observed."""

    conv: str = "int8"
    linear: str = "int8"
    activations: str = "u8"
    group_size: int = 32
    learn_scales: bool = False
    momentum: float = 0.01

    def __post_init__(self) -> None:
        for key, val, ok in (("conv", self.conv, ("int8", "float")),
                             ("linear", self.linear, PRECISIONS),
                             ("activations", self.activations, ("u8", "i8"))):
            if val not in ok:
                raise NpuccError(f"QATConfig: {key}={val!r} is not one of {', '.join(ok)}")
        if self.group_size <= 0:
            raise NpuccError(f"QATConfig: group_size must be positive, got {self.group_size}")


class ActRange(nn.Module):
    """The range of one activation: observed (min/max, then a moving average) or learned."""

    def __init__(self, dtype: str, learn: bool, momentum: float):
        super().__init__()
        self.dtype, self.momentum = dtype, momentum
        self.observing = False
        self.learn = learn
        self.lo = nn.Parameter(torch.zeros(()), requires_grad=learn)
        self.hi = nn.Parameter(torch.zeros(()), requires_grad=learn)
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.observing or not bool(self.seen):   # calibration: the min/max of all batches
            if bool(self.seen):
                lo, hi = min(lo, float(self.lo)), max(hi, float(self.hi))
        else:                                        # training: a moving average
            m = self.momentum
            lo, hi = (1 - m) * float(self.lo) + m * lo, (1 - m) * float(self.hi) + m * hi
        self.lo.fill_(min(lo, 0.0))
        self.hi.fill_(max(hi, 0.0))
        self.seen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or (self.training and not self.learn):
            self.observe(x)
        if self.observing:
            return x
        if not bool(self.seen):
            raise NpuccError("QAT: an activation range was never observed; pass calibration= "
                             "to prepare_qat or run calibrate_qat first")
        return fake_quant_act(x, self.lo, self.hi, self.dtype)

    def params(self) -> tuple[float, int]:
        return act_params(float(self.lo.detach()), float(self.hi.detach()), self.dtype)


class _QuantLayer(nn.Module):
    def __init__(self, layer: nn.Module, precision: str, cfg: QATConfig):
        super().__init__()
        self.layer, self.precision = layer, precision
        self.group = 0                   # int4: the group this layer's K uses
        self.cfg_group = cfg.group_size  # int4: the group_size asked for (compile's option)
        self.act = ActRange(cfg.activations, cfg.learn_scales, cfg.momentum) \
            if precision == "int8" else None
        self.w_log_scale = None   # learned clipping scales, in log space (positive, and an
        if precision == "int8" and cfg.learn_scales:   # optimizer step is a relative change)
            self.w_log_scale = nn.Parameter(torch.log(int8_weight_scale(layer.weight.detach())))

    @property
    def w_scale(self) -> torch.Tensor | None:
        return None if self.w_log_scale is None else torch.exp(self.w_log_scale)

    def quantized_params(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        w, b = self.layer.weight, self.layer.bias
        if self.precision == "int4":
            return x, fake_quant_weight_int4(w, self.group), b
        if self.precision == "float":
            return x, w, b
        x = self.act(x)
        if self.act.observing:
            return x, w, b
        wq = fake_quant_weight_int8(w, self.w_scale)
        if b is not None:
            b = fake_quant_bias(b, self.act.params()[0], int8_weight_scale(w, self.w_scale))
        return x, wq, b

    def snapped_weight(self) -> torch.Tensor:
        """The weight the compiler should quantize (on its grid when the scale was learned)."""
        w = self.layer.weight.detach()
        if self.precision == "int8" and self.w_log_scale is not None:
            return fake_quant_weight_int8(w, self.w_scale.detach())
        return w.clone()


class QuantConv2d(_QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = self.quantized_params(x)
        c = self.layer
        return nn.functional.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


class QuantLinear(_QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = self.quantized_params(x)
        return nn.functional.linear(x, w, b)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """In place: a ``BatchNorm2d`` right after a ``Conv2d`` in any ``nn.Sequential`` is folded
    into the conv (running statistics; the BN becomes ``Identity``)."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(inv.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * inv + bn.bias)
            seq._modules[b] = nn.Identity()
    return module


def _wrap(module: nn.Module, cfg: QATConfig, prefix: str = "") -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, nn.Conv2d) and child.groups == 1 and cfg.conv != "float":
            setattr(module, name, QuantConv2d(child, cfg.conv, cfg))
        elif isinstance(child, nn.Linear) and cfg.linear != "float":
            prec, group = cfg.linear, 0
            if prec == "int4":
                group = effective_group(child.in_features, cfg.group_size, 4) or 0
                prec = "int4" if group else "float"   # the int4 pass skips an odd K too
            q = QuantLinear(child, prec, cfg)
            q.group = group
            setattr(module, name, q)
        elif not isinstance(child, _QuantLayer):
            _wrap(child, cfg, f"{path}.")


def _batches(data: Iterable[Any]) -> Iterable[tuple]:
    for b in data:
        if isinstance(b, torch.Tensor):
            yield (b,)
        elif isinstance(b, (tuple, list)):
            yield tuple(b)
        else:
            yield (torch.as_tensor(b),)


@torch.no_grad()
def calibrate_qat(qmodel: nn.Module, data: Iterable[Any]) -> nn.Module:
    """Set every activation range to the min/max over ``data`` (batches of model inputs),
    as ``compile(..., calibration_method="minmax")`` would."""
    ranges = [m for m in qmodel.modules() if isinstance(m, ActRange)]
    was = qmodel.training
    qmodel.eval()
    for r in ranges:
        r.observing = True
        r.seen.fill_(False)
    try:
        for args in _batches(data):
            qmodel(*args)
    finally:
        for r in ranges:
            r.observing = False
        qmodel.train(was)
    return qmodel


def prepare_qat(module: nn.Module, config: QATConfig | None = None,
                calibration: Iterable[Any] | None = None) -> nn.Module:
    """A copy of ``module`` with BN folded and fake quantization in every Conv2d / Linear.

    ``calibration``: batches of inputs (tensors or tuples) whose min/max start the activation
    ranges; without it they start from the first training batch."""
    cfg = config or QATConfig()
    qm = fold_batchnorm(copy.deepcopy(module).eval())
    _wrap(qm, cfg)
    if calibration is not None:
        calibrate_qat(qm, calibration)
    return qm


@dataclass
class Converted:
    """``convert``'s result: the float module and the ``quantize=`` config that reproduce the
    fake-quantized model in ``compile``."""

    module: nn.Module
    quantize: dict[str, Any]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def compile(self, example_inputs: tuple, target: Any = "host", **kwargs: Any):
        from compiler.driver import compile as npucc_compile

        return npucc_compile(self.module, target, example_inputs=example_inputs,
                             quantize=self.quantize, progress=kwargs.pop("progress", False),
                             **kwargs)


def convert(qmodel: nn.Module) -> Converted:
    """The float module (eval mode) and the quantize config with the learned/observed ranges."""
    cfg_act, precisions, ranges = "u8", {}, {}
    out = copy.deepcopy(qmodel).eval()

    def unwrap(module: nn.Module, prefix: str = "") -> None:
        nonlocal cfg_act
        for name, child in list(module.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, _QuantLayer):
                layer = child.layer
                with torch.no_grad():
                    layer.weight.copy_(child.snapped_weight())
                kind = "conv2d" if isinstance(child, QuantConv2d) else "dense"
                group = child.cfg_group if child.precision == "int4" else 0
                precisions.setdefault(kind, set()).add((child.precision, group))
                if child.act is not None:
                    if not bool(child.act.seen):
                        raise NpuccError(f"convert: the range of {path}'s input was never "
                                         "observed (calibrate or train first)")
                    ranges[path] = (float(child.act.lo.detach()), float(child.act.hi.detach()))
                    cfg_act = child.act.dtype
                setattr(module, name, layer)
            else:
                unwrap(child, f"{path}.")

    unwrap(out)
    quant: dict[str, Any] = {"default": "float", "smooth": 0, "activations": cfg_act}
    for kind, precs in precisions.items():
        precs.discard(("float", 0))
        if len(precs) > 1:
            raise NpuccError(f"convert: {kind} layers use several precisions {sorted(precs)}")
        if precs:
            prec, group = precs.pop()
            quant[kind] = prec if prec == "int8" else {"precision": prec, "group_size": group}
    if ranges:
        quant["activation_ranges"] = dict(ranges)
    for p in out.parameters():
        p.requires_grad_(False)
    return Converted(out, quant, ranges)
