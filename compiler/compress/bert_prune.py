"""Structured pruning of BERT-style encoders in torch (transformers' BertModel and kin:
``encoder.layer[i].attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``), for fine-tuning / distillation after the cut.

- :func:`bert_importance`: per layer, each head's mean contribution norm (its slice of the
  context times its columns of the output projection) and each MLP channel's mean
  ``|gelu(h)| * ||W_out[:, j]||`` over the real tokens of the given batches;
- :func:`prune_bert`: removes ``head_sparsity`` of every layer's heads and ``mlp_sparsity``
  of its MLP channels (lowest importance) in place: the Linear layers are rebuilt smaller, so
  the exported / compiled model is smaller and does less work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compiler.errors import NpuccError

__all__ = ["bert_layers", "bert_importance", "prune_bert"]


def bert_layers(model: nn.Module) -> list[nn.Module]:
    enc = getattr(model, "encoder", None) or getattr(getattr(model, "bert", None), "encoder",
                                                     None)
    layers = getattr(enc, "layer", None)
    if layers is None or not all(hasattr(b, "attention") and hasattr(b, "intermediate")
                                 for b in layers):
        raise NpuccError("prune_bert: not a BERT-style encoder (model.encoder.layer[i] with "
                         "attention / intermediate / output)")
    return list(layers)


@torch.no_grad()
def bert_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                    ) -> list[dict[str, torch.Tensor]]:
    """``[{"heads": [H], "mlp": [I]}]`` per layer (higher = more important)."""
    layers = bert_layers(model)
    acc = [{"heads": 0.0, "mlp": 0.0} for _ in layers]
    hooks, mask_box = [], {}
    for i, b in enumerate(layers):
        sa = b.attention.self
        wo = b.attention.output.dense.weight            # [D, H*d]
        d = sa.attention_head_size

        def ctx_hook(_m, inp, _out, i=i, wo=wo, d=d):
            c = inp[0]                                   # [B, S, H*d]
            h = c.shape[-1] // d
            contrib = torch.einsum("bshd,ehd->bshe", c.reshape(*c.shape[:-1], h, d),
                                   wo.reshape(wo.shape[0], h, d)).norm(dim=-1)   # [B, S, H]
            m = mask_box["m"][..., None]
            acc[i]["heads"] = acc[i]["heads"] + (contrib * m).sum((0, 1))

        def mlp_hook(_m, inp, _out, i=i, w=b.output.dense.weight):
            g = inp[0].abs() * w.norm(dim=0)             # [B, S, I]
            acc[i]["mlp"] = acc[i]["mlp"] + (g * mask_box["m"][..., None]).sum((0, 1))

        hooks.append(b.attention.output.dense.register_forward_hook(ctx_hook))
        hooks.append(b.output.dense.register_forward_hook(mlp_hook))
    try:
        model.eval()
        for batch in batches:
            mask_box["m"] = batch["attention_mask"].float()
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [{"heads": torch.as_tensor(a["heads"]), "mlp": torch.as_tensor(a["mlp"])}
            for a in acc]


def _rows(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(keep), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[keep])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[keep])
    return new


def _cols(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, keep])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def _keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = scores.numel()
    k = max(1, n - int(round(sparsity * n)))
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values


def _per_layer(value: float | Sequence[float], n: int, what: str) -> list[float]:
    vals = [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]
    if len(vals) != n or any(not 0 <= v < 1 for v in vals):
        raise NpuccError(f"prune_bert: {what} must be one value or {n} values in [0, 1), got "
                         f"{value!r}")
    return vals


def prune_bert(model: nn.Module, importance: list[Mapping[str, Any]],
               head_sparsity: float | Sequence[float],
               mlp_sparsity: float | Sequence[float]) -> dict[str, Any]:
    """Remove heads and MLP channels in place (sparsities: one for all layers, or one per
    layer); returns ``{"heads": [kept head ids per layer], "mlp": [kept count per layer]}``."""
    layers = bert_layers(model)
    if len(importance) != len(layers):
        raise NpuccError(f"importance has {len(importance)} layers, the model {len(layers)}")
    hs = _per_layer(head_sparsity, len(layers), "head_sparsity")
    ms = _per_layer(mlp_sparsity, len(layers), "mlp_sparsity")
    kept: dict[str, list] = {"heads": [], "mlp": []}
    for b, imp, h_sp, m_sp in zip(layers, importance, hs, ms, strict=True):
        sa = b.attention.self
        d = sa.attention_head_size
        heads = _keep(torch.as_tensor(imp["heads"]), h_sp)
        idx = (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        sa.query, sa.key, sa.value = _rows(sa.query, idx), _rows(sa.key, idx), \
            _rows(sa.value, idx)
        b.attention.output.dense = _cols(b.attention.output.dense, idx)
        sa.num_attention_heads = len(heads)
        sa.all_head_size = len(heads) * d
        ch = _keep(torch.as_tensor(imp["mlp"]), m_sp)
        b.intermediate.dense = _rows(b.intermediate.dense, ch)
        b.output.dense = _cols(b.output.dense, ch)
        kept["heads"].append(heads.tolist())
        kept["mlp"].append(len(ch))
    return kept
