"""The training route of ``compress``: prune → QAT → distillation on the user's labelled
batches. Pruning needs a torch ``nn.Sequential`` CNN (the structure ``apply_to_torch``
rebuilds); QAT and distillation take any module whose Conv2d / Linear layers ``prepare_qat``
wraps (``compress`` plans only unpruned candidates for other modules).

For a plan ``(sparsity, precision)``:

1. prune: :func:`~compiler.compress.iterative.prune_channels_iteratively` in ``rounds``
   rounds, each followed by ``epochs`` of distillation from the original model
   (:class:`~compiler.compress.distill.Distiller`, KL at ``temperature`` + cross entropy);
2. quantize: :func:`~compiler.compress.qat.prepare_qat` with the plan's precision (int8
   convs; int8 or int4 Linear layers), ranges from the batches' inputs, ``epochs`` of the
   same distillation, :func:`~compiler.compress.qat.convert`;
3. compile for the target with the learned ranges.

Each stage prints its top-1 on ``val`` (torch for the float stages, the compiled package at
the end). Float plans skip step 2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from compiler.compress.distill import Distiller
from compiler.compress.iterative import prune_channels_iteratively
from compiler.compress.qat import QATConfig, convert, prepare_qat
from compiler.errors import NpuccError

__all__ = ["train_route", "QAT_PRECISIONS"]

QAT_PRECISIONS = {"int8": QATConfig(conv="int8", linear="int8"),
                  "int4": QATConfig(conv="int8", linear="int4", group_size=32)}


def _distill_epochs(teacher: nn.Module, student: nn.Module, batches: Sequence[tuple],
                    epochs: int, lr: float, temperature: float) -> None:
    d = Distiller(teacher, student, temperature=temperature, alpha=0.7)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        for x, y in batches:
            loss = d(x, labels=y).total
            opt.zero_grad()
            loss.backward()
            opt.step()
    d.remove()
    student.eval()


def _top1(predict: Callable[[np.ndarray], np.ndarray], val: Sequence[tuple]) -> float:
    hits = total = 0
    for x, y in val:
        xs = x.numpy()
        for i in range(len(xs)):
            hits += int(np.argmax(predict(xs[i:i + 1])) == int(y[i]))
            total += 1
    return hits / max(total, 1)


def train_route(model: nn.Module, plan: Any, desc: Any, train: Sequence[tuple],
                val: Sequence[tuple], example_inputs: tuple, *, epochs: int = 2,
                rounds: int = 2, lr: float = 1e-3, temperature: float = 4.0,
                prune_ops: Sequence[str] | None = None,
                say: Callable[..., None] = print) -> Any:
    """Prune, quantize-aware train and compile ``model`` as ``plan`` says (see module doc)."""
    from compiler.driver import compile as npucc_compile

    if plan.sparsity > 0 and not isinstance(model, nn.Sequential):
        raise NpuccError("compress(train=...) prunes nn.Sequential CNNs only (apply_to_torch "
                         f"rebuilds them); got a {type(model).__name__}: plan sparsities=(0,) "
                         "(QAT and distillation only) or use the PTQ route (no train=)")
    teacher = copy.deepcopy(model).eval()

    def torch_top1(m: nn.Module) -> float:
        with torch.no_grad():
            return _top1(lambda x: m(torch.from_numpy(x)).numpy(), val)

    say(f"  float: top-1 {torch_top1(teacher):.4f}")
    student = copy.deepcopy(model)
    if plan.sparsity > 0:
        student, _ = prune_channels_iteratively(
            student, example_inputs, sparsity=plan.sparsity, rounds=rounds,
            ops=tuple(prune_ops or ("conv2d", "dense")),     # the channel pass's default
            fine_tune=lambda m, r: _distill_epochs(teacher, m, train, epochs, lr, temperature))
        say(f"  pruned {100 * plan.sparsity:.0f}% channels in {rounds} rounds, distilled "
            f"{epochs} epochs each: top-1 {torch_top1(student):.4f}")
    quantize = None
    if plan.precision in QAT_PRECISIONS:
        qm = prepare_qat(student, QAT_PRECISIONS[plan.precision],
                         calibration=[x for x, _ in train])
        say(f"  fake-quantized ({plan.precision}), before QAT: top-1 {torch_top1(qm):.4f}")
        _distill_epochs(teacher, qm, train, epochs, lr * 0.3, temperature)
        say(f"  QAT + distillation {epochs} epochs: top-1 {torch_top1(qm):.4f}")
        conv = convert(qm)
        student, quantize = conv.module, conv.quantize
    elif plan.precision != "float":
        raise NpuccError(f"compress(train=...): no QAT for precision {plan.precision!r}; "
                         f"QAT covers {', '.join(QAT_PRECISIONS)} and float")
    m = npucc_compile(student, desc, example_inputs=example_inputs, quantize=quantize,
                      progress=False)
    name = m.input_names[0]
    say(f"  compiled: top-1 {_top1(lambda x: m.run({name: x})[0], val):.4f}")
    return m
