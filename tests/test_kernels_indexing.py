"""gather_elements / gather_nd / scatter_elements / scatter_nd kernels against the ops'
numpy references, and the references against the ONNX spec's own examples."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import OpError
from compiler.ir.registry import get_op
from tests.kernel_harness import Case, assert_matches_reference, run_cases

rng = np.random.default_rng(3)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def idx(shape, hi, lo=None, dtype=np.int64):
    return rng.integers(-hi if lo is None else lo, hi, shape).astype(dtype)


def unique_rows(n, dims, dtype=np.int64):
    """``n`` distinct index tuples into ``dims`` (some negative)."""
    flat = rng.permutation(int(np.prod(dims)))[:n]
    rows = np.stack(np.unravel_index(flat, dims), -1)
    neg = rng.random(rows.shape) < 0.3
    return np.where(neg, rows - np.array(dims), rows).astype(dtype)


CASES = {
    "gather_elements_bert_ids": Case("gather_elements", [np.arange(512, dtype=np.int64)[None],
                                                         idx((1, 12), 512, lo=0)], {"axis": 1}),
    "gather_elements_neg_axis0": Case("gather_elements", [f32(4, 5, 3), idx((2, 5, 3), 4)],
                                      {"axis": 0}),
    "gather_elements_i32_axis_last": Case("gather_elements",
                                          [f32(3, 6), idx((3, 9), 6, dtype=np.int32)],
                                          {"axis": -1}),
    "gather_nd_points": Case("gather_nd", [f32(4, 5, 6), idx((7, 2), 4)]),
    "gather_nd_full": Case("gather_nd", [f32(4, 5), idx((3, 2), 4)]),
    "gather_nd_batch": Case("gather_nd", [f32(2, 5, 6), idx((2, 3, 1), 5)],
                            {"batch_dims": 1}),
    "scatter_elements_none": Case("scatter_elements", [f32(5, 4), idx((2, 4), 5), f32(2, 4)],
                                  {"axis": 0}),
    "scatter_elements_add_dups": Case("scatter_elements",
                                      [f32(3, 7), idx((3, 9), 7), f32(3, 9)],
                                      {"axis": 1, "reduction": "add"}),
    "scatter_elements_max": Case("scatter_elements", [f32(6, 2), idx((4, 2), 6), f32(4, 2)],
                                 {"reduction": "max"}),
    "scatter_nd_rows": Case("scatter_nd", [f32(6, 5, 4), unique_rows(3, (6,)), f32(3, 5, 4)]),
    "scatter_nd_points_i32": Case("scatter_nd",
                                  [f32(4, 5), unique_rows(6, (4, 5), np.int32), f32(6)]),
    "scatter_nd_mul_dups": Case("scatter_nd", [f32(5, 3), idx((4, 1), 5), f32(4, 3)],
                                {"reduction": "mul"}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    got = run_cases(list(CASES.values()), tmp_path_factory.mktemp("indexing"))
    return dict(zip(CASES, got, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results, name):
    assert_matches_reference(name, CASES[name], results[name])


def _ref(op, inputs, **attrs):
    d = get_op(op)
    return d.reference(inputs, d.normalize_attrs(attrs))[0]


def test_references_follow_the_onnx_examples():
    # ONNX's documented examples (onnx/docs/Operators.md)
    data = np.array([[1, 2], [3, 4]], np.float32)
    np.testing.assert_array_equal(
        _ref("gather_elements", [data, np.array([[0, 0], [1, 0]])], axis=1), [[1, 1], [4, 3]])
    np.testing.assert_array_equal(
        _ref("gather_nd", [np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], np.float32),
                           np.array([[1], [0]])], batch_dims=1), [[2, 3], [4, 5]])
    np.testing.assert_array_equal(
        _ref("scatter_elements", [np.zeros((1, 5), np.float32), np.array([[1, 3]]),
                                  np.array([[1.1, 2.1]], np.float32)], axis=1),
        np.array([[0, 1.1, 0, 2.1, 0]], np.float32))
    np.testing.assert_array_equal(
        _ref("scatter_nd", [np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32),
                            np.array([[4], [3], [1], [7]]),
                            np.array([9, 10, 11, 12], np.float32)]),
        [1, 11, 3, 10, 9, 6, 7, 12])
    # reduction="none" with duplicates: the last write wins
    np.testing.assert_array_equal(
        _ref("scatter_nd", [np.zeros(3, np.float32), np.array([[1], [1]]),
                            np.array([5, 7], np.float32)]), [0, 7, 0])


def test_out_of_range_index_is_an_error_in_the_reference():
    with pytest.raises(OpError, match="outside"):
        _ref("gather_elements", [np.zeros((2, 3), np.float32), np.array([[0, 3, 1]] * 2)],
             axis=1)
