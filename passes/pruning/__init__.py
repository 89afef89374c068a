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
is fused and canonicalised, NCHW, BatchNorm folded) with the dict as its options:
``prune{method=channel,sparsity=0.5,config="{\"ops\":[\"conv2d\"]}",calibration=@calibration}``
(``method``, ``sparsity``, ``scope``, ``importance`` as options, the other keys as a JSON
object in ``config``, the samples by name: ``compiler/samples.py``). ``Prune.from_options``
makes that pass from a dict; the same text replays it in ``npucc opt``.

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

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from compiler.ir.graph import Graph
from compiler.pass_base import Pass, PassContext, PassResult, json_option, register_pass
from compiler.samples import resolve_samples
from passes.pruning import heads, magnitude, structured
from passes.pruning.common import PLAN_KEY, Plan, PruneError
from passes.pruning.sensitivity import sensitivity_plan

__all__ = ["Prune", "PruneError", "METHODS", "prune_graph"]

METHODS = ("magnitude", "2:4", "n:m", "channel", "head")


def prune_graph(graph: Graph, options: dict, samples=None) -> tuple[int, Plan]:
    """Prune ``graph`` in place by ``options`` (the ``prune=`` dict); returns (layers or blocks
    changed, the plan)."""

    method = str(options.get("method", "magnitude"))
    plan = Plan(method, dict(options))
    if method == "magnitude":
        if options.get("plan") == "sensitivity":

            if not samples:
                raise PruneError("plan='sensitivity' needs calibration samples: "
                                 "compile(..., calibration=[{input: array}, ...])")
            sp = sensitivity_plan(graph, samples, float(options.get("sparsity", 0.5)),
                                  verbose=bool(options.get("verbose", True)),
                                  max_sparsity=float(options.get("max_sparsity", 0.9)),
                                  executor=options.get("executor", "serial"))
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
    the pruned model exactly (no approximation besides the removed weights)."""

    name: ClassVar[str] = "prune"
    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = ""
    importance: str = ""
    config: str = ""          # the other keys of the prune= dict, as a JSON object
    calibration: str = ""     # "@name" | "file.npz": samples for calibrated importance

    FIELDS: ClassVar[tuple[str, ...]] = ("method", "sparsity", "scope", "importance")

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"prune sparsity {self.sparsity!r} must be a number in [0, 1)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], calibration: str = "") -> Prune:
        """The pass for a ``prune=`` dict (its string/number keys become options)."""
        opts = dict(options)
        s = opts.get("sparsity", 0.5)
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s < 1.0:
            raise PruneError(f"prune sparsity {s!r} must be a number in [0, 1)")
        kwargs = {k: opts.pop(k) for k in cls.FIELDS if k in opts}
        kwargs["sparsity"] = float(kwargs.get("sparsity", 0.5))
        try:
            config = json_option(opts) if opts else ""
        except TypeError as e:
            raise PruneError(f"prune=: the dict must hold only JSON values so the pipeline "
                             f"text can carry it: {e}") from None
        return cls(config=config, calibration=calibration, **kwargs)

    @property
    def options(self) -> dict[str, Any]:
        """The ``prune=`` dict this pass runs with."""
        opts = json.loads(self.config) if self.config else {}
        if not isinstance(opts, dict):
            raise PruneError("prune{config=...} must be a JSON object")
        opts.update(method=self.method, sparsity=self.sparsity)
        opts.update({k: getattr(self, k) for k in ("scope", "importance") if getattr(self, k)})
        return opts

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        samples = resolve_samples(self.calibration, ctx.resources,
                                  "prune{calibration=...}") if self.calibration else None
        n, plan = prune_graph(graph, self.options, samples)
        ctx.options[PLAN_KEY] = plan.to_dict()
        ctx.remark(f"prune {plan.method}: {n} layer(s)/group(s) pruned")
        return PassResult(graph, n > 0, {"pruned": n})
