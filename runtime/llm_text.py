"""Text around an LLM package: tokenizer, chat template, streaming detokenizer, sampler.

The tokenizer is the ``tokenizers`` library's (the package's tokenizer.json); the chat
template is rendered with jinja2's sandbox the way transformers' ``apply_chat_template`` does
(``trim_blocks``, ``lstrip_blocks``, ``add_generation_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["TextCodec", "Sampler", "StreamDecoder"]


class TextCodec:
    """Encode prompts (plain or chat) and decode tokens, from a tokenizer.json string."""

    def __init__(self, tokenizer_json: str | None, chat_template: str | None,
                 bos_id: int | None = None):
        self._tok = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(tokenizer_json)
        self.chat_template = chat_template
        self.bos_id = bos_id

    @property
    def available(self) -> bool:
        return self._tok is not None

    def require(self) -> Any:
        if self._tok is None:
            raise InputError("this package has no tokenizer: pass token ids (a list of ints) "
                             "instead of text")
        return self._tok

    def render_chat(self, messages: str | Sequence[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise InputError("this package has no chat template; use chat=False")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = self._tok
        special = {}
        if tok is not None and self.bos_id is not None:
            special["bos_token"] = tok.id_to_token(self.bos_id)
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=True, **special)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self.require()
        if chat:
            text = self.render_chat(text)
        return list(tok.encode(text, add_special_tokens=not chat).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.require().decode(list(ids), skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing token list into text pieces; holds back an incomplete UTF-8 tail."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.sent = codec, [], 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


@dataclass
class Sampler:
    """Greedy when ``temperature == 0``; else softmax(logits / T) cut to ``top_k`` and the
    ``top_p`` nucleus, drawn from a seeded numpy generator."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k is not None:
            order = order[:self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p is not None:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self._rng.choice(len(order), p=p)])
