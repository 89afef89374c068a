"""Pruning: the ``prune`` pass (magnitude, N:M, structured channels, attention heads).

Use
---
```python
m = compile(model, target="host",
            prune={"method": "channel", "sparsity": 0.5, "ops": ["conv2d"]},
            calibration=[{"image": x} for x in samples])
m.prune_report()                  # per-layer sparsity, parameters, output error (table)
m.stats()["weight_bytes_stored"]  # bytes of weights in the package (sparse-encoded)
```

``compile(..., prune={...})`` adds the ``prune`` pass before the layout pass (the graph it sees
is fused and canonicalised, NCHW, BatchNorm folded); the options travel in
``ctx.options["prune"]`` and the calibration samples in ``ctx.sample_inputs``. The pass can
also be named in a pipeline: ``prune{method=2:4}``; pipeline options override the dict.

Methods (``method``)
--------------------
``"magnitude"``  unstructured: the ``sparsity`` fraction of smallest |w| of every conv2d/dense
    weight set to zero, per layer (``scope="layer"``) or with one global threshold
    (``scope="global"``, torch's ``global_unstructured``). ``sparsities={layer: s}`` overrides
    per layer; ``plan="sensitivity"`` chooses them (below). Weights stay dense tensors with
    zeros in the graph; the package stores them compactly (Storage).
``"2:4"`` (or ``"n:m"`` with ``n``, ``m``)  keep the 2 largest of every 4 weights along the
    reduction axis (K of dense; for conv2d the input channels at each kernel position, the
    contiguous axis of the OHWI layout the kernels read — NVIDIA ASP's grouping). Layers whose
    reduction axis is not a multiple of 4 are left dense and marked ``skipped`` in the plan.
``"channel"``  structured: output channels of conv2d (groups=1) and dense really removed, by
    ``importance="l1"|"l2"`` weight norm or ``"calibrated"`` (mean |activation| on the
    calibration samples x L2 norm). Every consumer shrinks consistently: next conv's input
    channels, a dense's K (also through a flatten ``[N,C,H,W]->[N,C*H*W]``: whole H*W column
    blocks), per-channel constants of elementwise ops, pools, concat (channel offsets),
    depthwise convs (groups shrink). Producers feeding a residual add are one group, pruned
    jointly by summed importance. Channels reaching a graph output, or an op that mixes
    channels in a way we do not rewrite (softmax, layer_norm, split, other reshapes), are
    kept: the plan says why (``kept_because``). ``ops=["conv2d"]`` restricts the producers,
    ``multiple=8`` rounds kept channels up to the NPU's alignment.
``"head"``  attention heads removed from transformer blocks (BERT/MiniLM, GPT-2; pattern in
    :mod:`passes.pruning.heads`): Q/K/V rows (or the parts of a fused QKV dense), the H of
    the reshapes, the output projection's columns. ``importance="contribution"`` (default:
    mean norm of the head's contribution to the output projection on the calibration samples),
    ``"output-error"`` (the outputs' relative error when the head alone is removed: L x H
    reference runs) or ``"weight"``; padding tokens (``attention_mask`` = 0) do not count.
    ``scope="layer"`` removes ``sparsity`` of each block's heads, ``"global"`` ranks heads
    over the whole model (contribution/weight scores normalised per block; output errors are
    on one scale already). ``outputs=[i, ...]``: which graph outputs the output error is
    measured on (MiniLM: ``[0]``, the hidden states the sentence embedding pools). ``bias_correction=True`` moves the
    removed heads' mean calibration contribution into the output projection's bias (off by
    default: it did not carry over to other sentences on MiniLM).

Common options: ``sparsity`` (0.5; 0.25 for heads), ``exclude=[name substrings]``,
``min_params`` (skip smaller weights, unstructured). Layers are named by their node name (the
torch module path or the ONNX node name).

Sensitivity (``plan="sensitivity"``, :mod:`passes.pruning.sensitivity`)
-----------------------------------------------------------------------
Each layer is pruned alone at a few sparsities (0.3, 0.5, 0.7, 0.9) and the relative output
error on the calibration samples is measured with the reference interpreter; then per-layer
sparsities are chosen greedily (the next step with the least added error per removed
parameter) until the global target is reached, capped at ``max_sparsity`` (0.9). The plan is
printed as a rich table (``verbose=False`` silences it) and kept in the pass record
(``prune_plan["options"]["sensitivity"]``).

Storage
-------
``runtime/sparse.py``: when the model was pruned, every weight in the package with enough
zeros is stored as a bitmask (1 bit per entry + the non-zero values) or CSR (row pointers,
int16/int32 column indices, values), whichever is smaller, and only if smaller than dense.
The manifest records the encoding per weight (``weight_encoding``; format version 2 — a
runtime that does not know it refuses the package); the sha256 of ``weights.safetensors``
still covers the stored bytes. Weights are expanded when the runtime loads them, exactly.

Report
------
``CompiledModel.prune_report(samples=None)``: per layer sparsity / channels / heads,
parameters before and after (non-zero), and the output error (cosine, max abs, relative) of
the pruned model against the unpruned imported model on the samples (the calibration samples
by default). Returns a dict and prints a rich table.

Fine-tuning (:mod:`passes.pruning.torch_bridge`)
------------------------------------------------
``apply_to_torch(module, plan)`` applies the same plan to the torch module the graph came
from: unstructured / N:M masks through ``torch.nn.utils.prune.custom_from_mask`` (the mask
stays during fine-tuning; ``prune.remove`` makes it permanent), and for channel pruning of
``nn.Sequential``-style CNNs (Conv2d / BatchNorm2d / activations / pools / Flatten / Linear)
a new, smaller ``nn.Sequential`` with the kept channels' weights copied in. Fine-tune that
module, then compile it again (with ``prune`` for the masks to be re-applied exactly).
We chose building the smaller module over masking channels: fine-tuning then runs at the
pruned size and the compiled result is the same module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compiler.ir.graph import Graph
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes.pruning.common import PLAN_KEY, Plan, PruneError

__all__ = ["Prune", "PruneError", "METHODS", "prune_graph"]

METHODS = ("magnitude", "2:4", "n:m", "channel", "head")


def prune_graph(graph: Graph, options: dict, samples=None) -> tuple[int, Plan]:
    """Prune ``graph`` in place by ``options`` (the ``prune=`` dict); returns (layers or blocks
    changed, the plan)."""
    from passes.pruning import heads, magnitude, structured

    method = str(options.get("method", "magnitude"))
    plan = Plan(method, dict(options))
    if method == "magnitude":
        if options.get("plan") == "sensitivity":
            from passes.pruning.sensitivity import sensitivity_plan

            if not samples:
                raise PruneError("plan='sensitivity' needs calibration samples: "
                                 "compile(..., calibration=[{input: array}, ...])")
            sp = sensitivity_plan(graph, samples, float(options.get("sparsity", 0.5)),
                                  verbose=bool(options.get("verbose", True)),
                                  max_sparsity=float(options.get("max_sparsity", 0.9)))
            options = {**options, "sparsities": sp["sparsities"]}
            plan.options["sensitivity"] = sp
        n = magnitude.prune_unstructured(graph, options, plan)
    elif method in ("2:4", "n:m"):
        m_ = int(options.get("m", 4))
        n_ = int(options.get("n", 2))
        if not 0 < n_ < m_:
            raise PruneError(f"N:M pruning needs 0 < n < m, got n={n_}, m={m_}")
        n = magnitude.prune_nm(graph, options, plan, n=n_, m=m_)
    elif method == "channel":
        n = structured.prune_channels(graph, options, plan, samples)
    elif method == "head":
        n = heads.prune_heads(graph, options, plan, samples)
    else:
        raise PruneError(f"prune method {method!r} is not known; accepted: "
                         f"{', '.join(METHODS)}")
    return n, plan


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Prune conv2d/dense weights or attention heads (see the package docstring).

    Before: a fused, canonicalised NCHW float graph. After: the same graph with zeros in the
    weights (magnitude, N:M) or with smaller weights and shapes (channel, head); it computes
    the pruned model exactly (no approximation besides the removed weights). The options come
    from ``ctx.options["prune"]``; non-empty fields here override them."""

    name: ClassVar[str] = "prune"
    method: str = ""
    sparsity: float = -1.0
    scope: str = ""
    importance: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = dict(ctx.options.get("prune") or {})
        for key in ("method", "scope", "importance"):
            if getattr(self, key):
                opts[key] = getattr(self, key)
        if self.sparsity >= 0:
            opts["sparsity"] = self.sparsity
        if not opts:
            opts = {"method": "magnitude"}
        s = opts.get("sparsity", 0.5)
        if not isinstance(s, int | float) or not 0.0 <= float(s) < 1.0:
            raise PruneError(f"prune sparsity {s!r} must be a number in [0, 1)")
        n, plan = prune_graph(graph, opts, ctx.sample_inputs)
        ctx.options[PLAN_KEY] = plan.to_dict()
        ctx.remark(f"prune {plan.method}: {n} layer(s)/group(s) pruned")
        return PassResult(graph, n > 0, {"pruned": n})
