"""bench/paired.py: engines in live child processes taking turns, ratios per turn."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from bench.paired import Engine, paired_rounds, turn_ratios

ROOT = Path(__file__).resolve().parents[1]

# a child that serves a call sleeping the given ms (sleep, not compute: the ratio must not
# depend on how busy this machine is)
CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from bench.paired import serve
ms = float(sys.argv[1])
if ms < 0:
    raise SystemExit("bad engine: negative time")
serve(lambda: time.sleep(ms / 1e3), warmup=1)
"""


def _spawn(tmp_path: Path, ms: dict[str, float]):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    env = dict(os.environ)
    return lambda e: Engine(e, str(script), [str(ms[e])], env)


def test_turns_give_each_engines_blocks_and_ratios(tmp_path):
    spawn = _spawn(tmp_path, {"a": 2.0, "b": 6.0})
    p = paired_rounds(spawn, ["a", "b"], rounds=2, repeat=6, block=4)
    assert [len(p["times_ms"][e][""]) for e in "ab"] == [12, 12]
    assert len(p["turns"]) == 4            # 2 rounds x ceil(6 / 4) turns
    r = turn_ratios(p["turns"], ("a", ""), ("b", ""))
    assert len(r) == 4 and all(0.15 < x < 0.6 for x in r), r
    assert all(v > 0 for v in p["peak_rss_by_engine"].values())
    assert all(len(p["round_medians_ms"][e][""]) == 2 for e in "ab")


def test_conditions_run_inside_their_context(tmp_path):
    seen = []

    class Slow:
        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    p = paired_rounds(_spawn(tmp_path, {"a": 1.0}), ["a"], rounds=1, repeat=2, block=1,
                      conditions={"quiet": contextlib.nullcontext, "slow": Slow})
    assert seen == ["enter", "exit"] * 2
    assert len(p["times_ms"]["a"]["slow"]) == 2


def test_a_paused_engine_does_not_run(tmp_path):
    eng = _spawn(tmp_path, {"a": 1.0})("a")
    try:
        eng.pause()
        if sys.platform == "linux":
            assert "State:\tT" in Path(f"/proc/{eng.pid}/status").read_text()  # stopped
        t = time.perf_counter()
        assert len(eng.run(3)["times_ms"]) == 3       # run resumes it
        assert time.perf_counter() - t < 5
    finally:
        eng.kill()


def test_a_failing_child_reports_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="bad engine: negative time"):
        _spawn(tmp_path, {"x": -1.0})("x")
