"""The CPU architecture of an ELF shared library, read from its header (no dlopen)."""

from __future__ import annotations

import platform
from pathlib import Path

from .errors import ArchitectureError, PackageError

__all__ = ["ELF_MACHINES", "library_arch", "host_arch"]

# e_machine -> our architecture name (the ones a package may plausibly carry)
ELF_MACHINES = {3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390x", 40: "arm",
                62: "x86_64", 183: "aarch64", 243: "riscv"}
_HOST_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64",
                 "aarch64": "aarch64", "armv7l": "arm", "i686": "i386", "i386": "i386"}


def host_arch() -> str:
    m = platform.machine().lower()
    return _HOST_ALIASES.get(m, m)


def library_arch(path: Path) -> str:
    """The architecture named by ``path``'s ELF header (``e_machine``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise PackageError(f"cannot read kernel library {path}: {e}") from e
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ArchitectureError(f"{path} is not an ELF shared library")
    if head[5] not in (1, 2):
        raise ArchitectureError(f"{path}: unknown ELF byte order {head[5]}")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"unknown (ELF e_machine {machine})")
