"""The runtime end to end on a tiny kernel library built here with TVM TE.

Model: h = relu(x @ w1.T + b1); y = h @ w2.T + h; outputs (y, h). Steps: dense, add_bias
(in place over the dense result), relu (in place again), dense, add (in place over the second
dense result; not over h, which is an output).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime._tvm import import_tvm

REPO = Path(__file__).resolve().parents[1]
N, K, M = 4, 8, 16


def _kernels(lib_path: Path) -> None:
    tvm = import_tvm()
    from tvm import te

    def dense(n, k, m, name):
        x = te.placeholder((n, k), "float32", "X")
        w = te.placeholder((m, k), "float32", "W")
        r = te.reduce_axis((0, k), "r")
        y = te.compute((n, m), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), "Y")
        return te.create_prim_func([x, w, y]).with_attr("global_symbol", name)

    a = te.placeholder((N, M), "float32", "A")
    b = te.placeholder((M,), "float32", "B")
    c = te.compute((N, M), lambda i, j: a[i, j] + b[j], "C")
    add_bias = te.create_prim_func([a, b, c]).with_attr("global_symbol", "add_bias")
    a2 = te.placeholder((N, M), "float32", "A")
    c2 = te.compute((N, M), lambda i, j: te.max(a2[i, j], tvm.tirx.const(0, "float32")), "C")
    relu = te.create_prim_func([a2, c2]).with_attr("global_symbol", "relu")
    a3 = te.placeholder((N, M), "float32", "A")
    b3 = te.placeholder((N, M), "float32", "B")
    c3 = te.compute((N, M), lambda i, j: a3[i, j] + b3[i, j], "C")
    add = te.create_prim_func([a3, b3, c3]).with_attr("global_symbol", "add")
    mod = tvm.IRModule({"dense_4x8x16": dense(N, K, M, "dense_4x8x16"),
                        "dense_4x16x16": dense(N, M, M, "dense_4x16x16"),
                        "add_bias": add_bias, "relu": relu, "add": add})
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    ex.export_library(str(lib_path))


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.standard_normal((M, K), dtype=np.float32),
            "fc1.bias": rng.standard_normal(M, dtype=np.float32),
            "fc2.weight": rng.standard_normal((M, M), dtype=np.float32)}


def _reference(x: np.ndarray, w: dict[str, np.ndarray]) -> list[np.ndarray]:
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    return [h @ w["fc2.weight"].T + h, h]


STEPS = [
    {"kernel": "dense_4x8x16", "node": "fc1", "op": "dense", "inputs": ["x", "fc1.weight"],
     "outputs": ["t0"]},
    {"kernel": "add_bias", "node": "fc1_bias", "op": "add", "inputs": ["t0", "fc1.bias"],
     "outputs": ["t1"]},
    {"kernel": "relu", "node": "act", "op": "relu", "inputs": ["t1"], "outputs": ["h"]},
    {"kernel": "dense_4x16x16", "node": "fc2", "op": "dense", "inputs": ["h", "fc2.weight"],
     "outputs": ["t3"]},
    {"kernel": "add", "node": "residual", "op": "add", "inputs": ["t3", "h"], "outputs": ["y"]},
]


def _tensors() -> list[dict]:
    t = [{"name": "x", "shape": [N, K], "dtype": "f32"},
         {"name": "fc1.weight", "shape": [M, K], "dtype": "f32"},
         {"name": "fc1.bias", "shape": [M], "dtype": "f32"},
         {"name": "fc2.weight", "shape": [M, M], "dtype": "float32"}]
    return t + [{"name": n, "shape": [N, M], "dtype": "f32"} for n in ("t0", "t1", "h", "t3", "y")]


def _build(lib: Path, weights: dict[str, np.ndarray] | None = None, **kw):
    from runtime import build_package

    return build_package({"name": "host", "tvm": {"kind": "llvm", "num-cores": 2}},
                         ["x"], ["y", "h"], STEPS, _tensors(), weights or _weights(), lib,
                         elementwise_steps=kw.pop("elementwise_steps", [1, 2, "residual"]), **kw)


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lib") / "kernels.so"
    _kernels(path)
    return path


@pytest.fixture(scope="module")
def saved(lib, tmp_path_factory) -> Path:
    return _build(lib).save(tmp_path_factory.mktemp("pkg") / "tiny.npkg")


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.npkg"
    shutil.copytree(saved, dst)
    return dst


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, K), dtype=np.float32)


def test_build_plans_in_place(lib):
    pkg = _build(lib)
    mem = pkg.memory
    assert [tuple(p) for p in mem["inplace"]] == [(1, "t0", "t1"), (2, "t1", "h"),
                                                  (4, "t3", "y")]
    off = {n: t["offset"] for n, t in pkg.tensors.items()}
    assert off["t0"] == off["t1"] == off["h"] and off["t3"] == off["y"]
    assert off["fc1.weight"] is None and pkg.tensors["fc1.weight"]["kind"] == "weight"
    assert all(o % 64 == 0 for o in off.values() if o is not None)
    # x (128 B) and the chain t0/t1/h (256 B) overlap in time; t3/y (256 B) and h too.
    assert mem["arena_bytes"] == mem["lower_bound_bytes"] == 512
    assert mem["naive_bytes"] == 128 + 5 * 256
    no_inplace = _build(lib, elementwise_steps=[])
    assert no_inplace.memory["inplace"] == []
    assert no_inplace.memory["arena_bytes"] > mem["arena_bytes"]


def test_run_in_process(lib):
    m = _build(lib).executor()
    x = _x()
    want = _reference(x, _weights())
    for got in (m.run({"x": x}), m(x), m.run([x]), m(x=x)):
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    out = m(x)
    out[0][:] = 0  # outputs are copies: the next run is unaffected
    np.testing.assert_allclose(m(x)[0], want[0], rtol=1e-5, atol=1e-5)


def test_without_in_place_same_results(lib):
    x = _x(3)
    a = _build(lib).executor()(x)
    b = _build(lib, elementwise_steps=[]).executor()(x)
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p, q)


CHILD = r"""
import importlib.abc, sys, time
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("compiler", "passes"):
            raise ImportError(f"runtime must not import {name}")
        return None
sys.meta_path.insert(0, Refuse())
t0 = time.perf_counter()
import numpy as np
import runtime
m = runtime.load(sys.argv[1])
x = np.load(sys.argv[2])
y, h = m(x)
np.savez(sys.argv[3], y=y, h=h)
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "compiler", "passes"))
assert not bad, bad
print("child ok", round(time.perf_counter() - t0, 2), m.stats())
"""


@pytest.mark.parametrize("runtime_lib", [False, True], ids=["libtvm", "libtvm_runtime"])
def test_round_trip_fresh_process(saved, lib, tmp_path, runtime_lib):
    """Load in a process that refuses compiler/ and passes/ imports; with ``runtime_lib`` TVM
    loads only libtvm_runtime (what a deployed device has)."""
    x = _x(7)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if runtime_lib:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    r = subprocess.run([sys.executable, "-c", CHILD, str(saved), str(tmp_path / "x.npy"),
                        str(tmp_path / "out.npz")], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "child ok" in r.stdout
    got = np.load(tmp_path / "out.npz")
    here = _build(lib).executor()(x)
    np.testing.assert_array_equal(got["y"], here[0])
    np.testing.assert_array_equal(got["h"], here[1])
    np.testing.assert_allclose(got["y"], _reference(x, _weights())[0], rtol=1e-5, atol=1e-5)


def test_saved_package_layout(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["kernels.so", "manifest.json",
                                                      "weights.safetensors"]
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format_version"] == 1
    assert {k: v for k, v in m["target"].items() if k != "isa"} == {
        "name": "host", "tvm": {"kind": "llvm", "num-cores": 2}, "arch": "x86_64"}
    assert set(m["target"]["isa"]) == {"triple", "cpu", "features"}
    assert m["inputs"] == [{"name": "x", "shape": [N, K], "dtype": "f32"}]
    assert [o["name"] for o in m["outputs"]] == ["y", "h"]
    assert m["steps"][0] == STEPS[0]
    assert set(m["files"]) == {"kernels.so", "weights.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    from safetensors.numpy import load_file

    w = load_file(str(saved / "weights.safetensors"))
    np.testing.assert_array_equal(w["fc1.bias"], _weights()["fc1.bias"])


def test_flipped_weight_byte_refused(saved, tmp_path):
    from runtime import IntegrityError, PackageError, load

    pkg = _copy(saved, tmp_path)
    data = bytearray((pkg / "weights.safetensors").read_bytes())
    data[-5] ^= 0x01
    (pkg / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights.safetensors") as e:
        load(pkg)
    assert isinstance(e.value, PackageError)


def test_missing_file_refused(saved, tmp_path):
    from runtime import IntegrityError, load

    pkg = _copy(saved, tmp_path)
    (pkg / "kernels.so").unlink()
    with pytest.raises(IntegrityError, match="kernels.so is missing"):
        load(pkg)


def _edit_manifest(pkg: Path, fn) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    fn(m)
    (pkg / "manifest.json").write_text(json.dumps(m))


def test_unknown_format_version_refused(saved, tmp_path):
    from runtime import FormatVersionError, load

    pkg = _copy(saved, tmp_path)
    _edit_manifest(pkg, lambda m: m.update(format_version=99))
    with pytest.raises(FormatVersionError, match=r"format version 99 .*supported: 1"):
        load(pkg)


def test_foreign_elf_machine_refused(saved, tmp_path):
    import hashlib

    from runtime import ArchitectureError, load

    pkg = _copy(saved, tmp_path)
    lib = bytearray((pkg / "kernels.so").read_bytes())
    assert lib[18:20] == (62).to_bytes(2, "little")  # EM_X86_64
    lib[18:20] = (183).to_bytes(2, "little")          # EM_AARCH64
    (pkg / "kernels.so").write_bytes(bytes(lib))
    digest = hashlib.sha256(bytes(lib)).hexdigest()   # a consistent manifest: only arch is wrong
    _edit_manifest(pkg, lambda m: m["files"]["kernels.so"].update(sha256=digest))
    with pytest.raises(ArchitectureError, match=r"aarch64 library; this machine is x86_64"):
        load(pkg)


def test_inconsistent_plan_refused(saved, tmp_path):
    from runtime import PackageError, load

    pkg = _copy(saved, tmp_path)

    def clash(m):  # put the second dense's result on top of h, which is still live
        t = {t["name"]: t for t in m["tensors"]}
        t["t3"]["offset"] = t["y"]["offset"] = t["h"]["offset"]
    _edit_manifest(pkg, clash)
    with pytest.raises(PackageError, match="overlap"):
        load(pkg)


def test_input_errors(lib):
    from runtime import InputError

    m = _build(lib).executor()
    x = _x()
    with pytest.raises(InputError, match=r"unknown input\(s\) \['z'\].*\['x'\]"):
        m.run({"z": x})
    with pytest.raises(InputError, match=r"missing input\(s\) \['x'\]"):
        m.run({})
    with pytest.raises(InputError, match=r"input 'x' has shape \[4, 9\]; expected \[4, 8\]"):
        m(np.zeros((4, 9), np.float32))
    with pytest.raises(InputError, match=r"input 'x' has dtype float64; expected float32") as e:
        m(x.astype(np.float64))
    assert isinstance(e.value, ValueError)
    with pytest.raises(InputError, match="2 inputs given; the model takes 1"):
        m.run([x, x])


def test_profile_and_stats(lib):
    m = _build(lib).executor()
    p = m.profile(_x(), repeat=5)
    assert [s.node for s in p.steps] == ["fc1", "fc1_bias", "act", "fc2", "residual"]
    assert [s.kernel for s in p.steps][0] == "dense_4x8x16"
    assert all(s.median_ms >= 0 for s in p.steps) and p.total_ms > 0
    assert "residual" in p.table()
    s = m.stats()
    assert s["arena_bytes"] == 512 and s["lower_bound_bytes"] == 512
    assert s["naive_bytes"] == 128 + 5 * 256
    assert s["weight_bytes"] == 4 * (M * K + M + M * M)
    assert s["arenas"] == 1 and s["kernels"] == 5


def test_threads_run_concurrently(lib):
    m = _build(lib).executor()
    w = _weights()
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)
    arenas: list[int] = []

    def work(seed: int) -> None:
        try:
            xs = [_x(seed * 1000 + i) for i in range(4)]
            want = [_reference(x, w) for x in xs]
            barrier.wait()
            for i in range(300):
                if i == 1:
                    arenas.append(m.stats()["arenas"])
                got = m(xs[i % 4])
                for g, r in zip(got, want[i % 4], strict=True):
                    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 — reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert max(arenas) >= 2  # each thread ran on its own arena (plus the loading thread's)


def test_save_replaces_atomically(lib, tmp_path):
    from runtime import Package, PackageError, load

    path = tmp_path / "m.npkg"
    _build(lib).save(path)
    w2 = _weights(seed=5)
    _build(lib, weights=w2).save(path)
    x = _x()
    np.testing.assert_allclose(load(path)(x)[0], _reference(x, w2)[0], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npkg"]  # no temporaries left
    broken = Package(dict(_build(lib).manifest), tmp_path / "nonexistent.so", _weights(9))
    with pytest.raises(FileNotFoundError):
        broken.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npkg"]
    np.testing.assert_allclose(load(path)(x)[0], _reference(x, w2)[0], rtol=1e-5, atol=1e-5)
    (tmp_path / "precious").mkdir()
    with pytest.raises(PackageError, match="not a package"):
        _build(lib).save(tmp_path / "precious")


def test_build_errors(lib):
    from runtime import PlanError

    with pytest.raises(PlanError, match="over the target's memory budget"):
        _build(lib, memory_budget_bytes=1000)
    with pytest.raises(PlanError, match=r"weight 'fc1.bias' has 32 bytes.*needs 64"):
        _build(lib, weights={**_weights(), "fc1.bias": np.zeros(8, np.float32)})


def test_runtime_package_imports_nothing_of_the_compiler():
    code = textwrap.dedent("""
        import sys, runtime, runtime.executor, runtime.memory_pool, runtime.package
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("compiler", "passes", "torch"))
        assert not bad, bad
    """)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_kernel_failure_names_the_step(saved, tmp_path):
    from runtime import PackageError, RuntimeError_, load

    pkg = _copy(saved, tmp_path)
    _edit_manifest(pkg, lambda m: m["steps"][2].update(kernel="add_bias"))  # wrong arity
    m = load(pkg)
    with pytest.raises(RuntimeError_, match=r"kernel 'add_bias' failed at step 2 \(node act"):
        m(_x())
    _edit_manifest(pkg, lambda m: m["steps"][2].update(kernel="no_such_kernel"))
    with pytest.raises(PackageError, match="kernel 'no_such_kernel'.* is not in"):
        load(pkg)


def test_bf16_tensors_through_typed_views(tmp_path):
    """bf16 is not a DLPack dtype numpy can export: the executor retypes a byte view."""
    import ml_dtypes

    from runtime import build_package, load

    tvm = import_tvm()
    from tvm import te

    a = te.placeholder((4, 16), "bfloat16", "A")
    w = te.placeholder((16,), "bfloat16", "W")
    c = te.compute((4, 16), lambda i, j: a[i, j].astype("float32") * w[j].astype("float32"))
    f = te.create_prim_func([a, w, c]).with_attr("global_symbol", "mul_bf16")
    tvm.compile(tvm.IRModule({"mul_bf16": f}), tvm.target.Target({"kind": "llvm"})
                ).export_library(str(tmp_path / "bf.so"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype(ml_dtypes.bfloat16)
    wt = rng.standard_normal(16).astype(ml_dtypes.bfloat16)
    build_package({"name": "host", "tvm": {"kind": "llvm"}}, ["x"], ["y"],
                  [{"kernel": "mul_bf16", "node": "m", "op": "mul", "inputs": ["x", "w"],
                    "outputs": ["y"]}],
                  [{"name": "x", "shape": [4, 16], "dtype": "bf16"},
                   {"name": "w", "shape": [16], "dtype": "bf16"},
                   {"name": "y", "shape": [4, 16], "dtype": "f32"}],
                  {"w": wt}, tmp_path / "bf.so").save(tmp_path / "bf.npkg")
    (y,) = load(tmp_path / "bf.npkg")(x)
    np.testing.assert_array_equal(y, x.astype(np.float32) * wt.astype(np.float32))


def test_tampered_manifest_refused(saved, tmp_path):
    from runtime import PackageError, load

    pkg = _copy(saved, tmp_path)
    for edit, match in [
        (lambda m: m["tensors"][4].update(offset=-64), "offset -64"),
        (lambda m: m["tensors"][4].update(nbytes=64), "has nbytes 64; expected 256"),
        (lambda m: m["memory"].update(inplace=[[3, "h", "t3"]]), "in-place pairs"),
        (lambda m: m["files"].update({"../x": {"sha256": ""}}), "plain file name"),
    ]:
        shutil.rmtree(pkg)
        shutil.copytree(saved, pkg)
        _edit_manifest(pkg, edit)
        with pytest.raises(PackageError, match=match):
            load(pkg)
