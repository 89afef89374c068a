"""Applying an over-the-air delta to an installed package: ``runtime.apply_update``.

``apply_update(installed, delta, trusted_keys=None, allow_downgrade=False)``, in order:

1. The delta file is read once (a regular file, not a link) and its container parsed
   (``delta_format.read_delta``).
2. Trust: with trusted keys (the argument, else ``NPUCC_TRUSTED_KEYS`` / the per-user folder,
   as for ``runtime.load``) the delta must be signed by one of them, over exactly its header
   and payload; an unsigned or tampered delta is refused (:class:`SignatureError`). Without
   keys it is applied with an :class:`UnverifiedPackageWarning` (its payload's sha256 is still
   checked).
3. The installed package is read once and checked against its manifest (every file's size
   and sha256, nothing unlisted); the sha256 of its ``manifest.json`` must be the base the
   delta was made for (else :class:`UpdateError`: wrong base). An installed package that
   already is the delta's result is left alone (the update was applied before).
4. Downgrade: the result's model version (manifest ``version``) must not be older than the
   installed one unless ``allow_downgrade``.
5. Every file of the result is rebuilt from the installed files and the delta's segments, its
   size and sha256 checked against the (signed) header, and written to a fresh temporary
   folder beside the installed one (``.NAME.PID.*.tmp``, files ``O_EXCL``, fsynced).
6. The temporary folder is verified as a package the way ``runtime.load`` verifies one
   (manifest schema, every file's sha256, and with trusted keys the result's own ``model.sig``)
   and must be exactly the result the delta describes.
7. Swap: ``package_io.swap_into_place`` exchanges the folders in one ``renameat2`` step; the
   old package is then removed.

A failure at any step — an exception, or the process killed (SIGKILL) anywhere — leaves the
installed path naming a complete package, the old one up to step 7 and the new one after:
before the exchange nothing but the temporary folder was written, and the exchange is atomic.
A temporary folder a killed apply left behind is removed by the next apply (or save) once its
process is gone. ``on_step(name)`` is called after each step (``verified-delta``,
``checked-base``, ``wrote:<file>`` per file, ``rebuilt``, ``verified-result``, ``swapped``),
for progress reports and for tests that kill the process at a chosen step.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .delta_format import DELTA_PAYLOAD, Delta, UpdateError, read_delta, rebuild_file
from .errors import PackageError, SignatureError, UnverifiedPackageWarning
from .manifest_schema import manifest_version, parse_version
from .package_io import fsync_dir, read_regular, remove_stale, swap_into_place, temp_prefix
from .signing import MAX_SIGNATURE_BYTES, SIGNATURE_FILE, verify_signature
from .signing import trusted_keys as resolve_keys

__all__ = ["apply_update", "UpdateResult", "UpdateError", "check_delta", "version_text"]


@dataclass(frozen=True)
class UpdateResult:
    """What :func:`apply_update` did."""

    path: Path
    old_version: str | None
    new_version: str | None
    applied: bool            # False: the installed package already was the delta's result
    signed_by: Any           # the trusted key that signed the delta, or None
    files_written: int
    bytes_written: int
    seconds: float


def version_text(v: tuple[int, ...] | None) -> str:
    """A version tuple as users write it ("1.4"; "none" for a package without a version)."""
    return ".".join(map(str, v)) if v else "none"


def check_delta(delta: Delta, keys: list) -> Any:
    """Step 2 of the module docstring: the key that signed ``delta``, or None (no keys)."""
    if keys:
        if not delta.signature:
            raise SignatureError(f"{delta.where}: the update is not signed and trusted keys "
                                 f"are configured; refusing to apply it (make it with "
                                 f"`npucc update make ... --key KEY`)")
        try:
            return verify_signature(delta.signature, delta.digests(), keys, delta.where)
        except SignatureError as e:
            raise SignatureError(f"refusing the update: {e}") from None
    want = delta.header.get("payload_sha256")
    if want is not None and hashlib.sha256(delta.payload).hexdigest() != want:
        raise UpdateError(f"{delta.where}: {DELTA_PAYLOAD} does not match its sha256 in the "
                          f"header (the delta is damaged); refusing to apply it")
    warnings.warn(f"{delta.where}: applying an update without verifying its signature (no "
                  f"trusted keys configured: pass trusted_keys= or set NPUCC_TRUSTED_KEYS)",
                  UnverifiedPackageWarning, stacklevel=3)
    return None


def _read_installed(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The installed package's manifest and file bytes, every listed file checked against it
    (its signature is not needed: the delta names this exact manifest, which lists every
    file's sha256)."""
    from .package_load import read_verified

    manifest, blobs, _ = read_verified(path, for_signing=True)
    return manifest, blobs


def _check_version(delta: Delta, installed: dict[str, Any], allow_downgrade: bool) -> tuple:
    old = manifest_version(installed)
    raw = delta.header["result"].get("version")
    new = () if raw is None else parse_version(raw, f"{delta.where}: result")
    if new < old and not allow_downgrade:
        raise UpdateError(f"refusing to downgrade {delta.where!s}: it installs version "
                          f"{version_text(new)} over the installed {version_text(old)}; pass "
                          f"allow_downgrade=True (--allow-downgrade) to install an older "
                          f"version")
    return old, new


def _write_tree(tmp: Path, delta: Delta, base: dict[str, bytes],
                step: Callable[[str], None]) -> tuple[int, int]:
    """Step 5: rebuild every result file into ``tmp``; returns (files, bytes) written."""
    from .package_save import write_new_file

    count = total = 0
    names = sorted(delta.header["files"])
    for name in names:
        data = rebuild_file(delta, name, base)
        target = tmp / name
        if "/" in name:
            target.parent.mkdir(exist_ok=True)
        write_new_file(target, data)
        count, total = count + 1, total + len(data)
        step(f"wrote:{name}")
    for d in {(tmp / n).parent for n in names}:
        fsync_dir(d)
    return count, total


def _verify_result(tmp: Path, delta: Delta, keys: list, where: str) -> None:
    """Step 6: ``tmp`` is a valid package (signature included with keys) and is exactly the
    delta's result (same files, same digests, the signed manifest)."""
    from .package import MANIFEST
    from .package_load import read_verified

    try:
        manifest, blobs, _ = read_verified(tmp, keys, for_signing=not keys)
        if SIGNATURE_FILE in delta.header["result"]["files"] and SIGNATURE_FILE not in blobs:
            blobs[SIGNATURE_FILE] = read_regular(None, str(tmp / SIGNATURE_FILE),
                                                 MAX_SIGNATURE_BYTES, str(tmp))
    except PackageError as e:
        raise UpdateError(f"{where}: the updated package does not verify ({e}); the installed "
                          f"package was left in place") from None
    want = {n: e["sha256"] for n, e in delta.header["result"]["files"].items()}
    have = {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}
    if have != want or have[MANIFEST] != delta.header["result"]["manifest_sha256"]:
        raise UpdateError(f"{where}: the rebuilt package is not the one the delta describes; "
                          f"the installed package was left in place")
    if manifest.get("version") != delta.header["result"].get("version"):
        raise UpdateError(f"{where}: the new manifest's version {manifest.get('version')!r} "
                          f"is not the delta's {delta.header['result'].get('version')!r}")


def apply_update(installed: str | os.PathLike, delta: str | os.PathLike,
                 trusted_keys: Any = None, allow_downgrade: bool = False,
                 on_step: Callable[[str], None] | None = None) -> UpdateResult:
    """Turn the package folder ``installed`` into the delta's result, atomically; see the
    module docstring for the checks, their order and what a failure leaves behind."""
    from .package import MANIFEST

    t0 = time.perf_counter()
    path = Path(os.path.abspath(installed))
    if path.is_symlink():
        raise UpdateError(f"{path} is a symbolic link; apply the update to the package folder "
                          f"itself ({os.path.realpath(path)})")
    step = on_step or (lambda _name: None)
    keys = resolve_keys(trusted_keys)
    d = read_delta(delta)
    signer = check_delta(d, keys)
    step("verified-delta")
    remove_stale(path)
    manifest, base = _read_installed(path)
    have = hashlib.sha256(base[MANIFEST]).hexdigest()
    old_v = manifest.get("version")
    if have == d.header["result"]["manifest_sha256"]:
        return UpdateResult(path, old_v, old_v, False, signer, 0, 0, time.perf_counter() - t0)
    if have != d.header["base"]["manifest_sha256"]:
        raise UpdateError(f"refusing the update {d.where}: it was made for another package "
                          f"(base manifest sha256 {d.header['base']['manifest_sha256'][:16]}..., "
                          f"version {d.header['base'].get('version') or 'none'}); {path} has "
                          f"manifest sha256 {have[:16]}... (version {old_v or 'none'})")
    _check_version(d, manifest, allow_downgrade)
    step("checked-base")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        count, total = _write_tree(tmp, d, base, step)
        del base
        step("rebuilt")
        _verify_result(tmp, d, keys, str(path))
        step("verified-result")
        swap_into_place(tmp, path)
        step("swapped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return UpdateResult(path, old_v, d.header["result"].get("version"), True, signer, count,
                        total, time.perf_counter() - t0)
