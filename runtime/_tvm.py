"""Import TVM without importing torch.

``import tvm`` imports ``tvm_ffi``, which tries ``import torch`` when torch is installed; that
costs seconds and hundreds of MB in a process that only runs kernels. While TVM is imported, a
meta-path finder refuses ``torch`` (tvm_ffi catches the ImportError and carries on without its
torch interop); the finder is removed afterwards, so the process can still import torch later.
``sys.modules["torch"] = None`` would do the same but breaks scipy, hence the finder.
"""

from __future__ import annotations

import importlib.abc
import os
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


def default_threads(num_cores: int | None = None) -> None:
    """Size the kernels' thread pool: the target's cores that this process may use.

    Sets ``TVM_NUM_THREADS``, which both launchers read: npucc's (``runtime.pool``, in every
    library built with it, when the library is loaded) and TVM's (when its first parallel
    kernel runs; it otherwise guesses physical cores, 1 on a 2-vCPU guest). A value the user
    set is kept.
    """
    if "TVM_NUM_THREADS" in os.environ:
        return
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        avail = os.cpu_count() or 1
    n = min(num_cores, avail) if num_cores else avail
    os.environ["TVM_NUM_THREADS"] = str(max(1, n))


def import_tvm(num_cores: int | None = None) -> ModuleType:
    """Return the ``tvm`` module, imported without torch unless torch is already imported.

    ``num_cores`` (the package target's core count) sizes TVM's thread pool, see
    :func:`default_threads`.
    """
    default_threads(num_cores)
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
