"""Reading and replacing package folders without trusting the file system.

Reading (:func:`read_package_files`): the folder is opened once; every file is opened relative
to that descriptor with ``O_NOFOLLOW``, checked to be a regular file with ``fstat``, and read
once, within a size limit. Those bytes are what gets hashed, verified and used — the kernel
library is handed to the loader as a sealed in-memory file (:class:`SealedLibrary`,
``memfd_create``), so nothing is re-opened by path after the check. Symlinks and other
non-regular entries anywhere in the package are refused.

Replacing (:func:`swap_into_place`): a new package is written to a temporary folder beside the
target and exchanged with the old one by ``renameat2(RENAME_EXCHANGE)``, so the final name
always names a complete package. Where the exchange is not available, the old folder is moved
aside first and moved back if anything fails; :func:`recover` restores it after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, PackageError

__all__ = ["PackageFiles", "PackageReader", "read_regular", "check_file_name", "SealedLibrary",
           "swap_into_place", "recover", "remove_stale", "temp_prefix", "OLD_MARK",
           "replace_file", "fsync_dir"]

OLD_MARK = ".old-"
MAX_ENTRIES = 4096   # files in a package folder (the manifest may list at most 1024)
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass
class PackageFiles:
    """What a package folder holds: each regular file's bytes (read once) by relative name."""

    where: str
    data: dict[str, bytes] = field(default_factory=dict)
    subdirs: list[str] = field(default_factory=list)

    def digest(self, name: str) -> str:
        return hashlib.sha256(self.data[name]).hexdigest()


def read_regular(dir_fd: int | None, name: str, limit: int, where: str,
                 exact: bool = False) -> bytes:
    """The bytes of regular file ``name`` (relative to ``dir_fd``), read once; refuses
    symlinks, devices, fifos and sockets, and files over ``limit`` bytes (``exact``: of
    another size than ``limit``, the size the manifest states)."""
    try:
        fd = os.open(name, _O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError(f"{where}: file {name} is missing") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise PackageError(f"{where}: {name} is a symbolic link; packages may not contain "
                               f"links") from None
        raise PackageError(f"{where}: cannot open {name}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{where}: {name} is not a regular file "
                               f"({_kind(st.st_mode)}); refusing to read it")
        if exact and st.st_size != limit:
            raise IntegrityError(f"{where}: file {name} has {st.st_size} bytes; the manifest "
                                 f"says {limit} (damaged or modified); refusing to load")
        if st.st_size > limit:
            raise PackageError(f"{where}: {name} has {st.st_size} bytes, over the limit of "
                               f"{limit}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise PackageError(f"{where}: {name} grew past the limit of {limit} bytes "
                                   f"while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "an unknown file type"


def _scan(dir_fd: int, prefix: str, where: str, depth: int, out: PackageFiles,
          names: list[str]) -> None:
    entries = []
    with os.scandir(dir_fd) as it:
        for e in it:
            if len(entries) >= MAX_ENTRIES:
                raise PackageError(f"{where}: more than {MAX_ENTRIES} entries in {prefix or '.'}"
                                   f"; not a package")
            entries.append((e.name, e.stat(follow_symlinks=False).st_mode))
    entries.sort()
    for name, mode in entries:
        rel = prefix + name
        if stat.S_ISLNK(mode):
            raise PackageError(f"{where}: {rel} is a symbolic link; packages may not contain "
                               f"links (refusing to follow it)")
        if stat.S_ISDIR(mode):
            if depth >= 1:
                raise PackageError(f"{where}: unexpected nested folder {rel}")
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
            try:
                out.subdirs.append(rel)
                _scan(sub, rel + "/", where, depth + 1, out, names)
            finally:
                os.close(sub)
        elif stat.S_ISREG(mode):
            names.append(rel)
        else:
            raise PackageError(f"{where}: {rel} is {_kind(mode)}; a package holds only "
                               f"regular files")


class PackageReader:
    """A package folder opened once (a directory descriptor); files read relative to it."""

    def __init__(self, path: str | os.PathLike, where: str):
        self.where = where
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PackageError(f"{where} is not a package: it does not exist") from None
        except NotADirectoryError:
            raise PackageError(f"{where} is not a package: not a folder") from None
        except OSError as e:
            raise PackageError(f"{where}: cannot open the package folder: {e}") from None
        self.files = PackageFiles(where)
        self.names: list[str] = []
        try:
            _scan(self.fd, "", where, 0, self.files, self.names)
        except BaseException:
            self.close()
            raise

    def read(self, name: str, limit: int, exact: bool = False) -> bytes:
        """Read ``name`` once (at most ``limit`` bytes; exactly ``limit`` with ``exact``)."""
        parts = name.split("/")
        dir_fd, opened = self.fd, None
        try:
            if len(parts) == 2:
                try:
                    opened = dir_fd = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY |
                                              os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
                except OSError:
                    raise IntegrityError(f"{self.where}: file {name} is missing") from None
            data = read_regular(dir_fd, parts[-1], limit, self.where, exact)
        finally:
            if opened is not None:
                os.close(opened)
        if exact and len(data) != limit:
            raise IntegrityError(f"{self.where}: file {name} has {len(data)} bytes; the manifest "
                                 f"says {limit} (damaged or modified); refusing to load")
        self.files.data[name] = data
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SealedLibrary:
    """A shared library's verified bytes as a file the dynamic loader can open, that nobody
    can change: a sealed ``memfd`` (``/proc/self/fd/N``), or where memfd is missing a
    read-only copy in a private (0700) temporary folder. ``close()`` (or garbage collection)
    releases it; a library already loaded stays mapped."""

    def __init__(self, data: bytes, name: str = "kernels.so"):
        self.data_size = len(data)
        self._fd: int | None = None
        self._dir: str | None = None
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            fd = os.memfd_create(f"npucc-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                _write_all(fd, data)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW |
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self.path = Path(f"/proc/self/fd/{fd}")
            self.memfd = True
        else:  # pragma: no cover - non-Linux
            self._dir = tempfile.mkdtemp(prefix="npucc-lib-")
            self.path = Path(self._dir) / name
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o500)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.memfd = False

    def load(self, tvm: Any) -> Any:
        """The TVM module of this library (dlopen of exactly these bytes)."""
        from .pool import load_library  # its parallel loops on npucc's launcher

        return load_library(tvm, self.path, memfd=self.memfd)

    def read_bytes(self) -> bytes:
        """The sealed bytes (for saving a loaded package: what was verified, not the path)."""
        if not self.memfd:
            return self.path.read_bytes()
        parts, off = [], 0
        while off < self.data_size:
            chunk = os.pread(self._fd, self.data_size - off, off)
            if not chunk:
                break
            parts.append(chunk)
            off += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def check_file_name(name: Any, where: str) -> None:
    """A file the manifest names: a relative path inside the package (``kernels.so``,
    ``device/kernels.aarch64.so``), no empty, hidden or ``..`` components, no backslashes."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if "\\" in str(name) or any(not p or p.startswith(".") for p in parts) or len(parts) > 2:
        raise PackageError(f"{where}: manifest names file {name!r}; expected a plain file name "
                           f"inside the package (at most one subdirectory, e.g. device/x.so)")


# -- replacing a folder ------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange ``a`` and ``b``; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def swap_into_place(new: Path, path: Path) -> None:
    """Make the complete folder ``new`` appear at ``path`` (same parent folder); an old folder
    at ``path`` is removed once the new one is in place. No moment without a folder at
    ``path``, except on systems without RENAME_EXCHANGE (see :func:`recover`)."""
    if not path.exists():
        os.rename(new, path)
        fsync_dir(path.parent)
        return
    if _renameat2_exchange(new, path):
        fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)   # ``new`` now names the old package
        return
    old = path.parent / f".{path.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path) -> bool:
    """After a crash between the two renames of the fallback in :func:`swap_into_place`:
    when nothing is at ``path`` and exactly one moved-aside old package is beside it, move it
    back. Returns whether it did."""
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return False
    olds = [p for p in path.parent.iterdir()
            if p.name.startswith(f".{path.name}{OLD_MARK}") and p.is_dir()
            and not p.is_symlink()]
    if len(olds) != 1:
        return False
    os.rename(olds[0], path)
    fsync_dir(path.parent)
    return True


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporary folders beside ``path``."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> list[str]:
    """Remove what a save of ``path`` that crashed left beside it: its temporary folder
    (``.NAME.PID.*.tmp``) and, once ``path`` is in place again, a moved-aside old package
    (``.NAME.old-PID-*``), each only if process PID is gone. Returns the names removed."""
    import re

    if not path.parent.is_dir():
        return []
    name = re.escape(path.name)
    tmp = re.compile(rf"^\.{name}\.(\d+)\..*\.tmp$")
    old = re.compile(rf"^\.{name}{re.escape(OLD_MARK)}(\d+)-[0-9a-f]+$")
    removed = []
    for p in path.parent.iterdir():
        m = tmp.match(p.name) or (old.match(p.name) if path.is_dir() else None)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(path: str | os.PathLike, data: bytes, *, mode: int = 0o644,
                 check: Any = None) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, written and
    fsynced, then renamed over ``path`` (and the folder fsynced). ``check()``, when given,
    runs just before the rename (e.g. that nothing of someone else's appeared at ``path``);
    if anything raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if check is not None:
            check()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
