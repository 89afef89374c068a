"""No user file is ever destroyed (issue 12, point 3 and 4): output rules of ``npucc compile``,
``import`` and ``opt``, atomic package replacement under a crash at every step, and temporary
folders removed.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from package_helpers import build_library, build_tiny, tiny_input, tiny_reference

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits_cnn.onnx"


def _npucc(*argv: str) -> int:
    from compiler.cli import main

    return main([str(a) for a in argv])


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return build_library(tmp_path_factory.mktemp("lib") / "kernels.so")


def _load(path: Path):
    from runtime import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(path)


# -- package outputs ---------------------------------------------------------------------------
def test_compile_refuses_a_folder_that_is_not_a_package(tmp_path):
    """``npucc compile m.onnx -o webapp`` must not delete a web app that happens to have a
    manifest.json."""
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (app / "index.html").write_text("<html></html>")
    (app / "src" / "app.js").write_text("console.log(1)")
    before = _tree(app)
    assert _npucc("compile", DIGITS, "-o", app, "--no-progress") == 1
    assert _tree(app) == before


def test_save_refuses_anything_but_our_package(lib, tmp_path):
    from runtime import PackageError

    pkg = build_tiny(lib)
    for name, make in [
        ("file", lambda p: p.write_text("a user's file")),
        ("empty_dir", lambda p: p.mkdir()),
        ("link", lambda p: p.symlink_to(tmp_path)),
        ("fifo", lambda p: os.mkfifo(p)),
    ]:
        target = tmp_path / name
        make(target)
        with pytest.raises(PackageError, match="refusing to replace"):
            pkg.save(target)
        assert os.path.lexists(target)
    # our own package, with a file added by someone: not ours any more
    ours = pkg.save(tmp_path / "ours.npkg")
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(PackageError, match="notes.txt"):
        pkg.save(ours)
    assert (ours / "notes.txt").read_text() == "mine"
    (ours / "notes.txt").unlink()
    build_tiny(lib, seed=3).save(ours)   # an intact package of ours is replaced
    x = tiny_input()
    np.testing.assert_allclose(_load(ours)(x)[0], tiny_reference(x, seed=3), rtol=1e-5,
                               atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_compile_refuses_its_input_as_output(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(DIGITS, model)
    assert _npucc("compile", model, "-o", model, "--no-progress") == 1
    assert model.read_bytes() == DIGITS.read_bytes()


# -- IR outputs --------------------------------------------------------------------------------
def test_import_refuses_its_input_and_hard_links(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(DIGITS, model)
    assert _npucc("import", model, "-o", model) == 1
    os.link(model, tmp_path / "h.ir")
    assert _npucc("import", model, "-o", tmp_path / "h.ir") == 1
    assert model.read_bytes() == DIGITS.read_bytes()
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "h.safetensors").exists()


def test_import_keeps_an_unrelated_safetensors(tmp_path):
    """``npucc import hf/model.onnx -o hf/model.ir`` beside a Hugging Face model.safetensors."""
    from safetensors.numpy import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(DIGITS, hf / "model.onnx")
    save_file({"embed": np.ones(3, np.float32)}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    before = (hf / "model.safetensors").read_bytes()
    assert _npucc("import", hf / "model.onnx", "-o", hf / "model.ir") == 1
    assert (hf / "model.safetensors").read_bytes() == before
    assert not (hf / "model.ir").exists()
    # our own outputs are replaced freely
    assert _npucc("import", hf / "model.onnx", "-o", hf / "digits.ir") == 0
    assert _npucc("import", hf / "model.onnx", "-o", hf / "digits.ir") == 0
    assert _npucc("opt", hf / "digits.ir", "-p", "fold-constants", "-o", hf / "o.ir") == 0
    assert _npucc("opt", hf / "digits.ir", "-p", "fold-constants", "-o", hf / "digits.ir") == 1
    # an existing file that is not IR text is not overwritten either
    (hf / "notes.ir").write_text("my notes")
    assert _npucc("opt", hf / "digits.ir", "-o", hf / "notes.ir") == 1
    assert (hf / "notes.ir").read_text() == "my notes"


def test_outputs_never_replace_special_files(tmp_path):
    """``npucc opt x.ir -o /dev/null`` as root replaced the device node with a regular file.
    Here on a device node, fifo, symlink and folder of our own making."""
    assert _npucc("import", DIGITS, "-o", tmp_path / "x.ir") == 0
    targets = {"fifo": lambda p: os.mkfifo(p),
               "link": lambda p: p.symlink_to(tmp_path / "x.ir"),
               "dir": lambda p: p.mkdir()}
    if os.geteuid() == 0:
        targets["null"] = lambda p: os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for name, make in targets.items():
        target = tmp_path / name
        make(target)
        mode = os.lstat(target).st_mode
        assert _npucc("opt", tmp_path / "x.ir", "-o", target) == 1, name
        assert os.lstat(target).st_mode == mode, name
        assert _npucc("opt", tmp_path / "x.ir", "--split-input-file", "-o", target) == 1
        assert os.lstat(target).st_mode == mode, name
    from compiler.errors import NpuccError
    from compiler.ir.serialize import atomic_write

    with pytest.raises(NpuccError, match="not a regular file"):
        atomic_write(tmp_path / "fifo", "x")


# -- a crash at every step of save -------------------------------------------------------------
CRASH_CHILD = r"""
import os, shutil, sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
import runtime.package_io as pio
from runtime import Package

src, dst, crash_at, exchange = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pkg = Package.load(src)
if exchange == "no":   # a file system / kernel without renameat2(RENAME_EXCHANGE)
    pio._renameat2_exchange = lambda a, b: False
calls = 0

def counted(fn):
    def wrapper(*a, **kw):
        global calls
        calls += 1
        if calls == crash_at:
            os._exit(77)      # a crash: no cleanup, no finally, no atexit
        return fn(*a, **kw)
    return wrapper

for mod, name in [(os, "rename"), (os, "replace"), (os, "write"), (os, "fsync"),
                  (os, "mkdir"), (os, "open"), (os, "chmod"), (shutil, "rmtree"),
                  (pio, "_renameat2_exchange")]:
    setattr(mod, name, counted(getattr(mod, name)))
pkg.save(dst)
print("saved after", calls, "steps")
"""


@pytest.mark.parametrize("exchange", ["yes", "no"])
def test_crash_at_every_step_of_save(lib, tmp_path, exchange):
    """Kill the saving process at each file-system step in turn: the final name always loads,
    as the old or the new package (after the fallback's crash window: restored on load)."""
    old_src = build_tiny(lib, seed=0).save(tmp_path / "old_src.npkg")
    new_src = build_tiny(lib, seed=7).save(tmp_path / "new_src.npkg")
    x = tiny_input()
    old_y, new_y = tiny_reference(x, 0), tiny_reference(x, 7)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    seen = set()
    for k in range(1, 200):
        work = tmp_path / f"k{k}"
        work.mkdir()
        dst = work / "model.npkg"
        shutil.copytree(old_src, dst)
        r = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(new_src), str(dst), str(k),
                            exchange], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 77), r.stderr
        y = _load(dst)(x)[0]
        if np.allclose(y, old_y, rtol=1e-5, atol=1e-5):
            seen.add("old")
        else:
            np.testing.assert_allclose(y, new_y, rtol=1e-5, atol=1e-5)
            seen.add("new")
        build_tiny(lib, seed=7).save(dst)    # the next save works, and removes the crash's
        assert [p.name for p in work.iterdir()] == ["model.npkg"]   # temporaries
        shutil.rmtree(work)
        if r.returncode == 0:
            break
    else:
        pytest.fail("save never completed")
    assert seen == {"old", "new"} and k > 5


# -- temporary folders -------------------------------------------------------------------------
def test_compile_leaves_no_temporary_folder(tmp_path, monkeypatch):
    from compiler import compile as compile_model

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    m = compile_model(str(DIGITS), "host", progress=False)
    assert [p.name for p in tmp.iterdir() if p.name.startswith("npucc-")]   # in use
    out = m.save(tmp_path / "d.npkg")
    del m
    gc.collect()
    assert [p.name for p in tmp.iterdir()] == []
    assert _load(out)(np.zeros((1, 1, 8, 8), np.float32))[0].shape == (1, 10)
    # a compile failing after its kernels were built (arena + weights over the budget; the
    # weights alone fit, so it gets that far) cleans up too
    import re

    from compiler.errors import NpuccError

    s = _load(out).stats()
    budget = (s["weight_bytes"] + s["arena_bytes"] / 2) / 2**20
    toml = re.sub(r"(?m)^budget_mb = .*$", f"budget_mb = {budget:.6f}",
                  (REPO / "targets" / "host.toml").read_text())
    (tmp_path / "small.toml").write_text(toml)
    with pytest.raises(NpuccError, match="memory budget"):
        compile_model(str(DIGITS), str(tmp_path / "small.toml"), progress=False)
    gc.collect()
    assert [p.name for p in tmp.iterdir()] == []
