"""The error types the runtime raises.

The runtime never imports ``compiler/`` (a deployed package needs only ``runtime/``), so it has
its own small hierarchy. Every error a user or a damaged package can cause derives from
:class:`RuntimeError_`; anything else escaping the runtime is a bug in the runtime.
"""

from __future__ import annotations

__all__ = [
    "RuntimeError_",
    "PackageError",
    "FormatVersionError",
    "IntegrityError",
    "SignatureError",
    "UnverifiedPackageWarning",
    "ArchitectureError",
    "IsaError",
    "PlanError",
    "InputError",
]


class RuntimeError_(Exception):
    """Base class of every error the runtime raises on bad input."""


class PackageError(RuntimeError_):
    """A package is malformed, damaged, tampered with, or not for this machine.

    Raised by ``runtime.load`` before any kernel is loaded or run.
    """


class FormatVersionError(PackageError):
    """The manifest's ``format_version`` is not one this runtime reads."""


class IntegrityError(PackageError):
    """A file of the package is missing or its sha256 differs from the manifest's."""


class SignatureError(IntegrityError):
    """A package's signature is missing while trusted keys are configured, is malformed, is by
    a key that is not trusted, or does not cover exactly the package's files."""


class UnverifiedPackageWarning(UserWarning):
    """A package was loaded without a signature check (no trusted keys configured)."""


class ArchitectureError(PackageError):
    """The kernel library is for another CPU architecture than this machine's."""


class IsaError(ArchitectureError):
    """The kernel library needs instruction-set features (AVX-512, avx512fp16, dotprod...)
    the running CPU lacks. ``missing`` lists them (LLVM feature names)."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class PlanError(RuntimeError_):
    """An execution plan or memory plan is inconsistent (a compiler bug or a bad manifest)."""


class InputError(RuntimeError_, ValueError):
    """Inputs given to ``run`` do not match the graph's inputs (name, shape or dtype)."""
