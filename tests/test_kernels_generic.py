"""Every non-linalg, non-conv kernel against its op's numpy reference (rtol 1e-4).

All cases are compiled into one library by a module fixture (one tvm.compile call).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernel_harness import Case, reference, run_cases

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


def _add(name: str, case: Case) -> None:
    CASES[name] = case


def collect(extra: dict[str, Case]) -> None:
    for k, v in extra.items():
        _add(k, v)


try:
    from tests.generic_cases import CASES as _MORE  # reduce / shape / nn kernels
    collect(_MORE)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = list(CASES)
    got = run_cases([CASES[n] for n in names], tmp_path_factory.mktemp("generic"))
    return dict(zip(names, got, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_generic_kernel(name, results):
    case = CASES[name]
    with np.errstate(all="ignore"):
        ref = reference(case)
    for r, g in zip(ref, results[name], strict=True):
        r = np.asarray(r)
        assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
        if r.dtype.kind == "f":
            np.testing.assert_allclose(g, r.astype(g.dtype), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, r.astype(g.dtype))
