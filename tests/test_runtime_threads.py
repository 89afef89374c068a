"""Short-lived calling threads leave nothing behind (issue 12, point 5): every thread that
called a parallel kernel used to keep two OS threads (its own TVM thread pool) and an arena
forever. 2,000 threads each calling ``run`` once: thread count and RSS return to where they
were (within 10%), and results stay right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from package_helpers import build_library, build_tiny

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, sys, threading, warnings
import numpy as np
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
import runtime
from package_helpers import tiny_input, tiny_reference

m = runtime.load(sys.argv[1])
x, want = tiny_input(), tiny_reference(tiny_input())
errors = []

def call():
    try:
        np.testing.assert_allclose(m(x)[0], want, rtol=1e-5, atol=1e-5)
    except BaseException as e:  # reported below
        errors.append(e)

def stat():
    s = open("/proc/self/status").read()
    return int(s.split("Threads:")[1].split()[0]), int(s.split("VmRSS:")[1].split()[0])

def burst(n):
    for _ in range(n):
        t = threading.Thread(target=call)
        t.start()
        t.join()
    gc.collect()

m(x)
burst(50)                      # warm: the runner threads and their pools exist now
t0, rss0 = stat()
burst(2000)
t1, rss1 = stat()
assert not errors, errors[0]
print("threads", t0, t1, "rss", rss0, rss1, "arenas", m.stats()["arenas"])
assert t1 <= t0 * 1.1, (t0, t1)
assert rss1 <= rss0 * 1.1, (rss0, rss1)
assert m.stats()["arenas"] <= 2 + int(os.environ.get("NPUCC_RUN_THREADS", "64"))
"""


def test_short_lived_threads_leave_nothing(tmp_path):
    lib = build_library(tmp_path / "kernels.so", parallel=True)
    pkg = build_tiny(lib).save(tmp_path / "p.npkg")
    env = dict(os.environ, PYTHONPATH=str(REPO), TVM_NUM_THREADS="2", NPUCC_RUN_THREADS="2")
    r = subprocess.run([sys.executable, "-c", "import os\n" + CHILD, str(pkg),
                        str(Path(__file__).parent)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "threads" in r.stdout


FORK_CHILD = r"""
import os, sys, threading, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
import runtime
from package_helpers import tiny_input

m = runtime.load(sys.argv[1])
out = []
t = threading.Thread(target=lambda: out.append(m(tiny_input())[0]))
t.start(); t.join()                      # the runner pool exists now
pid = os.fork()
if pid == 0:                             # the child has none of the parent's threads
    got = []
    t = threading.Thread(target=lambda: got.append(m(tiny_input())[0]))
    t.start(); t.join(60)
    os._exit(0 if got and (got[0] == out[0]).all() else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("fork ok")
"""


def test_runs_after_fork(tmp_path):
    lib = build_library(tmp_path / "kernels.so", parallel=True)
    pkg = build_tiny(lib).save(tmp_path / "p.npkg")
    env = dict(os.environ, PYTHONPATH=str(REPO), TVM_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", FORK_CHILD, str(pkg), str(Path(__file__).parent)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fork ok" in r.stdout, r.stdout + r.stderr
