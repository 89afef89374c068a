"""Decoder LLMs in: a GGUF file, a transformers model or its folder -> :class:`LlmSpec`.

A GGUF file is read through transformers (``from_pretrained(folder, gguf_file=...)``, which
needs the ``gguf`` package): it dequantizes the weights to f32, undoes llama.cpp's Q/K row
permutation and rebuilds the tokenizer and chat template, so one importer (transformers'
module tree -> our weight names) serves every source. The dequantized weights are "the float
model" every comparison uses.

Supported architectures: Llama (and Llama-like: Mistral, SmolLM), Qwen2 (q/k/v biases) and
GPT-2 (learned positions, LayerNorm, fused c_attn Conv1D weights split into q, k, v).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError

__all__ = ["LlmSpec", "load_transformers", "spec_from_transformers", "llama_spec_from_config",
           "finish_spec", "LLAMA_NAMES", "LLAMA_LIKE"]

LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass
class LlmSpec:
    """What the graph builder needs: the architecture's numbers and its f32 weights.

    Weight names (all ``[out, in]`` for projections, as ``dense`` takes them): ``embed``,
    ``lm_head`` (absent when tied to ``embed``), ``norm.w`` (+ ``norm.b`` for GPT-2),
    ``pos_embed`` (GPT-2), and per layer ``l{i}.`` + ``attn_norm.w/b``, ``q.w/b``, ``k.w/b``,
    ``v.w/b``, ``o.w/b``, ``mlp_norm.w/b``, ``gate.w``, ``up.w/b``, ``down.w/b``. A quantized
    spec (:mod:`compiler.llm.quantize`) has ``<prefix>.wq`` + ``<prefix>.scales`` instead of
    ``<prefix>.w`` for the prefixes in ``quant``, and ``embed.q8`` + ``embed.row_scales``.
    """

    arch: str                  # "llama" (rope, rms norm, swiglu) | "gpt2"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tied: bool = False
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    tokenizer_json: str | None = None
    chat_template: str | None = None
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    name: str = "llm"
    quant: dict[str, tuple[int, int]] = field(default_factory=dict)  # prefix -> (bits, group)
    scheme: str | None = None  # the quantization that made ``quant`` (e.g. "int4-g32-gptq")
    precision: dict | None = None  # a mixed-precision plan (compiler.llm.mixed), for llm.json


def load_transformers(source: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a .gguf file or a transformers folder, offline."""
    import importlib.util

    path = Path(source)
    if not path.exists():
        raise NpuccError(f"model {path} does not exist")
    if importlib.util.find_spec("transformers") is None:
        raise NpuccError("importing an LLM needs transformers: pip install 'npucc[llm]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    folder = path
    if path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise NpuccError(f"reading {path.name} needs the gguf package: pip install gguf")
        folder, kw = path.parent, {"gguf_file": path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32", **kw)
    except Exception as e:  # transformers raises many kinds
        raise NpuccError(f"cannot load {path} with transformers: {type(e).__name__}: {e}") \
            from e
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception:  # noqa: BLE001  (a model without a tokenizer still compiles)
        tok = None
    return model.eval(), tok


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().astype(np.float32, copy=False)


def spec_from_transformers(model: Any, tokenizer: Any = None) -> LlmSpec:
    """The spec of a transformers causal LM (weights copied to numpy once)."""
    cfg = model.config
    kind = cfg.model_type
    if kind in LLAMA_LIKE:
        spec = _llama_spec(model, cfg)
    elif kind == "gpt2":
        spec = _gpt2_spec(model, cfg)
    else:
        raise NpuccError(f"model type {kind!r} is not supported; supported: "
                         f"{', '.join((*LLAMA_LIKE, 'gpt2'))}")
    return finish_spec(spec, cfg, tokenizer)


def finish_spec(spec: LlmSpec, cfg: Any, tokenizer: Any = None) -> LlmSpec:
    """``spec`` named after the config's model type, with ``tokenizer`` (when given) and the
    EOS ids (the tokenizer's, else the config's)."""
    spec.name = cfg.model_type
    if tokenizer is not None:
        add_tokenizer(spec, tokenizer)
    eos = cfg.eos_token_id if spec.eos_ids == [] else None
    if eos is not None:
        spec.eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    return spec


# our per-layer weight names -> transformers' Llama-family module names
LLAMA_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}


def llama_spec_from_config(cfg: Any, tied: bool) -> LlmSpec:
    """The spec of a Llama-family transformers config, without weights (``tied``: the
    output projection is the token embedding)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", None):
        raise NpuccError(f"rope scaling {rtype!r} is not supported (only default rope)")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if getattr(cfg, "use_sliding_window", False):
        raise NpuccError("sliding-window attention is not supported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return LlmSpec("llama", cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, heads,
                   cfg.num_key_value_heads or heads, head_dim, cfg.intermediate_size,
                   float(cfg.rms_norm_eps), float(theta),
                   int(getattr(cfg, "max_position_embeddings", 2048)), tied)


def _llama_spec(model: Any, cfg: Any) -> LlmSpec:
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    spec = llama_spec_from_config(cfg, tied)
    w = spec.weights
    w["embed"], w["norm.w"] = _np(sd["model.embed_tokens.weight"]), _np(sd["model.norm.weight"])
    if not tied:
        w["lm_head"] = _np(sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LLAMA_NAMES.items():
            for suffix in ("weight", "bias"):
                key = f"model.layers.{i}.{theirs}.{suffix}"
                if key in sd:
                    w[f"l{i}.{ours}.{suffix[0]}"] = _np(sd[key])
    return spec


def _gpt2_spec(model: Any, cfg: Any) -> LlmSpec:
    if getattr(cfg, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NpuccError(f"GPT-2 activation {cfg.activation_function!r} is not supported")
    sd = model.state_dict()
    d, heads = cfg.n_embd, cfg.n_head
    w: dict[str, np.ndarray] = {"embed": _np(sd["transformer.wte.weight"]),
                                "pos_embed": _np(sd["transformer.wpe.weight"]),
                                "norm.w": _np(sd["transformer.ln_f.weight"]),
                                "norm.b": _np(sd["transformer.ln_f.bias"])}
    tied = "lm_head.weight" not in sd or bool(
        sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr())
    if not tied:
        w["lm_head"] = _np(sd["lm_head.weight"])
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        w[f"l{i}.attn_norm.w"], w[f"l{i}.attn_norm.b"] = _np(sd[p + "ln_1.weight"]), \
            _np(sd[p + "ln_1.bias"])
        w[f"l{i}.mlp_norm.w"], w[f"l{i}.mlp_norm.b"] = _np(sd[p + "ln_2.weight"]), \
            _np(sd[p + "ln_2.bias"])
        qkv_w, qkv_b = _np(sd[p + "attn.c_attn.weight"]).T, _np(sd[p + "attn.c_attn.bias"])
        for j, name in enumerate("qkv"):   # Conv1D weights are [in, out]: transpose to [out, in]
            w[f"l{i}.{name}.w"] = np.ascontiguousarray(qkv_w[j * d:(j + 1) * d])
            w[f"l{i}.{name}.b"] = qkv_b[j * d:(j + 1) * d].copy()
        w[f"l{i}.o.w"] = np.ascontiguousarray(_np(sd[p + "attn.c_proj.weight"]).T)
        w[f"l{i}.o.b"] = _np(sd[p + "attn.c_proj.bias"])
        w[f"l{i}.up.w"] = np.ascontiguousarray(_np(sd[p + "mlp.c_fc.weight"]).T)
        w[f"l{i}.up.b"] = _np(sd[p + "mlp.c_fc.bias"])
        w[f"l{i}.down.w"] = np.ascontiguousarray(_np(sd[p + "mlp.c_proj.weight"]).T)
        w[f"l{i}.down.b"] = _np(sd[p + "mlp.c_proj.bias"])
    inter = cfg.n_inner or 4 * d
    return LlmSpec("gpt2", cfg.vocab_size, d, cfg.n_layer, heads, heads, d // heads, inter,
                   float(cfg.layer_norm_epsilon), max_positions=int(cfg.n_positions),
                   tied=tied, weights=w)


def add_tokenizer(spec: LlmSpec, tok: Any) -> None:
    """The tokenizer (tokenizer.json text), chat template, BOS and EOS of ``tok`` into ``spec``."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise NpuccError(f"tokenizer {type(tok).__name__} has no fast (tokenizers) backend; "
                         f"only tokenizer.json tokenizers travel in a package")
    spec.tokenizer_json = backend.to_str()
    spec.chat_template = getattr(tok, "chat_template", None)
    if tok.bos_token_id is not None:
        spec.bos_id = int(tok.bos_token_id)
    if tok.eos_token_id is not None:
        spec.eos_ids = [int(tok.eos_token_id)]
