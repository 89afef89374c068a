"""The quantized KV cache (compile_llm(kv_cache="int8" | "k4v8")): the write kernel's codes
and scales equal a numpy quantizer's bit for bit (kernel alone and in a package, in place in
the runtime's cache), the attention kernel reads codes as their reference dequantizes them,
a whole package computes what the reference interpreter computes on the same graph, the
sizes the runtime allocates and the decode estimate counts, the option's errors, and on
SmolLM2 the K4V8 package's logits against the float model's."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.ir.ops.llm_kv import dequantize_kv_rows, kv_tensor_types, quantize_kv_rows
from tests.kernel_harness import Case, check_cases

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def pos(p):
    return np.array([p], np.int32)


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 64), (4, 64), (4, 32)])
def test_numpy_quantizer_is_a_quantizer(bits, group):
    """Codes in range, every value within half a step of its group's grid, the range's
    ends hit exactly (asymmetric: min and max; symmetric: the largest magnitude)."""
    x = f32(7, 3, 64) * 3 + 0.7
    x[2, 1] = 0.0                                   # an all-zero row: scale 0, codes 0
    t = quantize_kv_rows(x, bits, group)
    back = dequantize_kv_rows(t, bits, group)
    step = np.repeat(t[1], group, axis=-1)
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + 1e-7)
    if bits == 8:
        assert t[0].dtype == np.int8 and np.abs(t[0].astype(int)).max() == 127
    else:
        lo, hi = t[0] & 15, t[0] >> 4
        assert t[0].dtype == np.uint8 and t[0].shape == (7, 3, 32)
        assert min(lo.min(), hi.min()) == 0 and max(lo.max(), hi.max()) == 15
        np.testing.assert_array_equal(t[2], x.reshape(7, 3, -1, group).min(-1))
    assert np.all(back[2, 1] == 0) and np.all(t[1][2, 1] == 0)


def test_kv_write_q_codes_and_scales_are_the_references_bit_for_bit(tmp_path):
    c, hkv, dh = 16, 2, 64
    new = f32(5, hkv, dh) * 2
    new[0, 0, :32] = 0.0
    new[3, 1, :] = 1.25                             # a constant group: max == min
    cases = []
    for bits, group in [(8, 32), (8, 64), (4, 64), (4, 32)]:
        cache = [np.zeros(t.shape, t.np_dtype)
                 for t in kv_tensor_types(c, hkv, dh, bits, group)]
        cases += [Case("kv_write_q", [*cache, new, pos(p)], {"bits": bits, "group": group})
                  for p in (0, 13)]                 # 13: the last two rows fall off the end
    check_cases(cases, tmp_path, rtol=0, atol=0)    # every code and scale exactly


@pytest.mark.parametrize("kb,kg,vg", [(4, 64, 64), (4, 32, 64), (8, 32, 32)])
def test_cached_attention_q_reads_the_quantized_cache(tmp_path, kb, kg, vg):
    c, hkv, dh = 20, 2, 64
    k = f32(c, hkv, dh) + np.linspace(-2, 2, dh, dtype=np.float32)   # off-centre channels
    kt, vt = quantize_kv_rows(k, kb, kg), quantize_kv_rows(f32(c, hkv, dh), 8, vg)
    check_cases([Case("cached_attention_q", [f32(t, 6, dh), *kt, *vt, pos(p)],
                      {"scale": 0.125, "k_bits": kb, "k_group": kg, "v_group": vg})
                 for t, p in [(1, 0), (1, 19), (5, 0), (5, 9), (5, 14)]],
                tmp_path, rtol=1e-4, atol=1e-5)


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   vocab_size=256)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from compiler import compile_llm

    hf = _hf()
    out = tmp_path_factory.mktemp("kv")
    return hf, {kv: compile_llm(hf, max_context=48, chunk=8, kv_cache=kv,
                                output=out / f"{kv}.npkg") for kv in ("f32", "int8", "k4v8")}


IDS = [3 * i % 251 + 1 for i in range(1, 22)]


@pytest.mark.parametrize("kv", ["int8", "k4v8"])
def test_package_cache_holds_the_references_codes_in_place(tiny, kv):
    """After a 19-token prompt (3 prefill chunks of 8: rows 0..23 written, the padding's
    too) and 2 decode steps (rows 19, 20 rewritten), layer 0's cache tensors in the runtime
    hold exactly the numpy quantization of the f32 package's layer-0 K and V rows (layer 0's
    rows do not depend on the cache type), and nothing past row 23. Rotated keys (k4v8) are
    the f32 rows times the Hadamard matrix, whose product numpy sums in another order: their
    codes are checked to within half a step instead."""
    from compiler.llm.graphs import hadamard, kv_cache_layout

    _, ms = tiny
    n = 24
    for m in (ms["f32"], ms[kv]):
        m.step_logits(IDS[:-2], IDS[-2:])
    lay = kv_cache_layout(kv, 64)
    assert lay.k_rotate == (kv == "k4v8")
    for name, bits, group in (("k", lay.k_bits, lay.k_group), ("v", lay.v_bits, lay.v_group)):
        rows = ms["f32"].state[f"{name}_cache.0"][:n]
        parts = ("cache", "scales", "mins")[:3 if bits == 4 else 2]
        got = [ms[kv].state[f"{name}_{part}.0"] for part in parts]
        for g in got:
            assert not g[n:].any()
        if name == "k" and lay.k_rotate:
            rows = rows @ hadamard(64)
            back = dequantize_kv_rows([g[:n] for g in got], bits, group)
            step = np.repeat(got[1][:n], group, axis=-1)
            assert np.all(np.abs(back - rows) <= step * 0.5001 + 1e-5)
            continue
        for g, w in zip(got, quantize_kv_rows(rows, bits, group), strict=True):
            np.testing.assert_array_equal(g[:n], w)


@pytest.mark.parametrize("kv", ["int8", "k4v8"])
def test_package_matches_the_reference_interpreter(tiny, kv):
    """The compiled quantized-cache graph (prefill, then decode steps on the cache the
    prefill wrote) against the reference interpreter on the same graph; and its distance to
    the f32-cache package, which the quantization error explains (int8 is 30x closer)."""
    from compiler.ir.interpreter import interpret
    from compiler.llm.compile import load_spec
    from compiler.llm.graphs import build_step_graph, kv_cache_layout, sample_graph_inputs

    hf, ms = tiny
    spec, lay = load_spec(hf), kv_cache_layout(kv, 64)
    n = 16
    pre = interpret(build_step_graph(spec, n, 48, kv_cache=lay),
                    sample_graph_inputs(spec, n, 48, np.asarray(IDS[:n]), 0, kv_cache=lay))
    ref = [pre[0][-1]]
    caches = pre[1:]
    dec = build_step_graph(spec, 1, 48, kv_cache=lay)
    for p, tok in enumerate(IDS[n:], start=n):
        res = interpret(dec, sample_graph_inputs(spec, 1, 48, np.asarray([tok]), p,
                                                 caches=caches, kv_cache=lay))
        ref.append(res[0][0])
        caches = res[1:]
    got = ms[kv].step_logits(IDS[:n], IDS[n:])
    ref = np.stack(ref)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    fl = ms["f32"].step_logits(IDS[:n], IDS[n:])
    err = np.abs(got - fl).max() / np.abs(fl).max()
    assert 0 < err < (0.02 if kv == "int8" else 0.3)


def test_sizes_and_the_decode_estimate_count_the_quantized_cache(tiny):
    from compiler.llm.estimate import estimate_decode

    _, ms = tiny
    layers, c, hkv, dh = 2, 48, 2, 64
    per = {"f32": 2 * dh * 4,
           "int8": 2 * (dh + dh // 32 * 4),                           # i8 codes + f32 scales
           "k4v8": dh // 2 + dh // 64 * 8 + dh + dh // 64 * 4}        # u8 pairs + scale, min
    for kv, m in ms.items():
        assert m.stats()["kv_cache_bytes"] == layers * c * hkv * per[kv]
        assert m.package.manifest["model"]["kv_cache"] == kv
    est = {kv: estimate_decode(m, "kirin990", position=40)["kv_ms"] for kv, m in ms.items()}
    assert est["k4v8"] / est["f32"] == pytest.approx(per["k4v8"] / per["f32"])
    assert est["int8"] / est["f32"] == pytest.approx(per["int8"] / per["f32"])
    lay = ms["k4v8"].package.manifest["model"]["kv_cache_layout"]
    assert (lay["k_bits"], lay["k_group"], lay["v_bits"], lay["v_group"]) == (4, 64, 8, 64)
    assert lay["k_rotation"] == "hadamard"


def test_graph_decode_estimate_reads_the_quantized_cache_to_the_position():
    """targets.llm_cost.decode_estimate on the decode graphs themselves: the attention reads
    the cache tensors up to the position at their stored size (codes, scales, mins)."""
    from compiler.llm.compile import load_spec
    from compiler.llm.graphs import build_step_graph, kv_cache_layout
    from targets.llm_cost import decode_estimate

    spec = load_spec(_hf())
    kv = {}
    for name in ("f32", "int8", "k4v8"):
        g = build_step_graph(spec, 1, 48, kv_cache=kv_cache_layout(name, 64))
        rows = decode_estimate(g, "kirin990", position=40)["nodes"]
        kv[name] = sum(r["kv_bytes"] for r in rows if r["op"].startswith("cached_attention"))
    per_position = 2 * 2 * 2 * 64 * 4                 # layers, kv heads, K and V, Dh, f32
    assert kv["f32"] == pytest.approx(41 * per_position)
    assert kv["k4v8"] / kv["f32"] == pytest.approx((32 + 4 + 4 + 64 + 4) / (2 * 64 * 4))
    assert kv["int8"] / kv["f32"] == pytest.approx(2 * (64 + 2 * 4) / (2 * 64 * 4))


def test_graph_decode_estimate_reads_one_embedding_row_not_the_table():
    """A decode step looks up one row of the tied table: the estimate reads that row (and its
    scale), and the table's bytes once, through the output projection."""
    from compiler.llm.compile import load_spec
    from compiler.llm.graphs import build_step_graph, kv_cache_layout
    from targets.llm_cost import decode_estimate

    spec = load_spec(_hf())
    g = build_step_graph(spec, 1, 48, kv_cache=kv_cache_layout("f32", 64))
    est = decode_estimate(g, "kirin990", position=40)
    lookups = [r for r in est["nodes"] if r["op"] in ("embed_rows", "embed_wq", "gather_q",
                                                       "gather")]
    assert lookups, sorted({r["op"] for r in est["nodes"]})
    row = max(r["bytes"] for r in lookups)
    assert spec.tied
    assert row <= 2 * 4 * spec.hidden + 16, row        # one f32 row in, one out, the id
    assert sum(r["bytes"] for r in est["nodes"]) < 2 * est["weights_bytes"] + 10 * 2**20


def test_an_unknown_kv_cache_type_is_refused_with_the_valid_ones(tmp_path, capsys):
    from compiler import compile_llm
    from compiler.cli import main
    from compiler.errors import NpuccError

    with pytest.raises(NpuccError, match=r"'q4_0'.*f32, int8, k4v8"):
        compile_llm(_hf(), max_context=16, kv_cache="q4_0", output=tmp_path / "x.npkg")
    assert not (tmp_path / "x.npkg").exists()
    assert main(["compile-llm", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "y.npkg"),
                 "--kv-cache", "fp8"]) == 1
    assert "f32, int8, k4v8" in capsys.readouterr().err
