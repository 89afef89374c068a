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


def exported_symbols(data: bytes, where: str = "kernel library") -> set[str]:
    """Names of the functions and objects an ELF shared library defines in its dynamic symbol
    table (``.dynsym``), read from its bytes without loading it. Bounds-checked: a malformed
    file raises :class:`PackageError`, never reads out of range."""
    import struct

    def bad(why: str) -> PackageError:
        return PackageError(f"{where}: not a well-formed ELF shared library ({why})")

    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise bad("header")
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"

    def unpack(fmt: str, off: int) -> tuple:
        size = struct.calcsize(end + fmt)
        if off < 0 or off + size > len(data):
            raise bad(f"offset {off} out of range")
        return struct.unpack_from(end + fmt, data, off)

    if is64:
        shoff, = unpack("Q", 0x28)
        shentsize, shnum = unpack("HH", 0x3A)
    else:
        shoff, = unpack("I", 0x20)
        shentsize, shnum = unpack("HH", 0x2E)
    if shnum > 65535 or shentsize < (64 if is64 else 40):
        raise bad("section table")
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if is64:
            _, stype, _, _, soff, ssize, link, _, _, entsize = unpack("IIQQQQIIQQ", off)
        else:
            _, stype, _, _, soff, ssize, link, _, _, entsize = unpack("IIIIIIIIII", off)
        sections.append((stype, soff, ssize, link, entsize))
    dynsym = [s for s in sections if s[0] == 11]   # SHT_DYNSYM
    if not dynsym:
        raise bad("no dynamic symbol table")
    _, soff, ssize, link, entsize = dynsym[0]
    if link >= len(sections) or entsize < (24 if is64 else 16):
        raise bad("dynamic symbol table")
    _, stroff, strsize, _, _ = sections[link]
    if stroff + strsize > len(data) or soff + ssize > len(data):
        raise bad("string table")
    names: set[str] = set()
    for off in range(soff, soff + ssize - entsize + 1, entsize):
        if is64:
            name, info, _, shndx = unpack("IBBH", off)
        else:
            name, _, _, info, _, shndx = unpack("IIIBBH", off)
        if shndx == 0 or (info >> 4) not in (1, 2):   # undefined, or not GLOBAL/WEAK
            continue
        if name >= strsize:
            raise bad("symbol name out of range")
        stop = data.find(b"\0", stroff + name, stroff + strsize)
        names.add(data[stroff + name:stop if stop >= 0 else stroff + strsize].decode(
            "utf-8", "replace"))
    return names
