"""Packages: a compiled model on disk, saved and loaded without the compiler.

A package is a directory ``X.npkg/``::

    manifest.json          format version, target, inputs/outputs, execution plan, tensor table,
                           memory plan figures, sha256 and size of every other file
    kernels.so             the kernel library (one exported TVM module, every step's kernel)
    weights.safetensors    weights by name, already packed to the layout the kernels read
    model.sig              (signed packages) OpenSSF model-signing signature over every other
                           file's sha256 (``signing.py``)

Manifest, format version 1 (every key below is written; readers ignore unknown keys)::

    format_version: 1
    target:   {name, tvm: <TVM target dict>, arch: "x86_64" | "aarch64",
               isa: {triple, cpu, features: [LLVM ISA features the kernels may use]}}
              ``isa`` is checked against the running CPU before the library is loaded
              (``runtime.cpu``); a package without it (older compilers) has it derived from
              ``tvm`` with LLVM
    inputs / outputs: [{name, shape, dtype}]                 (graph order)
    steps:    [{kernel, node, op, inputs: [names], outputs: [names]}]
              execution order; a kernel's arguments are ``inputs + outputs``
              (destination-passing: results are written into their arena views)
    tensors:  [{name, shape, dtype, kind, nbytes, offset, weight}]
              kind: input | output | intermediate | weight; ``offset`` into the arena (null
              for weights and unused tensors); ``weight``: the safetensors key (weights only)
    memory:   {arena_bytes, lower_bound_bytes, naive_bytes, weight_bytes, alignment, ordering,
               inplace: [[step, operand, result]]}
    weight_encoding: {key: {encoding: "bitmask" | "csr", dtype, shape, nnz}}   (optional)
              weights stored sparse (``runtime/sparse.py``); a package with this key has
              format version 2, and ``Package.weights()`` expands them (exactly) at load
    modes:    {default, order, plans: {mode: {library, extra_files, [target, steps, tensors,
               memory], report}}}   (optional) other plans of the same model, switched at run
              time; the top level is the default mode's plan (``runtime/modes.py``)
    files:    {filename: {sha256, bytes}}
              besides kernels.so and weights.safetensors: extra files of the package
              (``Package.extra_files``), possibly in a subdirectory, e.g.
              ``device/kernels.aarch64.so`` (the target CPU's own kernel library when the
              runnable one is a host build); they are checked like the others
    version:  "3", "1.4.0" (optional): the model's version (``compile(version=...)``);
              over-the-air updates (``runtime/update.py``) refuse an older one unless told;
              a package without it counts as version 0

Dtypes are the IR's short names (``f32``, ``i8``, ...). A weight's stored bytes are used
verbatim: the tensor table's dtype/shape say how the kernel reads them (so packed int4 may be
stored as ``u8``).

``Package.save`` (``package_save.py``) is atomic: the package is built in a temporary directory
beside the target and exchanged with an existing package in one step; it replaces nothing that
is not an npucc package. ``Package.load`` / ``runtime.load`` (``package_load.py``) refuse, before
loading any kernel, a package that is unsigned or foreign-signed while trusted keys are
configured, holds a link or special file, has a manifest outside its schema and limits
(``manifest_schema.py``), an unknown format version, a file that does not match its size and
sha256, a kernel library for another CPU architecture, ISA or plan, or an inconsistent plan;
and they load exactly the bytes they verified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _dtypes
from ._elf import library_arch
from ._verify import isa_record
from .errors import IntegrityError, PackageError, PlanError
from .memory_pool import PlanStep, PlanTensor, plan_memory
from .package_io import SealedLibrary, check_file_name

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["FORMAT_VERSION", "SUPPORTED_FORMAT_VERSIONS", "Step", "TensorInfo", "Package",
           "build_package"]

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1, 2)   # 2: weight_encoding (sparse-stored weights)
SPARSE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LIBRARY = "kernels.so"
WEIGHTS = "weights.safetensors"


@dataclass(frozen=True)
class Step:
    """One kernel call: ``kernel(*inputs, *outputs)``; ``node`` is the graph node's label."""

    kernel: str
    node: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "node": self.node, "op": self.op,
                "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the plan. ``kind`` and ``nbytes`` are derived when None (see build_package)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str | None = None
    weight: str | None = None   # safetensors key, weights only (default: the tensor's name)
    nbytes: int | None = None   # default: ceil(size * bits / 8)


def _get(obj: Any, *keys: str, default: Any = ...) -> Any:
    for key in keys:
        if isinstance(obj, Mapping):
            if key in obj:
                return obj[key]
        elif hasattr(obj, key):
            return getattr(obj, key)
    if default is ...:
        raise PackageError(f"{obj!r} has none of the fields {keys}")
    return default


def _coerce_step(s: Any) -> Step:
    if isinstance(s, Step):
        return s
    inputs = (*_get(s, "inputs", "operands"), *_get(s, "extra_consts", default=()))
    return Step(kernel=str(_get(s, "kernel", "symbol")), node=str(_get(s, "node", "label")),
                op=str(_get(s, "op")), inputs=tuple(inputs),
                outputs=tuple(_get(s, "outputs", "results")))


class Package:
    """A compiled model: manifest + kernel library + weights.

    Built by :func:`build_package` (files still where the compiler left them, weights in memory)
    or loaded by :meth:`load` (files in the package directory, verified).
    """

    def __init__(self, manifest: dict[str, Any], lib_path: str | os.PathLike,
                 weights: Mapping[str, np.ndarray] | bytes | str | os.PathLike,
                 directory: str | os.PathLike | None = None,
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
                 library: SealedLibrary | None = None):
        self.manifest = manifest
        self.lib_path = Path(lib_path)
        # a loaded package holds the verified bytes of its files, never their paths: weights
        # as bytes, the kernel library as a sealed in-memory file (``package_io``)
        self._library = library
        self._weights = weights if isinstance(weights, Mapping | bytes) else Path(weights)
        self.directory = Path(directory) if directory is not None else None
        # package-relative name ("device/kernels.aarch64.so") -> where the file is now, or its
        # verified bytes
        self.extra_files: dict[str, Path | bytes] = {
            k: v if isinstance(v, bytes) else Path(v) for k, v in (extra_files or {}).items()}
        # store weights with many zeros as bitmask/CSR when saving (set for pruned models)
        self.sparse_weights = bool(manifest.get("weight_encoding"))
        self.sign_key: Any = None      # save() signs with this key unless told otherwise
        self.signed_by: Any = None     # the trusted key that verified a loaded package

    def load_library(self, tvm: Any) -> Any:
        """The kernel library as a TVM module: for a loaded package exactly the bytes that
        were verified (never re-opened by path)."""
        if self._library is not None:
            return self._library.load(tvm)
        from .pool import load_library

        return load_library(tvm, self.lib_path)

    # -- views of the manifest -------------------------------------------------------------
    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    @property
    def steps(self) -> list[Step]:
        return [Step(s["kernel"], s["node"], s["op"], tuple(s["inputs"]), tuple(s["outputs"]))
                for s in self.manifest["steps"]]

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.manifest["tensors"]}

    @property
    def memory(self) -> dict[str, Any]:
        return self.manifest["memory"]

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest["target"]

    def weights(self) -> dict[str, np.ndarray]:
        """Weight arrays by safetensors key, as stored (bytes verbatim); sparse-stored ones
        (manifest ``weight_encoding``) expanded back to their dense arrays."""
        if isinstance(self._weights, Mapping):
            return dict(self._weights)
        from safetensors.numpy import load, load_file

        where = self.directory / WEIGHTS if self.directory else self._weights
        try:
            stored = (load_file(str(self._weights)) if isinstance(self._weights, Path)
                      else load(self.weights_file_bytes()))
        except Exception as e:  # the library raises its own untyped errors
            raise PackageError(f"cannot read {where}: {e}") from e
        encoding = self.manifest.get("weight_encoding")
        if not encoding:
            return stored
        from .sparse import decode_all

        try:
            return decode_all(stored, encoding)
        except (KeyError, ValueError, TypeError) as e:
            raise PackageError(f"{where}: sparse weights do not decode: {e}") from e

    def weights_file_bytes(self) -> bytes:
        """The bytes of ``weights.safetensors``. A loaded package holds the bytes it verified
        until an executor has copied them (:meth:`release_weight_bytes`); after that they are
        read again from the package folder and must still match the manifest's size and sha256
        (which load verified, signature included), else :class:`IntegrityError`."""
        if isinstance(self._weights, bytes):
            return self._weights
        if isinstance(self._weights, Path):
            return self._weights.read_bytes()
        from .package_io import PackageReader

        entry = self.manifest["files"][WEIGHTS]
        reader = PackageReader(self.directory, str(self.directory))
        try:
            data = reader.read(WEIGHTS, entry["bytes"], exact=True)
        finally:
            reader.close()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{self.directory}: {WEIGHTS} changed since the package was "
                                 f"loaded and verified; refusing to use it")
        return data

    def release_weight_bytes(self) -> None:
        """Drop the verified weight bytes a loaded package holds (an executor copied them into
        its own buffer): weights are then in memory once. See :meth:`weights_file_bytes`."""
        if isinstance(self._weights, bytes) and self.directory is not None:
            self._weights = None

    def stored_weight_bytes(self) -> int:
        """Bytes the used weights take in ``weights.safetensors`` (payload, without the
        safetensors header): sparse-encoded when ``sparse_weights`` is set."""
        from .sparse import encoded_nbytes

        total = 0
        for arr in self.weights().values():
            arr = np.asarray(arr)
            sizes = encoded_nbytes(arr) if self.sparse_weights and arr.dtype.kind in "fiu" \
                else {"dense": arr.nbytes}
            total += min(sizes.values())
        return int(total)

    def executor(self) -> Executor:
        from .executor import Executor

        return Executor(self)

    def __repr__(self) -> str:
        where = f" at {self.directory}" if self.directory else ""
        return (f"<Package{where}: {len(self.manifest['steps'])} steps, "
                f"arena {self.memory['arena_bytes']} B, weights {self.memory['weight_bytes']} B>")

    # -- saving ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, sign_key: Any = None,
             password: bytes | None = None) -> Path:
        """Write the package to folder ``path`` atomically, signed with ``sign_key`` (default:
        ``self.sign_key``; a private key PEM path, bytes or key object); returns the path.

        Replaces only an npucc package at ``path`` (its manifest's file list matches its
        files); anything else there is refused, never deleted. See
        :func:`runtime.package_save.save_package`.
        """
        from .package_save import save_package

        key = sign_key if sign_key is not None else self.sign_key
        manifest = save_package(self, Path(path), key, password)
        self.manifest = manifest
        self.directory = Path(path)
        return Path(path)

    def file_bytes(self) -> dict[str, bytes]:
        """Every file of the package but the manifest, as bytes to write (weights encoded);
        may update ``manifest`` keys that describe the weights (``weight_encoding``)."""
        files = {LIBRARY: self._library.read_bytes() if self._library is not None
                 else self.lib_path.read_bytes()}
        if isinstance(self._weights, Mapping):
            data, enc = _weights_bytes(self._weights, sparse=self.sparse_weights)
            self.manifest = dict(self.manifest)
            self.manifest.pop("weight_encoding", None)
            if enc:
                self.manifest["weight_encoding"] = enc
                self.manifest["format_version"] = SPARSE_FORMAT_VERSION
            files[WEIGHTS] = data
        else:
            files[WEIGHTS] = self.weights_file_bytes()
        for name, src in self.extra_files.items():
            check_file_name(name, name)
            files[name] = src if isinstance(src, bytes) else src.read_bytes()
        return files

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, trusted_keys: Any = None) -> Package:
        """Read and verify a package directory; see :func:`runtime.package_load.load_verified`
        for what is checked (signature, every file's size and sha256, symlinks, manifest
        schema and limits, architecture and instruction set, plan consistency)."""
        from .package_load import load_verified

        return load_verified(cls, path, trusted_keys)


def dump_manifest(m: Mapping[str, Any]) -> str:
    """JSON with one top-level key per line and one list item (step, tensor...) per line."""
    lines = []
    for key, value in m.items():
        if isinstance(value, list) and value:
            items = ",\n".join("  " + json.dumps(x) for x in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


_SAFETENSORS_NATIVE = frozenset({"float64", "float32", "float16", "int64", "int32", "int16",
                                 "int8", "uint64", "uint32", "uint16", "uint8", "bool"})


def _weights_bytes(weights: Mapping[str, np.ndarray], sparse: bool = False
                   ) -> tuple[bytes, dict[str, Any]]:
    """The weights as safetensors bytes; with ``sparse``, those with enough zeros as
    bitmask/CSR (``runtime/sparse.py``). Also returns the manifest's ``weight_encoding``."""
    from safetensors.numpy import save

    out, encoding = {}, {}
    for name, arr in weights.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _SAFETENSORS_NATIVE or not arr.dtype.isnative:
            arr = arr.reshape(-1).view(np.uint8)  # bf16, int4, ...: raw bytes; manifest has dtype
        if sparse and arr.dtype.name in _SAFETENSORS_NATIVE and arr.dtype != np.bool_:
            from .sparse import encode

            entries, rec = encode(name, arr)
            out.update(entries)
            if rec is not None:
                encoding[name] = rec
            continue
        out[name] = arr
    return save(out), encoding


def build_package(target: Mapping[str, Any] | Any, inputs: Sequence[str], outputs: Sequence[str],
                  steps: Sequence[Step | Mapping[str, Any]],
                  tensors: Sequence[TensorInfo | Mapping[str, Any]],
                  weights: Mapping[str, np.ndarray], lib_path: str | os.PathLike,
                  elementwise_steps: Collection[int | str] = (), *,
                  memory_budget_bytes: int | None = None) -> Package:
    """Plan memory and assemble an in-memory :class:`Package` (call ``.save(path)`` to write it).

    ``target``: ``{"name": str, "tvm": <TVM target dict>, "arch": "x86_64" | "aarch64"}`` (or
    an object with attributes ``name``, ``tvm`` or ``tvm_target``, ``arch``); ``arch`` defaults to the library's ELF machine and must agree with it when given.
    ``inputs`` / ``outputs``: graph input / output tensor names, in graph order.
    ``steps``: in execution order, :class:`Step`, ``targets.tvm_codegen.KernelStep`` or
    mappings/objects with ``kernel`` (or ``symbol``), ``node`` (or ``label``), ``op``,
    ``inputs`` (or ``operands``), optional ``extra_consts`` (appended to the inputs) and
    ``outputs`` (or ``results``); the kernel is called as ``kernel(*inputs, *outputs)``.
    ``tensors``: the tensors the steps and the graph interface name, :class:`TensorInfo` or
    mappings with ``name, shape, dtype`` and optionally ``kind, weight, nbytes``. When ``kind``
    is missing it is derived: graph input, graph output, weight (if its weight key — ``weight``
    or else its name — is in ``weights``), else intermediate. A name missing from ``tensors``
    but present in ``weights`` (e.g. a packed weight) is a weight typed by its array.
    ``weights``: arrays by safetensors key, already in the layout the kernels read; each
    array's byte size must equal its tensor's ``nbytes``.
    ``lib_path``: the exported kernel library (copied into the package by ``save``).
    ``elementwise_steps``: indices (or node labels) of steps that may run in place.
    ``memory_budget_bytes``: if given, arena + weights above it raise :class:`PlanError`.
    """
    steps = [_coerce_step(s) for s in steps]
    in_set, out_set = set(inputs), set(outputs)
    table = _tensor_table(tensors, weights, in_set, out_set)
    named = [n for s in steps for n in (*s.inputs, *s.outputs)] + list(inputs) + list(outputs)
    for name in named:  # weights the table does not describe: typed by their arrays
        if name not in table and name in weights:
            arr = np.asarray(weights[name])
            table[name] = {"name": name, "shape": list(arr.shape),
                           "dtype": _dtypes.canonical(arr.dtype), "kind": "weight",
                           "nbytes": arr.nbytes, "offset": None, "weight": name}
    missing = sorted({n for n in named if n not in table})
    if missing:
        raise PlanError(f"tensors named by the plan but not in the tensor table: {missing}")
    used_weights = _weight_sizes(table, weights)
    ew = _step_indices(steps, elementwise_steps)
    plan = plan_memory(
        [PlanTensor(t["name"], t["nbytes"], t["kind"]) for t in table.values()],
        [PlanStep(s.inputs, s.outputs) for s in steps], ew,
        inputs_also_outputs=in_set & out_set)
    plan.check()
    for name, off in plan.offsets.items():
        table[name]["offset"] = off
    weight_bytes = sum(used_weights.values())
    if memory_budget_bytes is not None and plan.arena_bytes + weight_bytes > memory_budget_bytes:
        raise PlanError(f"the model needs {plan.arena_bytes} B of arena + {weight_bytes} B of "
                        f"weights = {plan.arena_bytes + weight_bytes} B, over the target's "
                        f"memory budget of {memory_budget_bytes} B")

    lib_arch = library_arch(Path(lib_path))
    arch = _get(target, "arch", default=None) or lib_arch
    if arch != lib_arch:
        raise PackageError(f"target arch {arch!r} but {lib_path} is an {lib_arch} library")
    tvm_target = dict(_get(target, "tvm", "tvm_target", default={}))
    manifest = {
        "format_version": FORMAT_VERSION,
        "target": {"name": str(_get(target, "name", default="unknown")),
                   "tvm": tvm_target, "arch": arch, "isa": isa_record(tvm_target)},
        "inputs": [{k: table[n][k] for k in ("name", "shape", "dtype")} for n in inputs],
        "outputs": [{k: table[n][k] for k in ("name", "shape", "dtype")} for n in outputs],
        "steps": [s.to_json() for s in steps],
        "tensors": list(table.values()),
        "memory": {**plan.figures(), "weight_bytes": weight_bytes},
        "files": {},
    }
    return Package(manifest, lib_path, {k: weights[k] for k in used_weights})


def _tensor_table(tensors: Sequence[TensorInfo | Mapping[str, Any]],
                  weights: Mapping[str, np.ndarray], in_set: set[str], out_set: set[str]
                  ) -> dict[str, dict[str, Any]]:
    """The manifest's tensor records by name, kinds derived where not given."""
    table: dict[str, dict[str, Any]] = {}
    for t in tensors:
        name = str(_get(t, "name"))
        shape = [int(d) for d in _get(t, "shape")]
        dtype = _dtypes.canonical(str(_get(t, "dtype")))
        wkey = _get(t, "weight", default=None)
        kind = _get(t, "kind", default=None)
        if kind is None:
            kind = ("input" if name in in_set else "output" if name in out_set
                    else "weight" if (wkey or name) in weights else "intermediate")
        if kind == "weight":
            wkey = wkey or name
        nbytes = _get(t, "nbytes", default=None)
        nbytes = _dtypes.nbytes(shape, dtype) if nbytes is None else int(nbytes)
        if name in table:
            raise PlanError(f"tensor {name!r} appears twice in the tensor table")
        table[name] = {"name": name, "shape": shape, "dtype": dtype, "kind": kind,
                       "nbytes": nbytes, "offset": None, "weight": wkey}
    return table


def _weight_sizes(table: Mapping[str, dict[str, Any]], weights: Mapping[str, np.ndarray]
                  ) -> dict[str, int]:
    """Bytes of each weight array the table uses, checked against its tensor's size."""
    used: dict[str, int] = {}
    for t in table.values():
        if t["kind"] != "weight":
            continue
        if t["weight"] not in weights:
            raise PlanError(f"weight tensor {t['name']!r}: no array {t['weight']!r} in weights")
        size = np.asarray(weights[t["weight"]]).nbytes
        if size != t["nbytes"]:
            raise PlanError(f"weight {t['weight']!r} has {size} bytes; tensor {t['name']!r} "
                            f"({t['dtype']}{t['shape']}) needs {t['nbytes']}")
        used[t["weight"]] = size
    return used


def _step_indices(steps: Sequence[Step], which: Collection[int | str]) -> set[int]:
    """Step indices from indices or node labels."""
    labels = {s.node: i for i, s in enumerate(steps)}
    out = set()
    for e in which:
        if isinstance(e, str):
            if e not in labels:
                raise PlanError(f"elementwise step {e!r} is not a node label of the plan")
            e = labels[e]
        out.add(int(e))
    return out
