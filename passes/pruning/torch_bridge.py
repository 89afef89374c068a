"""The same pruning plan applied to the torch module, for fine-tuning.

- unstructured / N:M: the plan keeps each layer's keep-mask (in the graph's weight layout, which
  is torch's: Conv2d OIHW, Linear [out, in]); ``apply_to_torch`` installs it with
  ``torch.nn.utils.prune.custom_from_mask`` on the module the layer came from (layer name =
  module path, as ``from_torch`` names nodes). Fine-tuning keeps the zeros; call
  ``torch.nn.utils.prune.remove`` before exporting.
- channel: a new, smaller ``nn.Sequential`` (Conv2d / BatchNorm2d / activations / pools /
  Dropout / Flatten / Linear at the top level, like the digits CNN) with the kept channels'
  weights copied in; the original module is untouched. A flatten's column blocks follow the
  kept channels. Other module structures are refused (build them by hand from the plan's
  ``keep`` lists).

Masks are chosen on the graph's weights, which have BatchNorm folded in; the torch weights of
a conv followed by BN differ from them by a per-channel scale, so the installed masks are the
graph's decision, not a re-ranking of torch's weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from passes.pruning.common import PruneError

__all__ = ["apply_to_torch"]

_PASSTHROUGH = ("ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Tanh", "Hardswish", "LeakyReLU",
                "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Identity")


def apply_to_torch(module: Any, plan: dict[str, Any]) -> Any:
    """Apply ``plan`` (``CompiledModel.prune_plan``) to ``module``: masks in place for
    magnitude / N:M (returns ``module``), a new smaller module for channel pruning."""
    method = plan["method"]
    if method in ("magnitude", "2:4", "n:m"):
        return _masks(module, plan)
    if method == "channel":
        return _sequential(module, plan)
    raise PruneError(f"apply_to_torch: method {method!r} is not supported (magnitude, 2:4, "
                     "n:m, channel)")


def _masks(module: Any, plan: dict[str, Any]) -> Any:
    import torch
    from torch.nn.utils import prune

    mods = dict(module.named_modules())
    missing = [k for k, e in plan["layers"].items() if "mask" in e and k not in mods]
    if missing:
        raise PruneError(f"apply_to_torch: layers {missing} are not submodules of the module "
                         f"(known: {', '.join(k for k in mods if k)})")
    for name, e in plan["layers"].items():
        if "mask" not in e:
            continue
        m = mods[name]
        mask = torch.from_numpy(np.ascontiguousarray(e["mask"]).astype(np.float32))
        if tuple(mask.shape) != tuple(m.weight.shape):
            raise PruneError(f"apply_to_torch: layer {name}: mask {tuple(mask.shape)} does not "
                             f"fit weight {tuple(m.weight.shape)}")
        prune.custom_from_mask(m, "weight", mask)
    return module


def _sequential(module: Any, plan: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise PruneError("apply_to_torch: channel plans are applied to nn.Sequential modules "
                         f"only, not {type(module).__name__}; use the plan's keep lists")
    layers = plan["layers"]
    out: list[nn.Module] = []
    keep_in: np.ndarray | None = None     # kept channels of the running tensor
    flat: int | None = None               # H*W block after a Flatten
    with torch.no_grad():
        for name, m in module.named_children():
            kind = type(m).__name__
            keep = np.asarray(layers[name]["keep"]) if "keep" in layers.get(name, {}) else None
            if isinstance(m, nn.Conv2d):
                if m.groups != 1:
                    raise PruneError(f"apply_to_torch: grouped conv {name} is not supported")
                ki = keep_in if keep_in is not None else np.arange(m.in_channels)
                ko = keep if keep is not None else np.arange(m.out_channels)
                c = nn.Conv2d(len(ki), len(ko), m.kernel_size, m.stride, m.padding,
                              m.dilation, 1, m.bias is not None, m.padding_mode)
                c.weight.copy_(m.weight[ko][:, ki])
                if m.bias is not None:
                    c.bias.copy_(m.bias[ko])
                out.append(c)
                keep_in = ko if keep is not None else None
            elif isinstance(m, nn.BatchNorm2d):
                k = keep_in if keep_in is not None else np.arange(m.num_features)
                b = nn.BatchNorm2d(len(k), m.eps, m.momentum, m.affine,
                                   m.track_running_stats)
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    src = getattr(m, attr)
                    if src is not None:
                        getattr(b, attr).copy_(src[k])
                out.append(b)
            elif isinstance(m, nn.Flatten):
                flat = -1
                out.append(m)
            elif isinstance(m, nn.Linear):
                ko = keep if keep is not None else np.arange(m.out_features)
                cols = np.arange(m.in_features)
                if keep_in is not None:
                    if flat == -1:
                        block = m.in_features // _channels_before(module, name)
                        cols = (keep_in[:, None] * block + np.arange(block)).reshape(-1)
                    else:
                        cols = keep_in
                lin = nn.Linear(len(cols), len(ko), m.bias is not None)
                lin.weight.copy_(m.weight[ko][:, cols])
                if m.bias is not None:
                    lin.bias.copy_(m.bias[ko])
                out.append(lin)
                keep_in, flat = (ko if keep is not None else None), None
            elif kind in _PASSTHROUGH:
                out.append(m)
            else:
                raise PruneError(f"apply_to_torch: module {name} ({kind}) is not supported in "
                                 "a channel-pruned nn.Sequential")
    return nn.Sequential(*out).train(module.training)


def _channels_before(module: Any, name: str) -> int:
    """Output channels of the last Conv2d/BatchNorm2d before child ``name``."""
    from torch import nn

    c = None
    for n, m in module.named_children():
        if n == name:
            break
        if isinstance(m, nn.Conv2d):
            c = m.out_channels
        elif isinstance(m, nn.Linear):
            c = None
    if c is None:
        raise PruneError(f"apply_to_torch: cannot tell the channels flattened before {name}")
    return c
