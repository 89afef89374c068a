"""dense / matmul / gemm kernels against the ops' numpy references (rtol 1e-4).

All cases are compiled into one library (one tvm.compile call) by a module fixture.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernel_harness import Case, reference, run_cases

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


CASES = {
    "dense_minilm_qkv": Case("dense", [f32(1, 128, 384), f32(384, 384), f32(384)], consts=(1, 2)),
    "dense_gelu": Case("dense", [f32(64, 48), f32(96, 48), f32(96)], {"activation": "gelu"},
                       consts=(1, 2)),
    "dense_gelu_tanh": Case("dense", [f32(16, 32), f32(40, 32), f32(40)],
                            {"activation": "gelu_tanh"}, consts=(1, 2)),
    "dense_relu_odd": Case("dense", [f32(5, 7, 33), f32(50, 33), f32(50)],
                           {"activation": "relu"}, consts=(1, 2)),
    "dense_clip": Case("dense", [f32(9, 20), f32(17, 20), f32(17)],
                       {"activation": "clip", "clip_min": -0.5, "clip_max": 0.5}, consts=(1,)),
    "dense_sigmoid": Case("dense", [f32(4, 20), f32(16, 20), f32(16)],
                          {"activation": "sigmoid"}, consts=(1, 2)),
    "dense_relu6": Case("dense", [f32(11, 8), f32(33, 8), f32(33)],
                        {"activation": "relu6"}, consts=(1, 2)),
    "dense_m197": Case("dense", [f32(197, 64), f32(100, 64), f32(100)], consts=(1, 2)),
    "dense_vec": Case("dense", [f32(8), f32(4, 8), f32(4)], consts=(1, 2)),
    "dense_k1": Case("dense", [f32(3, 1), f32(5, 1)], consts=(1,)),
    "dense_nonconst_w": Case("dense", [f32(3, 20), f32(10, 20)]),
    "dense_empty_m": Case("dense", [f32(0, 8), f32(4, 8), f32(4)], consts=(1, 2)),
    "matmul_attn_qk": Case("matmul", [f32(1, 4, 32, 16), f32(1, 4, 16, 32)]),
    "matmul_attn_pv": Case("matmul", [f32(1, 4, 32, 32), f32(1, 4, 32, 16)]),
    "matmul_bcast": Case("matmul", [f32(3, 5, 7), f32(7, 9)]),
    "matmul_bcast_batch": Case("matmul", [f32(2, 1, 5, 7), f32(3, 7, 6)]),
    "matmul_1d_left": Case("matmul", [f32(7), f32(2, 7, 9)]),
    "matmul_1d_right": Case("matmul", [f32(2, 3, 4), f32(4)]),
    "matmul_1d_both": Case("matmul", [f32(6), f32(6)]),
    "matmul_const_b": Case("matmul", [f32(4, 7), f32(7, 40)], consts=(1,)),
    "gemm": Case("gemm", [f32(6, 5), f32(5, 7), f32(7)], {"alpha": 0.5, "beta": 2.0},
                 consts=(1, 2)),
    "gemm_trans": Case("gemm", [f32(5, 6), f32(7, 5), f32(6, 7)],
                       {"trans_a": True, "trans_b": True}, consts=(1,)),
    "gemm_nobias_nonconst": Case("gemm", [f32(3, 4), f32(4, 18)]),
    "gemm_nonconst_trans_b": Case("gemm", [f32(9, 4), f32(40, 4), f32(40)],
                                  {"trans_b": True}, consts=(2,)),
    "matmul_ragged_n": Case("matmul", [f32(2, 3, 17, 8), f32(2, 3, 8, 45)]),
    # convnext / swin / mobilevit: tiles would straddle the last leading dim -> batch dims
    "dense_4d_nhwc": Case("dense", [f32(1, 14, 14, 24), f32(40, 24), f32(40)],
                          {"activation": "gelu"}, consts=(1, 2)),
    "dense_3d_windows": Case("dense", [f32(4, 49, 20), f32(24, 20), f32(24)], consts=(1, 2)),
    "dense_3d_nonconst_w": Case("dense", [f32(3, 10, 12), f32(20, 12)]),
    "dense_nonconst_big": Case("dense", [f32(2, 16, 24), f32(70, 24), f32(70)],
                               {"activation": "gelu"}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = list(CASES)
    got = run_cases([CASES[n] for n in names], tmp_path_factory.mktemp("linalg"))
    return dict(zip(names, got, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_linalg_kernel(name, results):
    ref = reference(CASES[name])
    for r, g in zip(ref, results[name], strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
