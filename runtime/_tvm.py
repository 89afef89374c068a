"""Import TVM without importing torch.

``import tvm`` imports ``tvm_ffi``, which tries ``import torch`` when torch is installed; that
costs seconds and hundreds of MB in a process that only runs kernels. While TVM is imported, a
meta-path finder refuses ``torch`` (tvm_ffi catches the ImportError and carries on without its
torch interop); the finder is removed afterwards, so the process can still import torch later.
``sys.modules["torch"] = None`` would do the same but breaks scipy, hence the finder.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType

__all__ = ["import_tvm"]

_LOCK = threading.Lock()


class _RefuseTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname == "torch" or fullname.startswith("torch.") or fullname == "torch_c_dlpack_ext":
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked while importing TVM)",
                                      name=fullname)
        return None


def import_tvm() -> ModuleType:
    """Return the ``tvm`` module, imported without torch unless torch is already imported."""
    if "tvm" in sys.modules and "tvm.runtime" in sys.modules:
        return sys.modules["tvm"]
    with _LOCK:
        if "torch" in sys.modules:
            import tvm
            return tvm
        blocker = _RefuseTorch()
        sys.meta_path.insert(0, blocker)
        try:
            import tvm
        finally:
            sys.meta_path.remove(blocker)
        return tvm
