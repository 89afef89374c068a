"""Files: ``m.ir`` (text) with ``m.safetensors`` (weights) beside it. Writes are atomic.

Writing never destroys a file that is not ours (issue 12):

- :func:`atomic_write` replaces only a regular file (never a device, fifo, socket, folder or
  symbolic link: ``-o /dev/null`` run as root must not turn the device into a file);
- :func:`save` also refuses an output that is one of the inputs (same path or a hard link:
  ``npucc import m.onnx -o m.onnx``), an existing ``.ir`` that is not IR text, and an existing
  ``.safetensors`` that is not ours: ours carry the metadata ``{"format": "npucc-ir-weights",
  "ir": "<name>.ir"}`` (or, written before that marker, sit beside an IR file of the same
  stem).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from compiler.errors import ImportError_, NpuccError
from compiler.ir.graph import Graph

__all__ = ["save", "load", "weights_path", "atomic_write", "check_output", "WEIGHTS_FORMAT"]

WEIGHTS_FORMAT = "npucc-ir-weights"


def weights_path(ir_path: str | os.PathLike) -> Path:
    return Path(ir_path).with_suffix(".safetensors")


def _existing(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse (:class:`NpuccError`) to write ``path`` if it exists and is not a regular file, or
    is one of ``inputs`` (the same file, also through a hard link)."""
    path = Path(path)
    st = _existing(path)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "a device, fifo or socket")
        raise NpuccError(f"refusing to write {path}: it is {kind}, not a regular file")
    for src in inputs:
        try:
            s = os.stat(src)
        except (OSError, ValueError):
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            raise NpuccError(f"refusing to write {path}: it is the input {src}"
                             f"{' (a hard link to it)' if str(src) != str(path) else ''}; "
                             f"choose another output path")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename; only a
    regular file (or nothing) at ``path`` is replaced."""
    from runtime.package_io import replace_file

    path = Path(path)
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data.encode() if isinstance(data, str) else data)


def _used_weights(graph: Graph) -> dict[str, np.ndarray]:
    refs = [n.attrs["ref"] for n in graph.nodes if n.op == "const" and n.attrs.get("ref")]
    return {r: np.ascontiguousarray(graph.weights[r]) for r in refs if r in graph.weights}


def _is_ir_text(path: Path) -> bool:
    """An existing file we may overwrite with IR: text with a ``graph @`` line near its top."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        text = head.decode()
    except (OSError, UnicodeDecodeError):
        return False
    return any(line.lstrip().startswith("graph @") for line in text.splitlines())


def _safetensors_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file (None if it is not one)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 1 << 24:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    return header.get("__metadata__") or {} if isinstance(header, dict) else None


def check_ir_outputs(path: Path, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """The rules of the module docstring for ``path`` and the ``.safetensors`` beside it."""
    inputs = list(inputs)
    wpath = weights_path(path)
    check_output(path, inputs)
    check_output(wpath, inputs)
    ir_exists = _existing(path) is not None
    if ir_exists and not _is_ir_text(path):
        raise NpuccError(f"refusing to overwrite {path}: it exists and is not an npucc IR file; "
                         f"choose another output path")
    if _existing(wpath) is not None:
        meta = _safetensors_metadata(wpath)
        ours = meta is not None and (
            (meta.get("format") == WEIGHTS_FORMAT and meta.get("ir") == path.name)
            or (not meta and ir_exists))
        if not ours:
            raise NpuccError(f"refusing to overwrite {wpath}: the weights of {path.name} go "
                             f"there, and that file is not one npucc wrote for it; move it or "
                             f"choose another output name")


def save(graph: Graph, path: str | os.PathLike,
         inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write the text to ``path`` and the weights to ``path`` with suffix .safetensors.

    ``inputs``: files the output must not be (the model read, ...). Refuses, before writing
    anything, what the module docstring says it never replaces."""
    from safetensors.numpy import save as st_save

    path = Path(path)
    check_ir_outputs(path, inputs)
    weights = _used_weights(graph)
    meta = {"format": WEIGHTS_FORMAT, "ir": path.name}
    atomic_write(weights_path(path), st_save(weights, metadata=meta))
    atomic_write(path, str(graph))
    return path


def load(path: str | os.PathLike, verify: bool = True) -> Graph:
    """Read ``path`` and the weights beside it (if the file exists), then verify."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from compiler.ir.parser import parse
    from compiler.ir.verify import verify as verify_graph

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise NpuccError(f"cannot read {path}: {e}") from None
    wpath = weights_path(path)
    weights = None
    if wpath.exists():
        try:
            weights = load_file(str(wpath))
        except (SafetensorError, OSError, ValueError) as e:
            raise ImportError_(f"cannot read weights {wpath}: {e}") from None
    graph = parse(text, weights, source=str(path))
    if verify:
        verify_graph(graph)
    return graph
