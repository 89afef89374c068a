"""Compression that trains: quantization-aware training, distillation, iterative pruning.

- ``qat.py``: ``prepare_qat`` / ``calibrate_qat`` / ``convert`` (fake quantization equal to
  the quantize passes' arithmetic, ``fake_quant.py``), ending in ``compile(quantize=...)``;
- ``distill.py``: ``Distiller`` (response KL with temperature, feature MSE with learned
  projections, multi-teacher weights from validation accuracy);
- ``iterative.py``: prune → fine-tune → prune rounds to an exact sparsity, per-layer tiers
  from measured sensitivity;
- ``plan.py``: ``compress(model, data, device=, budget_mb=, latency_ms=)``: sparsity and
  precision chosen from the target description's cost model and the budgets.

Importing this package imports torch; ``import compiler`` does not.
"""

from __future__ import annotations

from compiler.compress.distill import Distiller, DistillLoss, teacher_weights
from compiler.compress.iterative import (
    TIERS,
    IterativePruner,
    exact_counts,
    fine_tune,
    measure_sensitivity,
    prune_channels_iteratively,
    tier_sparsities,
)
from compiler.compress.plan import (
    BudgetError,
    Candidate,
    CompressResult,
    compress,
    plan_compression,
)
from compiler.compress.qat import (
    Converted,
    QATConfig,
    calibrate_qat,
    convert,
    fold_batchnorm,
    prepare_qat,
)

__all__ = ["TIERS", "BudgetError", "Candidate", "CompressResult", "Converted", "compress",
           "plan_compression", "DistillLoss", "Distiller", "IterativePruner", "QATConfig",
           "calibrate_qat", "convert", "exact_counts", "fine_tune", "fold_batchnorm",
           "measure_sensitivity", "prepare_qat", "prune_channels_iteratively", "teacher_weights",
           "tier_sparsities"]
