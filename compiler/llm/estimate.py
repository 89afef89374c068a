"""A compiled LLM's decode latency on a target, from the same calibrated cost model as
``m.estimate()`` (``targets/llm_cost.py``): the weights streamed once per token over the
target's DRAM bandwidth, the KV cache read up to the position, and the decode graph's kernel
launches, with the target's calibration band."""

from __future__ import annotations

from typing import Any

from targets.llm_cost import decode_ms_per_token

__all__ = ["estimate_decode"]


def estimate_decode(model: Any, target: Any = "kirin990", position: int | None = None,
                    device: str = "cpu") -> dict[str, Any]:
    """ms/token of ``model`` (a ``runtime.llm.LanguageModel``) decoding on ``target`` at
    ``position`` (default: half the context); see ``targets.llm_cost.decode_ms_per_token``
    for the terms. The weights are the package's as stored (int4 codes and scales when
    quantized); the KV cache is read at the runtime's precision."""
    st = model.stats()
    layers = int(model.config["layers"])
    position = model.max_context // 2 if position is None else int(position)
    if not 0 <= position < model.max_context:
        raise ValueError(f"position {position} is outside the context (0..{model.max_context - 1})")
    launches = len(model.decode.calls)
    return decode_ms_per_token(target, weight_bytes=st["weight_bytes"],
                               kv_bytes_per_position=st["kv_cache_bytes"] // model.max_context,
                               position=position, layers=layers,
                               kernels_per_layer=max(1, round(launches / layers)), device=device)
