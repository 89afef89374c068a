"""npucc's runtime: load a compiled package and run it.

Needs only this package, numpy, safetensors and TVM's runtime — never ``compiler/`` or
``passes/`` — and keeps torch out of the process (see ``_tvm.py``)::

    import runtime
    m = runtime.load("model.npkg")
    (y,) = m.run({"x": x})          # or m(x) for a single input
    print(m.profile({"x": x}).table(top=10), m.stats())

Importing this package does not import TVM; ``load`` / ``Executor`` do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import (
    ArchitectureError,
    FormatVersionError,
    InputError,
    IntegrityError,
    IsaError,
    PackageError,
    PlanError,
    RuntimeError_,
    SignatureError,
    UnverifiedPackageWarning,
)
from .package import Package, Step, TensorInfo, build_package

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["load", "connect", "Package", "Executor", "Step", "TensorInfo", "build_package",
           "RuntimeError_", "PackageError", "FormatVersionError", "IntegrityError",
           "ArchitectureError", "IsaError", "PlanError", "InputError", "SignatureError",
           "UnverifiedPackageWarning", "apply_update"]


def load(path: str | os.PathLike, trusted_keys: Any = None, mode: str | None = None) -> Any:
    """Load and verify the package at ``path``; returns an :class:`Executor`, or for a package
    with several modes (``compile_modes``) a :class:`runtime.modal.ModalExecutor` starting in
    ``mode`` (default: the package's default mode; ``m.set_mode(...)`` switches).

    ``trusted_keys``: public keys (PEM paths or bytes) whose signature the package must carry;
    default: the keys ``NPUCC_TRUSTED_KEYS`` names. With keys, an unsigned package, one signed
    by another key, or one changed after signing is refused (:class:`SignatureError`);
    without, it loads with a one-time :class:`UnverifiedPackageWarning`. Either way nothing
    of the package runs before its files are checked, and the kernel library loaded is the
    very bytes that were checked (see ``runtime/package_load.py``).
    """
    from .modal import load_model

    return load_model(path, trusted_keys=trusted_keys, mode=mode)


def apply_update(installed: str | os.PathLike, delta: str | os.PathLike,
                 trusted_keys: Any = None, allow_downgrade: bool = False, **kwargs: Any) -> Any:
    """Apply the over-the-air delta file ``delta`` (``npucc update make``) to the installed
    package folder ``installed``: signature, base and version checked, the new package
    rebuilt beside the old, verified, then swapped in atomically. See ``runtime/update.py``."""
    from .update import apply_update as _apply

    return _apply(installed, delta, trusted_keys=trusted_keys,
                  allow_downgrade=allow_downgrade, **kwargs)


def connect(tracker: str, key: str, timeout: float = 60.0, retries: int = 2) -> Any:
    """A session with the remote devices of ``key`` behind the TVM RPC tracker ``tracker``
    (HOST:PORT); ``.load(path)`` verifies a package here and runs it there
    (``runtime/remote.py``)."""
    from .remote import connect as _connect

    return _connect(tracker, key, timeout=timeout, retries=retries)


def __getattr__(name: str) -> type:
    if name == "Executor":  # lazy: importing the executor imports TVM
        from .executor import Executor

        return Executor
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
