"""LLM packages: two step graphs (prefill, decode) over one weights file and one KV cache.

A package is a directory ``X.npkg/``::

    llm.json          format, target, model facts, the two graphs' plans, state, weights index,
                      sha256 and size of every other file
    prefill.so        kernels of the prefill graph (T tokens per call)
    decode.so         kernels of the decode graph (1 token per call)
    weights.bin       every weight once, each at a 64-byte aligned offset; memory-mapped by the
                      runtime (copy-on-write pages: never read into Python memory, shared with
                      the page cache, resident only where touched)
    tokenizer.json    (optional) the tokenizers-library tokenizer

``llm.json`` (format ``npucc-llm``, version 1)::

    target:  {name, tvm, arch}
    model:   {arch, vocab, layers, kv_heads, head_dim, max_context, chunk, bos_id, eos_ids,
              chat_template, quantize, name}
    weights: {key: {offset, nbytes, dtype, shape}}          (offsets into weights.bin)
    state:   {name: {shape, dtype}}                          (the KV cache, per layer k and v)
    graphs:  {prefill | decode: {library, tokens, arena_bytes, steps: [{kernel, node, op, args}],
              tensors: {name: {shape, dtype, bind, offset?, key?}}}}
             ``bind``: "arena" (``offset`` into the graph's arena), "weight" (``key`` in
             weights) or "state" (``key`` in state: the cache and its in-place update share
             it); ``args`` are tensor names in call order (operands, then results)
    files:   {filename: {sha256, bytes}}

    model.sig         (optional) the signature: ``npucc sign`` / :func:`sign_llm_package`,
                      OpenSSF model-signing format over llm.json and every file it lists

Loading (:meth:`LlmPackage.load`, :func:`read_verified_llm`) follows the rules of other
packages (``runtime/package_load.py``): the folder is opened once, links and special files are
refused, every file is read once (weights.bin mapped once) and its sha256 taken over those
bytes, the signature is checked against trusted keys when there are any, and each kernel
library is loaded from a sealed in-memory copy of the verified bytes after its ELF machine,
instruction set and exports are checked — before any of its code runs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import _dtypes
from ._elf import exported_symbols
from ._verify import check_arch
from .errors import (
    FormatVersionError,
    IntegrityError,
    PackageError,
    SignatureError,
)
from .memory_pool import ALIGN, align
from .package_io import PackageReader, SealedLibrary, check_file_name
from .package_load import check_signed_files
from .signing import (
    SIGNATURE_FILE,
    load_private_key,
    signature_bytes,
    trusted_keys,
)

__all__ = ["LLM_MANIFEST", "LlmPackage", "write_llm_package", "WEIGHTS_BIN",
           "read_verified_llm", "sign_llm_package", "is_llm_package", "dtype_name",
           "tensor_nbytes"]

LLM_MANIFEST = "llm.json"
WEIGHTS_BIN = "weights.bin"
TOKENIZER = "tokenizer.json"
FORMAT = "npucc-llm"
VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20


def dtype_name(dtype: Any) -> str:
    """The manifest's name of a dtype (``f32``, ``i8``, ...): what ``llm.json`` records."""
    return _dtypes.canonical(dtype)


def tensor_nbytes(shape: Any, dtype: str) -> int:
    """Bytes of a tensor of ``shape`` and manifest dtype ``dtype`` (sub-byte types packed)."""
    return _dtypes.nbytes(shape, dtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_llm_package(path: str | os.PathLike, manifest: Mapping[str, Any],
                      weights: Mapping[str, np.ndarray], libraries: Mapping[str, Path],
                      tokenizer_json: str | None = None) -> Path:
    """Write a package directory atomically (built beside ``path``, renamed into place).

    ``manifest``: llm.json without ``weights`` and ``files``; ``weights``: key -> array;
    ``libraries``: file name in the package -> built library.
    """
    path = Path(path)
    if path.exists() and not (path / LLM_MANIFEST).is_file():
        raise PackageError(f"refusing to replace {path}: it exists and is not an LLM package")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        index: dict[str, Any] = {}
        with open(tmp / WEIGHTS_BIN, "wb") as f:
            offset = 0
            for key, arr in weights.items():
                arr = np.ascontiguousarray(arr)
                f.write(b"\0" * (align(offset) - offset))
                offset = align(offset)
                f.write(arr.tobytes())
                index[key] = {"offset": offset, "nbytes": arr.nbytes,
                              "dtype": _dtypes.canonical(arr.dtype), "shape": list(arr.shape)}
                offset += arr.nbytes
        for name, src in libraries.items():
            shutil.copyfile(src, tmp / name)
        names = [WEIGHTS_BIN, *libraries]
        if tokenizer_json is not None:
            (tmp / TOKENIZER).write_text(tokenizer_json)
            names.append(TOKENIZER)
        full = {"format": FORMAT, "format_version": VERSION, **manifest, "weights": index,
                "files": {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size}
                          for n in names}}
        (tmp / LLM_MANIFEST).write_text(json.dumps(full, indent=1))
        if path.exists():
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class LlmPackage:
    """A verified LLM package (see the module docstring): its manifest, its kernel libraries
    as sealed in-memory files, and the one memory map of weights.bin that was hashed."""

    def __init__(self, directory: Path, manifest: dict[str, Any],
                 libraries: dict[str, SealedLibrary], weights_map: Any,
                 signed_by: Any = None, tokenizer: str | None = None):
        self.directory = directory
        self.manifest = manifest
        self.libraries = libraries
        self._weights_map = weights_map
        self._tokenizer = tokenizer
        self.signed_by = signed_by

    @classmethod
    def load(cls, path: str | os.PathLike, trusted_keys: Any = None, *,
             written_here: bool = False) -> LlmPackage:
        """Verify, then hold exactly what was verified (:func:`read_verified_llm`); each
        kernel library's ELF machine, instruction set and exports are checked on its sealed
        bytes before anything could dlopen it. ``written_here``: the package this process
        just compiled (``compile_llm``): hashes and libraries are checked, the signature
        question is not asked (it cannot be signed yet)."""
        path = Path(path)
        manifest, blobs, mapped, signer = read_verified_llm(path, trusted_keys,
                                                            written_here=written_here)
        libraries: dict[str, SealedLibrary] = {}
        try:
            for spec in manifest["graphs"].values():
                name = spec["library"]
                if name in libraries:
                    continue
                lib = libraries[name] = SealedLibrary(blobs[name], name)
                check_arch(lib.path, manifest, where=path / name)
                _check_exports(blobs[name], spec, path / name)
        except BaseException:
            for lib in libraries.values():
                lib.close()
            raise
        tok = blobs.get(TOKENIZER)
        return cls(path, manifest, libraries, mapped, signer,
                   tok.decode("utf-8") if tok is not None else None)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def weights_mapping(self) -> Any:
        """The copy-on-write memory map of weights.bin whose bytes were hashed (None when
        the file is empty); every weight is a view of it."""
        return self._weights_map

    def tokenizer_json(self) -> str | None:
        return self._tokenizer

    def map_weights(self) -> dict[str, np.ndarray]:
        """Every weight as a view of the verified copy-on-write memory map of weights.bin."""
        if self._weights_map is None:
            return {}
        mm = np.frombuffer(self._weights_map, dtype=np.uint8)
        size = mm.nbytes
        if mm.ctypes.data % ALIGN:
            raise PackageError("weights.bin was not mapped at an aligned address")
        out = {}
        for key, e in self.manifest["weights"].items():
            try:
                off, nb = int(e["offset"]), int(e["nbytes"])
            except (KeyError, TypeError, ValueError):
                raise PackageError(f"weight {key!r}: its index entry is malformed") from None
            if off % ALIGN or off < 0 or nb < 0 or off + nb > size:
                raise PackageError(f"weight {key!r} lies outside weights.bin or is unaligned")
            out[key] = mm[off:off + nb]
        return out

    def size_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.manifest["files"].values())


def _check_exports(lib: bytes, spec: dict[str, Any], where: Path) -> None:
    """Every kernel the graph calls is exported by its library, read from the ELF symbol table
    (a foreign library is refused before its constructors could run at dlopen)."""
    have = {n.removeprefix("__tvm_ffi_") for n in exported_symbols(lib, str(where))
            if n.startswith("__tvm_ffi_")}
    missing = sorted({s["kernel"] for s in spec["steps"]} - have)
    if missing:
        raise PackageError(f"{where}: kernel {missing[0]!r} is not exported by the library "
                           f"({len(missing)} missing); refusing to load it")


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PackageError(f"{where}/{LLM_MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{where}/{LLM_MANIFEST} is not an npucc LLM manifest")
    if manifest.get("format_version") != VERSION:
        raise FormatVersionError(f"{where}: LLM package version "
                                 f"{manifest.get('format_version')!r} is not supported "
                                 f"(supported: {VERSION})")
    files, graphs = manifest.get("files"), manifest.get("graphs")
    if not isinstance(files, dict) or not isinstance(graphs, dict) or not graphs \
            or not all(isinstance(g, dict) and isinstance(g.get("library"), str)
                       and isinstance(g.get("steps"), list) for g in graphs.values()):
        raise PackageError(f"{where}/{LLM_MANIFEST}: 'files' and 'graphs' are malformed")
    for name, entry in files.items():
        check_file_name(name, where)
        if "/" in name or name in (LLM_MANIFEST, SIGNATURE_FILE):
            raise PackageError(f"{where}: manifest names file {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0:
            raise PackageError(f"{where}: manifest entry of {name} needs sha256 and bytes")
    needed = {WEIGHTS_BIN} | {g["library"] for g in graphs.values()}
    if needed - set(files):
        raise PackageError(f"{where}: manifest lists no sha256 for {sorted(needed - set(files))}")
    return manifest


def _map_and_hash(dir_fd: int, name: str, size: int, where: str) -> tuple[Any, str]:
    """weights.bin opened once (relative to the package folder, no links), checked to be a
    regular file of the stated size, mapped copy-on-write, and hashed over that mapping: the
    pages hashed are the pages the kernels read. (A later write into the same file by someone
    who may write it would show through pages not yet touched; replacing the file does not.)"""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError(f"{where}: file {name} is missing") from None
    except OSError as e:
        raise PackageError(f"{where}: cannot open {name} ({e}); packages may not contain "
                           f"links") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{where}: {name} is not a regular file; refusing to read it")
        if st.st_size != size:
            raise IntegrityError(f"{where}: file {name} has {st.st_size} bytes; the manifest "
                                 f"says {size} (damaged or modified); refusing to load")
        if size == 0:
            return None, hashlib.sha256(b"").hexdigest()
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, hashlib.sha256(mm).hexdigest()


def read_verified_llm(path: str | os.PathLike, keys: Any = None, *,
                      require_signature: bool = False, for_signing: bool = False,
                      written_here: bool = False
                      ) -> tuple[dict[str, Any], dict[str, bytes], Any, Any]:
    """Check an LLM package, loading nothing: ``(manifest, bytes of llm.json and of every
    listed file but weights.bin, the memory map of weights.bin, the key that signed or None)``.

    The same rules as other packages (``runtime/package_load.py``): the folder is opened
    once and links or special files are refused; ``llm.json`` and every file it lists are
    read once (weights.bin mapped once) and hashed over those bytes; with trusted keys (the
    argument, else ``NPUCC_TRUSTED_KEYS`` or the per-user folder) ``model.sig`` must be signed
    by one of them over exactly these files and digests, and a file nobody listed is refused;
    without keys the package loads with a one-time :class:`UnverifiedPackageWarning`.
    ``require_signature``: refuse when no key is configured (``npucc verify``);
    ``for_signing``: ignore any signature, refuse unlisted files (``npucc sign``);
    ``written_here``: see :meth:`LlmPackage.load`."""
    path = Path(path)
    where = str(path)
    keys = [] if for_signing or written_here else trusted_keys(keys)
    if require_signature and not keys:
        raise SignatureError(f"{where}: no trusted public key given to verify against")
    reader = PackageReader(path, where)
    mapped = None
    try:
        if LLM_MANIFEST not in reader.names:
            raise PackageError(f"{path} is not an LLM package: no {LLM_MANIFEST} in it "
                               f"(compile one with `npucc compile-llm MODEL.gguf -o {path}`)")
        raw = reader.read(LLM_MANIFEST, MAX_MANIFEST_BYTES)
        manifest = _parse_manifest(raw, where)
        digests = {LLM_MANIFEST: hashlib.sha256(raw).hexdigest()}
        blobs: dict[str, bytes] = {LLM_MANIFEST: raw}
        for name, entry in manifest["files"].items():
            if name == WEIGHTS_BIN:
                mapped, digests[name] = _map_and_hash(reader.fd, name, entry["bytes"], where)
            else:
                blobs[name] = reader.read(name, entry["bytes"], exact=True)
                digests[name] = hashlib.sha256(blobs[name]).hexdigest()
            if digests[name] != entry["sha256"]:
                raise IntegrityError(f"{where}: file {name} does not match its sha256 in the "
                                     f"manifest (damaged or modified); refusing to load")
        signer = None if written_here else check_signed_files(
            reader, manifest, keys, where, for_signing, manifest_name=LLM_MANIFEST,
            digests=digests)
    except BaseException:
        if mapped is not None:
            mapped.close()
        raise
    finally:
        reader.close()
    return manifest, blobs, mapped, signer


def sign_llm_package(path: str | os.PathLike, sign_key: Any,
                     password: bytes | None = None) -> Path:
    """Sign the LLM package folder ``path`` in place (``npucc sign``): check every file
    against ``llm.json`` (and that no file is unlisted), then write ``model.sig``
    (OpenSSF model-signing format, ``runtime/signing.py``) atomically over exactly the
    digests checked. Returns the signature's path."""
    path = Path(path)
    key = load_private_key(sign_key, password)
    manifest, blobs, mapped, _ = read_verified_llm(path, for_signing=True)
    if mapped is not None:
        mapped.close()
    digests = {LLM_MANIFEST: hashlib.sha256(blobs[LLM_MANIFEST]).hexdigest(),
               **{n: e["sha256"] for n, e in manifest["files"].items()}}
    sig = signature_bytes(digests, key, Path(os.path.abspath(path)).name)
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sig)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path / SIGNATURE_FILE


def is_llm_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an LLM manifest (``llm.json``)."""
    return (Path(path) / LLM_MANIFEST).is_file()
