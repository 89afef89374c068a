"""A one-kernel package built here with TVM TE (seconds), and hostile files to put in one.

Model: y = x @ w.T + b, x f32[4, 8], w f32[16, 8], b f32[16].
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np

from runtime._tvm import import_tvm

__all__ = ["build_library", "build_tiny", "tiny_weights", "tiny_input", "tiny_reference",
           "evil_library", "rehash_manifest"]

N, K, M = 4, 8, 16


def build_library(path: Path, parallel: bool = False) -> Path:
    """``parallel``: the row loop runs on TVM's thread pool (as big kernels do)."""
    tvm = import_tvm()
    from tvm import te

    x = te.placeholder((N, K), "float32", "X")
    w = te.placeholder((M, K), "float32", "W")
    b = te.placeholder((M,), "float32", "B")
    r = te.reduce_axis((0, K), "r")
    y = te.compute((N, M), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), "Y")
    z = te.compute((N, M), lambda i, j: y[i, j] + b[j], "Z")
    f = te.create_prim_func([x, w, b, z]).with_attr("global_symbol", "dense_bias")
    if parallel:
        from tvm import s_tir

        sch = s_tir.Schedule(f)
        blk = sch.get_sblock("Z")
        sch.parallel(sch.get_loops(blk)[0])
        f = sch.mod["main"]
    from targets.tvm_codegen import export_with_launcher

    export_with_launcher(tvm.compile(tvm.IRModule({"dense_bias": f}),
                                     tvm.target.Target({"kind": "llvm"})), str(path))
    return path


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((M, K), dtype=np.float32),
            "b": rng.standard_normal(M, dtype=np.float32)}


def build_tiny(lib: Path, seed: int = 0, weights: dict[str, np.ndarray] | None = None):
    """An in-memory Package (``.save(path)`` writes it); ``weights``: ``{"w", "b"}`` instead
    of the seeded ones."""
    from runtime import build_package

    return build_package({"name": "host", "tvm": {"kind": "llvm"}}, ["x"], ["y"],
                         [{"kernel": "dense_bias", "node": "fc", "op": "dense",
                           "inputs": ["x", "w", "b"], "outputs": ["y"]}],
                         [{"name": "x", "shape": [N, K], "dtype": "f32"},
                          {"name": "w", "shape": [M, K], "dtype": "f32"},
                          {"name": "b", "shape": [M], "dtype": "f32"},
                          {"name": "y", "shape": [N, M], "dtype": "f32"}],
                         tiny_weights(seed) if weights is None else weights, lib)


def tiny_input(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, K), dtype=np.float32)


def tiny_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    w = tiny_weights(seed)
    return x @ w["w"].T + w["b"]


EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
int dense_bias(void) { return 0; }
"""


def evil_library(path: Path, marker: Path) -> Path:
    """A shared library whose constructor writes ``marker`` the moment it is dlopened."""
    src = path.with_suffix(".c")
    src.write_text(EVIL_C % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    return path


def rehash_manifest(pkg: Path) -> None:
    """Recompute every sha256 and size in ``pkg``'s manifest from the files (what an attacker
    who edits a file would do)."""
    m = json.loads((pkg / "manifest.json").read_text())
    for name, entry in m["files"].items():
        data = (pkg / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (pkg / "manifest.json").write_text(json.dumps(m))
