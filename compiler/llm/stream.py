"""A transformers safetensors folder -> a quantized :class:`LlmSpec`, one block of rows at a time.

``compile_llm(folder)`` takes this route for a folder holding ``config.json`` and
``*.safetensors`` (one file or shards with ``model.safetensors.index.json``) of a Llama-family
model (Llama, Mistral, SmolLM, Qwen2), unless GPTQ is asked for (its Hessians come from a float
pass of the whole model: the in-memory route, :func:`compiler.llm.compile.load_spec`).

The float model is never in memory: each tensor is read through safetensors' memory-mapped
slices in blocks of rows (at most :data:`BLOCK_BYTES` of f32 at a time), each block quantized
(rows are quantized independently, :func:`compiler.llm.quantize.quantize_projection`, so the
result is the one the whole matrix gives) and written with ``pwrite`` into a scratch file;
the spec's weights are read-only memory maps of that file. Projections the graphs fuse (q, k,
v and gate, up: :mod:`compiler.llm.graphs`) are written concatenated along N, and each
projection is a view of its rows, so building the graphs copies nothing. Python memory while
streaming: a few blocks, whatever the model's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.hf_import import (
    LLAMA_LIKE,
    LLAMA_NAMES,
    LlmSpec,
    finish_spec,
    llama_spec_from_config,
)
from compiler.llm.quantize import Scheme, quantize_projection, quantize_rows, scheme_label

__all__ = ["BLOCK_BYTES", "FUSED", "is_safetensors_folder", "streamable", "stream_spec",
           "ArrayFile"]

BLOCK_BYTES = 32 << 20
FUSED = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))   # as graphs.py fuses them
ALIGN = 64


def is_safetensors_folder(path: Any) -> bool:
    """A folder with a ``config.json`` and at least one ``*.safetensors`` file."""
    if not isinstance(path, str | os.PathLike):
        return False
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def streamable(path: Any) -> bool:
    """Whether :func:`stream_spec` reads ``path``: a safetensors folder of a Llama family."""
    if not is_safetensors_folder(path):
        return False
    try:
        kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return kind in LLAMA_LIKE


class ArrayFile(Mapping):
    """Arrays in one scratch file, each at a 64-byte aligned offset: written once with
    ``pwrite`` (whole, or a block of rows at a time), read back as read-only memory maps
    (:meth:`mapped`) or one array at a time into memory (``self[key]``, what
    :func:`runtime.llm_package.write_llm_package` iterates: one array resident at a time)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._index: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._end = 0

    def reserve(self, key: str, shape: tuple[int, ...], dtype: Any) -> None:
        if key in self._index:
            raise KeyError(f"{key} is already in {self.path}")
        start = -(-self._end // ALIGN) * ALIGN
        dt = np.dtype(dtype)
        self._index[key] = (start, tuple(int(d) for d in shape), dt)
        self._end = start + int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def write(self, key: str, arr: np.ndarray, row: int = 0) -> None:
        """``arr`` into ``key`` from row ``row`` on (the trailing dimensions must match)."""
        start, shape, dt = self._index[key]
        arr = np.ascontiguousarray(arr, dtype=dt)
        if arr.shape[1:] != shape[1:] or row + len(arr) > shape[0]:
            raise ValueError(f"{key}: rows {row}..{row + len(arr)} of {arr.shape} do not fit "
                             f"{shape}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
        view, off = memoryview(arr).cast("B"), start + row * row_bytes
        while view:
            n = os.pwrite(self._fd, view, off)
            view, off = view[n:], off + n

    def __setitem__(self, key: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        self.reserve(key, arr.shape, arr.dtype)
        self.write(key, arr.reshape(arr.shape or (1,)) if arr.ndim == 0 else arr)

    def __getitem__(self, key: str) -> np.ndarray:
        start, shape, dt = self._index[key]
        out = np.empty(shape, dt)
        buf, off = memoryview(out.reshape(-1)).cast("B"), start
        while buf:
            n = os.preadv(self._fd, [buf], off)
            if n <= 0:
                raise OSError(f"{self.path} ends before {key}")
            buf, off = buf[n:], off + n
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def mapped(self) -> dict[str, np.ndarray]:
        """Every array as a read-only view of one memory map of the file."""
        os.ftruncate(self._fd, max(self._end, 1))
        mm = np.memmap(self.path, np.uint8, "r")
        return {k: mm[s:s + int(np.prod(shape, dtype=np.int64)) * dt.itemsize]
                .view(dt).reshape(shape) for k, (s, shape, dt) in self._index.items()}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Tensors:
    """Tensor name -> safetensors file of a folder (sharded or not), read in row blocks."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            wmap = json.loads(index.read_text())["weight_map"]
            self.where = {name: folder / f for name, f in wmap.items()}
        else:
            self.where = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self.where.update((name, f) for name in h.keys())  # noqa: SIM118
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _slice(self, name: str):
        f = self.where.get(name)
        if f is None:
            raise NpuccError(f"tensor {name!r} is not in the safetensors files")
        if f not in self._handles:   # one file mapped at a time: its pages leave with it
            self._handles.clear()
            self._handles[f] = self._open(str(f), framework="pt")
        return self._handles[f].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._slice(name)[start:stop].float().numpy()

    def whole(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self._slice(name)[:].float().numpy()

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, f32 rows) of ``name``, at most BLOCK_BYTES each."""
        n, *rest = self.shape(name)
        step = max(1, BLOCK_BYTES // (4 * int(np.prod(rest, dtype=np.int64)) or 1))
        for r in range(0, n, step):
            yield r, self.rows(name, r, min(n, r + step))


def stream_spec(folder: str | os.PathLike, scheme: Scheme | None, scratch: str | os.PathLike,
                tokenizer: Any = None, progress: Callable[[str], None] | None = None
                ) -> tuple[LlmSpec, ArrayFile]:
    """The spec of the safetensors folder, quantized by ``scheme`` (None: f32), streamed (see
    the module docstring) into ``scratch/spec.bin``. Returns the spec and the file its weights
    map (the caller closes it and deletes the scratch folder when the package is written)."""
    from transformers import AutoConfig

    if scheme is not None and scheme.method != "rtn":
        raise NpuccError(f"the streaming import quantizes round-to-nearest; {scheme.method} "
                         f"needs the in-memory route")
    say = progress or (lambda msg: None)
    folder = Path(folder)
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds
        raise NpuccError(f"cannot read {folder / 'config.json'}: {type(e).__name__}: {e}") \
            from e
    if cfg.model_type not in LLAMA_LIKE:
        raise NpuccError(f"the streaming import reads {', '.join(LLAMA_LIKE)} models, not "
                         f"{cfg.model_type!r}")
    ts = _Tensors(folder)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in ts
    spec = llama_spec_from_config(cfg, tied)
    store = ArrayFile(Path(scratch) / "spec.bin")
    small: dict[str, np.ndarray] = {"norm.w": ts.whole("model.norm.weight")}
    try:
        _embedding(ts, spec, scheme, store)
        for i in range(spec.layers):
            say(f"layer {i + 1}/{spec.layers}: reading and quantizing")
            for ours, theirs in LLAMA_NAMES.items():
                for suffix in ("weight", "bias"):
                    key = f"model.layers.{i}.{theirs}.{suffix}"
                    if key in ts and (suffix == "bias" or "norm" in ours):
                        small[f"l{i}.{ours}.{suffix[0]}"] = ts.whole(key)
            for group in FUSED:
                _projections(ts, spec, scheme, store, i, group)
        spec.weights = {**store.mapped(), **small}
        _views(spec, scheme)
    except BaseException:
        store.close()
        raise
    finish_spec(spec, cfg, tokenizer if tokenizer is not None else _tokenizer(folder))
    if scheme is not None:
        spec.scheme = scheme_label(scheme)
    return spec, store


def _tokenizer(folder: Path) -> Any:
    if not (folder / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001  (a model without a tokenizer still compiles)
        return None


def _embedding(ts: _Tensors, spec: LlmSpec, scheme: Scheme | None, store: ArrayFile) -> None:
    """The token embedding (int8 rows when quantized) and an untied lm_head (int8 rows)."""
    v, d = ts.shape("model.embed_tokens.weight")
    if scheme is None:
        store.reserve("embed", (v, d), np.float32)
    else:
        store.reserve("embed.q8", (v, d), np.int8)
        store.reserve("embed.row_scales", (v,), np.float32)
    for r, block in ts.blocks("model.embed_tokens.weight"):
        if scheme is None:
            store.write("embed", block, r)
        else:
            q8, row = quantize_rows(block, 8)
            store.write("embed.q8", q8, r)
            store.write("embed.row_scales", row, r)
    if spec.tied:
        return
    if scheme is not None:    # int8 rows, as quantize_spec stores an untied lm_head
        _rows(ts, "lm_head.weight", "lm_head", Scheme(8, None, "rtn"), store, spec)
        return
    store.reserve("lm_head", ts.shape("lm_head.weight"), np.float32)
    for r, block in ts.blocks("lm_head.weight"):
        store.write("lm_head", block, r)


def _rows(ts: _Tensors, names: list[str] | str, prefix: str, scheme: Scheme | None,
          store: ArrayFile, spec: LlmSpec) -> None:
    """Matrices ``names`` (same K) quantized block by block into the rows of ``prefix``."""
    names = [names] if isinstance(names, str) else names
    shapes = [ts.shape(n) for n in names]
    total, k = sum(s[0] for s in shapes), shapes[0][1]
    if scheme is None:
        store.reserve(f"{prefix}.w", (total, k), np.float32)
    else:
        probe, g = quantize_projection(np.zeros((1, k), np.float32), scheme, prefix=prefix)
        for part, a in probe.items():
            store.reserve(f"{prefix}.{part}", (total, *a.shape[1:]), a.dtype)
        spec.quant[prefix] = (scheme.bits, g)
    row0 = 0
    for name in names:
        for r, block in ts.blocks(name):
            if scheme is None:
                store.write(f"{prefix}.w", block, row0 + r)
                continue
            parts, _ = quantize_projection(block, scheme, prefix=prefix)
            for part, a in parts.items():
                store.write(f"{prefix}.{part}", a, row0 + r)
        row0 += ts.shape(name)[0]


def _projections(ts: _Tensors, spec: LlmSpec, scheme: Scheme | None, store: ArrayFile,
                 i: int, group: tuple[str, ...]) -> None:
    names = [f"model.layers.{i}.{LLAMA_NAMES[p]}.weight" for p in group]
    _rows(ts, names, fused_name(i, group), scheme, store, spec)


def fused_name(layer: int, group: tuple[str, ...]) -> str:
    """The prefix :mod:`compiler.llm.graphs` gives projections it fuses (``l0.q+l0.k+l0.v``)."""
    return "+".join(f"l{layer}.{p}" for p in group)


def _views(spec: LlmSpec, scheme: Scheme | None) -> None:
    """Each projection of a fused group as a view of its rows of the fused arrays."""
    w = spec.weights
    rows = {"q": spec.heads * spec.head_dim, "k": spec.kv_heads * spec.head_dim,
            "v": spec.kv_heads * spec.head_dim, "gate": spec.intermediate,
            "up": spec.intermediate}
    for i in range(spec.layers):
        for group in (g for g in FUSED if len(g) > 1):
            fused = fused_name(i, group)
            parts = [k.rsplit(".", 1)[1] for k in list(w) if k.startswith(fused + ".")]
            row = 0
            for p in group:
                for part in parts:
                    w[f"l{i}.{p}.{part}"] = w[f"{fused}.{part}"][row:row + rows[p]]
                if scheme is not None:
                    spec.quant[f"l{i}.{p}"] = spec.quant[fused]
                row += rows[p]
