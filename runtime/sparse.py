"""Compact storage of sparse weights in a package: bitmask or CSR, whichever is smaller.

A weight with many zero entries (a pruned model's) is stored as its non-zero values plus

- ``bitmask``: one bit per entry (``np.packbits`` of the non-zero mask, C order), or
- ``csr``: rows = the first axis (1 for a vector), ``indptr`` (u32, rows + 1) and column
  ``indices`` (u16 when the row length fits, else u32),

whichever takes fewer bytes, and only when that is fewer than dense. "Zero" is the all-zero
bit pattern, so ``-0.0`` and NaN are values and the round trip is bit exact. Safetensors keys:
``<key>`` holds the values (1-D, the weight's dtype), ``<key>.__mask`` / ``<key>.__indptr`` +
``<key>.__indices`` the structure; the manifest's ``weight_encoding[key]`` records
``{encoding, dtype, shape, nnz}``. Everything here is numpy only (the runtime never imports the
compiler).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ENCODINGS", "encode", "decode_all", "encoded_nbytes", "nonzero_mask"]

ENCODINGS = ("bitmask", "csr")
_SUFFIXES = (".__mask", ".__indptr", ".__indices")


def nonzero_mask(arr: np.ndarray) -> np.ndarray:
    """Entries whose bits are not all zero."""
    a = np.ascontiguousarray(arr)
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind in "fiub":
        return a.view(f"u{a.dtype.itemsize}") != 0
    return a != 0


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    size = int(np.prod(shape)) if shape else 1
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (size // rows if rows else 0)


def encoded_nbytes(arr: np.ndarray) -> dict[str, int]:
    """Stored bytes of ``arr`` per encoding (``dense`` too)."""
    mask = nonzero_mask(arr)
    nnz = int(mask.sum())
    rows, cols = _rows(arr.shape)
    isz = arr.dtype.itemsize
    return {"dense": int(arr.nbytes),
            "bitmask": -(-arr.size // 8) + nnz * isz,
            "csr": nnz * (isz + (2 if cols <= 65536 else 4)) + (rows + 1) * 4}


def encode(key: str, arr: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Safetensors entries for weight ``key`` and its manifest record (None: stored dense)."""
    arr = np.ascontiguousarray(arr)
    if arr.size == 0 or arr.dtype.kind not in "fiu" or not arr.dtype.isnative:
        return {key: arr}, None
    sizes = encoded_nbytes(arr)
    best = min(ENCODINGS, key=lambda e: sizes[e])
    if sizes[best] >= sizes["dense"]:
        return {key: arr}, None
    mask = nonzero_mask(arr)
    flat = arr.reshape(-1)
    rec = {"encoding": best, "dtype": arr.dtype.name, "shape": list(arr.shape),
           "nnz": int(mask.sum())}
    out = {key: flat[mask.reshape(-1)]}
    if best == "bitmask":
        out[key + ".__mask"] = np.packbits(mask.reshape(-1))
    else:
        rows, cols = _rows(arr.shape)
        m2 = mask.reshape(rows, cols)
        out[key + ".__indptr"] = np.concatenate([[0], np.cumsum(m2.sum(1))]).astype(np.uint32)
        out[key + ".__indices"] = np.nonzero(m2)[1].astype(np.uint16 if cols <= 65536
                                                           else np.uint32)
    return out, rec


def _decode(key: str, rec: Mapping[str, Any], stored: Mapping[str, np.ndarray]) -> np.ndarray:
    shape = tuple(int(d) for d in rec["shape"])
    dtype = np.dtype(rec["dtype"])
    size = int(np.prod(shape)) if shape else 1
    values = np.asarray(stored[key]).view(dtype).reshape(-1)
    if values.size != int(rec["nnz"]):
        raise ValueError(f"weight {key!r}: {values.size} stored values, manifest says "
                         f"{rec['nnz']}")
    out = np.zeros(size, dtype=dtype)
    if rec["encoding"] == "bitmask":
        mask = np.unpackbits(np.asarray(stored[key + ".__mask"]), count=size).astype(bool)
        if int(mask.sum()) != values.size:
            raise ValueError(f"weight {key!r}: bitmask has {int(mask.sum())} entries set, "
                             f"{values.size} values stored")
        out[mask] = values
    elif rec["encoding"] == "csr":
        rows, cols = _rows(shape)
        indptr = np.asarray(stored[key + ".__indptr"]).astype(np.int64)
        idx = np.asarray(stored[key + ".__indices"]).astype(np.int64)
        if indptr.size != rows + 1 or indptr[-1] != values.size or idx.size != values.size \
                or (idx.size and idx.max() >= cols):
            raise ValueError(f"weight {key!r}: inconsistent CSR structure")
        row_of = np.repeat(np.arange(rows), np.diff(indptr))
        out[row_of * cols + idx] = values
    else:
        raise ValueError(f"weight {key!r}: unknown encoding {rec['encoding']!r}; known: "
                         f"{', '.join(ENCODINGS)}")
    return out.reshape(shape)


def decode_all(stored: Mapping[str, np.ndarray], encoding: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, np.ndarray]:
    """The dense weights from the stored safetensors entries and the manifest records."""
    out = {k: v for k, v in stored.items() if not k.endswith(_SUFFIXES)}
    for key, rec in encoding.items():
        out[key] = _decode(key, rec, stored)
    return out
