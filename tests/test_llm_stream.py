"""The streaming route of ``compile_llm``: a transformers safetensors folder read, quantized and
written one block of rows at a time (``compiler.llm.stream``), on tiny random Llamas.

Checked: the streamed weights are bit-identical to the in-memory route's (``load_spec`` +
``quantize_spec``) for every RTN scheme; the compiled package's logits equal transformers';
Python's peak allocations while streaming stay below twice the largest f32 tensor, while
the in-memory route's exceed that bound (so the bound can fail); GPTQ is refused by the
streaming reader and taken by the in-memory route."""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, INTER, VOCAB = 6, 256, 1024, 256


def _hf():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   vocab_size=VOCAB, tie_word_embeddings=False,
                                   initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model, one-file folder, sharded folder) of the same weights."""
    hf = _hf()
    one, sharded = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(one)
    hf.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    return hf, one, sharded


def _largest_f32(hf) -> int:
    return max(p.numel() * 4 for p in hf.parameters())


@pytest.mark.parametrize("quantize", [None, "int8", "int4-g32", "int4-g128-asym", "int3-g32"])
def test_streamed_weights_equal_the_in_memory_route(folders, tmp_path, quantize):
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec
    from compiler.llm.stream import stream_spec

    _, one, sharded = folders
    scheme = parse_scheme(quantize)
    ref = load_spec(one)
    if scheme is not None:
        ref = quantize_spec(ref, scheme)
    for folder in (one, sharded):
        got, store = stream_spec(folder, scheme, tmp_path / folder.name)
        try:
            for key, arr in ref.weights.items():
                assert key in got.weights, key
                assert got.weights[key].dtype == arr.dtype, key
                np.testing.assert_array_equal(got.weights[key], arr, err_msg=key)
            assert got.quant == {**ref.quant, **{k: v for k, v in got.quant.items()
                                                 if "+" in k}}
            assert (got.scheme, got.tied, got.layers) == (ref.scheme, False, LAYERS)
        finally:
            store.close()


def test_streaming_memory_is_bounded_by_the_largest_tensor(folders, tmp_path, monkeypatch):
    """tracemalloc counts numpy's buffers: the streamed spec lives in a file, and while
    streaming Python holds a few blocks of rows; the in-memory route holds the model."""
    from compiler.llm import stream
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec

    hf, _, sharded = folders
    monkeypatch.setattr(stream, "BLOCK_BYTES", 64 << 10)   # blocks smaller than a tensor
    scheme = parse_scheme("int4-g32")
    bound = 2 * _largest_f32(hf)
    total = sum(p.numel() * 4 for p in hf.parameters())
    assert total > 10 * bound        # the model is far larger than the bound
    stream.stream_spec(sharded, scheme, tmp_path / "warm")[1].close()   # imports, caches

    def peak(fn):
        tracemalloc.start()
        try:
            out = fn()
            return tracemalloc.get_traced_memory()[1], out
        finally:
            tracemalloc.stop()

    streamed, (spec, store) = peak(lambda: stream.stream_spec(sharded, scheme,
                                                              tmp_path / "s"))
    store.close()
    in_memory, _ = peak(lambda: quantize_spec(load_spec(sharded), scheme))
    quantized = (tmp_path / "s" / "spec.bin").stat().st_size
    print(f"peak Python allocations: streamed {streamed / 1024:.0f} KiB, in memory "
          f"{in_memory / 1024:.0f} KiB; bound {bound / 1024:.0f} KiB; quantized model "
          f"{quantized / 1024:.0f} KiB, float model {total / 1024:.0f} KiB")
    assert streamed < bound < quantized
    assert in_memory > bound


def test_streamed_package_logits_equal_transformers(folders, tmp_path):
    from compiler import compile_llm

    hf, _, sharded = folders
    said: list[str] = []
    work = tmp_path / "work"
    m = compile_llm(str(sharded), max_context=32, chunk=8, output=tmp_path / "m.npkg",
                    work_dir=work, progress=said.append)
    assert any(s.startswith("streaming") for s in said)
    assert not list(work.glob("scratch-*"))            # the scratch files are gone
    ids = [5, 17, 99, 3, 200, 7, 9, 11, 12, 100, 40, 2]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = m.logits(ids)
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-3
    assert m.generate(ids[:3], 6, ignore_eos=True) == \
        hf.generate(torch.tensor([ids[:3]]), max_new_tokens=6, do_sample=False,
                    min_new_tokens=6)[0, 3:].tolist()


def test_gptq_is_not_streamed(folders, tmp_path):
    from compiler.errors import NpuccError
    from compiler.llm.quantize import parse_scheme
    from compiler.llm.stream import stream_spec, streamable

    _, one, _ = folders
    assert streamable(one) and not streamable(tmp_path)
    with pytest.raises(NpuccError, match="gptq needs the in-memory route"):
        stream_spec(one, parse_scheme("int4-g32-gptq"), tmp_path / "s")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
