"""Files: ``m.ir`` (text) with ``m.safetensors`` (weights) beside it. Writes are atomic."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from compiler.errors import ImportError_, NpuccError
from compiler.ir.graph import Graph

__all__ = ["save", "load", "weights_path", "atomic_write"]


def weights_path(ir_path: str | os.PathLike) -> Path:
    return Path(ir_path).with_suffix(".safetensors")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _used_weights(graph: Graph) -> dict[str, np.ndarray]:
    refs = [n.attrs["ref"] for n in graph.nodes if n.op == "const" and n.attrs.get("ref")]
    return {r: np.ascontiguousarray(graph.weights[r]) for r in refs if r in graph.weights}


def save(graph: Graph, path: str | os.PathLike) -> Path:
    """Write the text to ``path`` and the weights to ``path`` with suffix .safetensors."""
    from safetensors.numpy import save as st_save

    path = Path(path)
    weights = _used_weights(graph)
    atomic_write(weights_path(path), st_save(weights) if weights else st_save({}))
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
