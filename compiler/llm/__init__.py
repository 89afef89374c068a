"""Decoder LLMs: import (GGUF, transformers), prefill + decode graphs over a static KV cache,
weight-only quantization, and the package the runtime's ``generate`` loop runs.

    from compiler import compile_llm
    m = compile_llm("SmolLM2-135M-Instruct.Q4_1.gguf", max_context=2048, quantize="int4-g32")
    print(m.generate("What is the capital of France?", 32, chat=True))
    m.save("smol.npkg")      # runtime.llm.load("smol.npkg") reads it back
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_llm", "estimate_decode"]


def compile_llm(source: Any, target: Any = "host", **kwargs: Any):
    """See :func:`compiler.llm.compile.compile_llm`."""
    from compiler.llm.compile import compile_llm as _compile_llm

    return _compile_llm(source, target, **kwargs)


def estimate_decode(model: Any, target: Any = "kirin990", position: int | None = None,
                    device: str = "cpu") -> dict[str, Any]:
    """See :func:`compiler.llm.estimate.estimate_decode`."""
    from compiler.llm.estimate import estimate_decode as _estimate

    return _estimate(model, target, position, device)
