"""ONNX operator conformance for the importer: onnx's own node test cases, imported with
``from_onnx`` and run with the reference interpreter.

Which cases: every case of ``onnx.backend.test.case.node.collect_testcases(None)`` whose
nodes are all default-domain ops in :data:`compiler.frontends.onnx.SUPPORTED_OPS`
(including the ``*_expanded`` cases, which spell a function op in supported ops).

How a case is adapted, and why:

- Opset. npucc imports opsets 13..21; a case written for another opset is relabelled to the
  nearest of those when every node's op exists there and every attribute the node sets is
  declared there. For the supported ops, opsets 22..28 changed only type constraints (new
  bf16/float8/float4/int2 types) and added ``round_mode`` (Cast, float8 only) and
  ``stash_type`` (Range): a node setting those is not relabelled, and ONNX shape inference
  (strict, with type checks) refuses a type that opset 21 does not allow. Two changes are
  semantic and their nodes are not relabelled: Mod-28 defines ``fmod=0`` on floats (floor
  modulo), and Pool-22 drops ceil_mode windows that start in the right padding. Cases
  that cannot be relabelled (also e.g. Dropout-11's ``ratio`` attribute) are skipped, not
  attempted.
- Static operands. Our IR takes static parameters as attributes (CATALOGUE.md): shapes,
  axes, pads, split sizes, slice bounds, clip bounds, resize scales/sizes, range bounds...
  A graph input that such an operand (:data:`STATIC_INPUTS`) depends on is bound to its
  test value as an initializer, directly or through the nodes computing the operand (an
  expanded function's arithmetic on its ``size`` input; not through Shape/Size, which are
  static anyway); in a real model these are constants or fold to constants at import.
  Tensor operands the IR keeps as operands (Gather indices, Where's condition...) stay
  graph inputs. A converter that starts needing another static operand must be added to
  the table (its cases fail with "computed at run time" until then).
- Comparison: like onnx's backend runner: same shape and dtype, then
  ``assert_allclose(rtol, atol)`` with the case's tolerances (1e-3 / 1e-7 by default;
  f16 and bf16 get at least two ULPs of rtol), exact equality for integer and bool
  outputs.

The checked-in list ``tests/data/onnx_conformance_expected.txt`` names the cases that pass.
``python -m tests.onnx_conformance --update`` (or ``NPUCC_UPDATE_CONFORMANCE=1 pytest
tests/test_onnx_conformance.py``) rewrites it; ``python -m tests.onnx_conformance`` prints
every failure with its reason.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPECTED_FILE = Path(__file__).parent / "data" / "onnx_conformance_expected.txt"
UPDATE_ENV = "NPUCC_UPDATE_CONFORMANCE"

# ONNX op type -> input slots the importer needs constant (they become IR attributes).
_REDUCE_AXES = {op: (1,) for op in (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")}
STATIC_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "Pad": (1, 2, 3), "Range": (0, 1, 2), "Clip": (1, 2),
    "Resize": (1, 2, 3), "ConstantOfShape": (0,), "Trilu": (1,), "CumSum": (1,),
    "Dropout": (1, 2), "TopK": (1,), "OneHot": (1,), "Compress": (1,), "NonZero": (0,),
    "If": (0,), **_REDUCE_AXES,
}


@dataclass
class Case:
    name: str
    model: object  # onnx.ModelProto, adapted
    inputs: dict[str, np.ndarray]  # the graph inputs left after binding
    outputs: list[np.ndarray]
    rtol: float
    atol: float


@dataclass
class Outcome:
    name: str
    passed: bool
    reason: str = ""


def _default_opset(model) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def _float_operand(model, name: str) -> bool:
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name:
            return vi.type.tensor_type.elem_type in floats
    return False


def _semantics_changed(model, node, v: int) -> str | None:
    """Why ``node`` means something else at opset ``v`` than at 21 (None if it does not)."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Mod" and v >= 28 and not (attrs.get("fmod") and attrs["fmod"].i) \
            and _float_operand(model, node.input[0]):
        return "Mod with fmod=0 on floats is defined only from opset 28 (floor modulo)"
    if node.op_type in ("AveragePool", "MaxPool") and v >= 22 and "ceil_mode" in attrs \
            and attrs["ceil_mode"].i:
        return (f"{node.op_type} ceil_mode drops windows starting in the right padding only "
                "from opset 22")
    return None


def _relabel(model) -> str | None:
    """Move ``model`` into opsets 13..21 in place; returns why it cannot be, or None."""
    from onnx import defs

    from compiler.frontends.onnx import MAX_OPSET, MIN_OPSET

    v = _default_opset(model)
    if v is None:
        return "no default-domain opset"
    target = min(max(v, MIN_OPSET), MAX_OPSET)
    if target == v:
        return None
    for node in model.graph.node:
        try:
            schema = defs.get_schema(node.op_type, target)
        except defs.SchemaError:
            return f"{node.op_type} does not exist at opset {target}"
        extra = [a.name for a in node.attribute if a.name not in schema.attributes]
        if extra:
            return f"{node.op_type} sets {', '.join(extra)}, unknown at opset {target}"
        if len(node.input) > schema.max_input:
            return f"{node.op_type} has more inputs than opset {target} allows"
        changed = _semantics_changed(model, node, v)
        if changed:
            return changed
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    return None


# ops whose result does not depend on their operands' values, only on their types
_TYPE_ONLY = frozenset({"Shape", "Size"})


def _bind_static(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn graph inputs that a static slot depends on into initializers (walking back
    through the nodes computing the operand, e.g. an expanded function's arithmetic on a
    ``size`` input; not through Shape/Size, whose results are static anyway).
    Returns the feeds left."""
    from onnx import numpy_helper

    needed: set[str] = set()
    for node in reversed(model.graph.node):
        slots = set(STATIC_INPUTS.get(node.op_type, ()))
        if node.op_type not in _TYPE_ONLY and any(o in needed for o in node.output):
            slots = set(range(len(node.input)))
            if node.op_type == "CastLike":
                slots.discard(1)  # only the type of the 'like' operand matters
        needed.update(node.input[i] for i in slots if i < len(node.input) and node.input[i])
    static = {name for name in needed if name in feeds}
    if not static:
        return feeds
    keep = [vi for vi in model.graph.input if vi.name not in static]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in sorted(static):
        model.graph.initializer.append(numpy_helper.from_array(feeds[name], name))
    return {k: v for k, v in feeds.items() if k not in static}


def _array(data) -> np.ndarray:
    """A data-set entry as an array (types numpy lacks come as TensorProtos)."""
    from onnx import TensorProto, numpy_helper

    if isinstance(data, TensorProto):
        return numpy_helper.to_array(data)
    return np.asarray(data)


@functools.cache
def _all_testcases() -> tuple:
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return tuple(node.collect_testcases(None))


def adapt(tc) -> Case | str:
    """An onnx TestCase made importable (see the module docstring), or why it cannot be."""
    model = type(tc.model)()
    model.CopyFrom(tc.model)
    why = _relabel(model)
    if why is not None:
        return why
    # onnx's runner feeds the graph inputs positionally; node cases use one data set
    ins, outs = tc.data_sets[0]
    names = [vi.name for vi in model.graph.input]
    feeds = {n: _array(a) for n, a in zip(names, ins, strict=False)}
    feeds = _bind_static(model, feeds)
    return Case(tc.name, model, feeds, [_array(o) for o in outs], tc.rtol, tc.atol)


def supported(model) -> bool:
    """Every node is a default-domain op the importer has a converter for."""
    from compiler.frontends.onnx import SUPPORTED_OPS

    return all(n.domain in ("", "ai.onnx") and n.op_type in SUPPORTED_OPS
               for n in model.graph.node)


def collect() -> tuple[list[Case], dict[str, str]]:
    """(adapted cases to attempt, skipped case name -> why) over the supported op types."""
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    for tc in _all_testcases():
        if not supported(tc.model):
            continue
        case = adapt(tc)
        if isinstance(case, str):
            skipped[tc.name] = case
        else:
            cases.append(case)
    return cases, skipped


def cases_of(*modules: str) -> list[Case]:
    """The supported, adaptable cases of a few onnx test modules (``"slice"``, ``"pad"``)
    and of any collected before, without collecting all of them (importing a module runs
    its exports)."""
    import importlib

    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for m in modules:
            importlib.import_module(f"onnx.backend.test.case.node.{m}")
    out = []  # every case collected so far (cases do not record their module)
    for tc in node._NodeTestCases:
        if supported(tc.model):
            case = adapt(tc)
            if not isinstance(case, str):
                out.append(case)
    return out


# relative tolerance floors per dtype: two units in the last place
_ULPS2 = {"float16": 2**-9, "bfloat16": 2**-6}


def _compare(got: list[np.ndarray], want: list[np.ndarray], rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want`` the way onnx's backend runner checks, else why not."""
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {list(a.shape)}, expected {list(b.shape)}"
        if a.dtype != b.dtype:
            return f"output {i} has dtype {a.dtype}, expected {b.dtype}"
        if b.dtype.kind in "biu":
            if not np.array_equal(a, b):
                n = int(np.sum(a != b))
                return f"output {i}: {n} of {b.size} elements differ"
            continue
        r = max(rtol, _ULPS2.get(b.dtype.name, 0.0))
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        close = np.isclose(a64, b64, rtol=r, atol=atol, equal_nan=True)
        if not close.all():
            err = np.abs(a64 - b64)
            err = np.where(np.isnan(err), np.inf, err)
            return (f"output {i}: {int((~close).sum())} of {b.size} elements off, max abs "
                    f"error {float(err.max()):.3g}")
    return ""


def run_case(case: Case) -> Outcome:
    """Import, verify and interpret one case; never raises."""
    from compiler.errors import NpuccError
    from compiler.frontends import from_onnx
    from compiler.ir import interpret

    try:
        g = from_onnx(case.model)
    except NpuccError as e:
        return Outcome(case.name, False, f"import: {type(e).__name__}: {_first_line(e)}")
    except Exception as e:  # a library error escaping the importer is a bug: report it
        return Outcome(case.name, False, f"import crashed: {type(e).__name__}: {e}")
    feeds = {v.name: case.inputs[v.name] for v in g.inputs if v.name in case.inputs}
    try:
        with np.errstate(all="ignore"):
            got = interpret(g, feeds)
    except NpuccError as e:
        return Outcome(case.name, False, f"interpret: {type(e).__name__}: {_first_line(e)}")
    except Exception as e:
        return Outcome(case.name, False, f"interpret crashed: {type(e).__name__}: {e}")
    why = _compare(got, case.outputs, case.rtol, case.atol)
    return Outcome(case.name, not why, why)


# op types whose cases also run through compile() and the TVM kernels (the importer's and
# the interpreter's agreement is not enough for ops whose kernels are new)
COMPILED_OPS = frozenset({"GatherElements", "GatherND", "ScatterElements", "Scatter",
                          "ScatterND", "ConvTranspose", "Compress", "NonZero", "If", "Gather"})
COMPILED_NAMES = ("pool_3d",)  # and cases named so (3-D pools imported as two 2-D pools)
COMPILED_EXPECTED_FILE = EXPECTED_FILE.with_name("onnx_conformance_compiled_expected.txt")


def compiled_cases() -> list[Case]:
    """The attempted cases that use one of :data:`COMPILED_OPS` or are named with one of
    :data:`COMPILED_NAMES`."""
    cases, _ = collect()
    return [c for c in cases if any(n.op_type in COMPILED_OPS for n in c.model.graph.node)
            or any(part in c.name for part in COMPILED_NAMES)]


def run_case_compiled(case: Case, work_dir: Path) -> Outcome:
    """Compile one case for the host (default pipeline, TVM kernels, our runtime), run it and
    compare; never raises."""
    from compiler import compile
    from compiler.errors import NpuccError

    try:
        cm = compile(case.model, target="host", work_dir=work_dir, progress=False)
    except NpuccError as e:
        return Outcome(case.name, False, f"compile: {type(e).__name__}: {_first_line(e)}")
    except Exception as e:
        return Outcome(case.name, False, f"compile crashed: {type(e).__name__}: {e}")
    feeds = {n: case.inputs[n] for n in cm.input_names}
    try:
        with np.errstate(all="ignore"):
            got = [np.asarray(a) for a in cm.run(feeds)]
    except Exception as e:
        return Outcome(case.name, False, f"run: {type(e).__name__}: {_first_line(e)}")
    why = _compare(got, case.outputs, case.rtol, case.atol)
    return Outcome(case.name, not why, why)


def run_all_compiled(work_dir: Path) -> list[Outcome]:
    return [run_case_compiled(c, work_dir / f"c{i}") for i, c in enumerate(compiled_cases())]


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return " ".join(lines[:2])[:300]


def run_all() -> tuple[list[Outcome], dict[str, str]]:
    cases, skipped = collect()
    return [run_case(c) for c in cases], skipped


def read_expected(path: Path = EXPECTED_FILE) -> set[str]:
    if not path.exists():
        return set()
    return {s.strip() for s in path.read_text().splitlines()
            if s.strip() and not s.startswith("#")}


def write_expected(names: set[str], path: Path = EXPECTED_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in sorted(names)))


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    if "--compiled" in argv:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            outcomes = run_all_compiled(Path(tmp))
        passed = {o.name for o in outcomes if o.passed}
        for o in sorted(outcomes, key=lambda o: o.name):
            if not o.passed:
                print(f"FAIL {o.name}: {o.reason}")
        print(f"{len(passed)}/{len(outcomes)} cases of {', '.join(sorted(COMPILED_OPS))} pass "
              f"through compile + kernels in {time.perf_counter() - t0:.1f} s")
        if "--update" in argv:
            write_expected(passed, COMPILED_EXPECTED_FILE)
            print(f"wrote {COMPILED_EXPECTED_FILE}")
        return 0
    outcomes, skipped = run_all()
    passed = {o.name for o in outcomes if o.passed}
    for o in sorted(outcomes, key=lambda o: o.name):
        if not o.passed:
            print(f"FAIL {o.name}: {o.reason}")
    if "-v" in argv:
        for name, why in sorted(skipped.items()):
            print(f"SKIP {name}: {why}")
    print(f"{len(passed)}/{len(outcomes)} conformance cases pass ({len(skipped)} skipped "
          f"outside opsets 13-21) in {time.perf_counter() - t0:.1f} s")
    if "--update" in argv:
        write_expected(passed)
        print(f"wrote {EXPECTED_FILE}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
