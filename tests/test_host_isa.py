"""Runs on any CPU: the detected host target, ISA-checked packages, portable builds.

Our machines change CPU (a Sapphire Rapids Xeon with avx512_fp16 and AMX, a Zen EPYC without
either). These tests pass on both and exercise "the other side" on whichever they get: builds
for a portable level (x86-64-v3) run here and under ``qemu-x86_64 -cpu Haswell`` (an
AVX2-only CPU), and a build for a CPU with features this one lacks is refused before its
library is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.cpu import CHECKED, missing_features, running_features, target_features
from targets.host import detect_host

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
DIGIT = ROOT / "examples" / "digit.npy"
# CPUs one of which has a feature the running CPU lacks, whichever of our machines this is
RICHER = ("sapphirerapids", "graniterapids", "znver5", "diamondrapids")


def _richer_cpu() -> tuple[str, list[str]]:
    for name in RICHER:
        missing = missing_features(target_features({"mcpu": name}))
        if missing:
            return name, missing
    pytest.fail(f"this CPU has every feature of {RICHER}: add a newer CPU to RICHER")


def _compile(**kw):
    from compiler import compile

    return compile(str(DIGITS), progress=False, **kw)


def _reference() -> np.ndarray:
    import onnx

    from compiler.frontends import from_onnx
    from compiler.ir.interpreter import interpret

    g = from_onnx(onnx.load(str(DIGITS)))
    return interpret(g, {g.inputs[0].name: np.load(DIGIT)})[0]


# -- detection -----------------------------------------------------------------------------
def test_detected_host_is_this_cpu():
    have = running_features()
    assert have is not None and {"sse2"} <= have
    h = detect_host("native")
    # never built for a feature the CPU lacks; everything LLVM could use that it has
    assert h.features <= have
    assert not missing_features(h.features)
    assert h.cores == len(os.sched_getaffinity(0)) or h.cores < len(os.sched_getaffinity(0))
    info = h.cpu_info()
    assert info.simd_bits == (512 if "avx512f" in have else 256 if "avx" in have else 128)
    assert info.fp16_arith == ("avx512fp16" in have)
    assert info.int8_dot == bool({"avx512vnni", "avxvnni"} & have)
    assert h.brand and h.brand in h.summary()


def test_features_come_from_cpuid_not_proc_cpuinfo():
    """Under qemu-x86_64 -cpu Haswell /proc/cpuinfo still shows the real host; CPUID answers
    for the emulated CPU, and only CPUID is used."""
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-user not installed (apt-get install qemu-user)")
    code = "from runtime.cpu import running_features as f; print(','.join(sorted(f())))"
    out = _qemu_haswell(["-c", code], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    feats = set(out.stdout.split()[-1].split(","))
    assert {"avx2", "fma", "f16c", "bmi2"} <= feats
    assert not {f for f in feats if f.startswith("avx512")}


def test_portable_level_and_env_override(monkeypatch):
    v3 = detect_host("x86-64-v3")
    assert v3.level == "x86-64-v3" and v3.tvm_target()["mcpu"] == "x86-64-v3"
    assert {"avx2", "fma", "f16c"} <= v3.features
    assert not {f for f in v3.features if f.startswith(("avx512", "amx"))}
    info = v3.cpu_info()
    assert (info.simd_bits, info.fp16_arith, info.int8_dot, info.amx) == (256, False, False,
                                                                           False)
    monkeypatch.setenv("NPUCC_HOST_CPU", "x86-64-v3")
    from targets.description import load_target

    assert load_target("host").cpu.tvm_target["mcpu"] == "x86-64-v3"


def test_unknown_level_is_refused_with_the_choices():
    from compiler.errors import NpuccError

    with pytest.raises(NpuccError, match=r"not an LLVM CPU name.*x86-64-v3"):
        _compile(target="host", cpu="pentium-9000")


def test_npucc_targets_show_host_prints_what_was_detected():
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "targets", "show", "host"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    h = detect_host("native")
    assert "# detected on this machine" in out.stdout
    assert f'mcpu = "{h.mcpu}"' in out.stdout and h.brand in out.stdout


def test_no_cpu_fact_in_code():
    """No CPU model of one of our machines is written into code or target files (the list of
    portable levels and comments aside). Host cost calibrations (targets/data/host_cost) are
    the exception by design: each is a measurement record that names the CPU it was taken on,
    and host.toml uses it only on that CPU (tests/test_cost_calibration.py)."""
    names = ("sapphirerapids", "znver", "rocketlake", "icelake", "cascadelake", "skylake")
    hits = []
    records = ROOT / "targets" / "data" / "host_cost"
    for folder in ("compiler", "passes", "targets", "runtime"):
        for p in (ROOT / folder).rglob("*"):
            if p.suffix not in (".py", ".toml") or not p.is_file() or p.parent == records:
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if any(n in code for n in names) and "PORTABLE_LEVELS" not in code:
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# -- packages state and check their ISA ----------------------------------------------------
def test_manifest_records_the_isa_and_a_richer_build_is_refused(tmp_path):
    name, missing = _richer_cpu()
    m = _compile(target="host", cpu=name, work_dir=tmp_path / "w")
    isa = m.package.manifest["target"]["isa"]
    assert isa["cpu"] == name and set(missing) <= set(isa["features"])
    assert isa["features"] == sorted(target_features(m.package.manifest["target"]["tvm"]))
    with pytest.raises(runtime.IsaError) as e:       # in process, before dlopen
        m.run({"image": np.load(DIGIT)})
    assert e.value.missing == missing
    assert all(f in str(e.value) for f in missing) and "x86-64-v3" in str(e.value)
    out = m.save(tmp_path / "rich.npkg")
    with pytest.raises(runtime.IsaError, match=missing[0]):
        runtime.load(out)


def test_a_manifest_claiming_a_missing_feature_is_refused_before_dlopen(tmp_path):
    """The library is replaced by one whose constructor writes a file: if the refusal came
    after dlopen, the file would exist."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    m = _compile(target="host", work_dir=tmp_path / "w")
    pkg = m.save(tmp_path / "m.npkg")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                   f'{{ FILE *o = fopen("{marker}", "w"); if (o) fclose(o); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(pkg / "kernels.so"), str(src)],
                   check=True)
    lacking = sorted(CHECKED - running_features() - {"neon", "dotprod", "fullfp16", "sve",
                                                      "sve2", "i8mm", "bf16", "fp16fml"})
    feature = next(f for f in lacking if f.startswith(("avx512", "amx", "avx", "xop", "fma4")))
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["target"]["isa"]["features"].append(feature)
    import hashlib

    data = (pkg / "kernels.so").read_bytes()
    manifest["files"]["kernels.so"] = {**manifest["files"]["kernels.so"],
                                       "sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)}
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.PackageError, match=feature):
        runtime.load(pkg)
    assert not marker.exists()


# -- portable builds run on an AVX2-only CPU -------------------------------------------------
RUNNER = """
import sys
import numpy as np
import runtime
for pkg, out in zip(sys.argv[2::2], sys.argv[3::2]):
    (y,) = runtime.load(pkg).run({"image": np.load(sys.argv[1])})
    np.save(out, y)
print("ran", len(sys.argv[2:]) // 2)
"""


def _qemu_haswell(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(ROOT),
           "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_x86_64_v3_packages_run_under_qemu_haswell_and_avx512_is_refused(tmp_path):
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-user not installed (apt-get install qemu-user)")
    want = _reference()
    host = _compile(target="host", cpu="x86-64-v3", work_dir=tmp_path / "w1")
    kirin = _compile(target="kirin990", cpu="x86-64-v3", work_dir=tmp_path / "w2")
    wide = _compile(target="host", cpu="x86-64-v4", work_dir=tmp_path / "w3")
    pkgs = [m.save(tmp_path / f"{n}.npkg") for n, m in
            (("host", host), ("kirin", kirin), ("wide", wide))]
    runner = tmp_path / "run.py"
    runner.write_text(RUNNER)
    outs = [tmp_path / "host.npy", tmp_path / "kirin.npy"]
    r = _qemu_haswell([str(runner), str(DIGIT), str(pkgs[0]), str(outs[0]), str(pkgs[1]),
                       str(outs[1])], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got_host, got_kirin = (np.load(o) for o in outs)
    np.testing.assert_allclose(got_host, want, rtol=1e-4, atol=1e-4)
    # the kirin990 build simulates the fp16 NPU: f16 storage, f32 arithmetic via F16C here
    np.testing.assert_allclose(got_kirin, kirin.run({"image": np.load(DIGIT)})[0],
                               rtol=1e-3, atol=1e-3)
    cos = float(got_kirin.ravel() @ want.ravel()
                / np.linalg.norm(got_kirin) / np.linalg.norm(want))
    assert cos >= 0.999
    # an AVX-512 package: refused with the error naming what is missing, no signal
    r = _qemu_haswell([str(runner), str(DIGIT), str(pkgs[2]), str(tmp_path / "w.npy")],
                      timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "IsaError" in r.stderr and "avx512f" in r.stderr and "x86-64-v3" in r.stderr
