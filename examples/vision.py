"""Import torchvision (and timm) against a CPU-only torch whose ``torchvision::`` C++ ops
cannot load.

Where they live: PyPI's torchvision cannot be imported next to the CPU torch, and once it
is installed in site-packages every ``import timm`` and every transformers model import
fails in every process (they import torchvision when they find it). So CI installs both
with ``pip install --no-deps --target ~/.cache/npucc-vision torchvision==0.28.0
timm==1.0.31`` (``NPUCC_VISION_PATH`` overrides the folder) and only processes that call
:func:`import_torchvision` see them, after the fix below.

PyPI's torchvision wheel is built against the CUDA torch: its ``_C`` extension fails to load
next to ``torch==2.13.0+cpu`` and ``import torchvision`` then dies registering fake kernels
for ``torchvision::nms``. The models themselves are pure Python; only detection
post-processing calls a C++ op (``nms``). Before torchvision is imported, this module
defines the ``torchvision::nms`` schema with an exact pure-torch CPU implementation (greedy
NMS over boxes sorted by score, the reference algorithm), so classification, segmentation and
detection models build and run eagerly. With a torchvision whose ``_C`` loads, it does
nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["import_torchvision", "nms_reference", "vision_path"]


def nms_reference(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Indices of the boxes kept by greedy non-maximum suppression, by descending score
    (``torchvision.ops.nms``'s contract; boxes are ``x1, y1, x2, y2``)."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    removed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        removed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


_LIB: Any = None


def vision_path() -> str:
    """The folder torchvision and timm are installed in (``--target``)."""
    import os

    return os.environ.get("NPUCC_VISION_PATH",
                          os.path.join(os.path.expanduser("~"), ".cache", "npucc-vision"))


def import_torchvision() -> Any:
    """``import torchvision``, defining a CPU ``torchvision::nms`` first when its C++
    extension cannot load."""
    import importlib.util
    import os
    import sys

    import torch

    if importlib.util.find_spec("torchvision") is None and os.path.isdir(vision_path()):
        sys.path.append(vision_path())
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        import torchvision

        return torchvision
    global _LIB
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already defined: a working extension)
    except (AttributeError, RuntimeError):
        if not _extension_loads():
            _LIB = torch.library.Library("torchvision", "DEF")
            _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.impl("nms", nms_reference, "CPU")
    import torchvision
    import torchvision.extension as ext

    if not ext._has_ops() and _LIB is not None:
        ext._has_ops = _has_ops  # nms above is the only op the models call
    return torchvision


def _has_ops() -> bool:
    return True


def _extension_loads() -> bool:
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.find_spec("torchvision")
    lib = next(Path(spec.origin).parent.glob("_C*.so"), None) if spec and spec.origin else None
    if lib is None:
        return False
    try:
        torch.ops.load_library(str(lib))
        return True
    except (OSError, RuntimeError):
        return False
