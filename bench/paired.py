"""Engines timed side by side in time: live child processes taking turns in short blocks.

On a shared virtual machine the speed of the cores drifts by up to ~1.8x over seconds (another
guest on our physical cores; /proc/stat's steal counter shows part of it). Timing each engine
in its own process one after another puts that drift into the ratio. Here every engine of a
round is loaded in its own child process at its own defaults, then they take turns: a block
of a few calls by one engine while the others are stopped (SIGSTOP, so their idle thread
pools can neither spin on nor be woken onto our cores), then the next engine. The order
rotates from block to block. Each block's median is compared with the other engines' blocks
of the same turn, which ran within ~100 ms of it: the **paired ratio** is the median of those
per-turn ratios, and drift between turns cancels out of it.

Child side: :func:`serve` (warm up, answer ``run N`` with the N call times). Parent side:
:func:`paired_rounds` with a ``spawn(engine) -> Engine`` (and optional conditions such as
a burner process taking a core, each turn running every condition), :func:`turn_ratios`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import numpy as np

__all__ = ["serve", "Engine", "paired_rounds", "turn_ratios"]

_READY = "READY"
_TIMES = "TIMES "


def serve(call: Callable[[], object], warmup: int = 3) -> None:
    """Child side: ``warmup`` calls, a ``READY`` line, then one line per request on stdin:
    ``run N`` -> one untimed call (the caches are the last engine's) and N timed ones,
    answered with ``TIMES {"times_ms": [...], "steal_ticks": [before, after]}``; ``quit`` ->
    ``TIMES {"peak_rss_bytes": ...}`` and return."""
    from bench.common import cpu_steal_ticks, peak_rss_bytes

    for _ in range(warmup):
        call()
    print(_READY, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["quit"]:
            print(_TIMES + json.dumps({"peak_rss_bytes": peak_rss_bytes()}), flush=True)
            return
        n = int(cmd[1])
        call()
        steal0, times = cpu_steal_ticks(), []
        for _ in range(n):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
        print(_TIMES + json.dumps({"times_ms": times, "steal_ticks": [steal0, cpu_steal_ticks()]}),
              flush=True)


class Engine:
    """Parent side: one live child ``python script *args`` that ends in :func:`serve`."""

    def __init__(self, name: str, script: str, args: Sequence[str], env: dict[str, str]):
        self.name = name
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, script, *args], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._err)
        self._stopped = False
        self._expect(_READY)

    def _expect(self, prefix: str) -> str:
        for line in self._proc.stdout:   # a child's own prints before READY are skipped
            if line.startswith(prefix):
                return line[len(prefix):]
        self._proc.wait()
        self._err.seek(0)
        raise RuntimeError(f"{self.name}: exit {self._proc.returncode}\n"
                           f"{self._err.read()[-4000:]}")

    def _ask(self, line: str) -> dict[str, Any]:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return json.loads(self._expect(_TIMES))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def pause(self) -> None:
        """Stop the whole process (every thread) until :meth:`resume`."""
        self._proc.send_signal(signal.SIGSTOP)
        os.waitpid(self._proc.pid, os.WUNTRACED)   # returns once it is really stopped
        self._stopped = True

    def resume(self) -> None:
        if self._stopped:
            self._proc.send_signal(signal.SIGCONT)
            self._stopped = False

    def run(self, n: int) -> dict[str, Any]:
        self.resume()
        return self._ask(f"run {n}")

    def close(self) -> int:
        """End the child; its peak RSS in bytes."""
        self.resume()
        rss = int(self._ask("quit")["peak_rss_bytes"])
        self._proc.wait()
        self._err.close()
        return rss

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._err.close()


def paired_rounds(spawn: Callable[[str], Engine], engines: Sequence[str], rounds: int,
                  repeat: int, block: int = 5,
                  conditions: dict[str, Callable[[], ContextManager]] | None = None
                  ) -> dict[str, Any]:
    """``rounds`` rounds of fresh processes (``spawn(engine)``), each timing ``repeat`` calls
    per engine and condition in turns of ``block`` calls. A turn runs every condition in
    order (``conditions``: name -> context manager factory, e.g. a burner process; default
    one plain condition ``""``), and within it every engine, the first engine rotating from
    turn to turn. Returns ``times_ms[engine][condition]`` (every call),
    ``round_medians_ms[engine][condition]``, ``turns`` (per turn,
    ``[engine][condition]`` -> that block's median; see :func:`turn_ratios`), the stolen CPU
    share while each engine was timed, and each engine's peak RSS."""
    engines = list(engines)
    conditions = conditions or {"": contextlib.nullcontext}
    times = {e: {c: [] for c in conditions} for e in engines}
    rounds_ms = {e: {c: [] for c in conditions} for e in engines}
    turns: list[dict[str, dict[str, float]]] = []
    steal = {e: [0, 0] for e in engines}
    rss = {e: 0 for e in engines}
    for _ in range(rounds):
        live: dict[str, Engine] = {}
        try:
            for e in engines:
                live[e] = spawn(e)
                live[e].pause()
            per_round = {e: {c: [] for c in conditions} for e in engines}
            for t in range(-(-repeat // block)):
                n = min(block, repeat - t * block)
                medians: dict[str, dict[str, float]] = {e: {} for e in engines}
                for c, context in conditions.items():
                    with context():
                        for e in engines[t % len(engines):] + engines[:t % len(engines)]:
                            r = live[e].run(n)
                            live[e].pause()
                            per_round[e][c] += r["times_ms"]
                            medians[e][c] = float(np.median(r["times_ms"]))
                            before, after = r["steal_ticks"]
                            if before is not None and after is not None:
                                steal[e] = [steal[e][0] + after[0] - before[0],
                                            steal[e][1] + after[1] - before[1]]
                turns.append(medians)
            for e in engines:
                for c in conditions:
                    times[e][c] += per_round[e][c]
                    rounds_ms[e][c].append(float(np.median(per_round[e][c])))
                rss[e] = max(rss[e], live.pop(e).close())
        finally:
            for p in live.values():
                p.kill()
    return {"times_ms": times, "round_medians_ms": rounds_ms, "turns": turns,
            "steal_by_engine": {e: (s / tot if tot else None) for e, (s, tot) in steal.items()},
            "peak_rss_by_engine": rss, "block": block}


def turn_ratios(turns: list[dict[str, dict[str, float]]], num: tuple[str, str],
                den: tuple[str, str]) -> list[float]:
    """Per turn, the block median of ``num`` = (engine, condition) over that of ``den``."""
    return [t[num[0]][num[1]] / t[den[0]][den[1]] for t in turns]
