"""Sample sets (calibration data) as files, and how pipeline text names them.

A pass that needs data names it in its options, never through a side channel, so the
pipeline text alone says what it ran on:

- ``quantize{calibration=@calibration}``: the sample set bound to the name ``calibration``
  (``compile(..., calibration=...)`` binds it; ``npucc opt --calibration FILE.npz`` binds it
  from a file, and ``--calibration NAME=FILE.npz`` any other name);
- ``quantize{calibration=calib.npz}``: a file, read when the pass runs.

A sample set is a list of ``{input name: array}`` dicts. Its file is one ``.npz`` whose arrays
are named ``<index>/<input name>`` (``np.savez``); a file whose names have no ``/`` is one
sample (``npucc opt --inputs`` writes those).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError

__all__ = ["Samples", "load_samples", "save_samples", "resolve_samples", "sample_refs"]

Samples = list[dict[str, np.ndarray]]


def save_samples(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``samples`` to ``path`` (.npz, atomically); returns the path."""
    from compiler.ir.serialize import atomic_write

    arrays: dict[str, np.ndarray] = {}
    for i, sample in enumerate(samples):
        for name, value in sample.items():
            arrays[f"{i}/{name}"] = np.asarray(value)
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return path


def load_samples(path: str | os.PathLike) -> Samples:
    """The sample set in ``path`` (see the module docstring)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise NpuccError(f"cannot read the sample set {path}: {e}") from None
    if not any("/" in k for k in arrays):
        return [arrays]
    by_index: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        index, _, name = key.partition("/")
        if not index.isdigit() or not name:
            raise NpuccError(f"sample set {path}: array {key!r} is not named "
                             "'<index>/<input name>'")
        by_index.setdefault(int(index), {})[name] = arr
    return [by_index[i] for i in sorted(by_index)]


def resolve_samples(ref: str, resources: Mapping[str, Any], what: str) -> Samples:
    """The sample set that option text ``ref`` names: ``@name`` (bound in ``resources``) or a
    file path. ``what`` names the option in errors (``"quantize{calibration=...}"``)."""
    if ref.startswith("@"):
        name = ref[1:]
        if name not in resources:
            bound = ", ".join(f"@{k}" for k in sorted(resources)) or "none"
            raise NpuccError(
                f"{what}: no sample set is bound to {ref!r} (bound: {bound}); give it with "
                f"compile(..., calibration=...) or `npucc opt --calibration {name}=FILE.npz`")
        return [dict(s) for s in resources[name]]
    path = Path(ref)
    if not path.is_file():
        raise NpuccError(f"{what}: sample file {ref!r} does not exist (give an .npz file, or "
                         "@name for a set bound with --calibration)")
    return load_samples(path)


def sample_refs(option_values: Iterable[Any]) -> list[str]:
    """The ``@name`` references among a pass's option values."""
    return [v[1:] for v in option_values if isinstance(v, str) and v.startswith("@")]
