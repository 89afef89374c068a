"""The over-the-air delta file (``.npkd``): its container, and how its segments rebuild a file.

A delta turns one installed package (the *base*, named by the sha256 of its ``manifest.json``)
into another (the *result*). On disk it is one file::

    MAGIC (12 bytes) | header_len, sig_len, payload_len (3 x u64, little-endian)
    | header (JSON, header_len bytes) | signature (sig_len bytes; 0 = unsigned) | payload

The header says, for every file of the result package (``manifest.json`` and ``model.sig``
included), its sha256 and size, and how to rebuild it as a list of *segments*, concatenated:

    {"op": "copy",  "src": [file, offset, length]}              bytes of a base file, verbatim
    {"op": "bsdiff", "src": [...], "blob": i, "bytes": n}       bsdiff4 patch of that range
    {"op": "zstd-ref", "src": [...], "blob": i, "bytes": n}     zstd frame whose dictionary is
                                                                that range (zstd --patch-from)
    {"op": "zstd", "blob": i, "bytes": n}                       zstd frame, no reference

``blob`` i is ``payload[blobs[i][0] : blobs[i][0] + blobs[i][1]]``. Segments may carry a
``tensor`` name (what they rebuild, for reports). The signature is ``model.sig``'s format
(``runtime/signing.py``: OpenSSF model-signing, ECDSA) over two digests, ``delta.json`` (the
header) and ``payload.bin``; an unsigned delta states the payload's sha256 in its header
instead, so damage is still found (but nobody vouches for it).

Everything here reads untrusted bytes: sizes are checked against the file and the limits
before anything is allocated by them, and every rebuilt segment must have the size the header
states.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PackageError
from .manifest_schema import LIMITS, json_depth
from .package_io import read_regular

__all__ = ["MAGIC", "DELTA_FORMAT_VERSION", "DELTA_HEADER", "DELTA_PAYLOAD", "UpdateError",
           "Delta", "read_delta", "encode_delta", "header_bytes_of", "rebuild_file", "zstd_compress",
           "SEGMENT_OPS"]

MAGIC = b"NPUCC-DELTA\n"
DELTA_FORMAT_VERSION = 1
DELTA_HEADER = "delta.json"      # the names the signature lists
DELTA_PAYLOAD = "payload.bin"
SEGMENT_OPS = ("copy", "bsdiff", "zstd-ref", "zstd")
_SIZES = struct.Struct("<QQQ")
MAX_HEADER_BYTES = 64 << 20
MAX_DELTA_BYTES = 64 << 30
_ZSTD_MAX_WINDOW = 1 << 31


class UpdateError(PackageError):
    """An update that cannot be applied: wrong base, a downgrade, a damaged delta."""


@dataclass
class Delta:
    """A parsed delta file: header dict, signature bytes (b"" when unsigned), payload."""

    header: dict[str, Any]
    header_bytes: bytes
    signature: bytes
    payload: bytes
    where: str

    def digests(self) -> dict[str, str]:
        """What the signature covers: sha256 of the header and of the payload."""
        return {DELTA_HEADER: hashlib.sha256(self.header_bytes).hexdigest(),
                DELTA_PAYLOAD: hashlib.sha256(self.payload).hexdigest()}

    def blob(self, i: Any) -> bytes:
        blobs = self.header["blobs"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blobs):
            raise UpdateError(f"{self.where}: a segment names blob {i!r}; the delta has "
                              f"{len(blobs)}")
        off, n = blobs[i]
        return self.payload[off:off + n]


def encode_delta(header: Mapping[str, Any], payload: bytes, signature: bytes = b"") -> bytes:
    """The bytes of a delta file (see the module docstring); ``header`` as made by
    ``compiler.update.make_update``."""
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + _SIZES.pack(len(hb), len(signature), len(payload)) + hb + signature + payload


def header_bytes_of(header: Mapping[str, Any]) -> bytes:
    """The header exactly as :func:`encode_delta` writes it (what gets signed)."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def read_delta(path: str | os.PathLike) -> Delta:
    """Read and parse the delta file at ``path`` (a regular file, not a link), checking its
    container and header shape; the signature is *not* checked here (``runtime.update``)."""
    where = str(path)
    data = read_regular(None, os.fspath(path), MAX_DELTA_BYTES, where)
    n0 = len(MAGIC) + _SIZES.size
    if len(data) < n0 or not data.startswith(MAGIC):
        raise UpdateError(f"{where} is not an npucc delta (no {MAGIC[:-1].decode()} header); "
                          f"make one with `npucc update make`")
    hlen, slen, plen = _SIZES.unpack_from(data, len(MAGIC))
    if hlen > MAX_HEADER_BYTES or slen > 1 << 20 or n0 + hlen + slen + plen != len(data):
        raise UpdateError(f"{where}: the delta is truncated or damaged (its sections state "
                          f"{hlen} + {slen} + {plen} bytes; the file holds {len(data) - n0})")
    hb = data[n0:n0 + hlen]
    sig = data[n0 + hlen:n0 + hlen + slen]
    payload = data[n0 + hlen + slen:]
    if json_depth(hb) > LIMITS["depth"]:
        raise UpdateError(f"{where}: the delta header nests too deep")
    try:
        header = json.loads(hb)
    except (ValueError, RecursionError) as e:
        raise UpdateError(f"{where}: the delta header is not valid JSON ({e}); damaged") from None
    _check_header(header, len(payload), where)
    return Delta(header, hb, sig, payload, where)


def _bad(where: str, why: str) -> UpdateError:
    return UpdateError(f"{where}: malformed delta header: {why}")


def _check_header(h: Any, payload_len: int, where: str) -> None:
    if not isinstance(h, dict) or h.get("format") != "npucc-delta":
        raise _bad(where, "not an npucc delta header")
    if h.get("format_version") != DELTA_FORMAT_VERSION:
        raise UpdateError(f"{where}: delta format version {h.get('format_version')!r} is not "
                          f"supported (this runtime reads {DELTA_FORMAT_VERSION})")
    for k in ("base", "result", "files", "blobs"):
        if k not in h:
            raise _bad(where, f"missing {k!r}")
    for side in ("base", "result"):
        d = h[side].get("manifest_sha256") if isinstance(h[side], dict) else None
        if not isinstance(d, str) or len(d) != 64:
            raise _bad(where, f"{side}.manifest_sha256")
    blobs = h["blobs"]
    if not isinstance(blobs, list) or len(blobs) > LIMITS["list"]:
        raise _bad(where, "blobs is not a list")
    for b in blobs:
        if (not isinstance(b, list) or len(b) != 2 or
                not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in b)
                or b[0] + b[1] > payload_len):
            raise _bad(where, f"blob {b!r} lies outside the payload of {payload_len} bytes")
    files = h["result"].get("files")
    if not isinstance(files, dict) or not isinstance(h["files"], dict) or \
            set(files) != set(h["files"]) or len(files) > LIMITS["files"] + 2:
        raise _bad(where, "result.files and files do not name the same files")
    for name, e in files.items():
        if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or \
                not isinstance(e.get("bytes"), int) or not 0 <= e["bytes"] <= LIMITS["file_bytes"]:
            raise _bad(where, f"result.files[{name!r}]")
        segs = h["files"][name]
        if not isinstance(segs, list) or any(
                not isinstance(s, dict) or s.get("op") not in SEGMENT_OPS for s in segs):
            raise _bad(where, f"files[{name!r}]: segments must be objects with op in "
                       f"{SEGMENT_OPS}")


def _source(seg: Mapping[str, Any], base: Mapping[str, bytes], where: str) -> bytes:
    src = seg.get("src")
    if not (isinstance(src, list) and len(src) == 3 and isinstance(src[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in src[1:])):
        raise UpdateError(f"{where}: segment source {src!r} is not [file, offset, length]")
    name, off, n = src
    if name not in base:
        raise UpdateError(f"{where}: a segment copies from {name!r}, which the installed "
                          f"package does not have")
    data = base[name]
    if off + n > len(data):
        raise UpdateError(f"{where}: a segment reads {name}[{off}:{off + n}], past its "
                          f"{len(data)} bytes")
    return data[off:off + n]


def _zstd():
    import zstandard

    return zstandard


def zstd_compress(data: bytes, ref: bytes | None = None, level: int = 19) -> bytes:
    """One zstd frame of ``data`` (content size recorded); with ``ref``, compressed against
    it as a raw-content dictionary, as ``zstd --patch-from=ref`` does (window covering it)."""
    zstandard = _zstd()
    wlog = max(10, min(30, (max(len(data), len(ref or b"")) - 1).bit_length() + 1))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=wlog, enable_ldm=len(data) > (8 << 20), threads=0)
    if ref is None:
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    d = zstandard.ZstdCompressionDict(ref, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(data)


def _zstd_decompress(blob: bytes, n: int, ref: bytes | None, where: str) -> bytes:
    zstandard = _zstd()
    try:
        d = (zstandard.ZstdCompressionDict(ref, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if ref is not None else None)
        dec = zstandard.ZstdDecompressor(dict_data=d, max_window_size=_ZSTD_MAX_WINDOW)
        params = zstandard.get_frame_parameters(blob)
        if params.content_size != n:
            raise UpdateError(f"{where}: a zstd segment holds {params.content_size} bytes; "
                              f"the header says {n}")
        return dec.decompress(blob, max_output_size=n)
    except zstandard.ZstdError as e:
        raise UpdateError(f"{where}: a zstd segment does not decode ({e}); the delta is "
                          f"damaged or was made for another package") from None


def _bsdiff_patch(src: bytes, patch: bytes, n: int, where: str) -> bytes:
    import bsdiff4

    # BSDIFF40, then three int64 (control, diff lengths, then the new size): check the size
    # before bsdiff4 allocates it
    if len(patch) < 32 or patch[:8] != b"BSDIFF40" or \
            int.from_bytes(patch[24:32], "little") != n:
        raise UpdateError(f"{where}: a bsdiff segment is not a BSDIFF40 patch to {n} bytes")
    try:
        return bsdiff4.patch(src, patch)
    except (ValueError, OSError) as e:   # bz2 errors are OSError
        raise UpdateError(f"{where}: a bsdiff segment does not apply ({e})") from None


def rebuild_file(delta: Delta, name: str, base: Mapping[str, bytes]) -> bytes:
    """The bytes of result file ``name``: its segments applied to the base files' bytes;
    checked against the size and sha256 the header states."""
    where = f"{delta.where}: {name}"
    entry = delta.header["result"]["files"][name]
    parts, total = [], 0
    for seg in delta.header["files"][name]:
        op = seg["op"]
        if op == "copy":
            out = _source(seg, base, where)
        else:
            n = seg.get("bytes")
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= entry["bytes"]:
                raise UpdateError(f"{where}: a segment's size {n!r} is not within the file's "
                                  f"{entry['bytes']} bytes")
            blob = delta.blob(seg.get("blob"))
            if op == "bsdiff":
                out = _bsdiff_patch(_source(seg, base, where), blob, n, where)
            else:
                ref = _source(seg, base, where) if op == "zstd-ref" else None
                out = _zstd_decompress(blob, n, ref, where)
            if len(out) != n:
                raise UpdateError(f"{where}: a segment rebuilt {len(out)} bytes, not {n}")
        total += len(out)
        if total > entry["bytes"]:
            raise UpdateError(f"{where}: the segments rebuild more than the {entry['bytes']} "
                              f"bytes the header states")
        parts.append(out)
    data = b"".join(parts)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UpdateError(f"{where}: the rebuilt file does not match its sha256 in the delta "
                          f"(the delta is damaged, or the installed package is not its base)")
    return data
