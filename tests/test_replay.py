"""The pipeline text is the whole story: a compile replays from its text, and a pass that
fails inside ``compile()`` replays from the one printed command, in a fresh process and a
fresh folder holding only the reproducer (its IR, the calibration samples, the target)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler import compile
from compiler.errors import PassFailedError
from compiler.fault import ENV
from compiler.ir.serialize import load, save
from compiler.samples import load_samples, save_samples

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.onnx"


def _calibration(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 1, 8, 8), dtype=np.float32) * 16} for _ in range(n)]


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a printed command with only this checkout's npucc on PATH (no inherited
    NPUCC_INJECT_FAULT: the command must carry everything itself)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("failing", ["quantize", "partition", "npu-numerics"])
def test_printed_command_alone_reproduces_a_failure_inside_compile(failing, tmp_path,
                                                                   monkeypatch):
    work, fresh = tmp_path / "work", tmp_path / "fresh"
    work.mkdir()
    fresh.mkdir()
    model = work / "model.onnx"
    shutil.copyfile(MODEL, model)
    crash = work / "npucc-crash"
    monkeypatch.setenv(ENV, failing)
    with pytest.raises(PassFailedError) as info:
        compile(str(model), target="kirin990", quantize="int8", calibration=_calibration(),
                calibration_method="percentile", progress=False,
                debug={"crash_dir": crash})
    err = info.value
    assert err.reproducer is not None and f"{ENV}={failing}" in err.reproducer
    fingerprint = str(err).split("fingerprint is ")[1].split()[0]
    # only the reproducer folder moves to the fresh directory; the model and everything else
    # the compile had is gone
    shutil.move(str(crash), fresh / "npucc-crash")
    shutil.rmtree(work)
    command = err.reproducer.replace(str(crash), "npucc-crash")
    done = _shell(command, fresh)
    assert done.returncode == 1, done.stderr
    assert f"pass '{failing}" in done.stderr and f"fingerprint is {fingerprint}" in done.stderr, \
        (command, done.stderr)
    if failing == "quantize":
        assert "calibration=@calibration" in command and "--calibration" in command
        assert "method=percentile" in command
    else:
        assert "target=kirin990" in command


def test_nan_in_calibration_is_refused_and_the_reproducer_carries_the_samples(tmp_path):
    calib = _calibration()
    calib[2]["image"][0, 0, 3, 3] = np.nan
    crash = tmp_path / "crash"
    with pytest.raises(PassFailedError, match=r"calibration sample 2, input 'image': 1 value\(s\)"
                       r" are NaN or inf") as info:
        compile(str(MODEL), target="kirin990", quantize="int8", calibration=calib,
                progress=False, debug={"crash_dir": crash})
    command = info.value.reproducer
    saved = load_samples(crash / "calibration.npz")
    assert len(saved) == 4 and np.isnan(saved[2]["image"]).sum() == 1
    done = _shell(command, tmp_path)
    assert done.returncode == 1
    assert "calibration sample 2, input 'image'" in done.stderr
    # the same command with clean samples bound to @calibration succeeds: the failure was
    # the data's, and the reproducer carried it
    save_samples(tmp_path / "clean.npz", _calibration())
    clean = command.split(" --calibration")[0] + f" --calibration calibration={tmp_path}/clean.npz"
    assert _shell(clean, tmp_path).returncode == 0


def test_compile_prints_the_pipeline_that_npucc_opt_replays_exactly(tmp_path):
    from compiler.driver import CompileOptions, compile_pipeline, import_model
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    calib = _calibration()
    out = io.StringIO()
    opts = dict(quantize="int8", calibration=calib, prune={"method": "channel",
                                                           "sparsity": 0.25})
    m = compile(str(MODEL), target="kirin990", progress=False,
                debug={"print_pipeline": True, "print_ir_stream": out}, **opts)
    printed = out.getvalue()
    text = printed.split("// pipeline: ")[1].splitlines()[0]
    assert "prune{method=channel,sparsity=0.25,calibration=@calibration}" in text
    assert "quantize{calibration=@calibration}" in text
    assert "partition{target=kirin990,by-cost=true}" in text
    assert "npu-numerics{target=kirin990}" in text
    desc = load_target("kirin990")
    assert text == compile_pipeline(desc.default_pipeline, CompileOptions(**opts), desc,
                                    PassContext())
    source = import_model(str(MODEL), CompileOptions())
    save(source, tmp_path / "m.ir")
    save_samples(tmp_path / "calib.npz", calib)
    done = _shell(f"npucc opt m.ir -p '{text}' --calibration calib.npz", tmp_path)
    assert done.returncode == 0, done.stderr
    here = run_pipeline(load(tmp_path / "m.ir"), text,
                        ctx=PassContext(resources={"calibration": calib}))
    assert done.stdout == str(here)
    # and it is what compile() ran (before it named the outputs back)
    assert m.graph.op_counts() == here.op_counts()


def test_an_unbound_sample_set_and_a_missing_target_are_clear_errors(tmp_path):
    from compiler.ir.parser import parse
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline

    g = parse("graph @g(%x: f32[1,4]) -> (f32[1,4]) {\n  %y = relu(%x) : f32[1,4]\n"
              "  return %y\n}")
    with pytest.raises(PassFailedError, match=r"no sample set is bound to '@calib' \(bound: "
                       r"none\); give it with compile\(\.\.\., calibration=\.\.\.\) or "
                       r"`npucc opt --calibration calib=FILE.npz`"):
        run_pipeline(g.copy(), "quantize{calibration=@calib}", ctx=PassContext())
    with pytest.raises(PassFailedError, match=r"the partition pass needs a target: give it as "
                       r"an option \(partition\{target=kirin990\}"):
        run_pipeline(g.copy(), "partition", ctx=PassContext())
