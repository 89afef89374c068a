"""What a parallel launch of npucc's launcher costs, and from how much work sharing pays.

    python bench/pool_overhead.py [--threads 2] [--work-us 0,1,2,5,10,20,50,100] [--reps 2000]

Builds a small C driver with ``runtime/native/npucc_pool.c`` (the launcher every kernels.so
carries) and times ``npucc_parallel_launch`` of a loop that does ``W`` µs of arithmetic in
total, split over the launch's chunks:

- ``1 thread``: the loop on the calling thread (the launcher's serial path);
- ``N threads``: shared out, back to back (the workers are still spinning from the last one);
- ``N, woken``: shared out after an idle gap longer than the workers' spin, so they sleep and
  the launch has to wake them (as after a stretch of serial kernels in a model run);
- ``decided``: the per-loop launch decision on (``NPUCC_POOL_PROBE_US``): what it chose.

Printed per W: median and p10 µs per launch of each, and the speedup; the overhead of an
empty launch is the W = 0 row. Numbers depend on the load: the script prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL_C = ROOT / "runtime" / "native" / "npucc_pool.c"

DRIVER = r"""
#include "@POOL@"
#include <stdio.h>
static volatile double sink;
static double iters_per_us;
typedef struct { double iters; } Job;
static int body(int task, TVMParallelGroupEnv* env, void* cd) {
  Job* j = (Job*)cd;
  int64_t total = (int64_t)j->iters, per = (total + env->num_task - 1) / env->num_task;
  int64_t b = (int64_t)task * per, e = b + per, i;
  double a0 = 1, a1 = 1, a2 = 1, a3 = 1;
  if (e > total) e = total;
  for (i = b; i < e; ++i) { a0 *= 1.0000001; a1 *= 0.9999999; a2 += 1e-9; a3 -= 1e-9; }
  sink = a0 + a1 + a2 + a3;
  return 0;
}
static void idle_us(int64_t us) { struct timespec t = {0, (long)us * 1000}; nanosleep(&t, NULL); }
static int cmp(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b; return x < y ? -1 : x > y;
}
static void timed(const char* what, Job* j, int reps, int64_t gap_us, double* med, double* p10) {
  int64_t* ts = (int64_t*)malloc(sizeof(int64_t) * reps);
  int r;
  for (r = 0; r < 20; ++r) npucc_parallel_launch(body, j, 0);
  for (r = 0; r < reps; ++r) {
    int64_t t;
    if (gap_us) idle_us(gap_us);
    t = now_ns();
    npucc_parallel_launch(body, j, 0);
    ts[r] = now_ns() - t;
  }
  qsort(ts, reps, sizeof(int64_t), cmp);
  *med = ts[reps / 2] / 1e3; *p10 = ts[reps / 10] / 1e3;
  free(ts);
  (void)what;
}
int main(int argc, char** argv) {
  int threads = atoi(argv[1]), reps = atoi(argv[2]), spin_us = atoi(argv[3]), k;
  int chunks = @CHUNKS@;
  Job cal = {2e6};
  int64_t t0, best = INT64_MAX;
  npucc_pool_configure(1, 4, spin_us);
  for (k = 0; k < 20; ++k) {  /* the best of 20: the core's speed when nothing else runs */
    t0 = now_ns(); npucc_parallel_launch(body, &cal, 0); t0 = now_ns() - t0;
    if (t0 < best) best = t0;
  }
  iters_per_us = cal.iters / (best / 1e3);
  for (k = 4; k < argc; ++k) {
    double w = atof(argv[k]), m1, q1, m2, q2, m3, q3, m4, q4;
    int64_t st[4];
    Job j = {w * iters_per_us};
    npucc_pool_configure(1, 4, spin_us); npucc_pool_adaptive(0, 0);
    timed("1", &j, reps, 0, &m1, &q1);
    npucc_pool_configure(threads, chunks, spin_us); npucc_pool_adaptive(0, 0);
    timed("N", &j, reps, 0, &m2, &q2);
    timed("woken", &j, reps / 10 + 10, 4 * spin_us + 200, &m3, &q3);
    npucc_pool_adaptive(1, @PROBE@);
    npucc_pool_reset_stats();
    timed("decided", &j, reps, 0, &m4, &q4);
    npucc_pool_adaptive_stats(st);
    printf("%g %.3f %.3f %.3f %.3f %.3f %.3f %.3f %.3f %s\n", w, m1, q1, m2, q2, m3, q3, m4, q4,
           st[1] ? "caller" : (st[2] ? "shared" : "?"));
    fflush(stdout);
  }
  return 0;
}
"""


def build(tmp: Path, probe_us: int, chunks: int) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("no C compiler (set CC or install gcc)")
    src = tmp / "driver.c"
    src.write_text(DRIVER.replace("@POOL@", str(POOL_C)).replace("@PROBE@", str(probe_us))
                   .replace("@CHUNKS@", str(chunks)))
    exe = tmp / "driver"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), "-lpthread"], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-us", default="0,1,2,5,10,20,50,100")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--spin-us", type=int, default=50, help="workers' spin before sleeping")
    ap.add_argument("--probe-us", type=int, default=None,
                    help="the launch decision's bound (default: runtime.pool's)")
    ap.add_argument("--chunks", type=int, default=None,
                    help="chunks per thread and launch (default: runtime.pool's)")
    args = ap.parse_args(argv)
    from bench.common import cpu_header

    print(cpu_header())
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pool-overhead-") as tmp:
        from runtime.pool import DEFAULT_CHUNKS, DEFAULT_PROBE_US

        probe = DEFAULT_PROBE_US if args.probe_us is None else args.probe_us
        exe = build(Path(tmp), probe, args.chunks or DEFAULT_CHUNKS)
        out = subprocess.run([str(exe), str(args.threads), str(args.reps), str(args.spin_us),
                              *args.work_us.split(",")], check=True, capture_output=True,
                             text=True).stdout
    n = args.threads
    print(f"µs per launch, median (p10); {n} threads shared out ({args.chunks or 'default'} "
          f"chunks per thread) vs the caller alone")
    print(f"{'work us':>8}{'1 thread':>16}{f'{n} threads':>16}{f'{n}, woken':>16}"
          f"{'decided':>16}  speedup  decision")
    for line in out.splitlines():
        w, m1, q1, m2, q2, m3, q3, m4, q4, dec = line.split()
        cols = [f"{float(m):8.2f} ({float(q):5.2f})" for m, q in ((m1, q1), (m2, q2), (m3, q3),
                                                                  (m4, q4))]
        print(f"{float(w):>8g}" + "".join(cols) + f"{float(m1) / float(m2):>8.2f}  {dec}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)  # bench.<name> only, never bare
    sys.exit(main())
