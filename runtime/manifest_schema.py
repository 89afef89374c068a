"""The manifest's schema, with limits, checked before any number from it is used.

A package is untrusted input (DESIGN.md, Runtime). ``parse_manifest(data)`` takes the raw
bytes of ``manifest.json`` and returns the dict only if it has the shape the runtime reads —
every key's type, every list's length, every size and shape bounded — or raises
:class:`PackageError` naming the first bad field by its JSON path. Nothing here allocates by a
number read from the manifest. The plan's *consistency* (tensors named by steps exist, arena
offsets do not overlap) is ``_verify.check_manifest``'s job, after this.

Limits (``LIMITS``) are generous for real models and small enough that a crafted manifest
cannot exhaust memory or recursion: 64 MiB of JSON, nesting depth 32, a dimension below
2**31, a tensor below 2**40 elements, an arena of at most 64 GiB (override with
``NPUCC_MAX_ARENA_BYTES``), files of at most 64 GiB.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _dtypes
from .errors import PackageError
from .package_io import check_file_name

__all__ = ["LIMITS", "parse_manifest", "validate_manifest", "json_depth", "parse_version",
           "manifest_version"]

LIMITS = {
    "manifest_bytes": 64 << 20,
    "depth": 32,
    "string": 4096,
    "list": 1 << 22,          # steps, tensors
    "io": 4096,               # graph inputs / outputs
    "rank": 16,
    "dim": (1 << 31) - 1,
    "elements": 1 << 40,
    "tensor_bytes": 1 << 42,
    "arena_bytes": 64 << 30,
    "file_bytes": 64 << 30,
    "files": 1024,
    "operands": 256,
    "num_cores": 4096,
}
_KINDS = ("input", "output", "intermediate", "weight")
_HEX = frozenset(string.hexdigits.lower())
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_VERSION = re.compile(r"\d{1,9}(?:\.\d{1,9}){0,3}")


def parse_version(v: Any, where: str = "version") -> tuple[int, ...]:
    """A model version (the manifest's optional ``version``: ``"2"``, ``"1.4.0"``, at most four
    numbers) as a tuple that compares in release order; :class:`PackageError` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9:
        v = str(v)
    if not isinstance(v, str) or not _VERSION.fullmatch(v):
        raise PackageError(f"{where}: model version {json.dumps(v)[:40]} is not a version; "
                           f"expected numbers separated by dots, e.g. \"3\" or \"1.4.0\"")
    parts = [int(x) for x in v.split(".")]
    while parts and parts[-1] == 0:   # "1.4" == "1.4.0"
        parts.pop()
    return tuple(parts)


def manifest_version(m: Mapping[str, Any]) -> tuple[int, ...]:
    """The model version a manifest states; a package without one (older compilers) is
    version 0, older than any versioned package."""
    v = m.get("version")
    return () if v is None else parse_version(v, "manifest")


def json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text (strings skipped), without parsing it."""
    skeleton = _STRINGS.sub(b"", data).translate(None, delete=bytes(
        c for c in range(256) if c not in b"[]{}"))
    if not skeleton:
        return 0
    a = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def parse_manifest(data: bytes, where: str, supported_versions: tuple[int, ...]) -> dict:
    """Bytes of manifest.json -> the validated manifest dict (see module docstring)."""
    if len(data) > LIMITS["manifest_bytes"]:
        raise PackageError(f"{where}: manifest.json has {len(data)} bytes, over the limit of "
                           f"{LIMITS['manifest_bytes']}")
    depth = json_depth(data)
    if depth > LIMITS["depth"]:
        raise PackageError(f"{where}: manifest.json nests {depth} levels deep, over the limit "
                           f"of {LIMITS['depth']}")
    try:
        m = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PackageError(f"{where}: manifest.json is not valid JSON: {e}") from None
    validate_manifest(m, where, supported_versions)
    return m


class _Bad(Exception):
    pass


def _fail(path: str, why: str) -> _Bad:
    return _Bad(f"{path}: {why}")


def _obj(v: Any, path: str, required: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise _fail(path, f"expected an object, got {type(v).__name__}")
    missing = [k for k in required if k not in v]
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    return v


def _list(v: Any, path: str, limit: int) -> list:
    if not isinstance(v, list):
        raise _fail(path, f"expected a list, got {type(v).__name__}")
    if len(v) > limit:
        raise _fail(path, f"{len(v)} items, over the limit of {limit}")
    return v


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, f"expected an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise _Bad(f"{path} {v} is outside [{lo}, {hi}]")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _fail(path, f"expected a string, got {type(v).__name__}")
    if len(v) > LIMITS["string"]:
        raise _fail(path, f"string of {len(v)} characters, over {LIMITS['string']}")
    return v


def _dtype(v: Any, path: str) -> str:
    try:
        return _dtypes.canonical(_str(v, path))
    except PackageError as e:
        raise _fail(path, str(e)) from None


def _shape(v: Any, path: str) -> list[int]:
    dims = [_int(d, f"{path}[{i}]", 0, LIMITS["dim"])
            for i, d in enumerate(_list(v, path, LIMITS["rank"]))]
    n = 1
    for d in dims:
        n *= d
    if n > LIMITS["elements"]:
        raise _fail(path, f"{n} elements, over the limit of {LIMITS['elements']}")
    return dims


def _strings(v: Any, path: str, limit: int) -> None:
    for i, s in enumerate(_list(v, path, limit)):
        _str(s, f"{path}[{i}]")


def _target(t: Any, path: str) -> None:
    t = _obj(t, path, ("name", "tvm", "arch"))
    _str(t["name"], f"{path}.name")
    _str(t["arch"], f"{path}.arch")
    tvm = _obj(t["tvm"], f"{path}.tvm")
    for k, v in tvm.items():
        _str(k, f"{path}.tvm key")
        if k == "num-cores":
            _int(v, f"{path}.tvm.num-cores", 1, LIMITS["num_cores"])
        elif isinstance(v, list):
            _strings(v, f"{path}.tvm.{k}", 256)
        elif not isinstance(v, (str, int, float, bool)):
            raise _fail(f"{path}.tvm.{k}", f"unexpected {type(v).__name__}")


def _io(v: Any, path: str) -> None:
    for i, t in enumerate(_list(v, path, LIMITS["io"])):
        t = _obj(t, f"{path}[{i}]", ("name", "shape", "dtype"))
        _str(t["name"], f"{path}[{i}].name")
        _shape(t["shape"], f"{path}[{i}].shape")
        _dtype(t["dtype"], f"{path}[{i}].dtype")


def _steps(v: Any, path: str) -> None:
    for i, s in enumerate(_list(v, path, LIMITS["list"])):
        p = f"{path}[{i}]"
        s = _obj(s, p, ("kernel", "node", "op", "inputs", "outputs"))
        for k in ("kernel", "node", "op"):
            _str(s[k], f"{p}.{k}")
        _strings(s["inputs"], f"{p}.inputs", LIMITS["operands"])
        _strings(s["outputs"], f"{p}.outputs", LIMITS["operands"])


def _tensors(v: Any, path: str) -> None:
    for i, t in enumerate(_list(v, path, LIMITS["list"])):
        p = f"{path}[{i}]"
        t = _obj(t, p, ("name", "shape", "dtype", "kind", "nbytes"))
        _str(t["name"], f"{p}.name")
        _shape(t["shape"], f"{p}.shape")
        _dtype(t["dtype"], f"{p}.dtype")
        if t["kind"] not in _KINDS:
            raise _fail(f"{p}.kind", f"{json.dumps(t['kind'])[:40]}; expected one of {_KINDS}")
        _int(t["nbytes"], f"{p}.nbytes", 0, min(LIMITS["tensor_bytes"], _arena_limit()))
        if t.get("offset") is not None:
            _int(t["offset"], f"{p}.offset", 0, _arena_limit())
        if t.get("weight") is not None:
            _str(t["weight"], f"{p}.weight")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 1 << 62


def _arena_limit() -> int:
    """The largest arena (and tensor) a manifest may ask for: 64 GiB or ``NPUCC_MAX_ARENA_BYTES``,
    and never more than this machine's memory (a bigger one could only end in MemoryError)."""
    env = os.environ.get("NPUCC_MAX_ARENA_BYTES")
    limit = int(env) if env and env.isdigit() else LIMITS["arena_bytes"]
    return min(limit, _physical_memory())


def _memory(v: Any, path: str) -> None:
    m = _obj(v, path, ("arena_bytes", "lower_bound_bytes", "naive_bytes", "weight_bytes",
                       "alignment", "inplace"))
    limit = _arena_limit()
    _int(m["arena_bytes"], f"{path}.arena_bytes", 0, limit)
    for k in ("lower_bound_bytes", "naive_bytes", "weight_bytes"):
        _int(m[k], f"{path}.{k}", 0, LIMITS["file_bytes"] * 4)
    a = _int(m["alignment"], f"{path}.alignment", 1, 4096)
    if a & (a - 1):
        raise _fail(f"{path}.alignment", f"{a} is not a power of two")
    for i, p in enumerate(_list(m["inplace"], f"{path}.inplace", LIMITS["list"])):
        q = _list(p, f"{path}.inplace[{i}]", 3)
        if len(q) != 3:
            raise _fail(f"{path}.inplace[{i}]", "expected [step, operand, result]")
        _int(q[0], f"{path}.inplace[{i}][0]", 0, LIMITS["list"])
        _str(q[1], f"{path}.inplace[{i}][1]")
        _str(q[2], f"{path}.inplace[{i}][2]")


def _files(v: Any, path: str) -> None:
    files = _obj(v, path)
    if len(files) > LIMITS["files"]:
        raise _fail(path, f"{len(files)} files, over the limit of {LIMITS['files']}")
    for name, e in files.items():
        check_file_name(name, "manifest")
        p = f"{path}[{json.dumps(name)[:80]}]"
        e = _obj(e, p, ("sha256", "bytes"))
        digest = _str(e["sha256"], f"{p}.sha256")
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise _fail(f"{p}.sha256", "expected 64 lower-case hex digits")
        _int(e["bytes"], f"{p}.bytes", 0, LIMITS["file_bytes"])


def _weight_encoding(v: Any, path: str) -> None:
    for key, rec in _obj(v, path).items():
        p = f"{path}[{json.dumps(key)[:80]}]"
        rec = _obj(rec, p, ("encoding", "dtype", "shape", "nnz"))
        _str(rec["encoding"], f"{p}.encoding")
        _dtype(rec["dtype"], f"{p}.dtype")
        dense = _shape(rec["shape"], f"{p}.shape")
        n = 1
        for d in dense:
            n *= d
        _int(n * np.dtype(_dtypes.numpy_dtype(rec["dtype"])).itemsize, f"{p} dense bytes", 0,
             _arena_limit())   # decoding allocates the dense array
        _int(rec["nnz"], f"{p}.nnz", 0, n)


def validate_manifest(m: Any, where: str, supported_versions: tuple[int, ...]) -> None:
    """Raise :class:`PackageError` unless ``m`` has the manifest's shape within ``LIMITS``."""
    from .errors import FormatVersionError

    try:
        m = _obj(m, "manifest")
        version = m.get("format_version")
        if isinstance(version, bool) or version not in supported_versions:
            raise FormatVersionError(
                f"{where}: package format version {json.dumps(version)[:40]} is not supported "
                f"by this runtime (supported: {', '.join(map(str, supported_versions))}); "
                f"rebuild the package with a matching compiler or upgrade the runtime")
        _obj(m, "manifest", ("target", "inputs", "outputs", "steps", "tensors", "memory",
                             "files"))
        _target(m["target"], "target")
        _io(m["inputs"], "inputs")
        _io(m["outputs"], "outputs")
        _steps(m["steps"], "steps")
        _tensors(m["tensors"], "tensors")
        _memory(m["memory"], "memory")
        _files(m["files"], "files")
        if m.get("weight_encoding") is not None:
            _weight_encoding(m["weight_encoding"], "weight_encoding")
        if m.get("version") is not None:
            try:
                parse_version(m["version"], "version")
            except PackageError as e:
                raise _Bad(str(e)) from None
    except _Bad as e:
        raise PackageError(f"{where}: malformed manifest: {e}") from None
