"""2:4-sparse int4 weights (compiler/llm/sparse.py, dense_wq24, targets/kernels/gemv_sparse.py):
the index packing round-trips, the kernel equals a numpy dense product of the same sparse
weights, a tiny Llama compiled with the scheme equals torch running the dequantized sparse
weights, and Wanda / SparseGPT select better than magnitude on their calibration inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.errors import NpuccError
from compiler.ir.ops.quant_sparse import (
    dense_from_sparse24,
    pack_index,
    pack_sparse24,
    unpack_index,
)
from tests.kernel_harness import Case

PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_index_packing_round_trips(rows, eighths, data):
    quads = 2 * eighths
    pats = data.draw(st.lists(st.sampled_from(PAIRS), min_size=rows * quads,
                              max_size=rows * quads))
    pos = np.array(pats, np.int8).reshape(rows, quads * 2)
    packed = pack_index(pos)
    assert packed.dtype == np.uint8 and packed.shape == (rows, quads // 2)
    np.testing.assert_array_equal(unpack_index(packed), pos)


def test_index_packing_refuses_bad_patterns():
    with pytest.raises(Exception, match="0 <= a < b <= 3"):
        pack_index(np.array([[1, 1, 0, 1, 0, 1, 0, 1]], np.int8))
    with pytest.raises(Exception, match="multiple of 8"):
        pack_index(np.array([[0, 1, 0, 1, 0, 1]], np.int8))


def _sparse(n: int, k: int, group: int, rng):
    """Random kept codes, patterns and scales, packed, and the dense weight by hand."""
    q = rng.integers(-8, 8, (n, k // 2)).astype(np.int8)
    pos = np.array(PAIRS, np.int8)[rng.integers(0, 6, (n, k // 4))].reshape(n, k // 2)
    s = (rng.random((n, k // (2 * group))) * 0.1 + 0.01).astype(np.float16)
    dense = np.zeros((n, k), np.float32)
    for r in range(n):
        for t in range(k // 2):
            dense[r, 4 * (t // 2) + int(pos[r, t])] = q[r, t] * np.float32(s[r, t // group])
    return (*pack_sparse24(q, pos), s), dense


def test_dequantization_places_each_kept_weight():
    rng = np.random.default_rng(1)
    (wq, idx, s), dense = _sparse(5, 64, 16, rng)
    np.testing.assert_array_equal(dense_from_sparse24(wq, idx, s), dense)
    assert ((dense.reshape(5, 16, 4) != 0).sum(-1) <= 2).all()


def test_kernel_matches_the_dense_product(tmp_path):
    """Decode (one row) and prefill (several rows), with and without bias, group sizes 16 to
    128, N not a multiple of the panel: the kernel equals x @ W^T with W built by hand, and
    the op's reference."""
    from tests.kernel_harness import reference, run_cases

    cases, wants = [], []
    for m, n, k, group, bias in [(1, 40, 256, 32, False), (1, 96, 512, 128, True),
                                 (1, 7, 64, 16, True), (5, 33, 128, 32, False)]:
        rng = np.random.default_rng(m * n + k)
        (wq, idx, s), dense = _sparse(n, k, group, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        ins = [x, wq, idx, s] + ([b] if bias else [])
        cases.append(Case("dense_wq24", ins, {"group_size": group},
                          consts=tuple(range(1, len(ins)))))
        wants.append(x.astype(np.float64) @ dense.T.astype(np.float64) + (b if bias else 0))
    for case, want, got in zip(cases, wants, run_cases(cases, tmp_path), strict=True):
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[0], reference(case)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int4-g32-2:4", "int4-g16-2:4-sparsegpt"])
def test_tiny_llama_equals_torch_on_the_sparse_weights(tmp_path, scheme):
    """The compiled package (prefill and decode) computes what transformers computes with the
    projections replaced by the dequantized 2:4 weights (and the int8 table)."""
    import torch

    from compiler import compile_llm
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec
    from tests.llm_tiny import tiny_llama

    hf = tiny_llama()
    calib = [int(i) for i in np.random.default_rng(3).integers(0, 256, 64)]
    spec = quantize_spec(load_spec(hf), parse_scheme(scheme), calibration=calib)
    assert spec.scheme == scheme and spec.quant["l0.q"] == (4, int(scheme[6:8]))
    m = compile_llm(spec, max_context=64, chunk=8, output=tmp_path / "s.npkg")
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}
    w = spec.weights
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for p, attr in names.items():
                d = dense_from_sparse24(w[f"l{i}.{p}.wq"], w[f"l{i}.{p}.idx"],
                                        w[f"l{i}.{p}.scales"])
                assert ((d.reshape(d.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
                layer.get_submodule(attr).weight.copy_(torch.from_numpy(d))
        table = w["embed.q8"].astype(np.float32) * w["embed.row_scales"][:, None]
        hf.model.embed_tokens.weight.copy_(torch.from_numpy(table))
    ids = [3 * i % 251 for i in range(1, 14)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = m.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    from compiler.llm.graphs import build_step_graph

    ops = [n.op for n in build_step_graph(spec, 1, 64).nodes]
    assert ops.count("dense_wq24") == 2 * 4 and "dense_wq" not in ops   # qkv, o, gate+up, down


def test_selection_with_the_hessian_beats_magnitude():
    """On a layer whose inputs have very different scales, Wanda and SparseGPT keep the
    weights that matter for the output: their output error on the calibration inputs is
    below magnitude's (and SparseGPT's, which also compensates, below Wanda's)."""
    from compiler.llm.quantize import parse_scheme
    from compiler.llm.sparse import quantize_sparse

    rng = np.random.default_rng(0)
    n, k, t = 48, 128, 512
    x = rng.standard_normal((t, k)) * np.exp(rng.standard_normal(k))
    w = rng.standard_normal((n, k)).astype(np.float32)
    H = 2 * x.T @ x / t
    err = {}
    for name in ("int4-g32-2:4", "int4-g32-2:4-wanda", "int4-g32-2:4-sparsegpt"):
        parts, _ = quantize_sparse(w, parse_scheme(name), H)
        d = dense_from_sparse24(parts["wq"], parts["idx"], parts["scales"])
        err[name] = float(np.square(x @ (d - w).T).mean())
    assert err["int4-g32-2:4-sparsegpt"] < err["int4-g32-2:4-wanda"] < err["int4-g32-2:4"]


def test_sizes_and_errors():
    from compiler.llm.quantize import matrix_bytes, parse_scheme, scheme_label

    sch = parse_scheme("int4-g128-2:4")
    assert scheme_label(sch) == "int4-g128-2:4" and sch.sparse and sch.method == "rtn"
    # 2048 x 2048: 12 bits per quad + one f16 per 256 inputs
    assert matrix_bytes(2048, 2048, sch) == 2048 * (512 + 256 + 16)
    assert scheme_label(parse_scheme("int4-g32-2:4-magnitude")) == "int4-g32-2:4"
    for bad in ("int4-g6-2:4", "int8-2:4", "int4-g128-2:4-obs"):
        with pytest.raises(NpuccError, match="2:4 scheme"):
            parse_scheme(bad)
    from compiler.llm.sparse import quantize_sparse

    with pytest.raises(NpuccError, match="needs the Hessian"):
        quantize_sparse(np.ones((4, 64), np.float32), parse_scheme("int4-g32-2:4-wanda"))
    with pytest.raises(NpuccError, match="multiple of 8"):
        quantize_sparse(np.ones((4, 36), np.float32), sch)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=32, max_size=32), st.booleans())
def test_top2_keeps_the_two_largest_per_quad(values, negate):
    """Per quad the two largest scores (ties: the lower position), as argsort would pick."""
    from compiler.llm.sparse import top2_positions

    score = np.array(values, np.float32).reshape(2, 16) * (-1 if negate else 1)
    want = np.sort(np.argsort(-score.reshape(2, 4, 4), axis=-1, kind="stable")[..., :2], -1)
    np.testing.assert_array_equal(top2_positions(score), want.reshape(2, 8))


def test_compile_llm_help_lists_the_sparse_schemes(capsys):
    from compiler.cli import main
    from compiler.llm.sparse import SPARSE_SCHEMES

    with pytest.raises(SystemExit):
        main(["compile-llm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for scheme in SPARSE_SCHEMES:
        assert scheme in text.replace("- ", "-")
