"""Every non-linalg, non-conv kernel against its op's numpy reference (rtol 1e-4).

All cases are compiled into one library by a module fixture (one tvm.compile call).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernel_harness import Case, assert_matches_reference, run_cases

rng = np.random.default_rng(1)


def f32(*shape, lo=-3.0, hi=3.0):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def i32(*shape, lo=-20, hi=20):
    return rng.integers(lo, hi, shape).astype(np.int32)


CASES: dict[str, Case] = {}
for op in ["exp", "tanh", "sigmoid", "erf", "sin", "cos", "floor", "ceil", "round", "softplus",
           "hard_swish", "neg", "abs", "sign", "relu"]:
    CASES[op] = Case(op, [f32(4, 37)])
CASES["exp_wide"] = Case("exp", [f32(2, 64, lo=-80, hi=80)])
CASES["softplus_wide"] = Case("softplus", [f32(3, 16, lo=-100, hi=100)])
CASES["log"] = Case("log", [f32(3, 32, lo=0.01, hi=10)])
CASES["sqrt"] = Case("sqrt", [f32(5, 16, lo=0.0, hi=10)])
CASES["reciprocal"] = Case("reciprocal", [f32(33, lo=0.5, hi=4)])
CASES["gelu"] = Case("gelu", [f32(2, 128)])
CASES["gelu_tanh"] = Case("gelu", [f32(2, 100)], {"approximate": "tanh"})
CASES["leaky_relu"] = Case("leaky_relu", [f32(3, 17)], {"alpha": 0.2})
CASES["hard_sigmoid"] = Case("hard_sigmoid", [f32(3, 17)], {"alpha": 0.3, "beta": 0.4})
CASES["clip"] = Case("clip", [f32(3, 17)], {"min": -1.0, "max": 0.5})
CASES["clip_int"] = Case("clip", [i32(3, 17)], {"min": -3.5, "max": 1e30})
CASES["relu_int"] = Case("relu", [i32(4, 5)])
CASES["abs_scalar"] = Case("abs", [np.array(-2.5, np.float32)])
CASES["neg_big"] = Case("neg", [f32(3, 128, 64)])
for op in ["add", "sub", "mul", "max", "min"]:
    CASES[op] = Case(op, [f32(2, 3, 16), f32(3, 1)])
CASES["add_big"] = Case("add", [f32(1, 128, 384), f32(384)])
CASES["add_scalar"] = Case("add", [np.array(1.5, np.float32), np.array(2.0, np.float32)])
CASES["div"] = Case("div", [f32(4, 9), f32(4, 9, lo=0.5, hi=2)])
CASES["div_int"] = Case("div", [i32(4, 9), i32(1, 9, lo=1, hi=5) * np.int32(-1)])
CASES["pow"] = Case("pow", [f32(3, 8, lo=0.1, hi=3), f32(8, lo=-2, hi=2)])
CASES["pow_int_exp"] = Case("pow", [f32(3, 8, lo=0.1, hi=3), np.array(2, np.int64)])
CASES["mod_int"] = Case("mod", [i32(4, 9), i32(4, 9, lo=1, hi=6)])
CASES["mod_int_neg"] = Case("mod", [i32(4, 9), np.array(-3, np.int32)])
CASES["fmod"] = Case("mod", [f32(4, 9), f32(4, 9, lo=0.5, hi=2)], {"fmod": True})
for op in ["equal", "less", "less_equal", "greater", "greater_equal"]:
    CASES[op] = Case(op, [i32(3, 8, lo=0, hi=3), i32(8, lo=0, hi=3)])
for op in ["logical_and", "logical_or", "logical_xor"]:
    CASES[op] = Case(op, [rng.random((3, 8)) > 0.5, rng.random((8,)) > 0.5])
CASES["logical_not"] = Case("logical_not", [rng.random((3, 8)) > 0.5])
CASES["where"] = Case("where", [rng.random((3, 1)) > 0.5, f32(3, 16), f32(16)])
CASES["cast_f2i"] = Case("cast", [f32(3, 16)], {"to": "i32"})
CASES["cast_i2f"] = Case("cast", [i32(3, 16)], {"to": "f32"})
CASES["cast_f2b"] = Case("cast", [np.array([0.0, 1.5, -2.0], np.float32)], {"to": "bool"})
CASES["cast_b2f"] = Case("cast", [rng.random((5,)) > 0.5], {"to": "f32"})
CASES["cast_i64"] = Case("cast", [i32(7)], {"to": "i64"})
CASES["sum3"] = Case("sum", [f32(2, 16), f32(16), f32(2, 1)])
CASES["add_empty"] = Case("add", [f32(0, 4), f32(4)])


# -- reduce -------------------------------------------------------------------------------
for op in ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod"]:
    CASES[op] = Case(op, [f32(3, 4, 5, lo=0.5, hi=1.5)], {"axes": [1, 2]})
    CASES[op + "_nokeep"] = Case(op, [f32(3, 4, 5, lo=0.5, hi=1.5)],
                                 {"axes": [0], "keepdims": False})
CASES["reduce_all"] = Case("reduce_sum", [f32(4, 6)], {"axes": [], "keepdims": False})
CASES["reduce_mean_big"] = Case("reduce_mean", [f32(1, 128, 384)], {"axes": [-1]})
CASES["reduce_max_int"] = Case("reduce_max", [i32(4, 6)], {"axes": [1]})
CASES["reduce_mean_int"] = Case("reduce_mean", [i32(4, 6, lo=0, hi=9)], {"axes": [1]})
CASES["argmax"] = Case("argmax", [i32(4, 7, lo=0, hi=3)], {"axis": 1})
CASES["argmax_last"] = Case("argmax", [i32(4, 7, lo=0, hi=3)],
                            {"axis": 1, "select_last_index": True})
CASES["topk"] = Case("topk", [i32(3, 9, lo=0, hi=4).astype(np.float32)], {"k": 4})
CASES["topk_smallest_axis0"] = Case("topk", [f32(7, 3)], {"k": 7, "axis": 0,
                                                       "largest": False})
CASES["topk_int"] = Case("topk", [i32(2, 5, lo=0, hi=3)], {"k": 2})
CASES["argmin"] = Case("argmin", [f32(4, 7, 3)], {"axis": 0, "keepdims": False})

# -- shape --------------------------------------------------------------------------------
CASES["reshape"] = Case("reshape", [f32(2, 3, 4)], {"shape": [4, 6]})
CASES["reshape_scalar"] = Case("reshape", [f32(1, 1)], {"shape": []})
CASES["identity"] = Case("identity", [f32(3, 5)])
CASES["transpose"] = Case("transpose", [f32(2, 3, 4, 5)], {"perm": [0, 2, 1, 3]})
CASES["transpose_big"] = Case("transpose", [f32(1, 128, 12, 32)], {"perm": [0, 2, 1, 3]})
CASES["concat"] = Case("concat", [f32(2, 3), f32(2, 5), f32(2, 0), f32(2, 1)], {"axis": 1})
CASES["split"] = Case("split", [f32(4, 10)], {"axis": 1, "sizes": [3, 0, 7]})
CASES["slice"] = Case("slice", [f32(6, 8)], {"starts": [1, -1], "ends": [100, 0],
                                             "axes": [0, 1], "steps": [2, -2]})
CASES["slice_pos"] = Case("slice", [f32(6, 8)], {"starts": [2], "ends": [5], "axes": [1]})
CASES["gather"] = Case("gather", [f32(5, 4), np.array([[0, -1], [3, 2]], np.int64)],
                       {"axis": 0})
CASES["gather_axis1"] = Case("gather", [f32(3, 5, 2), np.array([4, 0, -2], np.int32)],
                             {"axis": 1})
CASES["gather_scalar"] = Case("gather", [f32(5, 4), np.array(2, np.int64)], {"axis": 1})
CASES["expand"] = Case("expand", [f32(3, 1)], {"shape": [2, 3, 4]})
CASES["tile"] = Case("tile", [f32(2, 3)], {"repeats": [2, 3]})
CASES["trilu_upper"] = Case("trilu", [f32(2, 4, 5)], {"upper": True, "k": 1})
CASES["trilu_lower"] = Case("trilu", [f32(4, 5)], {"upper": False, "k": -1})
CASES["cumsum"] = Case("cumsum", [f32(3, 6)], {"axis": 1})
CASES["cumsum_excl_rev"] = Case("cumsum", [i32(3, 6)], {"axis": 1, "exclusive": True,
                                                        "reverse": True})
CASES["shape"] = Case("shape", [f32(2, 3, 4)], {"start": 1})
CASES["fill"] = Case("fill", [], {"shape": [3, 4], "value": 2.5, "dtype": "f32"})
CASES["fill_int"] = Case("fill", [], {"shape": [5], "value": 7.0, "dtype": "i64"})
CASES["arange"] = Case("arange", [], {"start": 1.0, "limit": 10.0, "delta": 2.5,
                                      "dtype": "f32"})
CASES["arange_int"] = Case("arange", [], {"start": 0.0, "limit": 7.0, "delta": 1.0,
                                          "dtype": "i64"})

# -- nn (not conv/pool) -------------------------------------------------------------------
CASES["softmax"] = Case("softmax", [f32(2, 3, 64, lo=-10, hi=10)])
CASES["softmax_minilm"] = Case("softmax", [f32(1, 12, 128, 128, lo=-10, hi=10)])
CASES["softmax_odd"] = Case("softmax", [f32(3, 10)])
CASES["softmax_axis1"] = Case("softmax", [f32(2, 5, 3)], {"axis": 1})
CASES["softmax_1d"] = Case("softmax", [f32(16)])
CASES["softmax_one_vector_rows"] = Case("softmax", [f32(1, 4, 16, 16)])  # row = one vector
CASES["log_softmax_one_vector_rows"] = Case("log_softmax", [f32(2, 16)])
CASES["log_softmax"] = Case("log_softmax", [f32(4, 32, lo=-10, hi=10)])
CASES["log_softmax_axis0"] = Case("log_softmax", [f32(4, 3)], {"axis": 0})
CASES["layer_norm"] = Case("layer_norm", [f32(1, 128, 384), f32(384), f32(384)])
CASES["layer_norm_nobias"] = Case("layer_norm", [f32(3, 10), f32(10)], {"epsilon": 1e-3})
CASES["layer_norm_2axes"] = Case("layer_norm", [f32(2, 3, 4), f32(3, 4), f32(4)],
                                 {"axis": 1})
CASES["batch_norm"] = Case("batch_norm", [f32(2, 3, 4, 4), f32(3), f32(3), f32(3),
                                          f32(3, lo=0.1, hi=2)])
CASES["instance_norm"] = Case("instance_norm", [f32(2, 3, 4, 5), f32(3), f32(3)])
CASES["instance_norm_nhwc"] = Case("instance_norm", [f32(2, 4, 5, 3), f32(3), f32(3)],
                                   {"layout": "NHWC"})
CASES["lrn"] = Case("lrn", [f32(1, 6, 3, 3)], {"size": 3, "alpha": 0.1, "beta": 0.75,
                                               "bias": 1.0})
CASES["lrn_even"] = Case("lrn", [f32(1, 5, 2, 2)], {"size": 4})
CASES["prelu"] = Case("prelu", [f32(2, 3, 4), f32(3, 1)])
CASES["pad_const"] = Case("pad", [f32(2, 3)], {"pads": [1, 0, 2, 3], "value": 1.5})
CASES["pad_crop"] = Case("pad", [f32(4, 5)], {"pads": [-1, 2, 0, -2]})
CASES["pad_reflect"] = Case("pad", [f32(1, 4, 5)], {"pads": [0, 2, 3, 0, 1, 4],
                                                    "mode": "reflect"})
CASES["pad_edge"] = Case("pad", [f32(3, 4)], {"pads": [2, 1, 1, 3], "mode": "edge"})
CASES["pad_wrap"] = Case("pad", [f32(3, 4)], {"pads": [2, 1, 1, 5], "mode": "wrap"})
CASES["resize_nearest"] = Case("resize", [f32(1, 2, 3, 4)], {"scales": [1.0, 1.0, 2.0, 1.5]})
CASES["resize_linear"] = Case("resize", [f32(1, 2, 3, 4)],
                              {"scales": [1.0, 1.0, 2.0, 2.0], "mode": "linear"})
CASES["resize_linear_ac"] = Case("resize", [f32(1, 1, 4, 4)],
                                 {"scales": [1.0, 1.0, 0.5, 1.75], "mode": "linear",
                                  "coordinate_transformation_mode": "align_corners"})
CASES["resize_cubic"] = Case("resize", [f32(1, 1, 5, 5)],
                             {"scales": [1.0, 1.0, 1.6, 2.0], "mode": "cubic"})
# rows of 128: the 4-vector tree statistics at every vector width (16, 8 and 4 lanes; small
# enough for the aarch64 qemu run)
CASES["layer_norm_tree_rows"] = Case("layer_norm", [f32(4, 128), f32(128), f32(128)])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = list(CASES)
    got = run_cases([CASES[n] for n in names], tmp_path_factory.mktemp("generic"))
    return dict(zip(names, got, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_generic_kernel(name, results):
    assert_matches_reference(name, CASES[name], results[name], atol=1e-5)
