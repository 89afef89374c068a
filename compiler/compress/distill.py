"""Knowledge distillation in the user's own training loop.

```python
d = Distiller(teacher, student, features=[("3", "3")], temperature=4.0, alpha=0.7)
opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-3)
for x, y in batches:
    loss = d(x, labels=y)          # a DistillLoss; loss.total is what to minimise
    opt.zero_grad(); loss.total.backward(); opt.step()
```

Losses (``DistillLoss``; ``T`` the temperature, ``B`` the batch):

- response ``"kl"``: ``T^2 * sum_b KL(p_t || p_s) / B`` with ``p = softmax(logits / T)`` over
  the last axis (Hinton et al.); with several teachers ``p_t = sum_i w_i p_t_i``;
  ``"mse"`` (embeddings): ``mean((s - sum_i w_i t_i)^2)``; ``"none"``;
- feature: for each ``(teacher_layer, student_layer)`` pair of module paths, ``mean((P(s) -
  t)^2)`` of the two modules' outputs (forward hooks), ``P`` a learned projection (a 1x1 conv
  on [B, C, H, W] features, a linear layer on [..., C] ones) when the widths differ, the
  identity otherwise; pairs average; features come from the first teacher;
- task: cross entropy with the labels when given (else 0);
- ``total = alpha * response + (1 - alpha) * task + beta * feature``.

Teachers are frozen (eval mode, no gradients). Multi-teacher weights default to equal; give
``teacher_weights=`` or compute them with :func:`teacher_weights` from each teacher's top-1 on
a validation set (``w_i = acc_i / sum_j acc_j``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiler.errors import NpuccError

__all__ = ["Distiller", "DistillLoss", "teacher_weights", "response_kl", "output_tensor"]

RESPONSES = ("kl", "mse", "none")


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``.logits``, ``.last_hidden_state``,
    or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise NpuccError(f"distillation: cannot find the output tensor in a {type(out).__name__}; "
                     "pass output_fn=")


def response_kl(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """``T^2 * sum KL(p_t || softmax(s / T)) / batch`` (batch = every leading row)."""
    log_ps = torch.log_softmax(student / temperature, dim=-1).reshape(-1, student.shape[-1])
    pt = teacher_probs.reshape(-1, student.shape[-1])
    kl = torch.sum(torch.where(pt > 0, pt * (torch.log(pt.clamp_min(1e-30)) - log_ps),
                               torch.zeros_like(pt)))
    return kl / pt.shape[0] * temperature ** 2


@dataclass
class DistillLoss:
    total: torch.Tensor
    response: torch.Tensor
    feature: torch.Tensor
    task: torch.Tensor

    def items(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "response", "feature",
                                                             "task")}


def _module(model: nn.Module, path: str, role: str) -> nn.Module:
    mods = dict(model.named_modules())
    if path not in mods:
        near = ", ".join(list(mods)[1:12])
        raise NpuccError(f"distillation: the {role} has no module {path!r}; some of its "
                         f"modules: {near}")
    return mods[path]


def _width(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 4 else t.shape[-1]


def _declared_width(m: nn.Module) -> int | None:
    for key in ("out_channels", "out_features", "num_features", "embedding_dim"):
        if isinstance(getattr(m, key, None), int):
            return getattr(m, key)
    shape = getattr(m, "normalized_shape", None)
    return int(shape[-1]) if shape else None


class Distiller(nn.Module):
    """Response + feature distillation of ``student`` from one or several ``teachers``."""

    def __init__(self, teachers: nn.Module | Sequence[nn.Module], student: nn.Module, *,
                 response: str = "kl", features: Iterable[tuple[str, str]] = (),
                 temperature: float = 4.0, alpha: float = 0.5, beta: float = 1.0,
                 teacher_weights: Sequence[float] | None = None,
                 output_fn: Callable[[Any], torch.Tensor] = output_tensor,
                 example_inputs: tuple | Mapping[str, Any] | None = None):
        super().__init__()
        if response not in RESPONSES:
            raise NpuccError(f"Distiller: response={response!r} is not one of "
                             f"{', '.join(RESPONSES)}")
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise NpuccError("Distiller: temperature must be > 0 and alpha in [0, 1]")
        ts = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
        w = [1.0 / len(ts)] * len(ts) if teacher_weights is None else \
            [float(v) for v in teacher_weights]
        if len(w) != len(ts) or any(v < 0 for v in w) or sum(w) <= 0:
            raise NpuccError(f"Distiller: {len(ts)} teachers need as many non-negative "
                             f"weights, got {list(w)}")
        self.weights = [v / sum(w) for v in w]
        self.teachers = ts                      # a plain list: not trained, not saved with us
        for t in ts:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
        self.student = student
        self.response, self.temperature = response, float(temperature)
        self.alpha, self.beta, self.output_fn = float(alpha), float(beta), output_fn
        self.pairs = list(features)
        self.proj = nn.ModuleDict()
        self._seen: dict[str, torch.Tensor] = {}
        self._hooks = []
        mods = []
        for i, (tl, sl) in enumerate(self.pairs):
            mods.append((_module(ts[0], tl, "teacher"), _module(student, sl, "student")))
            self._hook(mods[-1][0], f"t{i}")
            self._hook(mods[-1][1], f"s{i}")
        self._make_projections(mods, example_inputs)

    def _make_projections(self, mods: list[tuple[nn.Module, nn.Module]],
                          example_inputs: tuple | Mapping[str, Any] | None) -> None:
        """Projections exist before the user builds an optimizer: widths from the modules'
        types, or from one forward pass on ``example_inputs``."""
        if example_inputs is not None and mods:
            args, kw = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) \
                else (tuple(example_inputs), {})
            with torch.no_grad():
                self.teachers[0](*args, **kw)
                self.student(*args, **kw)
            for i in range(len(mods)):
                self._projection(i, self._seen[f"s{i}"], self._seen[f"t{i}"])
            return
        for i, (tm, sm) in enumerate(mods):
            ct, cs = _declared_width(tm), _declared_width(sm)
            if ct is None or cs is None:
                raise NpuccError(f"distillation: cannot tell the width of feature pair "
                                 f"{self.pairs[i]} from its modules; pass example_inputs=")
            spatial = isinstance(sm, nn.Conv2d) or isinstance(sm, nn.BatchNorm2d)
            self.proj[str(i)] = nn.Identity() if cs == ct else \
                (nn.Conv2d(cs, ct, 1, bias=False) if spatial else nn.Linear(cs, ct, bias=False))

    def _hook(self, module: nn.Module, key: str) -> None:
        def save(_m, _inp, out):
            self._seen[key] = output_tensor(out)
        self._hooks.append(module.register_forward_hook(save))

    def remove(self) -> None:
        """Remove the forward hooks (the student is then the plain module again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad] + \
            list(self.proj.parameters())

    def _projection(self, i: int, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        key = str(i)
        if key not in self.proj:
            cs, ct = _width(s), _width(t)
            if cs == ct:
                self.proj[key] = nn.Identity()
            elif s.dim() == 4:
                self.proj[key] = nn.Conv2d(cs, ct, 1, bias=False)
            else:
                self.proj[key] = nn.Linear(cs, ct, bias=False)
        return self.proj[key]

    def feature_loss(self) -> torch.Tensor:
        if not self.pairs:
            return torch.zeros(())
        losses = []
        for i in range(len(self.pairs)):
            s, t = self._seen[f"s{i}"], self._seen[f"t{i}"].detach()
            p = self._projection(i, s, t)(s)
            if p.shape != t.shape:
                raise NpuccError(f"distillation: features {self.pairs[i]} have shapes "
                                 f"{list(t.shape)} (teacher) and {list(p.shape)} (student, "
                                 "projected); only the channel width may differ")
            losses.append(torch.mean((p - t) ** 2))
        return torch.stack(losses).mean()

    def forward(self, *inputs: Any, labels: torch.Tensor | None = None, **kw: Any
                ) -> DistillLoss:
        """The losses on one batch; positional and keyword inputs go to every model."""
        with torch.no_grad():
            touts = [self.output_fn(t(*inputs, **kw)) for t in self.teachers]
        s_out = self.output_fn(self.student(*inputs, **kw))
        zero = torch.zeros((), dtype=s_out.dtype)
        if self.response == "kl":
            probs = sum(w * torch.softmax(t / self.temperature, dim=-1)
                        for w, t in zip(self.weights, touts, strict=True))
            resp = response_kl(s_out, probs, self.temperature)
        elif self.response == "mse":
            target = sum(w * t for w, t in zip(self.weights, touts, strict=True))
            resp = torch.mean((s_out - target) ** 2)
        else:
            resp = zero
        task = nn.functional.cross_entropy(s_out, labels) if labels is not None else zero
        feat = self.feature_loss()
        total = self.alpha * resp + (1 - self.alpha) * task + self.beta * feat
        return DistillLoss(total, resp, feat, task)


@torch.no_grad()
def teacher_weights(teachers: Sequence[nn.Module], data: Iterable[tuple[Any, torch.Tensor]],
                    output_fn: Callable[[Any], torch.Tensor] = output_tensor) -> list[float]:
    """``acc_i / sum_j acc_j`` from each teacher's top-1 on ``data`` (``(inputs, labels)``
    batches); equal weights when every teacher scores 0."""
    hits = [0] * len(teachers)
    total = 0
    for x, y in data:
        total += int(y.numel())
        for i, t in enumerate(teachers):
            t.eval()
            hits[i] += int((output_fn(t(x)).argmax(-1) == y).sum())
    if total == 0:
        raise NpuccError("teacher_weights: the validation data is empty")
    acc = [h / total for h in hits]
    s = sum(acc)
    return [a / s for a in acc] if s > 0 else [1.0 / len(acc)] * len(acc)
