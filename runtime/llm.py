"""Running an LLM package: the KV cache, prefill in chunks, decode, ``generate``.

    import runtime.llm
    m = runtime.llm.load("smol.npkg")
    print(m.generate("What is the capital of France?", max_new_tokens=32, chat=True))
    for piece in m.stream("Once upon a time", max_new_tokens=64):
        print(piece, end="", flush=True)

The runtime owns the KV cache: one buffer per layer for K and one for V (``max_context``
positions of ``kv_heads x head_dim`` f32), allocated once and shared by both graphs; the
``kv_write`` kernels update it in place at the current position. A quantized cache
(``compile_llm(kv_cache="int8" | "k4v8")``) is more state tensors per layer (codes, scales,
mins), allocated the same way from the manifest's ``state`` at their stored sizes. Weights are views of one
memory map of weights.bin, shared by both graphs. Each graph has its own arena (static
memory plan) and bound argument tuples, so a step is: copy ids and pos in, call the kernels,
read the logits view.

A prompt of n tokens runs through the prefill graph in ceil(n / chunk) calls (the last one
padded; the causal rule hides the padding) and each new token through the decode graph.
One model instance holds one sequence: it is not thread safe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _dtypes
from ._tvm import import_tvm
from .errors import InputError, PackageError, RuntimeError_
from .llm_package import LlmPackage
from .llm_text import Sampler, StreamDecoder, TextCodec
from .memory_pool import ALIGN

__all__ = ["LanguageModel", "GenerationStats", "load"]


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


class _Program:
    """One graph's kernels bound to its arena, the shared weights and the shared state."""

    def __init__(self, tvm: Any, package: LlmPackage, spec: dict[str, Any],
                 weights: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.tokens = int(spec["tokens"])
        try:   # the sealed copy of the verified bytes, never the path
            lib = package.libraries[spec["library"]].load(tvm)
        except Exception as e:  # TVM raises its own types
            raise PackageError(f"cannot load {spec['library']}: {e}") from e
        self.arena = _aligned(max(int(spec["arena_bytes"]), ALIGN))
        views: dict[str, Any] = {}
        self.np: dict[str, np.ndarray] = {}
        for name, t in spec["tensors"].items():
            dt = _dtypes.numpy_dtype(t["dtype"])
            nbytes = _dtypes.nbytes(t["shape"], t["dtype"])
            if t["bind"] == "arena":
                raw = self.arena[t["offset"]:t["offset"] + nbytes]
            elif t["bind"] == "weight" and t.get("key") in weights:
                raw = weights[t["key"]]
            elif t["bind"] == "state" and t.get("key") in state:
                raw = state[t["key"]].reshape(-1).view(np.uint8)
            else:
                raise PackageError(f"tensor {name!r}: unknown binding {t['bind']!r} "
                                   f"(or a weight / state key the package does not have)")
            if raw.nbytes != nbytes:
                raise PackageError(f"tensor {name!r} needs {nbytes} bytes, has {raw.nbytes}")
            arr = raw.view(dt).reshape(t["shape"])
            self.np[name] = arr
            views[name] = tvm.runtime.from_dlpack(arr)
        self.calls = []
        for s in spec["steps"]:
            try:
                f = lib[s["kernel"]]
            except Exception as e:
                raise PackageError(f"kernel {s['kernel']!r} is not in {spec['library']}") from e
            self.calls.append((f, tuple(views[a] for a in s["args"]), s))

    def run(self, ids: np.ndarray, pos: int) -> np.ndarray:
        self.np["ids"][:] = ids
        self.np["pos"][0] = pos
        for f, args, s in self.calls:
            try:
                f(*args)
            except Exception as e:
                raise RuntimeError_(f"kernel {s['kernel']!r} failed (node {s['node']}, "
                                    f"{s['op']}): {e}") from e
        return self.np["logits"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.new_tokens - 1, 0)   # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass
class _Request:
    ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: set[int]
    stop_strings: list[str] = field(default_factory=list)


class LanguageModel:
    """A loaded LLM package: ``generate``, ``stream``, ``logits``, ``stats``."""

    def __init__(self, package: LlmPackage):
        self.package = package
        m = package.manifest
        cfg = self.config = m["model"]
        cores = (m.get("target") or {}).get("tvm", {}).get("num-cores")
        tvm = import_tvm(int(cores) if cores else None)
        self._weights = package.map_weights()
        self.state = {name: _aligned(_dtypes.nbytes(s["shape"], s["dtype"]))
                      .view(_dtypes.numpy_dtype(s["dtype"])).reshape(s["shape"])
                      for name, s in m["state"].items()}
        self.prefill = _Program(tvm, package, m["graphs"]["prefill"], self._weights, self.state)
        self.decode = _Program(tvm, package, m["graphs"]["decode"], self._weights, self.state)
        self.max_context = int(cfg["max_context"])
        self.chunk = self.prefill.tokens
        self.vocab = int(cfg["vocab"])
        self.text = TextCodec(package.tokenizer_json(), cfg.get("chat_template"),
                              cfg.get("bos_id"))
        self.eos_ids = [int(e) for e in cfg.get("eos_ids") or []]
        self.last_stats = GenerationStats()

    # -- model steps --------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int], extra: int = 0, truncate: bool = False) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise InputError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        if len(ids) > self.max_context:
            if not truncate:
                raise InputError(f"the prompt has {len(ids)} tokens, more than this package's "
                                 f"max_context of {self.max_context}; shorten it, compile with "
                                 f"a larger --max-context, or ask for truncation "
                                 f"(truncate=True keeps the last tokens)")
            ids = ids[len(ids) - self.max_context + max(extra, 1):]
        return ids

    def _prefill(self, ids: list[int], keep_all: bool = False) -> np.ndarray:
        """Run the prompt from position 0; the logits of every position (keep_all) or of
        the last one."""
        t = self.chunk
        rows = []
        for s in range(0, len(ids), t):
            part = ids[s:s + t]
            chunk = np.zeros(t, np.int32)
            chunk[:len(part)] = part
            logits = self.prefill.run(chunk, s)
            rows.append(logits[:len(part)].copy() if keep_all else logits[len(part) - 1].copy())
        return np.concatenate(rows) if keep_all else rows[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Per-position logits ``[n, vocab]`` of a sequence (position i predicts token i+1),
        through the prefill graph; sequences up to max_context."""
        ids = self._check_ids(token_ids)
        return self._prefill(ids, keep_all=True)

    def step_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]
                    ) -> np.ndarray:
        """Logits after the prompt (prefill) and after each continuation token (decode),
        ``[len(continuation) + 1, vocab]``: what greedy generation sees at each step."""
        ids = self._check_ids(list(prompt_ids) + list(continuation))
        n = len(prompt_ids)
        out = [self._prefill(ids[:n])]
        for p, tok in enumerate(ids[n:], start=n):
            out.append(self.decode.run(np.array([tok], np.int32), p)[0].copy())
        return np.stack(out)

    # -- generation ------------------------------------------------------------------------
    def _request(self, prompt: str | Sequence[int], max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int | None,
                 stop: str | Sequence[str] | Sequence[int] | None, chat: bool,
                 truncate: bool, ignore_eos: bool) -> _Request:
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(prompt, str):
            if not prompt.strip() and not chat:
                raise InputError("the prompt is empty: give some text")
            if chat and not prompt.strip():
                raise InputError("the chat message is empty: give some text")
            ids = self.text.encode(prompt, chat=chat)
        else:
            ids = list(prompt)
        ids = self._check_ids(ids, extra=max_new_tokens, truncate=truncate)
        stops = [stop] if isinstance(stop, str | int) else list(stop or [])
        return _Request(ids, max_new_tokens, Sampler(temperature, top_k, top_p, seed),
                        (set() if ignore_eos else set(self.eos_ids))
                        | {s for s in stops if isinstance(s, int)},
                        [s for s in stops if isinstance(s, str)])

    def tokens(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop: Any = None, chat: bool = False,
               truncate: bool = False, ignore_eos: bool = False) -> Iterator[int]:
        """New token ids as they are produced (stops at a stop id, which is not yielded;
        the model's end-of-sequence ids are stop ids unless ``ignore_eos``)."""
        req = self._request(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
                            chat, truncate, ignore_eos)
        st = self.last_stats = GenerationStats(prompt_tokens=len(req.ids))
        if req.max_new_tokens == 0:
            st.stop_reason = "length"
            return
        t0 = time.perf_counter()
        logits = self._prefill(req.ids)
        st.prefill_seconds = time.perf_counter() - t0
        pos = len(req.ids)
        t0 = time.perf_counter()
        try:
            while True:
                tok = req.sampler(logits)
                if tok in req.stop_ids:
                    st.stop_reason = "stop"
                    return
                st.new_tokens += 1
                yield tok
                if st.new_tokens >= req.max_new_tokens:
                    st.stop_reason = "length"
                    return
                if pos >= self.max_context:
                    st.stop_reason = "context"
                    return
                logits = self.decode.run(np.array([tok], np.int32), pos)[0]
                pos += 1
        finally:
            st.decode_seconds = time.perf_counter() - t0

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, **kw: Any
               ) -> Iterator[str]:
        """Text pieces as tokens are produced; ``stop`` strings end the text before them."""
        stops = kw.get("stop")
        stops = [stops] if isinstance(stops, str) else [s for s in (stops or [])
                                                        if isinstance(s, str)]
        dec = StreamDecoder(self.text)
        self.text.require()  # a clear error before any work
        text = ""
        for tok in self.tokens(prompt, max_new_tokens, **kw):
            piece = dec.push(tok)
            if not piece:
                continue
            text += piece
            hit = min((text.find(s) for s in stops if s in text), default=-1)
            if hit >= 0:
                yield piece[:max(0, hit - (len(text) - len(piece)))]
                self.last_stats.stop_reason = "stop"
                return
            yield piece

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 callback: Callable[[str], Any] | None = None, **kw: Any) -> str | list[int]:
        """The completion of ``prompt``: text for a text prompt (``callback`` gets each piece
        as it is produced), token ids for a token-id prompt. Options: temperature (0 =
        greedy), top_k, top_p, seed, stop (strings or token ids), chat (apply the chat
        template), truncate (keep the last max_context tokens of a long prompt), ignore_eos."""
        if not isinstance(prompt, str):
            return list(self.tokens(prompt, max_new_tokens, **kw))
        pieces = []
        for piece in self.stream(prompt, max_new_tokens, **kw):
            pieces.append(piece)
            if callback is not None:
                callback(piece)
        return "".join(pieces)

    def save(self, path: str | os.PathLike) -> str:
        """Copy the package to ``path`` (atomically; refuses to replace a non-package)."""
        import shutil
        import tempfile
        from pathlib import Path

        from .llm_package import LLM_MANIFEST
        from .signing import SIGNATURE_FILE

        dst = Path(path)
        if dst.resolve() == self.package.directory.resolve():
            return str(dst)
        if dst.exists() and not (dst / LLM_MANIFEST).is_file():
            raise PackageError(f"refusing to replace {dst}: it exists and is not an LLM package")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            names = [LLM_MANIFEST, *self.package.manifest["files"]]
            if (self.package.directory / SIGNATURE_FILE).is_file():
                names.append(SIGNATURE_FILE)   # checked again when the copy is loaded
            for name in names:
                shutil.copyfile(self.package.directory / name, tmp / name)
            if dst.exists():
                shutil.rmtree(dst)
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return str(dst)

    def stats(self) -> dict[str, Any]:
        w = sum(a.nbytes for a in self._weights.values())
        return {"weight_bytes": w, "kv_cache_bytes": sum(a.nbytes for a in self.state.values()),
                "arena_bytes": self.prefill.arena.nbytes + self.decode.arena.nbytes,
                "package_bytes": self.package.size_bytes(), "max_context": self.max_context,
                "chunk": self.chunk}


def load(path: str | os.PathLike, trusted_keys: Any = None) -> LanguageModel:
    """Load the LLM package at ``path`` after verifying it (``runtime/llm_package.py``).

    ``trusted_keys``: public keys (PEM paths or bytes) whose signature the package must carry;
    default: the keys ``NPUCC_TRUSTED_KEYS`` names (or the per-user trust folder). With keys,
    an unsigned package, one signed by another key, or one changed after signing is refused
    (:class:`SignatureError`); without, it loads with a one-time
    :class:`UnverifiedPackageWarning`. No kernel library is loaded before that check."""
    return LanguageModel(LlmPackage.load(path, trusted_keys))
