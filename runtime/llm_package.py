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

Loading verifies every file's sha256 before any kernel is loaded, then maps the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import _dtypes
from .errors import FormatVersionError, IntegrityError, PackageError
from .memory_pool import ALIGN, align

__all__ = ["LLM_MANIFEST", "LlmPackage", "write_llm_package", "WEIGHTS_BIN"]

LLM_MANIFEST = "llm.json"
WEIGHTS_BIN = "weights.bin"
TOKENIZER = "tokenizer.json"
FORMAT = "npucc-llm"
VERSION = 1


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
    """A verified LLM package on disk (see the module docstring)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> LlmPackage:
        path = Path(path)
        mf = path / LLM_MANIFEST
        if not mf.is_file():
            raise PackageError(f"{path} is not an LLM package: no {LLM_MANIFEST} in it "
                               f"(compile one with `npucc compile-llm MODEL.gguf -o {path}`)")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PackageError(f"{mf} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackageError(f"{mf} is not an npucc LLM manifest")
        if manifest.get("format_version") != VERSION:
            raise FormatVersionError(f"{path}: LLM package version "
                                     f"{manifest.get('format_version')!r} is not supported "
                                     f"(supported: {VERSION})")
        files = manifest.get("files") or {}
        needed = {WEIGHTS_BIN} | {g["library"] for g in manifest["graphs"].values()}
        if needed - set(files):
            raise PackageError(f"{path}: manifest lists no sha256 for {sorted(needed - set(files))}")
        for name, entry in files.items():
            if "/" in name or name.startswith(".") or "\\" in name:
                raise PackageError(f"{path}: manifest names file {name!r}")
            f = path / name
            if not f.is_file() or f.is_symlink():
                raise IntegrityError(f"{path}: file {name} is missing")
            if _sha256(f) != entry.get("sha256"):
                raise IntegrityError(f"{path}: file {name} does not match its sha256 in the "
                                     f"manifest (damaged or modified); refusing to load")
        return cls(path, manifest)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    def tokenizer_json(self) -> str | None:
        f = self.directory / TOKENIZER
        return f.read_text() if TOKENIZER in self.manifest["files"] else None

    def map_weights(self) -> dict[str, np.ndarray]:
        """Every weight as a view of one copy-on-write memory map of weights.bin."""
        f = self.directory / WEIGHTS_BIN
        size = f.stat().st_size
        if size == 0:
            return {}
        mm = np.memmap(f, dtype=np.uint8, mode="c", shape=(size,))
        if mm.ctypes.data % ALIGN:
            raise PackageError("weights.bin was not mapped at an aligned address")
        out = {}
        for key, e in self.manifest["weights"].items():
            if e["offset"] % ALIGN or e["offset"] + e["nbytes"] > size:
                raise PackageError(f"weight {key!r} lies outside weights.bin or is unaligned")
            out[key] = mm[e["offset"]:e["offset"] + e["nbytes"]]
        return out

    def size_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.manifest["files"].values())
