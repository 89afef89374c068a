"""Model importers: ONNX (``from_onnx``) and PyTorch (``from_torch``).

``from_torch`` is resolved lazily so importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

from compiler.frontends.cut import select_outputs
from compiler.frontends.onnx import from_onnx

__all__ = ["from_onnx", "from_torch", "select_outputs"]


def __getattr__(name: str) -> Any:
    if name == "from_torch":
        from compiler.frontends.torch import from_torch

        return from_torch
    raise AttributeError(f"module 'compiler.frontends' has no attribute {name!r}")
