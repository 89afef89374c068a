"""Iterative pruning: prune → fine-tune → prune ... for N rounds, to an exact sparsity.

Two forms, both driven by the user's fine-tuning (any callable ``fine_tune(model, round)``;
:func:`fine_tune` is a minimal one):

- :class:`IterativePruner` (unstructured magnitude, torch masks): round ``r`` of ``N`` zeroes
  ``schedule(r)`` of each layer's final count (cubic, Zhu & Gupta 2017, or linear) — the
  smallest ``|w|`` of the masked weight, so what was pruned stays pruned — through
  ``torch.nn.utils.prune.custom_from_mask``, which keeps the zeros while fine-tuning. The
  final counts are exact integers: ``round(target * total)`` weights over all layers
  (:func:`exact_counts`), the per-layer shares following the given per-layer sparsities
  (tiers) scaled to meet the target;
- :func:`prune_channels_iteratively` (structured, ``nn.Sequential`` CNNs): each round compiles
  the current model with ``prune={"method": "channel", "sparsities": ...}`` (our pass picks the
  channels) and rebuilds a smaller torch module (``apply_to_torch``), so the channels are
  really gone; the last round reaches each layer's exact final channel count.

Layer-aware sparsity: :func:`measure_sensitivity` prunes each layer alone and measures the
drop of the user's score; :func:`tier_sparsities` gives the least sensitive third of the
layers ``0.7``, the middle ``0.4`` and the most sensitive ``0.2`` (the preset ``TIERS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from compiler.errors import NpuccError

__all__ = ["TIERS", "IterativePruner", "exact_counts", "fine_tune", "measure_sensitivity",
           "tier_sparsities", "schedule", "prunable_layers", "prune_channels_iteratively"]

TIERS = (0.7, 0.4, 0.2)   # least, medium, most sensitive layers
MAX_LAYER_SPARSITY = 0.98


def schedule(r: int, rounds: int, kind: str = "cubic") -> float:
    """The fraction of the final pruning done after round ``r`` (1-based) of ``rounds``."""
    t = min(max(r / rounds, 0.0), 1.0)
    if kind == "cubic":
        return 1.0 - (1.0 - t) ** 3
    if kind == "linear":
        return t
    raise NpuccError(f"schedule={kind!r} is not 'cubic' or 'linear'")


def prunable_layers(model: nn.Module, types: tuple[type, ...] = (nn.Conv2d, nn.Linear),
                    exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Module path -> module for every layer of ``types`` whose path contains no ``exclude``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, types) and name and not any(e in name for e in exclude)}


def exact_counts(sizes: Mapping[str, int], sparsities: Mapping[str, float],
                 target: float | None = None) -> dict[str, int]:
    """How many weights each layer loses. Without ``target``: ``round(s_l * n_l)``. With it:
    the per-layer sparsities are scaled by one factor (each capped at ``MAX_LAYER_SPARSITY``)
    so that the counts sum to exactly ``round(target * sum n_l)`` (largest remainders)."""
    if target is None:
        return {k: int(round(sparsities[k] * n)) for k, n in sizes.items()}
    total = sum(sizes.values())
    want = int(round(target * total))
    cap = {k: int(math.floor(MAX_LAYER_SPARSITY * n)) for k, n in sizes.items()}
    if want > sum(cap.values()):
        raise NpuccError(f"target sparsity {target} needs {want} of {total} weights pruned; "
                         f"at most {MAX_LAYER_SPARSITY} of each layer can go "
                         f"({sum(cap.values())} weights)")
    rel = {k: max(float(sparsities.get(k, 0.0)), 0.0) for k in sizes}
    if sum(rel[k] * n for k, n in sizes.items()) <= 0:
        rel = dict.fromkeys(sizes, 1.0)

    def removed(c: float) -> dict[str, float]:
        return {k: min(c * rel[k] * n, cap[k]) for k, n in sizes.items()}

    lo, hi = 0.0, 1.0
    while sum(removed(hi).values()) < want and hi < 1e9:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(removed(mid).values()) < want else (lo, mid)
    real = removed(hi)
    counts = {k: min(int(math.floor(v)), cap[k]) for k, v in real.items()}
    short = want - sum(counts.values())
    order = sorted(sizes, key=lambda k: (-(real[k] - counts[k]), k))
    while short > 0:          # largest remainders first, never past a layer's cap
        for k in order:
            if short and counts[k] < cap[k]:
                counts[k] += 1
                short -= 1
    while short < 0:
        for k in order[::-1]:
            if short and counts[k] > 0:
                counts[k] -= 1
                short += 1
    return counts


def _mask_smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask zeroing exactly the ``k`` smallest |w| (ties: lower flat index first)."""
    flat = w.detach().abs().reshape(-1)
    mask = torch.ones_like(flat)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:k]] = 0.0
    return mask.reshape(w.shape)


class IterativePruner:
    """Unstructured magnitude pruning in ``rounds`` steps with fine-tuning in between."""

    def __init__(self, model: nn.Module, sparsity: float | None = 0.5,
                 sparsities: Mapping[str, float] | None = None, rounds: int = 3,
                 schedule: str = "cubic", exclude: Sequence[str] = ()):
        if rounds < 1:
            raise NpuccError(f"rounds must be >= 1, got {rounds}")
        self.model, self.rounds, self.kind = model, rounds, schedule
        self.layers = prunable_layers(model, exclude=exclude)
        if not self.layers:
            raise NpuccError("no Conv2d / Linear layers to prune")
        sizes = {k: m.weight.numel() for k, m in self.layers.items()}
        per = dict(sparsities or {})
        unknown = [k for k in per if k not in sizes]
        if unknown:
            raise NpuccError(f"sparsities for unknown layers {unknown}; layers: {list(sizes)}")
        if sparsity is None and not per:
            raise NpuccError("give sparsity= (global target) or sparsities= (per layer)")
        rel = {k: per.get(k, sparsity if sparsity is not None else 0.0) for k in sizes}
        self.final = exact_counts(sizes, rel, sparsity)
        self.done = 0

    def step(self) -> dict[str, float]:
        """Prune the next round; returns each layer's sparsity now."""
        if self.done >= self.rounds:
            raise NpuccError(f"all {self.rounds} rounds are done")
        self.done += 1
        frac = schedule(self.done, self.rounds, self.kind)
        for name, m in self.layers.items():
            k = self.final[name] if self.done == self.rounds else \
                int(round(frac * self.final[name]))
            mask = _mask_smallest(m.weight, k)   # m.weight is orig * mask once installed
            if tprune.is_pruned(m):
                tprune.remove(m, "weight")
            tprune.custom_from_mask(m, "weight", mask)
        return self.sparsity()

    def run(self, fine_tune: Callable[[nn.Module, int], Any] | None = None
            ) -> dict[str, float]:
        """All remaining rounds, ``fine_tune(model, round)`` after each (the last one's
        fine-tuning recovers from the final cut; the masks keep the zeros)."""
        out: dict[str, float] = {}
        while self.done < self.rounds:
            out = self.step()
            if fine_tune is not None:
                fine_tune(self.model, self.done)
        return out

    def sparsity(self) -> dict[str, float]:
        return {k: float((m.weight == 0).sum()) / m.weight.numel()
                for k, m in self.layers.items()}

    def total_sparsity(self) -> float:
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        return zeros / sum(m.weight.numel() for m in self.layers.values())

    def finalize(self) -> nn.Module:
        """Make the zeros permanent (plain ``weight`` parameters again) and return the model."""
        for m in self.layers.values():
            if tprune.is_pruned(m):
                tprune.remove(m, "weight")
        return self.model


def fine_tune(model: nn.Module, data: Iterable[tuple[Any, Any]],
              loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, epochs: int = 1,
              lr: float = 1e-3) -> nn.Module:
    """A minimal loop: Adam, ``loss_fn(model(x), y)`` (cross entropy by default)."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    batches = list(data)
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def measure_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                        probe: float = 0.5, exclude: Sequence[str] = ()
                        ) -> dict[str, float]:
    """Layer path -> ``evaluate(model) - evaluate(model with that layer alone pruned to
    probe)`` (a higher score is better; the weights are restored after each probe)."""
    model.eval()
    base = float(evaluate(model))
    out = {}
    for name, m in prunable_layers(model, exclude=exclude).items():
        saved = m.weight.detach().clone()
        k = int(round(probe * saved.numel()))
        m.weight.mul_(_mask_smallest(saved, k))
        out[name] = base - float(evaluate(model))
        m.weight.copy_(saved)
    return out


def tier_sparsities(sensitivity: Mapping[str, float], tiers: Sequence[float] = TIERS
                    ) -> dict[str, float]:
    """Least sensitive third of the layers -> ``tiers[0]``, middle -> ``tiers[1]``, most
    sensitive -> ``tiers[2]`` (ties keep the layers' order)."""
    names = sorted(sensitivity, key=lambda k: sensitivity[k])
    n, t = len(names), len(tiers)
    return {k: float(tiers[min(i * t // max(n, 1), t - 1)]) for i, k in enumerate(names)}


def prune_channels_iteratively(model: nn.Module, example_inputs: tuple, *,
                               sparsity: float = 0.5,
                               sparsities: Mapping[str, float] | None = None,
                               rounds: int = 3, schedule_kind: str = "cubic",
                               fine_tune: Callable[[nn.Module, int], Any] | None = None,
                               calibration: Sequence[Mapping[str, Any]] | None = None,
                               ops: Sequence[str] = ("conv2d",),
                               importance: str = "l1") -> tuple[nn.Module, dict[str, Any]]:
    """Structured channel pruning of an ``nn.Sequential`` CNN in ``rounds`` rounds.

    Each layer ``l`` (a Conv2d, or a Linear with ``ops`` containing "dense", except the
    last) ends with exactly ``max(1, C_l - round(s_l * C_l))`` output channels (the rounding
    of the channel pass). Returns the smaller model and the rounds' plans."""
    from compiler.driver import compile as npucc_compile
    from passes.pruning.torch_bridge import apply_to_torch

    types = tuple(t for op, t in (("conv2d", nn.Conv2d), ("dense", nn.Linear)) if op in ops)
    layers = prunable_layers(model, types)
    if types and nn.Linear in types:   # the classifier's outputs are the model's
        layers.pop(list(layers)[-1], None)
    width = {k: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
             for k, m in layers.items()}
    per = {k: float((sparsities or {}).get(k, sparsity)) for k in layers}
    final = {k: max(1, c - int(round(per[k] * c))) for k, c in width.items()}
    plans = []
    cur = model
    for r in range(1, rounds + 1):
        frac = schedule(r, rounds, schedule_kind)
        now = {k: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
               for k, m in prunable_layers(cur, types).items() if k in final}
        keep = {k: final[k] if r == rounds else
                width[k] - int(round(frac * (width[k] - final[k]))) for k in final}
        rel = {k: (now[k] - min(keep[k], now[k])) / now[k] for k in final}
        compiled = npucc_compile(cur, "host", example_inputs=example_inputs, progress=False,
                                 calibration=calibration,
                                 prune={"method": "channel", "sparsity": 0.0, "ops": list(ops),
                                        "sparsities": rel, "importance": importance})
        plan = compiled.prune_plan
        cur = apply_to_torch(cur, plan)
        plans.append(plan)
        if fine_tune is not None:
            fine_tune(cur, r)
    got = {k: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
           for k, m in prunable_layers(cur, types).items() if k in final}
    if got != final:
        raise NpuccError(f"channel pruning ended at {got}, not the planned {final}")
    return cur.eval(), {"final_channels": final, "rounds": plans}
