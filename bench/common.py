"""Helpers the bench scripts share (``from bench.common import ...``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["interleaved_ms", "mean_pool", "cosine", "cpu_header", "cpu_steal_ticks",
           "peak_rss_bytes", "run_child"]


def interleaved_ms(runs: Sequence[Callable[[], object]], repeat: int, warmup: int = 3
                   ) -> list[float]:
    """Median wall time (ms) of each callable, taking turns so machine drift hits all alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t)
    return [1e3 * float(np.median(t)) for t in times]


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-aware mean over the sequence axis: [B, S, D] hidden states -> [B, D] embeddings."""
    m = mask[..., None].astype(np.float64)
    return (h.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cpu_header() -> str:
    """The line every bench prints first: the CPU its figures were measured on (detected, or
    the level NPUCC_HOST_CPU forces), with the capabilities the kernels chose by."""
    from targets.host import detect_host

    h = detect_host()
    return f"CPU: {h.summary()}\nISA features: {' '.join(sorted(h.features))}"


def cpu_steal_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat (Linux; None elsewhere).
    Steal is time the hypervisor gave our virtual CPUs to someone else: a bench prints its
    share over the timed calls, so a slow round on a shared host is seen as such."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (Linux; ru_maxrss would include the RSS of the parent
    that forked it), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_child(script: str, args: list[str], env: dict[str, str]) -> dict:
    """Run ``python script *args`` and return the JSON of its ``RESULT `` line; RuntimeError
    with the end of its stderr when it fails or prints none."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])
