"""npucc stress: 100 concurrent callers on MobileNetV2 and MiniLM, every output checked bit for
bit against a single-threaded run; and the checks themselves catch a stale-result bug, a
memory leak and a thread leak (real ones, built into a wrapper around a real one-kernel
package)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from compiler.cli import main
from runtime.stress import input_variants, random_inputs, stress

RUNS = 100   # after a warm-up of 100; the CLI default is 10000 (full-size runs: README)
WARMUP = ["--warmup", "100"]


@pytest.fixture(scope="module")
def mobilenet_pkg(tmp_path_factory, mobilenet_model):
    import torch

    from compiler import compile

    model, x = mobilenet_model
    m = compile(model, example_inputs=(torch.from_numpy(x),), progress=False)
    return m.save(tmp_path_factory.mktemp("stress") / "mobilenet.npkg")


@pytest.fixture(scope="module")
def minilm_pkg(tmp_path_factory, minilm_model):
    """MiniLM for one sentence of 32 tokens, and its real tokenized inputs as .npy files."""
    from compiler import compile
    from examples.models import MINILM_SENTENCES, export_onnx, minilm_inputs

    model, tok, _ = minilm_model
    feeds = minilm_inputs(tok, MINILM_SENTENCES[1:2], seq=32)
    d = tmp_path_factory.mktemp("stress")
    pkg = compile(export_onnx(model, feeds), progress=False).save(d / "minilm.npkg")
    args = []
    for name, arr in feeds.items():
        np.save(d / f"{name}.npy", arr)
        args += ["--input", f"{name}={d / name}.npy"]
    return pkg, args


@pytest.mark.slow
def test_stress_mobilenet_v2_100_callers(mobilenet_pkg, capsys):
    assert main(["stress", str(mobilenet_pkg), "--concurrency", "100", "--runs", str(RUNS),
                 *WARMUP]) == 0
    out = capsys.readouterr().out
    assert f"{RUNS} runs from 100 concurrent callers" in out
    assert f"bit-identical to single-threaded runs: {RUNS + 100}/{RUNS + 100}" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.slow
def test_stress_minilm_100_callers_real_sentence(minilm_pkg, capsys):
    pkg, inputs = minilm_pkg
    assert main(["stress", str(pkg), "--concurrency", "100", "--runs", str(RUNS), *WARMUP,
                 *inputs]) == 0
    out = capsys.readouterr().out
    assert f"bit-identical to single-threaded runs: {RUNS + 100}/{RUNS + 100}" in out
    assert "0 mismatches, 0 errors" in out and out.rstrip().endswith("OK")


class _StaleResult:
    """The real model behind the bug of returning the previous call's result buffer."""

    def __init__(self, model):
        self.model, self.package, self.output_names = model, model.package, model.output_names
        self.lock = threading.Lock()
        self.last = None

    def run(self, x):
        out = self.model.run(x)
        if threading.current_thread() is threading.main_thread():
            return out   # right when called alone, as such bugs are
        with self.lock:
            prev, self.last = self.last, out
        return prev if prev is not None else out


class _Leaky:
    """The real model behind a leak: 2 MiB kept per call, or a thread left waiting per call."""

    def __init__(self, model, kind: str):
        self.model, self.package, self.output_names = model, model.package, model.output_names
        self.kind, self.kept, self.stop = kind, [], threading.Event()

    def run(self, x):
        if self.kind == "memory":
            self.kept.append(np.ones(1 << 21, np.uint8))
        else:
            t = threading.Thread(target=self.stop.wait, daemon=True)
            t.start()
            self.kept.append(t)
        return self.model.run(x)


def test_stress_catches_a_stale_result_bug_and_leaks(tmp_path):
    import runtime
    from tests.package_helpers import build_library, build_tiny

    m = runtime.load(build_tiny(build_library(tmp_path / "lib.so")).save(tmp_path / "t.npkg"))
    r = stress(_StaleResult(m), concurrency=8, runs=16, warmup=8, variants=2)
    assert not r.ok and r.mismatches > 0
    assert "outputs differ from the single-threaded run" in r.failures[0]
    assert "bytes differ, max abs difference" in r.first_problem
    r = stress(_Leaky(m, "memory"), concurrency=8, runs=24, warmup=4, variants=1,
               max_rss_growth_mb=24)
    assert r.mismatches == 0 and any("RSS grew by" in f for f in r.failures), r.text()
    leaky = _Leaky(m, "threads")
    try:
        r = stress(leaky, concurrency=8, runs=12, warmup=4, variants=1)
    finally:
        leaky.stop.set()
    assert any("more threads at the end than after the warm-up" in f for f in r.failures)
    assert r.threads["end"] - r.threads["warm"] >= 12


def test_variants_keep_values_and_differ():
    x = random_inputs([{"name": "ids", "shape": [1, 16], "dtype": "i64"},
                       {"name": "x", "shape": [2, 3], "dtype": "f32"}])
    assert set(np.unique(x["ids"])) <= {0, 1} and x["x"].dtype == np.float32
    vs = input_variants(x, 3)
    assert all(sorted(v["x"].ravel()) == sorted(x["x"].ravel()) for v in vs)
    assert not np.array_equal(vs[1]["x"], vs[0]["x"])


def test_stress_cli_errors(mobilenet_pkg, capsys):
    assert main(["stress", str(mobilenet_pkg), "--runs", "0"]) == 1
    assert "--runs must be at least 1" in capsys.readouterr().err
    assert main(["stress", str(mobilenet_pkg), "--input", "nope=/nonexistent.npy"]) == 1
    assert "cannot read input 'nope'" in capsys.readouterr().err
