"""Package trust (issue 12): signatures with a trust root, verify-then-load of exactly the
verified bytes, symlink and special-file refusal, the manifest schema with limits.

Every attack here is real: real keys, a real shared library whose constructor writes a file
when dlopened, real symlinks and fifos; TVM and the runtime are never mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from package_helpers import (
    build_library,
    build_tiny,
    evil_library,
    rehash_manifest,
    tiny_input,
    tiny_reference,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("NPUCC_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))   # no per-user keys


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return build_library(tmp_path_factory.mktemp("lib") / "kernels.so")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    from runtime.signing import generate_key

    d = tmp_path_factory.mktemp("keys")
    return {name: generate_key(d / f"{name}.key") for name in ("a", "b")}


@pytest.fixture(scope="module")
def signed(lib, keys, tmp_path_factory) -> Path:
    return build_tiny(lib).save(tmp_path_factory.mktemp("pkg") / "tiny.npkg",
                                sign_key=keys["a"][0])


def _copy(src: Path, tmp_path: Path, name: str = "copy.npkg") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _load(path: Path, trusted=None):
    from runtime import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(path, trusted_keys=trusted)


# -- signatures --------------------------------------------------------------------------------
def test_signed_package_loads_with_its_key(signed, keys):
    m = _load(signed, [keys["a"][1]])
    x = tiny_input()
    np.testing.assert_allclose(m(x)[0], tiny_reference(x), rtol=1e-5, atol=1e-5)
    from runtime.signing import key_id, load_public_key

    assert m.package.signed_by.id == key_id(load_public_key(keys["a"][1]).pem)
    assert sorted(p.name for p in signed.iterdir()) == ["kernels.so", "manifest.json",
                                                        "model.sig", "weights.safetensors"]


def test_foreign_key_refused(signed, keys):
    from runtime import SignatureError

    with pytest.raises(SignatureError, match="not a trusted key"):
        _load(signed, [keys["b"][1]])


def test_unsigned_refused_when_keys_configured(lib, keys, tmp_path, monkeypatch):
    from runtime import SignatureError

    pkg = build_tiny(lib).save(tmp_path / "unsigned.npkg")
    with pytest.raises(SignatureError, match="not signed"):
        _load(pkg, [keys["a"][1]])
    # the environment default is a trust root too
    monkeypatch.setenv("NPUCC_TRUSTED_KEYS", str(keys["a"][1]))
    with pytest.raises(SignatureError, match="not signed"):
        _load(pkg)
    monkeypatch.setenv("NPUCC_TRUSTED_KEYS", str(keys["a"][1].parent))   # a folder of keys
    with pytest.raises(SignatureError, match="not signed"):
        _load(pkg)
    monkeypatch.delenv("NPUCC_TRUSTED_KEYS")
    _load(pkg)                                        # no trust root: loads (warned)
    user = tmp_path / "config" / "npucc" / "trusted_keys"
    user.mkdir(parents=True)
    shutil.copy(keys["a"][1], user / "release.pub")   # the per-user trust root
    with pytest.raises(SignatureError, match="not signed"):
        _load(pkg)


def test_signature_from_env_trust_root(signed, keys, monkeypatch):
    monkeypatch.setenv("NPUCC_TRUSTED_KEYS", os.pathsep.join(str(k[1]) for k in keys.values()))
    assert _load(signed).package.signed_by is not None


@pytest.mark.parametrize("name", ["manifest.json", "kernels.so", "weights.safetensors",
                                  "model.sig"])
def test_any_changed_byte_refused(signed, keys, tmp_path, name):
    """Flip one byte of each file, recompute the manifest's hashes (an attacker can), and the
    signature still refuses it."""
    from runtime import PackageError

    size = (signed / name).stat().st_size
    for pos in (0, size // 2, size - 2):
        pkg = _copy(signed, tmp_path, f"flip{pos}.npkg")
        data = bytearray((pkg / name).read_bytes())
        data[pos] ^= 0x01
        (pkg / name).write_bytes(bytes(data))
        if name not in ("manifest.json", "model.sig"):
            rehash_manifest(pkg)
        with pytest.raises(PackageError):
            _load(pkg, [keys["a"][1]])
        shutil.rmtree(pkg)


def test_weight_edit_with_recomputed_hashes_refused(signed, keys, tmp_path):
    """The reproduction of issue 12: a weight edited, the manifest's hashes recomputed."""
    from safetensors.numpy import load_file, save_file

    from runtime import SignatureError

    pkg = _copy(signed, tmp_path)
    w = load_file(str(pkg / "weights.safetensors"))
    w["b"][3] = 100.0
    save_file(w, str(pkg / "weights.safetensors"))
    rehash_manifest(pkg)
    assert _load(pkg)(tiny_input())[0][0, 3] > 50   # without a trust root it loads (warned)
    with pytest.raises(SignatureError, match="weights.safetensors"):
        _load(pkg, [keys["a"][1]])


def test_unlisted_file_refused_when_signed(signed, keys, tmp_path):
    from runtime import SignatureError

    pkg = _copy(signed, tmp_path)
    (pkg / "extra.bin").write_bytes(b"x")
    with pytest.raises(SignatureError, match="extra.bin"):
        _load(pkg, [keys["a"][1]])


def test_resigned_by_attacker_key_refused(signed, keys, tmp_path):
    from runtime import SignatureError
    from runtime.package_save import sign_package

    pkg = _copy(signed, tmp_path)
    sign_package(pkg, keys["b"][0])
    assert _load(pkg, [keys["b"][1]]).package.signed_by is not None
    with pytest.raises(SignatureError, match="not a trusted key"):
        _load(pkg, [keys["a"][1]])


def test_one_time_warning_without_keys(signed, tmp_path):
    code = ("import warnings, runtime, sys\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    runtime.load(sys.argv[1]); runtime.load(sys.argv[1])\n"
            "ws = [x for x in w if issubclass(x.category, runtime.UnverifiedPackageWarning)]\n"
            "assert len(ws) == 1, [str(x.message) for x in w]\n"
            "assert 'without verifying' in str(ws[0].message)\n"
            "assert ws[0].filename == '<string>', ws[0].filename\n")
    env = {k: v for k, v in os.environ.items() if k != "NPUCC_TRUSTED_KEYS"}
    r = subprocess.run([sys.executable, "-c", code, str(signed)], capture_output=True,
                       text=True, env=dict(env, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 0, r.stderr


def test_model_signing_accepts_our_signature(signed, keys):
    """The OpenSSF model-signing tool itself verifies an npucc package."""
    exe = shutil.which("model_signing")
    assert exe, "model-signing is a test dependency (pip install -e .[test])"
    r = subprocess.run([exe, "verify", "key", str(signed), "--signature",
                        str(signed / "model.sig"), "--public_key", str(keys["a"][1])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([exe, "verify", "key", str(signed), "--signature",
                        str(signed / "model.sig"), "--public_key", str(keys["b"][1])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def test_we_accept_model_signing_signature(lib, keys, tmp_path):
    pkg = build_tiny(lib).save(tmp_path / "ms.npkg")
    r = subprocess.run([shutil.which("model_signing") or "model_signing", "sign", "key",
                        str(pkg), "--private_key", str(keys["b"][0]), "--signature",
                        str(pkg / "model.sig")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _load(pkg, [keys["b"][1]]).package.signed_by is not None


def test_cli_keygen_sign_verify(lib, tmp_path):
    from compiler.cli import main

    pkg = build_tiny(lib).save(tmp_path / "c.npkg")
    assert main(["keygen", "-o", str(tmp_path / "k.key")]) == 0
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
    assert main(["keygen", "-o", str(tmp_path / "k.key")]) == 1   # never overwrites a key
    assert main(["verify", str(pkg), "--public-key", str(tmp_path / "k.pub")]) == 1  # unsigned
    assert main(["sign", str(pkg), "--key", str(tmp_path / "k.key")]) == 0
    assert main(["verify", str(pkg), "--public-key", str(tmp_path / "k.pub")]) == 0
    (pkg / "weights.safetensors").write_bytes(b"junk")
    assert main(["verify", str(pkg), "--public-key", str(tmp_path / "k.pub")]) == 1


def test_encrypted_key(lib, tmp_path, monkeypatch):
    from compiler.cli import main

    monkeypatch.setenv("NPUCC_TEST_PW", "correct horse")
    assert main(["keygen", "-o", str(tmp_path / "e.key"), "--password-env", "NPUCC_TEST_PW"]) == 0
    assert b"ENCRYPTED" in (tmp_path / "e.key").read_bytes()
    pkg = build_tiny(lib).save(tmp_path / "e.npkg")
    assert main(["sign", str(pkg), "--key", str(tmp_path / "e.key")]) == 1   # no password
    assert main(["sign", str(pkg), "--key", str(tmp_path / "e.key"),
                 "--password-env", "NPUCC_TEST_PW"]) == 0
    assert _load(pkg, [tmp_path / "e.pub"]).package.signed_by is not None


# -- foreign code never runs ---------------------------------------------------------------------
def test_constructor_of_resigned_library_never_runs(signed, keys, tmp_path):
    """A kernels.so whose constructor writes a file, hashes recomputed and the package
    re-signed by an untrusted key: refused before the library is ever opened."""
    from runtime import SignatureError
    from runtime.package_save import sign_package

    marker = tmp_path / "pwned"
    pkg = _copy(signed, tmp_path)
    evil_library(pkg / "kernels.so", marker)
    (pkg / "kernels.c").unlink()
    rehash_manifest(pkg)
    sign_package(pkg, keys["b"][0])
    with pytest.raises(SignatureError):
        _load(pkg, [keys["a"][1]])
    assert not marker.exists()


def test_library_swapped_after_verification_never_runs(signed, keys, tmp_path, monkeypatch):
    """The swap-after-verify race: kernels.so is replaced on disk after the package was
    verified and before the executor loads the library. The loader runs the verified bytes."""
    import runtime.executor as executor_module
    from runtime import Package
    from runtime.executor import Executor

    marker = tmp_path / "pwned"
    pkg = _copy(signed, tmp_path)
    evil = evil_library(tmp_path / "evil.so", marker)
    real_import = executor_module.import_tvm

    def swap_then_import(*a, **kw):
        os.replace(evil, pkg / "kernels.so")     # the window: verified, not yet loaded
        return real_import(*a, **kw)

    p = Package.load(pkg, trusted_keys=[keys["a"][1]])
    monkeypatch.setattr(executor_module, "import_tvm", swap_then_import)
    m = Executor(p)
    assert b"constructor" in (pkg / "kernels.so").read_bytes()   # the swap happened
    x = tiny_input()
    np.testing.assert_allclose(m(x)[0], tiny_reference(x), rtol=1e-5, atol=1e-5)
    assert not marker.exists()


# -- symlinks and special files ----------------------------------------------------------------
def test_symlinked_library_refused(signed, tmp_path):
    from runtime import PackageError

    pkg = _copy(signed, tmp_path)
    outside = tmp_path / "outside.so"
    shutil.move(pkg / "kernels.so", outside)
    (pkg / "kernels.so").symlink_to(outside)
    with pytest.raises(PackageError, match="symbolic link"):
        _load(pkg)


def test_symlinked_folder_to_etc_refused(signed, tmp_path):
    """``device -> /etc`` plus a ``device/passwd`` entry: refused, and so nothing of /etc can
    be copied into a new package by ``Package.load(p).save(q)``."""
    from runtime import Package, PackageError

    pkg = _copy(signed, tmp_path)
    (pkg / "device").symlink_to("/etc")
    data = Path("/etc/passwd").read_bytes()
    m = json.loads((pkg / "manifest.json").read_text())
    m["files"]["device/passwd"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    (pkg / "manifest.json").write_text(json.dumps(m))
    (pkg / "model.sig").unlink()
    with pytest.raises(PackageError, match="symbolic link"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Package.load(pkg).save(tmp_path / "q.npkg")
    assert not (tmp_path / "q.npkg").exists()


def test_fifo_and_unlisted_symlink_refused(signed, tmp_path):
    from runtime import PackageError

    pkg = _copy(signed, tmp_path)
    os.mkfifo(pkg / "weights.fifo")
    with pytest.raises(PackageError, match="fifo"):
        _load(pkg)
    os.unlink(pkg / "weights.fifo")
    (pkg / "notes").symlink_to("/etc/hostname")
    with pytest.raises(PackageError, match="symbolic link"):
        _load(pkg)


def test_loaded_package_saves_verified_bytes(signed, keys, tmp_path):
    """Package.load(p).save(q) writes the bytes that were verified, even if p changes after."""
    from runtime import Package

    p = _copy(signed, tmp_path)
    pkg = Package.load(p, trusted_keys=[keys["a"][1]])
    (p / "weights.safetensors").write_bytes(b"changed after loading")
    pkg.save(tmp_path / "q.npkg", sign_key=keys["a"][0])
    x = tiny_input()
    np.testing.assert_allclose(_load(tmp_path / "q.npkg", [keys["a"][1]])(x)[0],
                               tiny_reference(x), rtol=1e-5, atol=1e-5)


# -- crafted manifests -------------------------------------------------------------------------
def _edit(pkg: Path, fn) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    fn(m)
    (pkg / "manifest.json").write_text(json.dumps(m))


def _tensor(m, name):
    return next(t for t in m["tensors"] if t["name"] == name)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format_version=True), "format version true"),
    (lambda m: m["memory"].update(arena_bytes=10**14), r"arena_bytes 100000000000000"),
    (lambda m: m["target"]["tvm"].update({"num-cores": "abc"}), "num-cores"),
    (lambda m: _tensor(m, "y").update(shape=[10**13, 4]), r"shape\[0\] 10000000000000"),
    (lambda m: m["inputs"][0].update(shape=[10**6, 10**6, 10**6]), "elements"),
    (lambda m: m.update(steps="x" * 10), "steps: expected a list"),
    (lambda m: m["files"]["kernels.so"].update(bytes=-1), "bytes -1"),
    (lambda m: m["files"]["kernels.so"].update(sha256="zz"), "sha256"),
    (lambda m: m.update(weight_encoding={"w": {"encoding": "csr", "dtype": "f32",
                                              "shape": [10**13], "nnz": 1}}), "shape"),
    (lambda m: m.update(weight_encoding={"w": {"encoding": "csr", "dtype": "f32",
                                              "shape": [10**6, 10**6], "nnz": 1}}),
     "dense bytes"),
    (lambda m: _tensor(m, "y").update(nbytes=2**41), "nbytes"),
])
def test_crafted_manifest_refused(signed, tmp_path, edit, match):
    from runtime import PackageError

    pkg = _copy(signed, tmp_path)
    (pkg / "model.sig").unlink()
    _edit(pkg, edit)
    with pytest.raises(PackageError, match=match):
        _load(pkg)


def test_deep_json_manifest_refused(signed, tmp_path):
    from runtime import PackageError

    pkg = _copy(signed, tmp_path)
    (pkg / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PackageError, match="levels deep"):
        _load(pkg)
    m = json.loads((signed / "manifest.json").read_text())
    m["target"]["extra"] = json.loads("[" * 40 + "]" * 40)
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="levels deep"):
        _load(pkg)


# -- manifest fuzzing: only PackageError -------------------------------------------------------
def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))



def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.sampled_from([0, -1, 1, 63, 64, 2**31, 2**63, 10**14])
               | st.floats(allow_nan=False) | st.text(max_size=12)
               | st.sampled_from(["f32", "i8", "bf16", "weight", "input", "kernels.so", "x"]))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)


def test_fuzzed_manifests_raise_only_package_errors(signed, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from runtime import PackageError, RuntimeError_

    base = json.loads((signed / "manifest.json").read_text())
    paths = [p for p, _ in _paths(base)]
    pkg = _copy(signed, tmp_path_factory.mktemp("fuzz"))
    (pkg / "model.sig").unlink()

    @settings(max_examples=int(os.environ.get("NPUCC_FUZZ_EXAMPLES", "300")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(paths), _json_values(),
                              st.sampled_from(["set", "delete", "raw"])), min_size=1,
                    max_size=3))
    def check(edits):
        m = json.loads(json.dumps(base))
        text = None
        for path, value, how in edits:
            if how == "raw":   # truncated or non-JSON bytes
                text = json.dumps(m)[: len(json.dumps(value)) * 7 % 400]
                continue
            if not path:
                m = value
                continue
            parent = m
            try:
                for k in path[:-1]:
                    parent = parent[k]
                if how == "delete":
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue
        (pkg / "manifest.json").write_text(text if text is not None else json.dumps(m))
        try:
            ex = _load(pkg)
        except PackageError:
            return
        try:
            ex(tiny_input())
        except RuntimeError_:
            pass

    check()


def test_compile_signs_with_sign_key(keys, tmp_path):
    """compile(..., sign_key=) and ``npucc compile --sign-key`` write signed packages."""
    from compiler import compile as compile_model
    from compiler.cli import main

    digits = REPO / "examples" / "digits_cnn.onnx"
    m = compile_model(str(digits), "host", progress=False, sign_key=keys["a"][0])
    out = m.save(tmp_path / "d.npkg")
    x = np.load(REPO / "examples" / "digit.npy").astype(np.float32).reshape(1, 1, 8, 8)
    np.testing.assert_allclose(_load(out, [keys["a"][1]])(x)[0], m(x)[0], rtol=0, atol=0)
    assert main(["compile", str(digits), "-o", str(tmp_path / "c.npkg"), "--no-progress",
                 "--sign-key", str(keys["b"][0])]) == 0
    assert main(["verify", str(tmp_path / "c.npkg"), "--public-key", str(keys["b"][1])]) == 0
    assert main(["verify", str(tmp_path / "c.npkg"), "--public-key", str(keys["a"][1])]) == 1


def test_cli_run_with_trusted_key(signed, keys, tmp_path, capsys):
    from compiler.cli import main

    np.save(tmp_path / "x.npy", tiny_input())
    assert main(["run", str(signed), "--input", str(tmp_path / "x.npy"),
                 "--trusted-key", str(keys["a"][1])]) == 0
    assert main(["run", str(signed), "--input", str(tmp_path / "x.npy"),
                 "--trusted-key", str(keys["b"][1])]) == 1
    assert "not a trusted key" in capsys.readouterr().err
    bad = tiny_input()
    bad[1, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    assert main(["run", str(signed), "--input", str(tmp_path / "bad.npy"),
                 "--trusted-key", str(keys["a"][1]), "--check-finite"]) == 1
    assert "input 'x' has 1 non-finite" in capsys.readouterr().err


def test_foreign_library_refused_before_dlopen_without_keys(signed, tmp_path):
    """No trust root configured (the package loads with a warning), but a kernels.so that does
    not export the plan's kernels is refused from its symbol table: its constructor never
    runs (it used to run at dlopen, before the kernel lookup failed)."""
    from runtime import PackageError

    marker = tmp_path / "pwned"
    pkg = _copy(signed, tmp_path)
    (pkg / "model.sig").unlink()
    evil = evil_library(tmp_path / "evil.so", marker)
    data = evil.read_bytes().replace(b"dense_bias", b"dense_xxxx")
    (pkg / "kernels.so").write_bytes(data)
    rehash_manifest(pkg)
    with pytest.raises(PackageError, match="kernel 'dense_bias' is not in kernels.so"):
        _load(pkg)
    assert not marker.exists()


def test_size_differs_from_manifest(signed, tmp_path):
    from runtime import IntegrityError

    pkg = _copy(signed, tmp_path)
    with open(pkg / "weights.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(IntegrityError, match=r"weights.safetensors has \d+ bytes; the manifest "
                                             r"says"):
        _load(pkg)


def test_weights_held_once_and_rechecked(signed, keys, tmp_path):
    """A running package holds its weights once (the executor's copy); saving it afterwards
    reads them again and refuses bytes that changed since they were verified."""
    from runtime import IntegrityError

    p = _copy(signed, tmp_path)
    m = _load(p, [keys["a"][1]])
    assert m.package._weights is None          # the verified bytes were released
    m.package.save(tmp_path / "q.npkg")        # unchanged on disk: re-read, re-checked, saved
    x = tiny_input()
    np.testing.assert_allclose(_load(tmp_path / "q.npkg")(x)[0], tiny_reference(x), rtol=1e-5,
                               atol=1e-5)
    q = tmp_path / "q.npkg"                    # the package now lives there (save moved it)
    data = bytearray((q / "weights.safetensors").read_bytes())
    data[-3] ^= 1
    (q / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed since the package was loaded"):
        m.package.save(tmp_path / "r.npkg")
    assert not (tmp_path / "r.npkg").exists()
