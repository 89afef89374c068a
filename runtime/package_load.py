"""Verify, then load exactly what was verified.

``load_verified(path, trusted_keys)`` is ``Package.load``. In order, before any kernel library
is opened by the dynamic loader:

1. The folder is opened once; every entry is listed without following links: a symbolic link
   or a non-regular file anywhere in it is refused (``package_io``).
2. ``manifest.json`` is read once (at most 64 MiB) and checked against the schema and its
   limits (``manifest_schema``): the format version, every type, list length, shape and size.
3. Every file the manifest lists is read once, with the size the manifest states, and its
   sha256 taken over the bytes read.
4. Trust: with trusted keys (the argument, else ``NPUCC_TRUSTED_KEYS``), ``model.sig`` must
   exist, be signed by one of them, and list exactly the package's files with exactly the
   digests just computed; a file nobody listed is refused. Without keys the package loads with
   a one-time :class:`UnverifiedPackageWarning`.
5. The kernel library's bytes become a sealed in-memory file (``SealedLibrary``); its ELF
   machine and instruction set are checked on those bytes (``_verify.check_arch``), then the
   plan (``_verify.check_manifest``), then that the library exports every kernel the plan
   calls (``check_exports``, from its ELF symbol table: a foreign library is refused before
   its constructors could run). The executor dlopens that sealed file: the path is never
   re-opened after the check, so a file swapped in meanwhile is never run.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from ._elf import exported_symbols
from ._verify import check_arch, check_manifest
from .errors import IntegrityError, PackageError, SignatureError, UnverifiedPackageWarning
from .manifest_schema import LIMITS, parse_manifest
from .package_io import PackageReader, SealedLibrary, check_file_name, recover
from .signing import MAX_SIGNATURE_BYTES, SIGNATURE_FILE, trusted_keys, verify_signature

__all__ = ["load_verified", "read_verified", "check_signed_files", "check_exports"]

_warned = threading.Event()


def check_signed_files(reader: PackageReader, manifest: dict[str, Any], keys: list,
                       where: str, for_signing: bool = False, *, manifest_name: str = "",
                       digests: dict[str, str] | None = None) -> Any:
    """Step 4 of the module docstring. Returns the key that signed, or None (no keys).
    ``for_signing``: no keys needed and no warning, but no unlisted file either.
    ``manifest_name``: the file holding ``manifest`` (default ``manifest.json``; LLM packages:
    ``llm.json``); ``digests``: the sha256 of every signed file when the reader did not read
    them all itself (an LLM package hashes its weights over the mapping the kernels read)."""
    from .package import MANIFEST

    manifest_name = manifest_name or MANIFEST
    listed = set(manifest["files"]) | {manifest_name, SIGNATURE_FILE}
    unlisted = sorted(n for n in reader.names if n not in listed)
    signed = SIGNATURE_FILE in reader.names
    if for_signing:
        if unlisted:
            raise PackageError(f"{where}: file(s) {unlisted} are not listed in "
                               f"{manifest_name}; refusing to sign a package with unlisted "
                               f"files")
        return None
    if not keys:
        if not _warned.is_set():
            _warned.set()
            warnings.warn(f"{where}: loaded without verifying its signature (no trusted keys "
                          f"configured: pass trusted_keys= or set NPUCC_TRUSTED_KEYS); a "
                          f"package is code, load only packages you trust",
                          UnverifiedPackageWarning, stacklevel=_caller_level())
        return None
    if not signed:
        raise SignatureError(f"{where}: the package is not signed ({SIGNATURE_FILE} missing) and "
                             f"trusted keys are configured; refusing to load")
    if unlisted:
        raise SignatureError(f"{where}: file(s) {unlisted} are not part of the signed "
                             f"package; refusing to load")
    sig = reader.read(SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
    if digests is None:
        digests = {name: reader.files.digest(name) for name in reader.files.data
                   if name != SIGNATURE_FILE}
    return verify_signature(sig, digests, keys, where)


def _caller_level() -> int:
    """The stack level of the first frame outside runtime/ (whom a warning should name)."""
    import sys

    here = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1
    return level


def check_exports(lib: bytes, manifest: dict[str, Any], where: str) -> None:
    """Every kernel the plan calls is exported by the library (``__tvm_ffi_<name>``), checked
    on its bytes: a library that is not this package's is refused before the dynamic loader
    runs any of its code (constructors run at dlopen, before a kernel lookup could fail)."""
    have = {n.removeprefix("__tvm_ffi_") for n in exported_symbols(lib, f"{where}/kernels.so")
            if n.startswith("__tvm_ffi_")}
    missing = sorted({s["kernel"] for s in manifest["steps"]} - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PackageError(f"{where}: kernel {missing[0]!r}{more} is not in kernels.so (the "
                           f"library exports no __tvm_ffi_{missing[0]}); refusing to load it")


def read_verified(path: str | os.PathLike, keys: Any = None, require_signature: bool = False,
                  for_signing: bool = False) -> tuple[dict[str, Any], dict[str, bytes], Any]:
    """Steps 1-4 of the module docstring: (manifest, file bytes by name, signing key or None).
    Loads nothing; works for a package of any architecture. ``require_signature``: refuse
    when no trusted key is configured (``npucc verify``); ``for_signing``: check the hashes
    and that no file is unlisted, ignore any signature (``npucc sign``)."""
    from .package import LIBRARY, MANIFEST, SUPPORTED_FORMAT_VERSIONS, WEIGHTS

    path = Path(path)
    where = str(path)
    keys = [] if for_signing else trusted_keys(keys)
    if require_signature and not keys:
        raise SignatureError(f"{where}: no trusted public key given to verify against")
    recover(path)
    reader = PackageReader(path, where)
    try:
        if MANIFEST not in reader.names:
            raise PackageError(f"{path} is not a package: no {MANIFEST} in it")
        manifest = parse_manifest(reader.read(MANIFEST, LIMITS["manifest_bytes"]), where,
                                  SUPPORTED_FORMAT_VERSIONS)
        files = manifest["files"]
        if {LIBRARY, WEIGHTS} - set(files):
            raise PackageError(f"{path}: manifest lists no sha256 for {LIBRARY} and {WEIGHTS}")
        for name, entry in files.items():
            check_file_name(name, where)
            if name in (MANIFEST, SIGNATURE_FILE):
                raise PackageError(f"{path}: manifest lists {name} among its own files")
            data = reader.read(name, entry["bytes"], exact=True)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise IntegrityError(f"{path}: file {name} does not match its sha256 in the "
                                     f"manifest (damaged or modified); refusing to load")
        signer = check_signed_files(reader, manifest, keys, where, for_signing)
    finally:
        reader.close()
    return manifest, reader.files.data, signer


def load_verified(cls: type, path: str | os.PathLike, keys: Any = None) -> Any:
    """``Package.load``: see the module docstring."""
    from .package import LIBRARY, WEIGHTS

    path = Path(path)
    manifest, blobs, signer = read_verified(path, keys)
    library = SealedLibrary(blobs[LIBRARY])
    try:
        check_arch(library.path, manifest, where=path / LIBRARY)
        check_manifest(manifest, where=str(path))
        check_exports(blobs[LIBRARY], manifest, str(path))
    except BaseException:
        library.close()
        raise
    extra = {name: blobs[name] for name in manifest["files"] if name not in (LIBRARY, WEIGHTS)}
    pkg = cls(manifest, path / LIBRARY, blobs[WEIGHTS], directory=path, extra_files=extra,
              library=library)
    pkg.signed_by = signer
    return pkg
