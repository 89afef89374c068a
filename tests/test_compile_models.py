"""``compiler.compile(model, target="host")`` end to end on every model of the IR issue.

Each compiled model runs through the runtime (TVM kernels on one arena) and is compared with
the reference interpreter run on the imported, unoptimised graph (``m.source``):
relative error = max|got - want| / max|want| within ``TOL`` (``TOL_DEEP`` for the deepest).

- the nine light ONNX models of the onnx package: their ConstantOfShape placeholder weights
  are folded and every weight re-seeded (examples/random_weights.py), logits exposed;
- MiniLM (the trained all-MiniLM-L6-v2) as an ONNX export and from torch;
- the GPT-2-style decoder ("test" config) as an ONNX export and from torch;
- MobileNetV2 from torch.

Compiled models are shared through module fixtures, so the memory, save/reload and error tests
reuse them instead of compiling again. Also here: the memory plan against its lower bound and
the naive sum, a package reloaded in a fresh process, a tampered package, the ``npucc``
command, input errors and the memory budget error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import runtime
from compiler import NpuccError, compile
from compiler.ir import interpret

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
TOL_DEEP = 1e-3
DEEP = {"densenet121"}
# densenet121 builds ~320 distinct kernels (every dense block widens the convolutions'
# input): its compile is ~2 minutes of this file's time, so it is marked slow.
LIGHT = ["bvlc_alexnet", pytest.param("densenet121", marks=pytest.mark.slow),
         "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet", "vgg19",
         "zfnet512"]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    scale = float(np.abs(want).max())
    return float(np.abs(got.astype(np.float64) - want).max()) / (scale or 1.0)


def check_against_source(m, feeds, tol: float) -> list[np.ndarray]:
    """Run ``m`` and the interpreter on ``m.source``; every output within ``tol``."""
    got = m.run(feeds)
    want = interpret(m.source, feeds)
    assert [v.name for v in m.source.outputs] == m.output_names
    errs = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
    assert max(errs) <= tol, f"relative errors {errs} over {tol}"
    for b in want:
        assert np.isfinite(b).all()
    return got


class _Compiled:
    """Compile each model once per module; tests ask by key."""

    def __init__(self):
        self.models: dict[str, tuple] = {}

    def get(self, key, build):
        if key not in self.models:
            self.models[key] = build()
        return self.models[key]


@pytest.fixture(scope="module")
def compiled():
    return _Compiled()


# -- models ------------------------------------------------------------------------------
def _light(name: str):
    from examples.random_weights import light_graph, light_inputs

    graph = light_graph(name)
    return compile(graph, progress=False), light_inputs(graph)


@pytest.mark.parametrize("name", LIGHT)
def test_light_model(compiled, name):
    m, feeds = compiled.get(name, lambda: _light(name))
    got = check_against_source(m, feeds, TOL_DEEP if name in DEEP else TOL)
    logits = got[-1]
    assert logits.std() > 1e-3, "degenerate logits: the weights did not get randomised"
    assert m.summary()["nodes_per_device"].get("cpu", 0) > 0


def _gpt2(gpt2_model, kind: str):
    import torch

    from examples.models import export_onnx

    model, ids = gpt2_model
    if kind == "onnx":
        path = export_onnx(model, ids, input_names=["input_ids"], output_names=["logits"])
        return compile(path, progress=False)
    return compile(model, example_inputs=(torch.from_numpy(ids),), input_names=["input_ids"],
                   progress=False)


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_gpt2_decoder(compiled, gpt2_model, kind):
    import torch

    m = compiled.get(f"gpt2-{kind}", lambda: _gpt2(gpt2_model, kind))
    model, ids = gpt2_model
    assert m.input_names == ["input_ids"]
    (got,) = check_against_source(m, {"input_ids": ids}, TOL)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert rel_err(got, want) <= TOL
    assert np.array_equal(m(ids)[0], got)  # __call__, positional
    assert m.estimate()["latency_ms"] > 0
    prof = m.profile({"input_ids": ids}, repeat=2)
    assert len(prof.steps) == m.stats()["steps"] and prof.total_ms > 0


def _minilm(minilm_model, kind: str):
    import torch

    from examples.models import export_onnx

    model, _, inputs = minilm_model
    if kind == "onnx":
        return compile(export_onnx(model, inputs), progress=False)
    example = {k: torch.from_numpy(v) for k, v in inputs.items()}
    return compile(model, example_inputs=example, input_names=list(inputs), progress=False)


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_minilm(compiled, minilm_model, kind):
    import torch

    m = compiled.get(f"minilm-{kind}", lambda: _minilm(minilm_model, kind))
    model, _, inputs = minilm_model
    assert m.input_names == list(inputs)
    got = check_against_source(m, inputs, TOL)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert rel_err(got[0], want.last_hidden_state.numpy()) <= TOL


def _mobilenet(mobilenet_model):
    import torch

    model, x = mobilenet_model
    return compile(model, example_inputs=(torch.from_numpy(x),), progress=False)


def test_mobilenet_v2(compiled, mobilenet_model):
    import torch

    m = compiled.get("mobilenet", lambda: _mobilenet(mobilenet_model))
    model, x = mobilenet_model
    (got,) = check_against_source(m, [x], TOL)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert rel_err(got, want) <= TOL


# -- memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["resnet50", "mobilenet", "minilm-onnx"])
def test_arena_close_to_lower_bound(compiled, key, request):
    fixture = request.getfixturevalue
    build = {"resnet50": lambda: _light("resnet50"),
             "mobilenet": lambda: _mobilenet(fixture("mobilenet_model")),
             "minilm-onnx": lambda: _minilm(fixture("minilm_model"), "onnx")}[key]
    m = compiled.get(key, build)
    m = m[0] if isinstance(m, tuple) else m
    s = m.stats()
    assert s["lower_bound_bytes"] <= s["arena_bytes"] <= 1.10 * s["lower_bound_bytes"], s
    if key == "resnet50":
        assert s["naive_bytes"] >= 3 * s["arena_bytes"], s
        assert s["weight_bytes"] > 90e6  # 25.5M float parameters, as packed


# -- packages ------------------------------------------------------------------------------
def _fresh_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_package_reloaded_in_fresh_process(compiled, gpt2_model, tmp_path):
    m = compiled.get("gpt2-torch", lambda: _gpt2(gpt2_model, "torch"))
    _, ids = gpt2_model
    (want,) = m.run({"input_ids": ids})
    pkg = m.save(tmp_path / "gpt2.npkg")
    np.save(tmp_path / "ids.npy", ids)
    code = textwrap.dedent(f"""
        import sys, numpy as np, runtime
        m = runtime.load({str(pkg)!r})
        (y,) = m.run({{"input_ids": np.load({str(tmp_path / "ids.npy")!r})}})
        np.save({str(tmp_path / "y.npy")!r}, y)
        assert "compiler" not in sys.modules and "torch" not in sys.modules, "imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_fresh_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "y.npy")
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_tampered_package_is_refused(compiled, gpt2_model, tmp_path):
    m = compiled.get("gpt2-torch", lambda: _gpt2(gpt2_model, "torch"))
    pkg = m.save(tmp_path / "gpt2.npkg")
    runtime.load(pkg)  # the untouched package loads
    wfile = pkg / "weights.safetensors"
    data = bytearray(wfile.read_bytes())
    data[len(data) // 2] ^= 0x01
    wfile.write_bytes(bytes(data))
    with pytest.raises(runtime.IntegrityError, match="weights.safetensors"):
        runtime.load(pkg)


def test_cli_compile_and_run(tmp_path):
    import onnxruntime as ort

    model, digit = ROOT / "examples" / "digits_cnn.onnx", ROOT / "examples" / "digit.npy"
    npucc = [sys.executable, "-m", "compiler.cli"]
    env = _fresh_env()
    proc = subprocess.run([*npucc, "compile", str(model), "-t", "host", "-o",
                           str(tmp_path / "d.npkg"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "arena" in proc.stdout
    proc = subprocess.run([*npucc, "run", str(tmp_path / "d.npkg"), "--input",
                           f"image={digit}", "--save-outputs", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"image": np.load(digit)})
    (out,) = list((tmp_path / "out").glob("*.npy"))
    got = np.load(out)
    assert rel_err(got, want) <= TOL
    assert int(got.argmax()) == int(want.argmax())
    assert out.stem in proc.stdout


# -- errors ----------------------------------------------------------------------------------
def test_wrong_input_shape_names_input(compiled, gpt2_model):
    m = compiled.get("gpt2-torch", lambda: _gpt2(gpt2_model, "torch"))
    _, ids = gpt2_model
    with pytest.raises(ValueError, match=r"'input_ids'.*\[1, 5\].*expected \[1, 32\]"):
        m.run({"input_ids": ids[:, :5]})
    with pytest.raises(ValueError, match=r"'input_ids'.*int32.*expected int64"):
        m.run({"input_ids": ids.astype(np.int32)})
    with pytest.raises(ValueError, match=r"unknown input.*'ids'.*input_ids"):
        m.run({"ids": ids})


BIG_ACTIVATIONS = """
graph @wide(%x: f32[256,1024]) -> (f32[256,1024]) {
  %0 = relu(%x) : f32[256,1024]
  %1 = exp(%0) : f32[256,1024]
  %2 = add(%0, %1) : f32[256,1024]
  return %2
}
"""


def _tiny_target(tmp_path: Path, budget_mb: float) -> Path:
    text = (ROOT / "targets" / "host.toml").read_text()
    assert "budget_mb = 8192" in text
    target = tmp_path / "tiny.toml"
    target.write_text(text.replace("budget_mb = 8192", f"budget_mb = {budget_mb}")
                      .replace('name = "host"', 'name = "tiny"'))
    return target


def test_memory_budget_error(tmp_path):
    # weights alone over the budget: refused before any kernel is built
    target = _tiny_target(tmp_path, 0.1)
    with pytest.raises(NpuccError) as err:
        compile(ROOT / "examples" / "digits_cnn.onnx", target=target, progress=False)
    msg = str(err.value)
    assert "'tiny'" in msg and str(target) in msg and "budget_mb = 0.1;" in msg
    assert "0.15 MiB of weights alone" in msg and "raise budget_mb to at least 1" in msg
    # activations over the budget: the arena is known after codegen
    (tmp_path / "wide.ir").write_text(BIG_ACTIVATIONS)
    target = _tiny_target(tmp_path, 1.5)
    with pytest.raises(NpuccError, match=r"it needs 2\.00 MiB of activations \(arena\) \+ 0\.00 "
                       r"MiB of weights = 2\.00 MiB.*budget_mb = 1\.5;.*at least 2,"):
        compile(tmp_path / "wide.ir", target=target, progress=False)
