"""The instruction-set features of the CPU this process runs on, in LLVM's feature names.

A package's kernels are built for a list of LLVM features (``avx512f``, ``avx512fp16``,
``dotprod``...); before its library is dlopened the runtime checks that the running CPU has
every one of them (``runtime._verify.check_isa``). The answer must come from the CPU itself,
not from what the OS prints about the machine: under ``qemu-x86_64 -cpu Haswell``
``/proc/cpuinfo`` still describes the real host, while CPUID answers for the emulated CPU.

- x86-64: the CPUID and XGETBV instructions, run from a small page of machine code (as
  py-cpuinfo and numpy's dispatcher do), gated by what the OS enables in XCR0 (a CPU with
  AVX-512 under an OS that does not save the ZMM state cannot use it).
- aarch64 Linux: the kernel's ``AT_HWCAP``/``AT_HWCAP2`` bits (``getauxval``), which
  qemu-aarch64 also sets for the emulated CPU.

Only ISA features are listed (``CHECKED``), not LLVM's tuning flags (``fast-*``, ``slow-*``):
those change scheduling, never which instructions are legal. Needs neither TVM nor
``compiler/``.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import sys

from ._elf import host_arch

__all__ = ["CHECKED", "PORTABLE_LEVELS", "running_features", "missing_features", "cpu_brand",
           "host_arch", "target_features"]

# (leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3) -> {bit: LLVM feature}
_X86_BITS: dict[tuple[int, int, int], dict[int, str]] = {
    (1, 0, 2): {0: "sse3", 1: "pclmul", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4.1",
                20: "sse4.2", 22: "movbe", 23: "popcnt", 25: "aes", 26: "xsave", 28: "avx",
                29: "f16c", 30: "rdrnd"},
    (1, 0, 3): {8: "cx8", 15: "cmov", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2"},
    (7, 0, 1): {0: "fsgsbase", 3: "bmi", 5: "avx2", 8: "bmi2", 16: "avx512f", 17: "avx512dq",
                18: "rdseed", 19: "adx", 21: "avx512ifma", 23: "clflushopt", 24: "clwb",
                28: "avx512cd", 29: "sha", 30: "avx512bw", 31: "avx512vl"},
    (7, 0, 2): {1: "avx512vbmi", 6: "avx512vbmi2", 8: "gfni", 9: "vaes", 10: "vpclmulqdq",
                11: "avx512vnni", 12: "avx512bitalg", 14: "avx512vpopcntdq", 22: "rdpid",
                27: "movdiri", 28: "movdir64b"},
    (7, 0, 3): {8: "avx512vp2intersect", 14: "serialize", 22: "amx-bf16", 23: "avx512fp16",
                24: "amx-tile", 25: "amx-int8"},
    (7, 1, 0): {4: "avxvnni", 5: "avx512bf16", 7: "cmpccxadd", 21: "amx-fp16", 23: "avxifma"},
    (7, 1, 3): {4: "avxvnniint8", 5: "avxneconvert", 8: "amx-complex", 10: "avxvnniint16"},
    (0x80000001, 0, 2): {0: "sahf", 5: "lzcnt", 6: "sse4a", 8: "prfchw", 11: "xop",
                         16: "fma4", 21: "tbm"},
    (0xD, 1, 0): {0: "xsaveopt", 1: "xsavec", 3: "xsaves"},
}
# features usable only when the OS saves their register state (XCR0 bits)
_AVX = {"avx", "avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avxvnni", "avxifma",
        "avxvnniint8", "avxneconvert", "avxvnniint16", "xop", "fma4"}
_XCR0_AVX = 0b110                    # SSE + AVX (YMM) state
_XCR0_AVX512 = 0b11100110            # + opmask, ZMM_Hi256, Hi16_ZMM
_XCR0_AMX = (1 << 17) | (1 << 18)    # XTILECFG, XTILEDATA

# Linux arm64 hwcaps (arch/arm64/include/uapi/asm/hwcap.h) -> LLVM feature
_ARM_HWCAP = {0: "fp-armv8", 1: "neon", 3: "aes", 6: "sha2", 7: "crc", 8: "lse",
              12: "rdm", 13: "jsconv", 14: "complxnum", 15: "rcpc", 17: "sha3", 20: "dotprod",
              22: "sve", 23: "fp16fml"}
_ARM_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16"}
_ARM_FULLFP16 = (9, 10)   # FPHP and ASIMDHP: scalar and vector half precision

CHECKED: frozenset[str] = frozenset(
    {f for bits in _X86_BITS.values() for f in bits.values()}
    | set(_ARM_HWCAP.values()) | set(_ARM_HWCAP2.values()) | {"fullfp16"})
"""Every feature name this module can check; a package's other features are not ISA."""

PORTABLE_LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4", "znver4", "sapphirerapids",
                   "cortex-a55", "cortex-a76", "generic")
"""LLVM CPU names offered for builds meant to run on other machines than this one."""


# -- x86-64: CPUID from a page of machine code ---------------------------------------------
# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4])   (System V: edi, esi, rdx)
_CPUID_CODE = bytes([
    0x53,                    # push rbx          (callee-saved, cpuid writes it)
    0x49, 0x89, 0xD0,        # mov r8, rdx       (cpuid writes edx)
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])
# uint64 xgetbv(uint32 index)
_XGETBV_CODE = bytes([
    0x89, 0xF9,              # mov ecx, edi
    0x0F, 0x01, 0xD0,        # xgetbv
    0x48, 0xC1, 0xE2, 0x20,  # shl rdx, 32
    0x48, 0x09, 0xD0,        # or rax, rdx
    0xC3,                    # ret
])


class _X86:
    """CPUID / XGETBV callable from Python (System V ABI: Linux, macOS, BSD)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CPUID_CODE + _XGETBV_CODE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.POINTER(ctypes.c_uint32 * 4))(base)
        self._xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(
            base + len(_CPUID_CODE))
        self.max_leaf = self._raw(0, 0)[0]
        self.max_ext = self._raw(0x80000000, 0)[0]

    def _raw(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._cpuid(leaf, sub, ctypes.byref(out))
        return tuple(out)

    def __call__(self, leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        """CPUID, all zero for a leaf above the CPU's maximum (its answer is undefined)."""
        top = self.max_ext if leaf >= 0x80000000 else self.max_leaf
        return self._raw(leaf, sub) if leaf <= top else (0, 0, 0, 0)

    def xcr0(self) -> int:
        if not self(1)[2] >> 27 & 1:   # OSXSAVE: without it XGETBV itself is illegal
            return 0
        return self._xgetbv(0)

    def features(self) -> frozenset[str]:
        found = set()
        for (leaf, sub, reg), bits in _X86_BITS.items():
            value = self(leaf, sub)[reg]
            found |= {name for bit, name in bits.items() if value >> bit & 1}
        xcr0 = self.xcr0()
        if xcr0 & _XCR0_AVX != _XCR0_AVX:
            found -= _AVX | {f for f in found if f.startswith(("avx512", "amx"))}
        if xcr0 & _XCR0_AVX512 != _XCR0_AVX512:
            found -= {f for f in found if f.startswith("avx512")}
        if xcr0 & _XCR0_AMX != _XCR0_AMX:
            found -= {f for f in found if f.startswith("amx")}
        return frozenset(found)

    def brand(self) -> str:
        if self.max_ext < 0x80000004:
            return ""
        raw = b"".join(int(r).to_bytes(4, "little")
                       for leaf in (0x80000002, 0x80000003, 0x80000004) for r in self(leaf))
        return raw.split(b"\0")[0].decode("ascii", "replace").strip()


@functools.cache
def _x86() -> _X86 | None:
    if host_arch() != "x86_64" or sys.platform == "win32":  # Windows x64 passes args elsewhere
        return None
    try:
        return _X86()
    except (OSError, ValueError):   # no executable anonymous memory (hardened kernel)
        return None


def _linux_cpuinfo_flags() -> frozenset[str] | None:
    """x86 fallback when CPUID cannot run from Python: the kernel's flags (its names differ
    from LLVM's only by underscores and a few renames)."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    rename = {"pni": "sse3", "pclmulqdq": "pclmul", "sse4_1": "sse4.1", "sse4_2": "sse4.2",
              "abm": "lzcnt", "lahf_lm": "sahf", "3dnowprefetch": "prfchw",
              "rdrand": "rdrnd", "bmi1": "bmi", "sha_ni": "sha", "amx_tile": "amx-tile", "amx_int8": "amx-int8",
              "amx_bf16": "amx-bf16", "amx_fp16": "amx-fp16", "avx_vnni": "avxvnni"}
    names = {rename.get(f, f.replace("_", "")) for f in flags}
    return frozenset(names & CHECKED)


def _aarch64_hwcaps() -> frozenset[str] | None:
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    hw, hw2 = getauxval(16), getauxval(26)   # AT_HWCAP, AT_HWCAP2
    found = {n for b, n in _ARM_HWCAP.items() if hw >> b & 1}
    found |= {n for b, n in _ARM_HWCAP2.items() if hw2 >> b & 1}
    if all(hw >> b & 1 for b in _ARM_FULLFP16):
        found.add("fullfp16")
    return frozenset(found)


@functools.cache
def running_features() -> frozenset[str] | None:
    """The ISA features (LLVM names, a subset of :data:`CHECKED`) of the CPU running this
    process, or None where this platform gives no way to ask."""
    arch = host_arch()
    if arch == "x86_64":
        x86 = _x86()
        return x86.features() if x86 is not None else _linux_cpuinfo_flags()
    if arch == "aarch64" and sys.platform.startswith("linux"):
        return _aarch64_hwcaps()
    return None


def missing_features(required: list[str] | tuple[str, ...] | frozenset[str]) -> list[str]:
    """Which of ``required`` (LLVM feature names) the running CPU lacks. Names this module
    cannot check (tuning flags, unknown features) are not reported. Raises ``LookupError``
    when the running CPU's features cannot be read at all on this platform."""
    have = running_features()
    if have is None:
        raise LookupError(f"cannot read the CPU features on {platform.system()} "
                          f"{host_arch()}")
    return sorted(f for f in set(required) & CHECKED if f not in have)


def target_features(tvm_target: dict) -> frozenset[str]:
    """The ISA features (a subset of :data:`CHECKED`) that code built for a TVM target dict may
    use: LLVM's features of its ``mcpu`` with its ``mattr`` applied. Needs TVM's compiler
    library (not the runtime-only one)."""
    key = (str(tvm_target.get("mtriple", "")), str(tvm_target.get("mcpu", "")),
           tuple(str(a) for a in tvm_target.get("mattr", ()) or ()))
    return _target_features(key)


@functools.cache
def _target_features(key: tuple[str, str, tuple[str, ...]]) -> frozenset[str]:
    from ._tvm import import_tvm

    tvm = import_tvm()
    from tvm.target import codegen

    triple, mcpu, mattr = key
    spec: dict = {"kind": "llvm"}
    if triple:
        spec["mtriple"] = triple
    if mcpu:
        spec["mcpu"] = mcpu
    if mattr:
        spec["mattr"] = list(mattr)
    feats = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(spec))}
    return frozenset(feats & CHECKED)


@functools.cache
def cpu_brand() -> str:
    """The CPU's marketing name (CPUID brand string on x86; /proc/cpuinfo elsewhere)."""
    x86 = _x86()
    if x86 is not None and x86.brand():
        return x86.brand()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "CPU part"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or host_arch()
