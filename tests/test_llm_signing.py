"""Signed LLM packages (issue 13, with issue 12's rules): ``npucc sign`` signs a compile-llm
package, ``--trusted-key`` / ``trusted_keys=`` verifies it before any kernel library is
loaded, and a tampered weights file or library is refused — by its sha256 when the manifest
was left alone, by the signature when the attacker re-hashed the manifest too. Real keys, a
real shared library whose constructor writes a file when dlopened; nothing is mocked."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from package_helpers import evil_library

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 99, 3, 200]


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("NPUCC_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))   # no per-user keys


def _npucc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "compiler.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(a signed package, its public key, another key's public key, the float reference's
    greedy tokens), compiled once from a tiny random Llama."""
    from compiler import compile_llm
    from runtime.signing import generate_key

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True,
                                   initializer_range=0.2, vocab_size=256)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("signed")
    m = compile_llm(hf, max_context=32, chunk=8, quantize="int4-g32", output=d / "m.npkg")
    expected = m.generate(PROMPT, 8, ignore_eos=True)
    key, pub = generate_key(d / "k.key")
    _, other = generate_key(d / "other.key")
    r = _npucc("sign", d / "m.npkg", "--key", key)
    assert r.returncode == 0, r.stderr
    assert (d / "m.npkg" / "model.sig").is_file()
    return d / "m.npkg", pub, other, expected


@pytest.fixture
def copy(built, tmp_path):
    pkg = tmp_path / "c.npkg"
    shutil.copytree(built[0], pkg)
    return pkg


def _rehash(pkg: Path) -> None:
    """What an attacker who edits a file does: recompute its sha256 and size in llm.json."""
    m = json.loads((pkg / "llm.json").read_text())
    for name, entry in m["files"].items():
        data = (pkg / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (pkg / "llm.json").write_text(json.dumps(m))


def _flip_weight_byte(pkg: Path) -> None:
    m = json.loads((pkg / "llm.json").read_text())
    e = next(e for k, e in m["weights"].items() if ".wq" in k)
    with open(pkg / "weights.bin", "r+b") as f:
        f.seek(e["offset"] + 3)
        b = f.read(1)[0]
        f.seek(e["offset"] + 3)
        f.write(bytes([b ^ 0x11]))


def test_signed_package_loads_with_its_key_and_generates_the_same(built):
    from runtime.llm import load

    pkg, pub, _, expected = built
    m = load(pkg, trusted_keys=[pub])
    assert m.package.signed_by is not None and m.package.signed_by.source == str(pub)
    assert m.generate(PROMPT, 8, ignore_eos=True) == expected
    r = _npucc("verify", pkg, "--public-key", pub)
    assert r.returncode == 0, r.stderr
    assert "signature OK" in r.stdout


def test_other_key_and_unsigned_are_refused(built, copy):
    from runtime.errors import SignatureError
    from runtime.llm import load

    pkg, pub, other, _ = built
    with pytest.raises(SignatureError, match="not a trusted key"):
        load(pkg, trusted_keys=[other])
    (copy / "model.sig").unlink()
    with pytest.raises(SignatureError, match=r"not signed \(model.sig missing\)"):
        load(copy, trusted_keys=[pub])
    r = _npucc("generate", copy, "hello", "-n", "2", "--trusted-key", pub)
    assert r.returncode != 0
    assert "not signed" in r.stderr and "Traceback" not in r.stderr


def test_tampered_weights_are_refused(built, copy):
    from runtime.errors import IntegrityError, SignatureError
    from runtime.llm import load

    _, pub, _, _ = built
    _flip_weight_byte(copy)
    with pytest.raises(IntegrityError, match="weights.bin does not match its sha256"):
        load(copy, trusted_keys=[pub])
    _rehash(copy)   # the manifest now agrees with the tampered file; the signature does not
    with pytest.raises(SignatureError, match=r"changed \['llm.json', 'weights.bin'\]"):
        load(copy, trusted_keys=[pub])
    r = _npucc("verify", copy, "--public-key", pub)
    assert r.returncode != 0 and "files differ from what was signed" in r.stderr


@pytest.mark.parametrize("rehash", [False, True])
def test_tampered_library_never_runs(built, copy, tmp_path, rehash):
    """A library swapped for one whose constructor writes a file: refused before dlopen, by
    hash (manifest untouched) or by signature (manifest re-hashed), and even without keys by
    the export check on its ELF symbols."""
    from runtime.errors import IntegrityError, PackageError, SignatureError
    from runtime.llm import load

    _, pub, _, _ = built
    marker = tmp_path / "constructor-ran"
    evil_library(tmp_path / "evil.so", marker)
    shutil.copyfile(tmp_path / "evil.so", copy / "decode.so")
    if rehash:
        _rehash(copy)
    with pytest.raises(SignatureError if rehash else IntegrityError,
                       match="changed" if rehash else "decode.so"):
        load(copy, trusted_keys=[pub])
    if rehash:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(PackageError, match="not exported by the library"):
                load(copy, trusted_keys=[])
    assert not marker.exists()


def test_unlisted_file_is_refused_when_verifying(built, copy):
    from runtime.errors import PackageError, SignatureError
    from runtime.llm import load
    from runtime.llm_package import sign_llm_package

    _, pub, _, _ = built
    (copy / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(SignatureError, match=r"\['extra.so'\] are not part of the signed"):
        load(copy, trusted_keys=[pub])
    with pytest.raises(PackageError, match="refusing to sign a package with unlisted files"):
        sign_llm_package(copy, built[0].parent / "k.key")


def test_unverified_load_warns_and_links_are_refused(built, copy):
    from runtime.errors import PackageError
    from runtime.llm_package import read_verified_llm

    _, pub, _, expected = built
    code = (f"from runtime.llm import load; m = load({str(copy)!r}); "
            f"print(m.generate({PROMPT}, 8, ignore_eos=True))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "UnverifiedPackageWarning" in r.stderr and "loaded without verifying" in r.stderr
    assert r.stdout.strip() == str(expected)
    (copy / "weights.bin").rename(copy / "w.real")
    (copy / "weights.bin").symlink_to(copy / "w.real")
    with pytest.raises(PackageError, match="symbolic link"):
        read_verified_llm(copy, [pub])


def test_weights_are_the_verified_mapping(built):
    """The weights the kernels read are views of the one mapping that was hashed (not a
    second open of the path), and are not copied into Python memory."""
    from runtime.llm import load

    pkg, pub, _, _ = built
    m = load(pkg, trusted_keys=[pub])
    w = m.package.map_weights()
    base = np.frombuffer(m.package.weights_mapping, np.uint8)
    first = min(w.values(), key=lambda a: a.ctypes.data)
    assert first.ctypes.data >= base.ctypes.data
    assert all(base.ctypes.data <= a.ctypes.data < base.ctypes.data + base.nbytes
               for a in w.values())
    blob = (pkg / "weights.bin").read_bytes()
    assert hashlib.sha256(bytes(base)).hexdigest() == hashlib.sha256(blob).hexdigest()
