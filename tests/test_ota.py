"""Over-the-air delta updates (compiler/update.py, runtime/update.py, npucc update).

Fast cases use the one-kernel package of tests/package_helpers.py; the four kinds of change of
bench/ota.py (fine-tuned layer, re-calibrated quantization, merged LoRA, compiler-only) run on
the small GPT-2-style decoder, compiled for real. Every applied package is compared with NEW
byte for byte and loaded with trusted keys (so with NEW's own signature).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compiler.cli import main
from compiler.update import make_update
from runtime import load
from runtime.delta_format import UpdateError
from runtime.errors import PackageError, SignatureError
from runtime.signing import generate_key
from runtime.update import apply_update
from tests.package_helpers import build_library, build_tiny, tiny_input

ROOT = Path(__file__).resolve().parents[1]


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _manifest_sha(path: Path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, and signed packages OLD (v1), NEW (v2: one weight changed), OTHER (v1, another
    model); deltas OLD->NEW (signed, unsigned, signed by a stranger) and NEW->OLD."""
    d = tmp_path_factory.mktemp("ota")
    key, pub = generate_key(d / "k.key")
    skey, spub = generate_key(d / "stranger.key")
    lib = build_library(d / "lib.so")

    def package(name: str, seed: int, version: str, bump: float = 0.0) -> Path:
        pkg = build_tiny(lib, seed)
        w = dict(pkg.weights())
        w["w"] = w["w"].copy()
        w["w"][0, :3] += bump
        pkg._weights = w if bump else pkg._weights
        pkg.manifest["version"] = version
        return pkg.save(d / name, sign_key=key)

    w = {"old": package("old.npkg", 0, "1"), "new": package("new.npkg", 0, "2", bump=0.5),
         "other": package("other.npkg", 7, "1")}
    w["delta"] = make_update(w["old"], w["new"], d / "u.npkd", key).path
    w["unsigned"] = make_update(w["old"], w["new"], d / "unsigned.npkd").path
    w["stranger"] = make_update(w["old"], w["new"], d / "stranger.npkd", skey).path
    w["back"] = make_update(w["new"], w["old"], d / "back.npkd", key).path
    w.update(dir=d, key=key, pub=pub)
    return w


def _install(world, tmp_path: Path, which: str = "old") -> Path:
    dst = tmp_path / "installed.npkg"
    dst.mkdir()
    for name, data in _files(world[which]).items():
        (dst / name).write_bytes(data)
    return dst


def _loads_as(path: Path, world, which: str) -> None:
    """``path`` loads with the trusted key, is byte-identical to package ``which`` and
    computes its outputs."""
    assert _files(path) == _files(world[which])
    m = load(path, trusted_keys=[world["pub"]])
    assert m.package.signed_by.id == load(world[which], [world["pub"]]).package.signed_by.id
    x = tiny_input()
    want = load(world[which], [world["pub"]]).run({"x": x})[0]
    np.testing.assert_array_equal(m.run({"x": x})[0], want)


def test_round_trip_byte_identical_and_signed_by_new(world, tmp_path):
    inst = _install(world, tmp_path)
    r = apply_update(inst, world["delta"], trusted_keys=[world["pub"]])
    assert r.applied and (r.old_version, r.new_version) == ("1", "2")
    assert r.signed_by.id == load(world["new"], [world["pub"]]).package.signed_by.id
    _loads_as(inst, world, "new")
    assert (inst / "model.sig").read_bytes() == (world["new"] / "model.sig").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["installed.npkg"]  # nothing left
    # the changed weight traveled as a diff, the kernel library was referenced
    st = make_update(world["old"], world["new"], tmp_path / "again.npkd")
    assert st.tensors == {"w": st.tensors["w"]} and st.tensors["w"] in ("bsdiff", "zstd-ref")
    assert st.copied_bytes >= (world["old"] / "kernels.so").stat().st_size
    # applying it again is a no-op, not an error
    again = apply_update(inst, world["delta"], trusted_keys=[world["pub"]])
    assert not again.applied


def _refused(world, tmp_path, delta, exc, match, which="old", **kw) -> Path:
    """Apply ``delta`` to a fresh copy of ``which``: refused with ``match``, and the copy is
    unchanged, loads, and nothing was left beside it. Returns the copy's path."""
    where = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
    where.mkdir()
    inst = _install(world, where, which)
    before = _files(inst)
    with pytest.raises(exc, match=match):
        apply_update(inst, delta, **kw)
    assert _files(inst) == before
    _loads_as(inst, world, which)
    assert sorted(p.name for p in where.iterdir()) == ["installed.npkg"]
    return inst


def test_refuses_wrong_base(world, tmp_path):
    _refused(world, tmp_path, world["delta"], UpdateError,
             r"made for another package \(base manifest sha256 "
             + _manifest_sha(world["old"])[:16], which="other",
             trusted_keys=[world["pub"]])


def test_refuses_tampered_delta(world, tmp_path):
    data = bytearray(world["delta"].read_bytes())
    data[-5] ^= 0x40                      # one bit of the payload
    bad = tmp_path / "tampered.npkd"
    bad.write_bytes(bytes(data))
    _refused(world, tmp_path, bad, SignatureError,
             "refusing the update: .*the signature does not verify with any trusted key|"
             "files differ from what was signed", trusted_keys=[world["pub"]])
    # the header (which says what to build) is covered too
    data = bytearray(world["delta"].read_bytes())
    i = data.index(b'"version":"2"')
    data[i + 11:i + 12] = b"9"
    bad.write_bytes(bytes(data))
    _refused(world, tmp_path, bad, SignatureError, "files differ from what was signed: "
             r"changed \['delta.json'\]", trusted_keys=[world["pub"]])


def test_refuses_unsigned_or_foreign_signed_delta_when_keys_are_configured(world, tmp_path,
                                                                           monkeypatch):
    _refused(world, tmp_path, world["unsigned"], SignatureError,
             "the update is not signed and trusted keys are configured",
             trusted_keys=[world["pub"]])
    # keys from the environment count as configured
    monkeypatch.setenv("NPUCC_TRUSTED_KEYS", str(world["pub"]))
    _refused(world, tmp_path, world["unsigned"], SignatureError, "not signed")
    _refused(world, tmp_path, world["stranger"], SignatureError,
             "which is not a trusted key")


def test_unsigned_delta_without_keys_applies_with_a_warning(world, tmp_path):
    """In a fresh process (the warning is given once per process, so an earlier test in this
    one may already have used it up): ``npucc update apply`` with no key configured."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "NPUCC_TRUSTED_KEYS"}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "no-config"), PYTHONPATH=str(ROOT))
    inst = _install(world, tmp_path)
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "update", "apply", str(inst),
                        str(world["unsigned"])], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "UnverifiedPackageWarning" in r.stderr, r.stderr
    assert "without verifying its signature" in r.stderr, r.stderr
    _loads_as(inst, world, "new")


def test_refuses_downgrade_unless_allowed(world, tmp_path):
    inst = _refused(world, tmp_path, world["back"], UpdateError,
                    "refusing to downgrade .*installs version 1 over the installed 2; pass "
                    r"allow_downgrade=True \(--allow-downgrade\)", which="new",
                    trusted_keys=[world["pub"]])
    r = apply_update(inst, world["back"], trusted_keys=[world["pub"]], allow_downgrade=True)
    assert (r.old_version, r.new_version) == ("2", "1")
    _loads_as(inst, world, "old")


def test_damaged_installed_package_is_refused_before_anything_is_written(world, tmp_path):
    inst = _install(world, tmp_path)
    (inst / "weights.safetensors").write_bytes(b"x" * (inst / "weights.safetensors")
                                                .stat().st_size)
    with pytest.raises(PackageError, match="does not match its sha256"):
        apply_update(inst, world["delta"], trusted_keys=[world["pub"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["installed.npkg"]


def test_not_a_delta_and_truncated_delta(world, tmp_path):
    junk = tmp_path / "junk.npkd"
    junk.write_bytes(b"hello")
    inst = _install(world, tmp_path)
    with pytest.raises(UpdateError, match="is not an npucc delta"):
        apply_update(inst, junk, trusted_keys=[world["pub"]])
    junk.write_bytes(world["delta"].read_bytes()[:-10])
    with pytest.raises(UpdateError, match="truncated or damaged"):
        apply_update(inst, junk, trusted_keys=[world["pub"]])
    _loads_as(inst, world, "old")


def test_make_refuses_to_overwrite_what_is_not_a_delta(world, tmp_path):
    from compiler.errors import NpuccError

    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(NpuccError, match="refusing to replace .*notes.txt: it exists and is "
                       "not an npucc delta"):
        make_update(world["old"], world["new"], precious, world["key"])
    assert precious.read_text() == "mine"


def test_make_with_a_key_refuses_an_unsigned_new(world, tmp_path):
    from compiler.errors import NpuccError

    unsigned = _install(world, tmp_path, "new")
    (unsigned / "model.sig").unlink()
    with pytest.raises(NpuccError, match="is not signed: an update installs NEW with its own "
                       "signature, so sign it first"):
        make_update(world["old"], unsigned, tmp_path / "u.npkd", world["key"])
    assert not (tmp_path / "u.npkd").exists()


def test_refuses_a_link_to_the_package(world, tmp_path):
    inst = _install(world, tmp_path)
    (tmp_path / "link.npkg").symlink_to(inst)
    with pytest.raises(UpdateError, match="is a symbolic link; apply the update to the package "
                       "folder itself"):
        apply_update(tmp_path / "link.npkg", world["delta"], trusted_keys=[world["pub"]])
    _loads_as(inst, world, "old")


def test_cli_make_and_apply(world, tmp_path, capsys):
    out = tmp_path / "cli.npkd"
    assert main(["update", "make", str(world["old"]), str(world["new"]), "-o", str(out),
                 "--key", str(world["key"])]) == 0
    assert "% of NEW" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    other = _install(world, tmp_path / "other", "other")
    assert main(["update", "apply", str(other), str(out), "--trusted-key",
                 str(world["pub"])]) == 1
    assert "made for another package" in capsys.readouterr().err
    inst = _install(world, tmp_path)
    assert main(["update", "apply", str(inst), str(out), "--trusted-key",
                 str(world["pub"])]) == 0
    assert "version 1 -> 2" in capsys.readouterr().out
    _loads_as(inst, world, "new")
    assert main(["update", "apply", str(inst), str(world["back"]), "--trusted-key",
                 str(world["pub"])]) == 1
    assert "refusing to downgrade" in capsys.readouterr().err
    assert main(["update", "apply", str(inst), str(world["back"]), "--trusted-key",
                 str(world["pub"]), "--allow-downgrade"]) == 0


def test_manifest_version_is_optional_and_checked(world, tmp_path):
    from runtime.manifest_schema import parse_version

    assert parse_version("1.4") == parse_version("1.4.0") < parse_version("1.10")
    inst = _install(world, tmp_path)
    m = json.loads((inst / "manifest.json").read_text())
    m["version"] = "1.x"
    (inst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="model version \"1.x\" is not a version"):
        load(inst)


def test_compile_model_version_from_the_shell(tmp_path, capsys):
    onnx = ROOT / "examples" / "digits_cnn.onnx"
    out = tmp_path / "d.npkg"
    assert main(["compile", str(onnx), "-o", str(out), "--no-progress",
                 "--model-version", "2.x"]) == 1
    assert "model version \"2.x\" is not a version" in capsys.readouterr().err
    assert not out.exists()   # refused before the work (a good version: the decoder cases)


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from runtime.update import apply_update

    def hook(step):
        if step == sys.argv[3]:
            os.kill(os.getpid(), signal.SIGKILL)

    apply_update(sys.argv[1], sys.argv[2], trusted_keys=[sys.argv[4]], on_step=hook)
""")


@pytest.mark.parametrize("step", ["verified-delta", "checked-base", "wrote:kernels.so",
                                  "wrote:manifest.json", "rebuilt", "verified-result",
                                  "swapped"])
def test_kill_9_during_apply_leaves_a_loadable_package(world, tmp_path, step):
    inst = _install(world, tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, str(script), str(inst), str(world["delta"]), step,
                        str(world["pub"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    expect = "new" if step == "swapped" else "old"
    _loads_as(inst, world, expect)
    # the next apply finishes the job and removes what the killed one left behind
    r = apply_update(inst, world["delta"], trusted_keys=[world["pub"]])
    assert r.applied == (expect == "old")
    _loads_as(inst, world, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["installed.npkg", "kill.py"]


# -- the four kinds of change of bench/ota.py, on the small decoder -------------------------
@pytest.fixture(scope="module")
def decoder_packages(tmp_path_factory, gpt2_model):
    """v1 of the test decoder, and four v2s: last block fine-tuned (real AdamW steps),
    int8 re-calibrated, LoRA (random A/B, rank 8) merged into q and v, and the same weights
    with other kernels (built for x86-64-v2 instead of -v3). All signed."""
    import copy

    import torch

    from compiler import compile
    from compiler.driver import CompileOptions, import_model
    from examples.models import gpt2_config, gpt2_inputs

    d = tmp_path_factory.mktemp("ota-decoder")
    key, pub = generate_key(d / "k.key")
    model, ids = gpt2_model
    cfg = gpt2_config("test")
    calib_a = [{"input_ids": gpt2_inputs(**cfg, seed=s)} for s in range(2)]
    calib_b = [{"input_ids": gpt2_inputs(**cfg, seed=s)} for s in range(10, 14)]
    example = (torch.from_numpy(ids),)

    def graph(module):   # imported once per set of weights, compiled as often as needed
        return import_model(module, CompileOptions(example_inputs=example,
                                                   input_names=["input_ids"]))

    def build(name, g, version, **kw):
        m = compile(g, progress=False, version=version, cpu=kw.pop("cpu", "x86-64-v3"), **kw)
        return m.save(d / name, sign_key=key)

    tuned = copy.deepcopy(model).train()
    for p in tuned.parameters():
        p.requires_grad_(False)
    last = tuned.h[-1]
    for p in last.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(last.parameters(), lr=1e-3)
    x = torch.from_numpy(gpt2_inputs(**cfg, batch=4, seed=3))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(tuned(x[:, :-1]).flatten(0, 1),
                                                 x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    lora = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    dm = cfg["d_model"]
    with torch.no_grad():
        for blk in lora.h:
            w = blk.attn.c_attn.weight            # [3d, d]: q, k, v rows
            for rows in (slice(0, dm), slice(2 * dm, 3 * dm)):
                a = torch.randn(8, dm, generator=g) * 0.02
                b = torch.randn(dm, 8, generator=g) * 0.02
                w[rows] += b @ a
    g = graph(model)
    return {
        "pub": pub, "key": key, "dir": d,
        "base": build("base.npkg", g, "1"),
        "fine-tuned": build("tuned.npkg", graph(tuned), "2"),
        "lora": build("lora.npkg", graph(lora), "2"),
        "compiler-only": build("v2.npkg", g, "2", cpu="x86-64-v2"),
        "int8-base": build("i8a.npkg", g, "1", quantize="int8", calibration=calib_a),
        "re-calibrated": build("i8b.npkg", g, "2", quantize="int8", calibration=calib_b),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fine-tuned", "re-calibrated", "lora", "compiler-only"])
def test_four_kinds_of_change_round_trip(decoder_packages, case, tmp_path):
    p = decoder_packages
    base = p["int8-base"] if case == "re-calibrated" else p["base"]
    st = make_update(base, p[case], tmp_path / "u.npkd", p["key"])
    inst = tmp_path / "inst.npkg"
    inst.mkdir()
    for name, data in _files(base).items():
        (inst / name).write_bytes(data)
    apply_update(inst, st.path, trusted_keys=[p["pub"]])
    assert _files(inst) == _files(p[case])
    m = load(inst, trusted_keys=[p["pub"]])
    assert m.package.manifest["version"] == "2"
    changed = set(st.tensors)
    if case == "fine-tuned":     # the last block's tensors, and only those
        assert len(changed) >= 8 and all(k.startswith("h.1.") for k in changed), changed
    elif case == "lora":         # q and v live in c_attn: its two weights, nothing else
        assert changed == {f"h.{i}.attn.c_attn.weight.packed.k003_dense" for i in (0, 1)}
    elif case == "compiler-only":   # another CPU level: new kernels, weights re-packed
        assert all(".packed." in k for k in changed) and st.delta_bytes < 0.1 * \
            st.new_package_bytes
    else:                        # the int8 weights stay; scales and requantization change
        assert st.delta_bytes < 0.05 * st.new_package_bytes
