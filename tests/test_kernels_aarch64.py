"""The kernels cross-compiled for the Kirin 990 CPU (aarch64 Cortex-A76, NEON) and run under
qemu-user, against the same op references as on the host.

Needs the aarch64 Python + TVM runtime that ``bench/setup_qemu_aarch64.sh`` prepares; skips
(saying so) without it. Every case of test_kernels_linalg / test_kernels_generic, one library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.kernel_harness import assert_matches_reference, build_cases

QEMU_DIR = Path(os.environ.get("NPUCC_QEMU_DIR") or Path.home() / ".cache" / "npucc-qemu")

RUNNER = """
import json, sys
import numpy as np
import tvm.runtime
d = sys.argv[1]
lib = tvm.runtime.load_module(d + "/k.so")
for c in json.load(open(d + "/cases.json")):
    z = np.load(d + "/" + c["sym"] + ".in.npz")
    args = [tvm.runtime.tensor(z["arr_%d" % i]) for i in range(len(z.files))]
    outs = [tvm.runtime.tensor(np.zeros(s, t)) for s, t in c["outs"]]
    lib[c["sym"]](*args, *outs)
    np.savez(d + "/" + c["sym"] + ".out.npz", *[o.numpy() for o in outs])
print("ran", len(json.load(open(d + "/cases.json"))))
"""


def _qemu_cmd() -> list[str]:
    if not (QEMU_DIR / "READY").exists() or shutil.which("qemu-aarch64") is None:
        pytest.skip(f"no aarch64 python under qemu at {QEMU_DIR} "
                    "(run bench/setup_qemu_aarch64.sh)")
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64-linux-gnu-g++ cross compiler")
    libs = [QEMU_DIR / "sysroot/usr/aarch64-linux-gnu/lib",
            QEMU_DIR / "sysroot/lib/aarch64-linux-gnu", QEMU_DIR / "sysroot/usr/lib/aarch64-linux-gnu"]
    return ["env", "TVM_USE_RUNTIME_LIB=1", "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1",
            "TVM_NUM_THREADS=1", f"PYTHONPATH={QEMU_DIR / 'site'}",
            "LD_LIBRARY_PATH=" + ":".join(map(str, libs)),
            "qemu-aarch64", "-L", str(QEMU_DIR / "sysroot"), "-cpu", "cortex-a76",
            str(QEMU_DIR / "sysroot/usr/bin/python3.11")]


def _all_cases():
    from tests.test_kernels_generic import CASES as GENERIC
    from tests.test_kernels_linalg import CASES as LINALG

    both = {**{f"linalg_{k}": v for k, v in LINALG.items()},
            **{f"generic_{k}": v for k, v in GENERIC.items()}}
    # qemu emulates every instruction: keep the small cases (the big ones only add time)
    return {k: c for k, c in both.items() if sum(a.size for a in c.inputs) <= 8192}


CASES = _all_cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tvm.support.cc as cc

    from targets.kernels.base import CpuInfo

    cmd = _qemu_cmd()
    cpu = CpuInfo({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                   "mattr": ["+neon", "+dotprod", "+fullfp16"]}, arch="aarch64", simd_bits=128,
                  num_cores=2, l1d_bytes=64 * 1024, l2_bytes=512 * 1024)
    tmp = tmp_path_factory.mktemp("aarch64")
    names = list(CASES)
    _, calls = build_cases([CASES[n] for n in names], tmp, cpu,
                           cross_compiler=cc.cross_compiler("aarch64-linux-gnu-g++"))
    manifest = []
    for sym, args, otypes in calls:
        np.savez(tmp / f"{sym}.in.npz", *args)
        manifest.append({"sym": sym, "outs": [[list(t.shape), t.np_dtype.str] for t in otypes]})
    (tmp / "cases.json").write_text(json.dumps(manifest))
    (tmp / "run.py").write_text(RUNNER)
    proc = subprocess.run([*cmd, str(tmp / "run.py"), str(tmp)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for name, (sym, _, _) in zip(names, calls, strict=True):
        z = np.load(tmp / f"{sym}.out.npz")
        out[name] = [z[f"arr_{i}"] for i in range(len(z.files))]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_aarch64_kernel(name, results):
    assert_matches_reference(name, CASES[name], results[name], atol=1e-4)
