"""Importers: ONNX (``from_onnx``) and PyTorch (``from_torch``) -> a verified Graph.

Both are imported lazily so ``import compiler.frontends`` pulls in neither onnx nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_onnx", "from_torch"]


def __getattr__(name: str) -> Any:
    if name == "from_onnx":
        from compiler.frontends.onnx import from_onnx

        return from_onnx
    if name == "from_torch":
        from compiler.frontends.torch import from_torch

        return from_torch
    raise AttributeError(f"module 'compiler.frontends' has no attribute {name!r}")
