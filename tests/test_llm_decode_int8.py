"""compile_llm(decode_activations="int8"): the decode graph's int4 projections quantize their
input to int8 blocks of 32 (dense_wq{act_bits=8}, integer dot products) while the prefill graph
keeps f32 inputs; on a tiny random Llama against the reference interpreter and against the
f32-input graph."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow   # one tiny compile (~15-40 s)

MAX_CONTEXT, CHUNK = 64, 8
PROMPT = [40, 2, 90, 41, 7, 9, 11, 12, 100]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from compiler import compile_llm
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, initializer_range=0.2)
    spec = quantize_spec(load_spec(transformers.LlamaForCausalLM(cfg).eval()),
                         parse_scheme("int4-g32"))
    tmp = tmp_path_factory.mktemp("a8")
    a8 = compile_llm(spec, max_context=MAX_CONTEXT, chunk=CHUNK, output=tmp / "a8.npkg",
                     decode_activations="int8")
    return spec, a8


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_only_the_decode_graph_quantizes_its_inputs(packages):
    from compiler.llm.graphs import build_step_graph

    spec, a8 = packages
    assert a8.package.manifest["model"]["decode_activations"] == "int8"
    step = build_step_graph(spec, 1, MAX_CONTEXT, act_bits=8)
    dense = [n for n in step.nodes if n.op == "dense_wq"]
    assert dense and all(n.attrs["act_bits"] == 8 for n in dense)
    assert not any(n.attrs.get("act_bits") for n in build_step_graph(spec, CHUNK, MAX_CONTEXT)
                   .nodes if n.op == "dense_wq")


def test_decode_step_matches_the_reference_interpreter(packages):
    """After a prefill, one decode step of the package equals the interpreter's run of the
    act_bits=8 decode graph over the very cache the prefill wrote, and stays close to the
    f32-input graph's step (the inputs' int8 rounding, no more)."""
    from compiler.ir.interpreter import interpret
    from compiler.llm.graphs import build_step_graph, cache_names, sample_graph_inputs

    spec, a8 = packages
    a8.step_logits(PROMPT, [])             # fills the cache for positions 0 .. len - 1
    caches = [a8.state[n].copy() for n in cache_names(spec.layers)]
    tok, pos = 17, len(PROMPT)
    got = a8.decode.run(np.array([tok], np.int32), pos)[0].copy()
    feeds = sample_graph_inputs(spec, 1, MAX_CONTEXT, [tok], pos, caches)
    ref = interpret(build_step_graph(spec, 1, MAX_CONTEXT, act_bits=8), feeds)[0][0]
    assert _rel(got, ref) < 1e-4
    f32 = interpret(build_step_graph(spec, 1, MAX_CONTEXT), feeds)[0][0]
    assert 1e-5 < _rel(got, f32) < 5e-2, _rel(got, f32)
    assert (got * f32).sum() / np.linalg.norm(got) / np.linalg.norm(f32) > 0.999


def test_unknown_decode_activations_are_refused():
    from compiler.errors import NpuccError
    from compiler.llm.graphs import check_decode_activations

    assert check_decode_activations(None) == 0 and check_decode_activations("int8") == 8
    with pytest.raises(NpuccError, match="use f32 .* or int8"):
        check_decode_activations("int4")
