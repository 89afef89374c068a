"""Decoder LLMs on tiny random-weight transformers models (Llama with GQA and tied
embeddings, Qwen2 with q/k/v biases, GPT-2): the compiled prefill + decode package against
transformers itself, token for token and logits within 1e-3 relative."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_CONTEXT, CHUNK = 64, 8
PROMPTS = [[7], [5, 17, 99, 3, 200], [11, 12, 13, 14, 15, 16, 17, 18],
           [40, 2, 90, 41, 7, 9, 11, 12, 100], [3 * i % 251 for i in range(1, 18)]]
NEW_TOKENS = 24


def _hf(arch: str):
    torch.manual_seed(0)
    common = {"vocab_size": 256}
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=True, initializer_range=0.2,
                                       **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, max_position_embeddings=128,
                                       tie_word_embeddings=False, rope_theta=1e6,
                                       initializer_range=0.2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():   # random biases (the init zeroes them)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      initializer_range=0.2, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def pair(request, tmp_path_factory):
    from compiler import compile_llm

    hf = _hf(request.param)
    m = compile_llm(hf, max_context=MAX_CONTEXT, chunk=CHUNK,
                    output=tmp_path_factory.mktemp(request.param) / "m.npkg")
    return hf, m


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_logits_match_transformers(pair):
    hf, m = pair
    ids = PROMPTS[4] + PROMPTS[3]           # 26 tokens: 4 prefill chunks, the last padded
    got = m.logits(ids)
    assert got.shape == (len(ids), 256)
    assert _rel(got, _hf_logits(hf, ids)) < 1e-3


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_greedy_generation_matches_transformers(pair, prompt):
    hf, m = pair
    ids = PROMPTS[prompt]
    ours = m.generate(ids, NEW_TOKENS, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert len(set(ref)) > 3, "degenerate reference: the test would prove little"
    assert ours == ref
    # every step's logits (prefill for the first token, decode after) vs transformers
    steps = m.step_logits(ids, ours[:-1])
    full = _hf_logits(hf, ids + ours[:-1])[len(ids) - 1:]
    assert _rel(steps, full) < 1e-3


def test_decode_reads_the_cache_the_prefill_wrote(pair):
    """Decode after a chunked prefill equals a prefill of the whole sequence: the cache is
    shared by the two graphs and updated in place."""
    _, m = pair
    ids = PROMPTS[3]
    a = m.step_logits(ids[:5], ids[5:])[-1]
    b = m.logits(ids)[-1]
    assert _rel(a, b) < 1e-4
    k0 = m.state["k_cache.0"]
    assert np.abs(k0[:len(ids)]).max() > 0
    # the arenas hold no cache: it lives once, in the runtime's state buffers
    assert m.decode.arena.nbytes < k0.nbytes


def test_one_copy_of_each_weight(pair):
    _, m = pair
    pkg = m.package.manifest
    arrays = list(m._weights.values())  # noqa: SLF001
    digests = {hash(a.tobytes()) for a in arrays}
    assert len(digests) == len(arrays)
    keys = {t["key"] for g in pkg["graphs"].values() for t in g["tensors"].values()
            if t["bind"] == "weight"}
    assert keys == set(pkg["weights"])
    # both graphs read the same weight keys for the layer projections
    pre = {t["key"] for t in pkg["graphs"]["prefill"]["tensors"].values()
           if t["bind"] == "weight"}
    dec = {t["key"] for t in pkg["graphs"]["decode"]["tensors"].values()
           if t["bind"] == "weight"}
    assert len(pre & dec) >= len(dec) - 2


def test_projections_sharing_an_input_are_one_call(pair):
    """q/k/v are one projection and (Llama, Qwen2) gate/up another: a decode step makes four
    projection calls per layer (qkv, o, gate+up or up, down), plus an untied lm_head."""
    hf, m = pair
    steps = m.package.manifest["graphs"]["decode"]["steps"]
    proj = [s for s in steps if s["op"] in ("dense", "dense_wq")]
    tied = hf.config.tie_word_embeddings
    assert len(proj) == 4 * m.config["layers"] + (0 if tied else 1)
    assert sum(s["op"] == "split" for s in steps) == m.config["layers"] * (
        1 if hf.config.model_type == "gpt2" else 2)


def test_sampling_is_seeded_and_bounded(pair):
    _, m = pair
    ids = PROMPTS[1]
    kw = {"ignore_eos": True}
    a = m.generate(ids, 12, temperature=1.0, top_k=20, top_p=0.9, seed=3, **kw)
    b = m.generate(ids, 12, temperature=1.0, top_k=20, top_p=0.9, seed=3, **kw)
    assert a == b
    assert m.generate(ids, 12, temperature=0.7, top_k=1, seed=5, **kw) \
        == m.generate(ids, 12, **kw)
    greedy = m.generate(ids, 12, **kw)
    stopped = m.generate(ids, 12, stop=[greedy[3]], **kw)
    assert stopped == greedy[:greedy.index(greedy[3])]
    assert m.last_stats.stop_reason == "stop"


def test_prompt_errors(pair):
    from runtime.errors import InputError

    _, m = pair
    with pytest.raises(InputError, match="empty"):
        m.generate([], 4)
    with pytest.raises(InputError, match=r"70 tokens.*max_context of 64"):
        m.generate([1] * 70, 4)
    out = m.generate(list(range(1, 71)), 4, truncate=True)
    assert len(out) <= 4
    with pytest.raises(InputError, match="outside the vocabulary"):
        m.generate([300], 4)
    with pytest.raises(InputError, match="no tokenizer"):
        m.generate("hello", 4)


def test_generation_stops_at_max_context(pair):
    _, m = pair
    out = m.generate(list(range(1, 61)), 10, ignore_eos=True)
    assert len(out) == MAX_CONTEXT - 60 + 1
    assert m.last_stats.stop_reason == "context"


def test_int4_g32_kernels_match_their_reference(tmp_path):
    """The int4 package (dense_wq, gather_q, int8 lm_head) computes what the reference
    interpreter computes on the same quantized graph; and stays close to float."""
    from compiler import compile_llm
    from compiler.ir.interpreter import interpret
    from compiler.llm.compile import load_spec
    from compiler.llm.graphs import build_step_graph, sample_graph_inputs
    from compiler.llm.quantize import parse_scheme, quantize_spec

    hf = _hf("llama")
    spec = quantize_spec(load_spec(hf), parse_scheme("int4-g32"))
    m = compile_llm(spec, max_context=MAX_CONTEXT, chunk=CHUNK, output=tmp_path / "q.npkg")
    ids = PROMPTS[3]
    g = build_step_graph(spec, 16, MAX_CONTEXT)
    chunk = np.zeros(16, np.int32)
    chunk[:len(ids)] = ids
    res = interpret(g, sample_graph_inputs(spec, 16, MAX_CONTEXT, chunk, 0))
    ref = res[0][:len(ids)]
    got = m.logits(ids)
    assert _rel(got, ref) < 1e-4
    f = _hf_logits(hf, ids)
    cos = (got * f).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(f, axis=-1)
    assert cos.mean() > 0.9 and cos.min() > 0.8   # random weights: int4's worst case
    assert m.stats()["weight_bytes"] < 0.5 * sum(a.nbytes for a in load_spec(hf).weights
                                                 .values())


def test_group_falls_back_when_k_is_not_a_multiple():
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec

    q = quantize_spec(load_spec(_hf("llama")), parse_scheme("int4-g128"))
    assert q.quant["l0.q"] == (4, 64) and q.quant["l0.down"] == (4, 128)


def test_unknown_quantization_is_refused():
    from compiler.errors import NpuccError
    from compiler.llm.quantize import parse_scheme

    with pytest.raises(NpuccError, match="int4-g32"):
        parse_scheme("int3")
    assert parse_scheme("int4-g128-gptq").method == "gptq"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_cli_compile_llm_from_a_transformers_folder(tmp_path, capsys):
    from compiler.cli import main
    from runtime.llm import load

    hf = _hf("llama")
    hf.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "tiny.npkg"
    rc = main(["compile-llm", str(tmp_path / "tiny"), "-o", str(out), "--max-context", "64",
               "--chunk", "8", "--quantize", "int8"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote" in printed
    assert "estimated decode on host:" in printed and "estimated decode on kirin990:" in printed
    m = load(out)
    assert m.config["quantize"] == "int8" and m.max_context == 64
    # the kirin990 decode estimate: weights once per token, the KV cache up to the position
    from compiler.llm import estimate_decode

    e0, e63 = estimate_decode(m, "kirin990", 0), estimate_decode(m, "kirin990", 63)
    assert e0["weights_ms"] == e63["weights_ms"] > 0
    assert e63["kv_ms"] == pytest.approx(64 * e0["kv_ms"])
    assert e63["ms_per_token"] == pytest.approx(e63["weights_ms"] + e63["kv_ms"]
                                                + e63["fixed_ms"])
    assert "typically within" in e63["summary"]
    with pytest.raises(ValueError, match=r"position 64 is outside the context \(0..63\)"):
        estimate_decode(m, "kirin990", 64)
    ids = PROMPTS[2]
    f = _hf_logits(hf, ids)
    got = m.logits(ids)
    assert _rel(got, f) < 0.05
    assert main(["compile-llm", str(tmp_path / "missing.gguf"), "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["compile-llm", str(tmp_path / "tiny"), "-o", str(out), "--quantize",
                 "int3"]) == 1
    assert "int4-g32" in capsys.readouterr().err
    assert main(["generate", str(out), "hello"]) == 1      # no tokenizer in this package
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "hello"]) == 1
    assert "not an LLM package" in capsys.readouterr().err


def test_gptq_beats_round_to_nearest_on_its_calibration_tokens():
    """GPTQ (int4 g32) minimises each projection's output error on the calibration inputs: the
    model's logits there are closer to float than round-to-nearest's."""
    from compiler.ir.interpreter import interpret
    from compiler.llm.compile import load_spec
    from compiler.llm.graphs import build_step_graph, sample_graph_inputs
    from compiler.llm.quantize import parse_scheme, quantize_spec

    hf = _hf("llama")
    spec = load_spec(hf)
    calib = [int(i) for i in np.random.default_rng(1).integers(0, 256, 128)]
    ids = np.asarray(calib[:32], np.int32)

    def logits(s):
        g = build_step_graph(s, 32, 32)
        return interpret(g, sample_graph_inputs(s, 32, 32, ids, 0))[0]

    ref = logits(spec)
    err = {}
    for name in ("int4-g32-rtn", "int4-g32-gptq", "int4-g32-asym", "int4-g32-gptq-asym"):
        q = quantize_spec(spec, parse_scheme(name), calibration=calib)
        err[name] = float(np.square(logits(q) - ref).mean())
    assert err["int4-g32-gptq"] < err["int4-g32-rtn"]
    assert err["int4-g32-gptq-asym"] < err["int4-g32-asym"]


def test_asymmetric_int4_reproduces_q4_1_weights_exactly(tmp_path):
    """Weights on a Q4_1 grid (a scale and a minimum per group of 32, like a dequantized
    Q4_1 GGUF) quantize to themselves with int4-g32-asym: the package computes the float
    model's logits; the symmetric int4-g32 does not."""
    from compiler import compile_llm
    from compiler.llm.compile import load_spec

    hf = _hf("llama")
    spec = load_spec(hf)
    rng = np.random.default_rng(0)
    for key, w in list(spec.weights.items()):
        if key.endswith(".w") and w.ndim == 2 and key.split(".")[1] in ("q", "k", "v", "o",
                                                                        "gate", "up", "down"):
            n, k = w.shape
            d = (np.abs(w).reshape(n, k // 32, 32).max(-1) / 7.5).astype(np.float16)
            off = rng.uniform(-12, -3, d.shape)           # a minimum off the symmetric grid
            mn = (off * d.astype(np.float32)).astype(np.float16)
            u = rng.integers(0, 16, (n, k // 32, 32))
            u[..., 0], u[..., 1] = 0, 15
            spec.weights[key] = (u * d.astype(np.float32)[..., None]
                                 + mn.astype(np.float32)[..., None]).reshape(n, k) \
                .astype(np.float32)
    ids = PROMPTS[4]
    ref = compile_llm(spec, max_context=32, chunk=8, output=tmp_path / "f.npkg").logits(ids)
    asym = compile_llm(spec, max_context=32, chunk=8, quantize="int4-g32-asym",
                       output=tmp_path / "a.npkg")
    sym = compile_llm(spec, max_context=32, chunk=8, quantize="int4-g32",
                      output=tmp_path / "s.npkg")
    # only the int8 embedding / output projection differ from float
    err_asym = _rel(asym.logits(ids), ref)
    err_sym = _rel(sym.logits(ids), ref)
    assert err_asym < 0.5 * err_sym
    assert asym.step_logits(ids[:9], ids[9:]).shape == (len(ids) - 8, 256)
