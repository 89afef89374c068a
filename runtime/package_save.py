"""Saving a package without ever destroying a file that is not ours.

``save_package(pkg, path, sign_key)`` is ``Package.save``:

- Something already at ``path`` is replaced only if it is an npucc package by our own marker:
  a folder (not a link) whose ``manifest.json`` passes the manifest schema and whose files are
  exactly the ones that manifest lists (plus ``model.sig``), each with its listed sha256. A
  file, a device, a link, or a folder holding anything else (a web app with its own
  ``manifest.json``, an edited package) is refused with :class:`PackageError` naming it.
- The new package is written to a temporary folder beside ``path`` (every file created with
  ``O_EXCL``, fsynced), signed there when a key is given, then exchanged with the old one
  atomically (``package_io.swap_into_place``): at every moment ``path`` names either the old
  or the new complete package. The temporary folder is removed on every exit path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import PackageError
from .manifest_schema import LIMITS, parse_manifest
from .package_io import (
    PackageReader,
    fsync_dir,
    recover,
    remove_stale,
    replace_file,
    swap_into_place,
    temp_prefix,
)
from .signing import SIGNATURE_FILE, load_private_key, signature_bytes

__all__ = ["save_package", "sign_package", "check_replaceable", "not_a_package_reason",
           "write_new_file"]


def not_a_package_reason(path: Path) -> str | None:
    """Why the folder ``path`` is not an npucc package we may replace (None if it is one)."""
    from .package import MANIFEST, SUPPORTED_FORMAT_VERSIONS

    where = str(path)
    try:
        reader = PackageReader(path, where)
    except PackageError as e:
        return str(e)
    try:
        if MANIFEST not in reader.names:
            return f"it has no {MANIFEST}"
        try:
            m = parse_manifest(reader.read(MANIFEST, LIMITS["manifest_bytes"]), where,
                               SUPPORTED_FORMAT_VERSIONS)
        except PackageError as e:
            return f"its {MANIFEST} is not an npucc package manifest ({e})"
        listed = set(m["files"])
        other = sorted(n for n in reader.names if n not in listed | {MANIFEST, SIGNATURE_FILE})
        dirs = sorted(d for d in reader.files.subdirs
                      if not any(n.startswith(d + "/") for n in listed))
        if other or dirs:
            return f"it holds files that are not part of an npucc package: {(other + dirs)[:8]}"
        for name, entry in m["files"].items():
            try:
                data = reader.read(name, entry["bytes"], exact=True)
            except PackageError as e:
                return str(e)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return f"its file {name} does not match the manifest's sha256"
    finally:
        reader.close()
    return None


def check_replaceable(path: Path) -> None:
    """Raise :class:`PackageError` unless ``path`` is absent or an npucc package."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "it exists and is not a package (not a folder)"
    else:
        why = not_a_package_reason(path)
        if why is None:
            return
        why = f"it is not a package (by npucc's marker): {why}"
    raise PackageError(f"refusing to replace {path}: {why}; remove it yourself or choose "
                       f"another output path")


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file or link) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def save_package(pkg: Any, path: Path, sign_key: Any = None,
                 password: bytes | None = None) -> dict[str, Any]:
    """Write ``pkg`` to ``path`` (see the module docstring); returns the manifest written."""
    from .package import MANIFEST, dump_manifest

    path = Path(os.path.abspath(path))
    recover(path)
    remove_stale(path)
    check_replaceable(path)
    key = load_private_key(sign_key, password) if sign_key is not None else None
    files = pkg.file_bytes()
    manifest = dict(pkg.manifest)
    manifest["files"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                         for name, data in files.items()}
    files[MANIFEST] = dump_manifest(manifest).encode()
    if key is not None:
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        files[SIGNATURE_FILE] = signature_bytes(digests, key, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, data in files.items():
            if "/" in name:
                (tmp / name).parent.mkdir(exist_ok=True)
            write_new_file(tmp / name, data)
        for d in {(tmp / name).parent for name in files}:
            fsync_dir(d)
        swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def sign_package(path: str | os.PathLike, sign_key: Any, password: bytes | None = None) -> Path:
    """Sign the package folder ``path`` in place: check every file against the manifest (and
    that no file is unlisted), then write ``model.sig`` (atomically, replacing an old one) over
    exactly the bytes checked. Returns the signature's path."""
    from .package import MANIFEST
    from .package_load import read_verified

    path = Path(path)
    key = load_private_key(sign_key, password)
    manifest, blobs, _ = read_verified(path, for_signing=True)
    names = [MANIFEST, *manifest["files"]]
    digests = {n: hashlib.sha256(blobs[n]).hexdigest() for n in names}
    sig = signature_bytes(digests, key, Path(os.path.abspath(path)).name)
    return replace_file(path / SIGNATURE_FILE, sig)
