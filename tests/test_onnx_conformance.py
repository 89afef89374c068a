"""ONNX operator conformance: onnx's node test cases for every op type the importer claims,
imported, interpreted and compared with onnx's expected outputs.

How cases are selected and adapted (opset relabelling, static operands bound as
initializers, tolerances) is documented in :mod:`tests.onnx_conformance`. The checked-in
list tests/data/onnx_conformance_expected.txt names the cases known to pass: the test fails
when one of them stops passing (each with its reason) and reports newly passing ones
without failing. Rewrite the list with ``NPUCC_UPDATE_CONFORMANCE=1 pytest
tests/test_onnx_conformance.py`` or ``python -m tests.onnx_conformance --update``.
"""

from __future__ import annotations

import os

import pytest

from tests.onnx_conformance import (
    COMPILED_EXPECTED_FILE,
    COMPILED_OPS,
    EXPECTED_FILE,
    UPDATE_ENV,
    read_expected,
    run_all,
    run_all_compiled,
    write_expected,
)


def test_onnx_node_conformance(capsys):
    outcomes, skipped = run_all()
    passed = {o.name for o in outcomes if o.passed}
    reasons = {o.name: o.reason for o in outcomes if not o.passed}
    report = [f"ONNX conformance: {len(passed)}/{len(outcomes)} attempted cases pass "
              f"({len(skipped)} skipped: not expressible at opsets 13-21)"]
    expected = read_expected()
    if os.environ.get(UPDATE_ENV):
        write_expected(passed)
        report.append(f"rewrote {EXPECTED_FILE} ({len(passed)} cases)")
        expected = passed
    new = sorted(passed - expected)
    if new and expected:
        report.append(f"{len(new)} case(s) pass that the expected list does not name (run "
                      f"with {UPDATE_ENV}=1 to add them):\n  " + "\n  ".join(new))
    with capsys.disabled():  # the counts are worth seeing on every run
        print("\n" + "\n".join(report))
    assert expected, f"{EXPECTED_FILE} is missing or empty; run with {UPDATE_ENV}=1"
    regressed = sorted(expected - passed)
    lines = [f"{n}: {reasons.get(n) or skipped.get(n) or 'no longer collected'}"
             for n in regressed]
    assert not regressed, (f"{len(regressed)} expected conformance case(s) fail:\n  "
                           + "\n  ".join(lines))


@pytest.mark.slow
def test_onnx_node_conformance_compiled(capsys, tmp_path):
    """The cases of the ops whose kernels are newest (:data:`COMPILED_OPS`) through
    compile() + the TVM kernels + the runtime, against onnx's expected outputs."""
    outcomes = run_all_compiled(tmp_path)
    passed = {o.name for o in outcomes if o.passed}
    reasons = {o.name: o.reason for o in outcomes if not o.passed}
    with capsys.disabled():
        print(f"\nONNX conformance through compile + kernels: {len(passed)}/{len(outcomes)} "
              f"cases of {', '.join(sorted(COMPILED_OPS))} pass")
    expected = read_expected(COMPILED_EXPECTED_FILE)
    if os.environ.get(UPDATE_ENV):
        write_expected(passed, COMPILED_EXPECTED_FILE)
        expected = passed
    assert expected, f"{COMPILED_EXPECTED_FILE} is missing or empty; run with {UPDATE_ENV}=1"
    regressed = sorted(expected - passed)
    assert not regressed, (f"{len(regressed)} expected compiled case(s) fail:\n  "
                           + "\n  ".join(f"{n}: {reasons.get(n, 'not collected')}"
                                         for n in regressed))
