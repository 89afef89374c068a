"""The kirin990 CPU kernels, cross-compiled to AArch64, run under qemu-aarch64.

A conv+relu+dense model is compiled for kirin990; ``export_device`` writes the device package
(every kernel of the lowered graph built for the Cortex-A76 with the aarch64 cross compiler).
An aarch64 Python with TVM's runtime (bench/setup_qemu_aarch64.sh, cached under
~/.cache/npucc-qemu or $NPUCC_QEMU_DIR) loads it with our ``runtime`` under qemu-aarch64 and
runs it; its outputs must match the host build of the same lowered graph (both compute the NPU
region in f16, so only summation order differs) and the f32 reference.

Skipped, with the reason, when qemu-aarch64, the cross compiler or the sysroot is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from npu_helpers import cosine, rel_l2

from compiler.ir.graph import Graph
from compiler.ir.types import TensorType

ROOT = Path(__file__).resolve().parents[1]
QEMU_DIR = Path(os.environ.get("NPUCC_QEMU_DIR", Path.home() / ".cache" / "npucc-qemu"))

RUNNER = """
import sys, time
import numpy as np
import platform
import runtime
t0 = time.time()
ex = runtime.load(sys.argv[1])
x = np.load(sys.argv[2])
(y,) = ex.run({"x": x})
np.save(sys.argv[3], y)
print("machine", platform.machine(), "load+run s", round(time.time() - t0, 2))
"""


def _qemu_env() -> tuple[list[str], dict[str, str]]:
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install qemu-user "
                    f"g++-aarch64-linux-gnu)")
    if not (QEMU_DIR / "READY").is_file():
        pytest.skip(f"no aarch64 Python sysroot at {QEMU_DIR}: run bench/setup_qemu_aarch64.sh "
                    f"(~10-15 min once; downloads aarch64 wheels and Debian arm64 python3.11)")
    sysroot = QEMU_DIR / "sysroot"
    libs = [sysroot / "usr/aarch64-linux-gnu/lib", sysroot / "lib/aarch64-linux-gnu",
            sysroot / "usr/lib/aarch64-linux-gnu"]
    env = {"PATH": os.environ.get("PATH", ""), "TVM_USE_RUNTIME_LIB": "1",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "2",
           "PYTHONPATH": f"{QEMU_DIR / 'site'}:{ROOT}",
           "LD_LIBRARY_PATH": ":".join(map(str, libs))}
    cmd = ["qemu-aarch64", "-L", str(sysroot), "-cpu", "cortex-a76",
           str(sysroot / "usr/bin/python3.11")]
    return cmd, env


def conv_relu_dense(seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("conv_relu_dense")
    x = g.add_input("x", TensorType((1, 3, 16, 16), "f32"))
    w = g.add_weight("conv.w", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32))
    b = g.add_weight("conv.b", rng.uniform(-0.1, 0.1, 8).astype(np.float32))
    y = g.add("conv2d", x, w, b, pads=[1, 1, 1, 1], activation="relu")
    y = g.add("reshape", y, shape=[1, 8 * 16 * 16])
    fw = g.add_weight("fc.w", (rng.standard_normal((10, 2048)) * 0.03).astype(np.float32))
    fb = g.add_weight("fc.b", rng.uniform(-0.1, 0.1, 10).astype(np.float32))
    g.outputs = [g.add("dense", y, fw, fb)]
    return g


@pytest.mark.slow  # ~55-70 s here: compile, cross-compile, ~15 s of qemu start-up and run
def test_kirin990_cpu_library_under_qemu(tmp_path):
    cmd, env = _qemu_env()
    from compiler import compile
    from compiler.ir.interpreter import interpret

    g = conv_relu_dense()
    m = compile(g, target="kirin990", progress=False)
    info = m.export_device(tmp_path / "dev")
    pkg = tmp_path / "dev" / info["cpu"]["package"]
    head = (pkg / "kernels.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(RUNNER)
    proc = subprocess.run([*cmd, str(tmp_path / "run.py"), str(pkg), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], env=env, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout, proc.stderr[-2000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "machine aarch64" in proc.stdout
    y_arm = np.load(tmp_path / "y.npy")
    (y_host,) = m.run({"x": x})
    (ref,) = interpret(g, {"x": x})
    print(f"aarch64 vs host build: rel L2 {rel_l2(y_arm, y_host):.2e}, max |diff| "
          f"{np.abs(y_arm - y_host).max():.2e} (outputs up to {np.abs(y_host).max():.2f}); "
          f"vs f32 reference: cosine {cosine(y_arm, ref):.6f}", file=sys.stderr)
    assert rel_l2(y_arm, y_host) < 2e-3
    assert cosine(y_arm, ref) > 0.999
