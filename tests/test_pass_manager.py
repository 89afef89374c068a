"""The pass manager: pipeline text, instruments, bisection, crash reproducers and the CLI.

Test-only passes come from tests/pm_test_passes.py, loaded as a plugin (as the CLI would),
so a reproducer command printed here replays in a subprocess too.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.errors import (
    NpuccError,
    NumericCheckError,
    PassFailedError,
    PassVerificationError,
    PipelineError,
    VerificationError,
)
from compiler.ir import Graph, TensorType, interpret, load, parse
from compiler.pass_base import Pass, PassContext, PassResult, load_plugin, register_pass
from compiler.pass_manager import DebugOptions, PassManager, run_pipeline
from compiler.pipeline import format_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "pm_test_passes.py"
load_plugin(str(PLUGIN))

TINY = """graph @g(%x: f32[2,3]) -> (f32[2,3]) {
  %0 = relu(%x) : f32[2,3]
  %1 = neg(%0) : f32[2,3]
  %2 = neg(%1) : f32[2,3]
  return %2
}
"""


@register_pass
@dataclass(frozen=True)
class OptionsPass(Pass):
    """Has one option of every kind pipeline text can set."""

    name: ClassVar[str] = "test-options"
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    mode: Literal["fast", "exact"] = "fast"
    names: tuple[str, ...] = ("relu",)
    pair: tuple[int, int] = (1, 2)
    label: str = ""
    limit: int | None = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph, False)


def tiny() -> Graph:
    return parse(TINY)


def weighted() -> Graph:
    """x * w + relu(x), with w a real weight (so stage dumps carry a safetensors file)."""
    g = Graph("wg")
    x = g.add_input("x", TensorType((4, 8), "f32"))
    w = g.add_weight("w", np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8))
    g.outputs = [g.add("add", g.add("mul", x, w), g.add("relu", x))]
    return g


def npucc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# -- pipeline text ----------------------------------------------------------------------
def test_bare_list_then_key_is_unambiguous():
    (p,) = parse_pipeline("test-options{names=relu,relu6,flag=true}")
    assert p == OptionsPass(names=("relu", "relu6"), flag=True)
    (q,) = parse_pipeline("test-options{ names = [relu, relu6] , flag=true }")
    assert q == p


def test_typed_values():
    (p,) = parse_pipeline('test-options{count=0x10,ratio=1e-3,mode=exact,names=[],'
                          'pair=3,4,label="a, b=c",limit=none}')
    assert p == OptionsPass(count=16, ratio=1e-3, mode="exact", names=(), pair=(3, 4),
                            label="a, b=c", limit=None)
    assert parse_pipeline("test-options{limit=7,names=gelu}")[0] == \
        OptionsPass(limit=7, names=("gelu",))
    assert parse_pipeline("test-options{ratio=inf,flag=on}")[0] == \
        OptionsPass(ratio=float("inf"), flag=True)


def test_several_passes_and_round_trip():
    text = "verify, test-options{flag=1,label=x}, print-op-stats{json=true},verify"
    passes = parse_pipeline(text)
    assert [p.name for p in passes] == ["verify", "test-options", "print-op-stats", "verify"]
    canon = format_pipeline(passes)
    assert canon == "verify,test-options{flag=true,label=x},print-op-stats{json=true},verify"
    assert parse_pipeline(canon) == passes
    assert parse_pipeline("") == []


_words = st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=8)


@settings(max_examples=60, deadline=None)
@given(flag=st.booleans(), count=st.integers(-10**6, 10**6),
       ratio=st.floats(allow_nan=False, width=64), mode=st.sampled_from(["fast", "exact"]),
       names=st.lists(_words, max_size=3).map(tuple), label=_words,
       limit=st.none() | st.integers(0, 99))
def test_pipeline_text_round_trips(flag, count, ratio, mode, names, label, limit):
    p = OptionsPass(flag=flag, count=count, ratio=ratio, mode=mode, names=names, label=label,
                    limit=limit)
    assert parse_pipeline(p.pipeline_text) == [p], p.pipeline_text


@pytest.mark.parametrize("text, message, column", [
    ("verify,fold-constant", "unknown pass 'fold-constant' (did you mean 'fold-constants'?)"
     "; known passes:", 8),
    ("test-options{colour=red}", "unknown option 'colour' for pass 'test-options'; its "
     "options: flag: bool = false, count: int = 1", 14),
    ("test-options{count=many}", "option 'count' of pass 'test-options': 'many' is not a int",
     20),
    ("test-options{mode=slow}", "'slow' is not one of fast, exact", 19),
    ("test-options{pair=1}", "option 'pair' of pass 'test-options' takes 2 values", 14),
    ("test-options{flag=true,flag=false}", "option 'flag' of pass 'test-options' is given "
     "twice", 24),
    ("test-options{label=a,b}", "takes one value (str), got a list of 2; quote a string", 14),
    ("test-options{true}", "expected key=value, got 'true'", 14),
    ("verify,,verify", "unexpected ','", 8),
    ("verify{", "unexpected end of the pipeline", 8),
    ("verify}", "unexpected '}'; expected ',' or '{'", 7),
])
def test_pipeline_errors(text, message, column):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert message in str(e.value)
    assert e.value.column == column
    assert str(e.value).splitlines()[-1] == "  " + " " * (column - 1) + "^"


def test_unknown_pass_lists_every_pass():
    from compiler.pass_base import pass_registry

    with pytest.raises(PipelineError) as e:
        parse_pipeline("no-such-pass")
    for name in pass_registry():
        assert name in str(e.value)


# -- instruments --------------------------------------------------------------------------
def test_dump_dir_numbered_files_share_weights(tmp_path):
    g = weighted()
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    want = interpret(g, [x])[0]
    out = run_pipeline(g, "verify,test-double-neg,test-double-neg{times=0}",
                       debug=DebugOptions(dump_dir=tmp_path / "stages"))
    names = sorted(p.name for p in (tmp_path / "stages").glob("*.ir"))
    assert names == ["00-input.ir", "01-verify.ir", "02-test-double-neg.ir",
                     "03-test-double-neg.ir"]
    # every stage loads with its weights and computes the same thing
    for n in names:
        stage = load(tmp_path / "stages" / n)
        np.testing.assert_allclose(interpret(stage, [x])[0], want)
    assert str(load(tmp_path / "stages" / "03-test-double-neg.ir")) == str(out)
    # unchanged weights are written once: the stages' safetensors are one file
    inodes = {(tmp_path / "stages" / n).with_suffix(".safetensors").stat().st_ino
              for n in names}
    assert len(inodes) == 1


def test_print_ir_to_stream_named_and_only_if_changed():
    buf = io.StringIO()
    run_pipeline(tiny(), "test-double-neg{times=0},verify,test-double-neg",
                 debug=DebugOptions(print_ir_after=("test-double-neg",),
                                    print_ir_after_change=True, print_ir_before=("verify",),
                                    print_ir_stream=buf))
    text = buf.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("// -----//")]
    assert headers == ["// -----// IR Dump Before verify (#2) //----- //",
                       "// -----// IR Dump After test-double-neg (#3) //----- //"]
    # a dump is valid IR (the header is a comment)
    assert str(parse(text.split(headers[1])[1])).count("neg(") == 4


def test_timing_table_and_records():
    buf = io.StringIO()
    pm = PassManager.from_debug("verify,test-double-neg{times=2},print-op-stats",
                                DebugOptions(time_passes=True, report_stream=buf))
    pm.run(tiny())
    from compiler.instruments import Timing

    timing = pm.instrument(Timing)
    assert [(r.pass_text, r.nodes_before, r.nodes_after, r.delta, r.changed)
            for r in timing.records] == [("verify", 3, 3, 0, False),
                                         ("test-double-neg{times=2}", 3, 7, 4, True),
                                         ("print-op-stats", 7, 7, 0, False)]
    assert timing.records[2].stats == {"neg": 6, "relu": 1}
    assert all(r.seconds >= 0 for r in timing.records)
    table = buf.getvalue()
    assert "Pass timing" in table
    assert "test-double-neg{times=2}" in table and "3 → 7" in table and "+4" in table
    assert "added=4" in table and "neg=6, relu=1" in table


def test_verify_each_names_the_pass_that_broke_the_graph():
    with pytest.raises(PassVerificationError) as e:
        run_pipeline(tiny(), "verify,test-corrupt,verify")
    err = e.value
    assert (err.pass_text, err.index) == ("test-corrupt", 1)
    assert "pass 'test-corrupt' (#2 in the pipeline) broke the graph" in str(err)
    assert "relu %0: result 0 is declared f32[2,3,1] but the op infers f32[2,3]" in str(err)
    # off: the broken graph goes through (and the verify pass catches it)
    with pytest.raises(PassFailedError, match=r"pass 'verify' \(#2 in the pipeline\) failed"):
        run_pipeline(tiny(), "test-corrupt,verify", debug={"verify_each": False})


def test_bad_input_graph_is_not_blamed_on_a_pass():
    g = tiny()
    g.nodes[0].outputs[0].type = TensorType((9,), "f32")
    with pytest.raises(VerificationError, match="the input graph"):
        run_pipeline(g, "verify")


def test_numeric_check_table_and_tolerance():
    from compiler.numeric import NumericCheck

    buf = io.StringIO()
    pm = PassManager.from_debug("test-double-neg,test-flip-sign,test-double-neg",
                                DebugOptions(numeric_check=True, report_stream=buf))
    pm.run(tiny())
    recs = pm.instrument(NumericCheck).records
    assert [r.figures.max_abs == 0 for r in recs] == [True, False, False]
    assert recs[1].figures.cosine == pytest.approx(-1.0)
    assert recs[1].figures.max_rel == pytest.approx(2.0)
    assert "Numeric check" in buf.getvalue() and "test-flip-sign" in buf.getvalue()
    with pytest.raises(NumericCheckError) as e:
        run_pipeline(tiny(), "test-double-neg,test-flip-sign",
                     debug=DebugOptions(tolerance=1e-3, report_stream=io.StringIO()))
    assert (e.value.pass_text, e.value.index) == ("test-flip-sign", 1)
    assert "max_abs" in str(e.value) and "> 0.001" in str(e.value)


def test_sample_inputs_respect_int_range():
    from compiler.numeric import make_sample_inputs

    g = parse("""graph @ids(%tok: i64[4,64], %mask: bool[4,64], %h: f16[2,2]) -> (i64[4,64]) {
  %0 = neg(%tok) : i64[4,64]
  return %0
}""")
    a = make_sample_inputs(g, seed=3, int_range=(5, 9))
    assert a["tok"].dtype == np.int64 and a["tok"].min() >= 5 and a["tok"].max() < 9
    assert a["mask"].dtype == np.bool_ and a["h"].dtype == np.float16
    b = make_sample_inputs(g, seed=3, int_range={"tok": (0, 2)})
    assert set(np.unique(b["tok"])) <= {0, 1}
    np.testing.assert_array_equal(make_sample_inputs(g, seed=3, int_range=(5, 9))["tok"],
                                  a["tok"])


def test_bisect_finds_the_sign_flip():
    from compiler.numeric import bisect

    g = tiny()
    before = str(g)
    pipeline = ["test-double-neg", "verify", "test-double-neg{times=2}", "test-flip-sign",
                "test-double-neg", "verify", "test-double-neg"]
    res = bisect(g, ",".join(pipeline), None, 1e-5)
    assert res.found and res.index == 3 and res.pass_text == "test-flip-sign"
    assert res.figures.max_abs > 0 and res.previous.max_abs == 0
    assert res.probes <= 4
    assert str(g) == before  # bisection works on copies
    x = {"x": np.ones((2, 3), np.float32)}
    ok = bisect(g, "test-double-neg,verify", x, 1e-5)
    assert not ok.found and ok.figures.max_abs == 0


def test_raising_pass_writes_a_reproducer_that_replays(tmp_path):
    with pytest.raises(PassFailedError) as e:
        run_pipeline(tiny(), 'verify,test-crash{message="bad, bad"}',
                     debug=DebugOptions(crash_dir=tmp_path / "crash"))
    err = e.value
    assert (err.pass_text, err.index) == ('test-crash{message="bad, bad"}', 1)
    assert "raised RuntimeError: bad, bad" in str(err)
    saved = tmp_path / "crash" / "test-crash.ir"
    assert str(load(saved)) == TINY  # what the pass received, not what it damaged
    cmd = shlex.split(err.reproducer)
    assert cmd[:3] == ["npucc", "opt", str(saved)]
    proc = npucc(*cmd[1:], "--crash-dir", str(tmp_path / "again"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        "npucc: error: pass 'test-crash{message=\"bad, bad\"}' (#1 in the pipeline) raised "
        "RuntimeError: bad, bad")
    assert "Traceback" not in proc.stderr


# -- CLI --------------------------------------------------------------------------------
def test_cli_time_passes_and_print_ir_after(tmp_path):
    (tmp_path / "m.ir").write_text(TINY)
    proc = npucc("opt", "m.ir", "-p", "verify,test-double-neg,print-op-stats",
                 "--load-plugin", str(PLUGIN), "--time-passes",
                 "--print-ir-after=test-double-neg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "// -----// IR Dump After test-double-neg (#2) //----- //" in proc.stderr
    assert "Pass timing" in proc.stderr and "3 → 5" in proc.stderr
    assert proc.stdout.startswith("graph @g(") and proc.stdout.count("neg(") == 4
    parse(proc.stdout)


def test_cli_output_file_numeric_check_and_bisect(tmp_path, capsys):
    from compiler.cli import main
    from compiler.ir import save

    save(weighted(), tmp_path / "w.ir")
    np.savez(tmp_path / "in.npz", x=np.full((4, 8), 0.5, np.float32))
    rc = main(["opt", str(tmp_path / "w.ir"), "-p", "test-double-neg", "-o",
               str(tmp_path / "o.ir"), "--numeric-check", "--inputs", str(tmp_path / "in.npz")])
    assert rc == 0
    assert load(tmp_path / "o.ir").op_counts()["neg"] == 2
    assert "Numeric check" in capsys.readouterr().err
    rc = main(["opt", str(tmp_path / "w.ir"), "-p", "test-double-neg,test-flip-sign,verify",
               "--bisect", "--tolerance", "1e-6"])
    out = capsys.readouterr().out
    assert rc == 0 and "first pass exceeding max_abs 1e-06: #2 test-flip-sign" in out


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    from compiler.cli import main

    (tmp_path / "m.ir").write_text(TINY)
    assert main(["opt", str(tmp_path / "m.ir"), "-p", "verify",
                 "--print-ir-after=nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("npucc: error: unknown pass 'nope'")
    assert main(["opt", str(tmp_path / "missing.ir"), "-p", "verify"]) == 1
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "bad.ir").write_text("graph @g(%x: f32[2]) -> (f32[2]) {\n  return %y\n")
    assert main(["opt", str(tmp_path / "bad.ir")]) == 1
    assert capsys.readouterr().err.startswith(f"npucc: error: {tmp_path / 'bad.ir'}:")


def test_cli_diff(tmp_path, capsys):
    from compiler.cli import main

    (tmp_path / "a.ir").write_text(TINY)
    (tmp_path / "b.ir").write_text(str(run_pipeline(tiny(), "test-double-neg")))
    assert main(["diff", str(tmp_path / "a.ir"), str(tmp_path / "a.ir")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a.ir"), str(tmp_path / "b.ir")]) == 1
    out = capsys.readouterr().out
    assert f"--- {tmp_path / 'a.ir'}" in out and "+  %3 = neg(%2) : f32[2,3]" in out
    assert "nodes: 3 -> 5 (+2); 0 removed, 2 added" in out
    assert "neg                  2 -> 4 (+2)" in out


def test_cli_opt_help_lists_passes(tmp_path):
    proc = npucc("opt", "--load-plugin", str(PLUGIN), "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "verify: Run the graph verifier" in proc.stdout
    assert "test-crash: Damage the graph, then raise RuntimeError(message)" in proc.stdout
    assert "message: str = boom" in proc.stdout


def test_cli_import_stays_light():
    code = ("import sys, compiler.cli; heavy = [m for m in ('numpy', 'lark', 'rich', 'tvm', "
            "'onnx', 'passes') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_import_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])],
                                                "m", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    from compiler.cli import main

    assert main(["import", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.ir"),
                 "--input-shape", "x=2,3"]) == 0
    g = load(tmp_path / "m.ir")
    assert [v.type for v in g.inputs] == [TensorType((2, 3), "f32")]
    assert g.op_counts() == {"relu": 1}


def test_debug_options_from_dict_checks_keys():
    assert DebugOptions.coerce({"time_passes": True, "print_ir_after": "a,b"}).print_ir_after \
        == ("a", "b")
    with pytest.raises(NpuccError, match="unknown debug option"):
        DebugOptions.coerce({"time_pass": True})


def test_pass_limit_skips_the_rest_and_roundtrip_check_passes():
    out = run_pipeline(tiny(), "test-double-neg,test-flip-sign,test-double-neg",
                       debug={"pass_limit": 1, "verify_roundtrip": True})
    assert out.op_counts()["neg"] == 4  # only the first pass ran
