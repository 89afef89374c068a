"""QAT of decoder LLMs (compiler.compress.llm_qat) and the LLM route of compress: a tiny
random Llama (untied output head, GQA). The compiled package gets the QAT codes and learned
f16 scales exactly and computes the fake-quant torch model's logits; distillation lowers the
KL to the float model on held-out tokens; budgets choose the precision."""

from __future__ import annotations

import argparse
import json
import unittest

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from compiler.compress.llm_qat import (  # noqa: E402
    LlmQATConfig,
    llm_qat_spec,
    prepare_llm_qat,
    qat_codes,
    token_windows,
    train_llm_qat,
)
from compiler.errors import NpuccError  # noqa: E402

VOCAB = 256


def _tiny():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def _text_bytes(*modules) -> list[int]:
    """Token ids: the UTF-8 bytes of standard-library docstrings (English text, vocab 256)."""
    return list("\n\n".join(m.__doc__ for m in modules).encode())


def _kl(teacher, student, windows) -> float:
    with torch.no_grad():
        tot = 0.0
        for w in windows:
            x = torch.tensor([w])
            pt = torch.log_softmax(teacher(x).logits, -1)
            ps = torch.log_softmax(student(x).logits, -1)
            tot += float((pt.exp() * (pt - ps)).sum(-1).mean())
    return tot / len(windows)


@pytest.fixture(scope="module")
def trained():
    hf = _tiny()
    student = prepare_llm_qat(hf, LlmQATConfig(bits=4, group_size=32))
    held_out = token_windows(_text_bytes(unittest), 32)[:6]      # never trained on
    before = _kl(hf, student, held_out)
    info = train_llm_qat(student, hf, _text_bytes(argparse, json), steps=40, seq=32, batch=2,
                         lr=1e-4, scale_lr=1e-2)
    return hf, student, held_out, before, info


def test_distillation_lowers_the_kl_on_held_out_tokens(trained):
    hf, student, held_out, before, info = trained
    after = _kl(hf, student, held_out)
    assert info["steps"] == 40 and info["seconds"] > 0
    assert after < 0.85 * before, (before, after)   # measured: 0.0201 -> 0.0138
    assert info["last_loss"] < info["first_loss"]


@pytest.mark.slow
def test_compiled_package_is_the_fake_quant_model(trained, tmp_path):
    """The codes and learned f16 scales go into compile_llm as they are: the package's logits
    are the student's (f32 summation order apart), and differ from round-to-nearest PTQ's."""
    from compiler import compile_llm
    from compiler.ir.ops.quant_weight import unpack_int4
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec

    hf, student, held_out, _, _ = trained
    spec = llm_qat_spec(student)
    codes = qat_codes(student)
    rtn = quantize_spec(load_spec(hf), parse_scheme("int4-g32"))
    learned = 0
    for prefix, (parts, bits, group) in codes.items():
        q, s = parts["q"], parts["scales"]
        assert (bits, group) == spec.quant[prefix] == (4, 32)
        assert np.array_equal(unpack_int4(spec.weights[f"{prefix}.wq"]), q)
        assert np.array_equal(spec.weights[f"{prefix}.scales"], s)
        assert s.dtype == np.float16
        learned += int((s != rtn.weights[f"{prefix}.scales"]).sum())
    assert learned > 0                      # the scales the package holds are the trained ones
    m = compile_llm(spec, max_context=64, chunk=8, output=tmp_path / "qat.npkg")
    ids = held_out[0]
    with torch.no_grad():
        fake = student(torch.tensor([ids])).logits[0].numpy()
        ptq = prepare_llm_qat(hf, LlmQATConfig(bits=4, group_size=32))(
            torch.tensor([ids])).logits[0].numpy()
    got = m.logits(ids)
    scale = np.abs(fake).max()
    assert np.abs(got - fake).max() / scale < 1e-4
    assert np.abs(ptq - fake).max() / scale > 1e-2     # the check above can tell them apart
    assert m.config["quantize"] == "int4-g32-qat"


def test_fake_quant_gradients_are_the_straight_through_and_lsq_ones():
    """GroupFakeQuant (which keeps only w and d for backward) against the same arithmetic
    written as an autograd graph: values equal, gradients to w and d equal."""
    from compiler.compress.llm_qat import GroupFakeQuant

    torch.manual_seed(0)
    w = torch.randn(6, 4, 8, requires_grad=True)
    d = (torch.rand(6, 4, 1) * 0.3 + 0.05).requires_grad_(True)
    gy = torch.randn(6, 4, 8)
    y = GroupFakeQuant.apply(w, d, None, -8, 7)
    gw, gd = torch.autograd.grad((y * gy).sum(), (w, d))
    x = w / d
    q = torch.clamp(x + (torch.round(x) - x).detach(), -8, 7)     # STE round, clipped
    ref = q * d
    rw, rd = torch.autograd.grad((ref * gy).sum(), (w, d))
    assert torch.equal(y, ref.detach())
    assert (y.detach() / d.detach()).abs().max() > 7.5              # some weights are clipped
    assert torch.allclose(gw, rw, atol=1e-5) and torch.allclose(gd, rd, atol=1e-4)
    assert (gw == 0).any() and (gw != 0).any()
    c = (torch.randn(6, 4, 1) * 0.1).requires_grad_(True)
    y = GroupFakeQuant.apply(w, d, c, -4, 3)
    gw, gd, gc = torch.autograd.grad((y * gy).sum(), (w, d, c))
    x = (w - c) / d
    ref = torch.clamp(x + (torch.round(x) - x).detach(), -4, 3) * d + c
    rw, rd, rc = torch.autograd.grad((ref * gy).sum(), (w, d, c))
    assert torch.equal(y, ref.detach())
    assert torch.allclose(gw, rw, atol=1e-5) and torch.allclose(gd, rd, atol=1e-4)
    assert torch.allclose(gc, rc, atol=1e-4) and (gc != 0).any()


def test_an_untrained_3_bit_student_is_compile_llms_int3():
    """3 bits are asymmetric in compile_llm (f16 scale and offset per group): before any
    training the student's spec is exactly compile_llm's own int3-g32 quantization."""
    from compiler.llm.compile import load_spec
    from compiler.llm.quantize import parse_scheme, quantize_spec

    hf = _tiny()
    student = prepare_llm_qat(hf, LlmQATConfig(bits=3, group_size=32))
    spec = llm_qat_spec(student)
    ref = quantize_spec(load_spec(hf), parse_scheme("int3-g32"))
    assert spec.quant == ref.quant and spec.scheme == "int3-g32-qat"
    for key, arr in ref.weights.items():
        assert np.array_equal(spec.weights[key], arr), key
        assert spec.weights[key].dtype == arr.dtype, key
    parts = qat_codes(student)["l0.q"][0]
    assert parts["q"].min() >= -4 and parts["q"].max() <= 3 and "offsets" in parts
    with pytest.raises(NpuccError, match="bits=8 is not 2, 3 or 4"):
        LlmQATConfig(bits=8)
    with pytest.raises(NpuccError, match="asymmetric"):
        LlmQATConfig(bits=3, asym=False)


def test_qat_refuses_a_model_it_cannot_quantize():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                vocab_size=64))
    with pytest.raises(NpuccError, match="Llama-like"):
        prepare_llm_qat(gpt2)


def test_budgets_choose_the_precision():
    from compiler.compress.llm_plan import choose_scheme
    from compiler.compress.plan import BudgetError
    from compiler.llm.compile import load_spec

    spec = load_spec(_tiny())
    said: list[str] = []
    big, sizes = choose_scheme(spec, None, say=said.append)
    assert big == "f32" and len(said) == 5
    assert sizes["f32"] > sizes["int8"] > sizes["int4-g32"] > sizes["int4-g128"] \
        > sizes["int3-g128"]
    mid = (sizes["int8"] + sizes["int4-g32"]) / 2 / 2**20
    assert choose_scheme(spec, mid, say=said.append)[0] == "int4-g32"
    assert choose_scheme(spec, sizes["int8"] / 2**20, say=said.append)[0] == "int8"
    with pytest.raises(BudgetError, match=r"closest is int3-g128 at 0\.\d\d MiB"):
        choose_scheme(spec, 0.01, say=said.append)


def _tokenizer(text: str):
    """A word-level tokenizer of at most VOCAB words trained on ``text`` (a tokenizer.json
    tokenizer, as the package carries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=VOCAB,
                                                              special_tokens=["<unk>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.slow
def test_cli_compresses_an_llm_from_a_text(tmp_path, capsys):
    """`npucc compress FOLDER --text FILE --device kirin990 --budget-mb N --qat-steps N`: the
    budget picks int4 g32, QAT runs, every stage's held-out perplexity is printed, and the
    package holds the QAT scheme."""
    from compiler.cli import main
    from compiler.compress.llm_plan import choose_scheme
    from compiler.llm.compile import load_spec
    from runtime.llm import load

    text = "\n\n".join(m.__doc__ for m in (argparse, json, unittest))
    hf = _tiny()
    hf.save_pretrained(tmp_path / "tiny")
    _tokenizer(text).save_pretrained(tmp_path / "tiny")
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")
    _, sizes = choose_scheme(load_spec(hf), None, say=lambda _: None)
    budget = (sizes["int8"] + sizes["int4-g32"]) / 2 / 2**20
    out = tmp_path / "tiny.npkg"
    rc = main(["compress", str(tmp_path / "tiny"), "--text", str(tmp_path / "notes.txt"),
               "--device", "kirin990", "--budget-mb", f"{budget:.4f}", "--qat-steps", "4",
               "--seq", "32", "--window", "32", "--max-context", "64", "--chunk", "8",
               "-o", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    lines = printed.out
    assert "over int8" in lines and "fits int4-g32" in lines and "plan: int4-g32, QAT 4" in lines
    for stage in ("float: perplexity", "PTQ int4-g32: perplexity", "QAT: perplexity",
                  "compiled for host", "decode on kirin990"):
        assert stage in lines, stage
    m = load(out)
    assert m.config["quantize"] == "int4-g32-qat" and m.max_context == 64
    assert m.stats()["weight_bytes"] <= budget * 2**20
    assert main(["compress", str(tmp_path / "tiny"), "--text", str(tmp_path / "notes.txt"),
                 "--budget-mb", "0.001", "-o", str(tmp_path / "b.npkg")]) == 1
    assert "closest is int3-g128" in capsys.readouterr().err
