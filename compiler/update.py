"""Making an over-the-air delta between two packages: ``make_update(old, new, out, key)``.

The delta (format: ``runtime/delta_format.py``) rebuilds every file of NEW from OLD's files:

- a file of NEW whose bytes are a file of OLD is one ``copy`` segment (referenced, no bytes);
- ``weights.safetensors`` is cut at its tensors: the header, then each tensor's bytes in file
  order. A tensor whose bytes are a tensor of OLD (any name) is a ``copy`` of that range; a
  changed tensor is the smallest of a bsdiff4 patch against OLD's tensor of that name, a zstd
  frame with that tensor as dictionary (``zstd --patch-from``), or the tensor zstd-compressed
  whole; a new tensor is stored whole (zstd);
- a changed kernel library (``*.so``) is stored whole (zstd-compressed): machine code moves
  with every change and a binary diff of it buys little;
- any other changed file (``manifest.json``, ``model.sig``, extras) is the smallest of bsdiff4,
  zstd against OLD's file of that name, or whole.

NEW's ``manifest.json`` and ``model.sig`` travel in the delta as they are, so the applied
package is byte-identical to NEW and carries NEW's own signature. The delta itself is signed
with ``key`` (the header and the payload). bsdiff4 is skipped for ranges over
``BSDIFF_MAX_BYTES`` (its suffix sort needs ~9 bytes of memory per input byte and is slow);
zstd's long-distance matching covers those.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["make_update", "DeltaStats", "BSDIFF_MAX_BYTES"]

BSDIFF_MAX_BYTES = 32 << 20
_SAFETENSORS_MAX_HEADER = 100 << 20


@dataclass
class DeltaStats:
    """What a delta holds: bytes by how each part travels, and the chosen method per tensor."""

    path: Path
    delta_bytes: int
    new_package_bytes: int
    by_op: dict[str, int] = field(default_factory=dict)      # payload bytes by segment op
    copied_bytes: int = 0                                    # NEW's bytes referenced from OLD
    tensors: dict[str, str] = field(default_factory=dict)    # changed tensor -> op chosen

    @property
    def ratio(self) -> float:
        return self.delta_bytes / max(1, self.new_package_bytes)


class _Builder:
    """Accumulates the payload and the header's per-file segment lists."""

    def __init__(self, old: Mapping[str, bytes]):
        self.old = old
        self.payload = bytearray()
        self.blobs: list[list[int]] = []
        self.stats_by_op: dict[str, int] = {}
        self.copied = 0
        self.tensors: dict[str, str] = {}

    def _blob(self, data: bytes) -> int:
        self.blobs.append([len(self.payload), len(data)])
        self.payload += data
        return len(self.blobs) - 1

    def copy(self, src: list, tensor: str | None = None) -> dict[str, Any]:
        self.copied += src[2]
        seg: dict[str, Any] = {"op": "copy", "src": src}
        if tensor is not None:
            seg["tensor"] = tensor
        return seg

    def encoded(self, data: bytes, src: list | None, tensor: str | None = None,
                diff: bool = True) -> dict[str, Any]:
        """The smallest encoding of ``data``: against ``src`` (an OLD range) when given and
        ``diff``, else whole."""
        from runtime.delta_format import zstd_compress

        cands: list[tuple[int, str, bytes]] = [(0, "zstd", zstd_compress(data))]
        if src is not None and diff:
            ref = self.old[src[0]][src[1]:src[1] + src[2]]
            cands.append((1, "zstd-ref", zstd_compress(data, ref)))
            if max(len(ref), len(data)) <= BSDIFF_MAX_BYTES:
                import bsdiff4

                cands.append((2, "bsdiff", bsdiff4.diff(ref, data)))
        _, op, blob = min(cands, key=lambda c: (len(c[2]), c[0]))
        seg: dict[str, Any] = {"op": op, "blob": self._blob(blob), "bytes": len(data)}
        if op != "zstd":
            seg["src"] = src
        if tensor is not None:
            seg["tensor"] = tensor
            self.tensors[tensor] = op
        self.stats_by_op[op] = self.stats_by_op.get(op, 0) + len(blob)
        return seg


def _safetensors_ranges(data: bytes, where: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(data section start, [(tensor, start, end) in file offsets, sorted by start])."""
    if len(data) < 8:
        raise NpuccError(f"{where}: not a safetensors file (shorter than its header length)")
    n = int.from_bytes(data[:8], "little")
    if n > min(_SAFETENSORS_MAX_HEADER, len(data) - 8):
        raise NpuccError(f"{where}: not a safetensors file (header length {n})")
    try:
        header = json.loads(data[8:8 + n])
        ranges = sorted((8 + n + int(v["data_offsets"][0]), 8 + n + int(v["data_offsets"][1]),
                         k) for k, v in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise NpuccError(f"{where}: not a safetensors file ({e})") from None
    return 8 + n, [(k, a, b) for a, b, k in ranges]


def _weights_segments(b: _Builder, name: str, new: bytes) -> list[dict[str, Any]]:
    start, ranges = _safetensors_ranges(new, f"NEW/{name}")
    old_ranges: dict[str, tuple[int, int]] = {}
    by_digest: dict[str, list] = {}
    old_start = 0
    if name in b.old:
        old_start, olds = _safetensors_ranges(b.old[name], f"OLD/{name}")
        for k, s, e in olds:
            old_ranges[k] = (s, e)
            by_digest.setdefault(hashlib.sha256(b.old[name][s:e]).hexdigest(),
                                 [name, s, e - s])
    segs = [b.encoded(new[:start], [name, 0, old_start] if name in b.old else None)]
    pos = start
    for k, s, e in ranges:
        if s < pos or e < s or e > len(new):
            raise NpuccError(f"NEW/{name}: tensor {k} overlaps another or lies outside the file")
        if s > pos:   # bytes between tensors (none in files safetensors writes)
            segs.append(b.encoded(new[pos:s], None))
        chunk = new[s:e]
        hit = by_digest.get(hashlib.sha256(chunk).hexdigest())
        if hit is not None:
            segs.append(b.copy(list(hit), k))
        else:
            src = [name, *old_ranges[k]] if k in old_ranges else None
            if src is not None:
                src = [name, src[1], src[2] - src[1]]
            segs.append(b.encoded(chunk, src, k))
        pos = e
    if pos < len(new):
        segs.append(b.encoded(new[pos:], None))
    return [s for s in segs if s.get("bytes", 1) or s["op"] == "copy"]


def _file_segments(b: _Builder, name: str, new: bytes,
                   old_by_digest: Mapping[str, str]) -> list[dict[str, Any]]:
    from runtime.package import WEIGHTS

    same = old_by_digest.get(hashlib.sha256(new).hexdigest())
    if same is not None:
        return [b.copy([same, 0, len(new)])]
    if name == WEIGHTS or name.endswith(".safetensors"):
        return _weights_segments(b, name, new)
    src = [name, 0, len(b.old[name])] if name in b.old else None
    return [b.encoded(new, src, diff=not name.endswith(".so"))]


def _read_package(path: Path, signature: bool = True
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Every file of package ``path``, checked against its manifest (and its model.sig)."""
    from runtime.package_io import PackageReader
    from runtime.package_load import read_verified
    from runtime.signing import MAX_SIGNATURE_BYTES, SIGNATURE_FILE

    manifest, blobs, _ = read_verified(path, for_signing=True)
    if not signature:
        return manifest, blobs
    reader = PackageReader(path, str(path))
    try:
        if SIGNATURE_FILE in reader.names:
            blobs[SIGNATURE_FILE] = reader.read(SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
    finally:
        reader.close()
    return manifest, blobs


def _write_delta(out: Path, data: bytes) -> None:
    """Write ``out`` atomically; an existing ``out`` is replaced only if it is a delta file
    (by its magic), never anything else."""
    from runtime.delta_format import MAGIC
    from runtime.package_io import replace_file

    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        ours = False
        if stat.S_ISREG(st.st_mode):
            with open(out, "rb") as f:
                ours = f.read(len(MAGIC)) == MAGIC
        if not ours:
            raise NpuccError(f"refusing to replace {out}: it exists and is not an npucc delta; "
                             f"remove it yourself or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, data)


def make_update(old: str | os.PathLike, new: str | os.PathLike, out: str | os.PathLike,
                key: Any = None, password: bytes | None = None) -> DeltaStats:
    """Write the delta that turns package folder ``old`` into ``new`` to file ``out``, signed
    with private key ``key`` (PEM path, bytes or key object; None: unsigned, which a device
    with trusted keys refuses). Both packages are checked against their manifests first.
    With a key, NEW must be signed (the update installs NEW's own signature)."""
    from runtime.delta_format import DELTA_FORMAT_VERSION, encode_delta, header_bytes_of
    from runtime.package import MANIFEST
    from runtime.signing import SIGNATURE_FILE, load_private_key, signature_bytes

    old, new, out = Path(old), Path(new), Path(out)
    priv = load_private_key(key, password) if key is not None else None
    old_m, old_files = _read_package(old, signature=False)
    new_m, new_files = _read_package(new)
    if priv is not None and SIGNATURE_FILE not in new_files:
        raise NpuccError(f"{new} is not signed: an update installs NEW with its own signature, "
                         f"so sign it first (npucc sign {new} --key KEY)")
    # OLD's model.sig is not part of the base (the delta names OLD by its manifest, which a
    # re-signed copy shares): nothing may be rebuilt from it
    b = _Builder(old_files)
    old_by_digest = {hashlib.sha256(d).hexdigest(): n for n, d in sorted(old_files.items())}
    files = {n: _file_segments(b, n, d, old_by_digest) for n, d in sorted(new_files.items())}
    payload = bytes(b.payload)
    header: dict[str, Any] = {
        "format": "npucc-delta", "format_version": DELTA_FORMAT_VERSION,
        "base": {"manifest_sha256": hashlib.sha256(old_files[MANIFEST]).hexdigest(),
                 "version": old_m.get("version")},
        "result": {"manifest_sha256": hashlib.sha256(new_files[MANIFEST]).hexdigest(),
                   "version": new_m.get("version"),
                   "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                             for n, d in sorted(new_files.items())}},
        "files": files,
        "blobs": b.blobs,
    }
    if priv is None:
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        sig = b""
    else:
        from runtime.delta_format import DELTA_HEADER, DELTA_PAYLOAD

        sig = signature_bytes({DELTA_HEADER: hashlib.sha256(header_bytes_of(header)).hexdigest(),
                               DELTA_PAYLOAD: hashlib.sha256(payload).hexdigest()},
                              priv, out.name)
    data = encode_delta(header, payload, sig)
    _write_delta(out, data)
    return DeltaStats(out, len(data), sum(len(d) for d in new_files.values()),
                      dict(b.stats_by_op), b.copied, dict(b.tensors))
