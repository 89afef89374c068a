"""Device-aware compression of a decoder LLM from a text: ``compress_llm(model, text, ...)``.

```python
r = compress_llm("SmolLM2-135M-Instruct.Q4_1.gguf", open("notes.txt").read(),
                 device="kirin990", budget_mb=120, qat_steps=100)
r.scheme, r.stages        # the precision chosen; perplexity at each stage
r.model.generate("Hello", 16)
```

- The text is tokenized and split once: the first ``1 - eval_fraction`` of its tokens are the
  calibration / training tokens (QAT and distillation see only them), the rest are held out
  for the perplexity printed at each stage (windows of ``window`` tokens), never trained on.
- Precision comes from the budget: the candidate schemes (``SCHEMES``: f32, int8, int4 g32,
  int4 g128, int3 g128, most precise first) are quantized as ``compile_llm`` would quantize them, and the
  first whose weight bytes fit ``budget_mb`` is the plan (the weight bytes each scheme stores
  are printed). None fitting is refused with :class:`BudgetError` naming the smallest.
- Stages, each with its measured held-out perplexity: the float model, PTQ (round to nearest
  on the scheme's grid, in torch), QAT with distillation from the float model
  (``qat_steps > 0``, int4 and int3 schemes: :mod:`compiler.compress.llm_qat`), and the compiled
  package (``compile_llm``; with QAT its codes and learned scales go in as they are). The
  package's decode estimate on ``device`` is printed (``estimate_decode``).

``compile_llm`` builds for the CPU it runs on, so the package is built for ``host`` when
``device`` is another architecture (kirin990's aarch64): the device sets the budget check
and the decode estimate.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compiler.compress.plan import MIB, BudgetError
from compiler.errors import NpuccError

__all__ = ["SCHEMES", "LlmCompressResult", "compress_llm", "choose_scheme", "split_tokens",
           "scheme_bytes"]

SCHEMES = ("f32", "int8", "int4-g32", "int4-g128", "int3-g128")
QAT_GRIDS = ("int4", "int3")        # the schemes with a PTQ and a QAT stage


@dataclass
class LlmCompressResult:
    model: Any                                  # runtime.llm.LanguageModel
    scheme: str
    weight_bytes: dict[str, int]                # scheme -> weight bytes (what it stores)
    stages: dict[str, float] = field(default_factory=dict)   # stage -> held-out perplexity
    training: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None


def split_tokens(ids: list[int], eval_fraction: float, window: int
                 ) -> tuple[list[int], list[list[int]]]:
    """(training tokens, evaluation windows): the first ``1 - eval_fraction`` of ``ids``
    and the rest cut into ``window``-token windows (no token in both)."""
    from compiler.compress.llm_qat import token_windows

    if not 0 < eval_fraction < 1:
        raise NpuccError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(ids) * (1 - eval_fraction))
    windows = token_windows(ids[cut:], window)
    if not windows or cut < 2 * window:
        raise NpuccError(f"the text has {len(ids)} tokens; compress_llm needs at least "
                         f"{2 * window} for training and {window} held out ({eval_fraction:.0%}"
                         f" of the text): give a longer text or a smaller window")
    return ids[:cut], windows


def scheme_bytes(spec: Any, scheme: str) -> int:
    """The weight bytes ``spec`` stores under ``scheme`` (quantized as compile_llm does)."""
    from compiler.llm.quantize import parse_scheme, quantize_spec

    s = parse_scheme(None if scheme == "f32" else scheme)
    q = spec if s is None else quantize_spec(spec, s)
    return int(sum(a.nbytes for a in q.weights.values()))


def choose_scheme(spec: Any, budget_mb: float | None, schemes: tuple[str, ...] = SCHEMES,
                  say: Callable[[str], None] = print) -> tuple[str, dict[str, int]]:
    """(the most precise scheme whose weight bytes fit ``budget_mb``, every scheme's bytes);
    :class:`BudgetError` with the smallest achievable size when none fits."""
    sizes = {s: scheme_bytes(spec, s) for s in schemes}
    fits = [s for s in schemes if budget_mb is None or sizes[s] <= budget_mb * MIB]
    for s in schemes:
        say(f"  {'fits' if s in fits else 'over'} {s}: {sizes[s] / MIB:.2f} MiB weights")
    if not fits:
        small = min(sizes, key=sizes.get)
        raise BudgetError(f"no precision fits budget_mb={budget_mb}: the closest is {small} "
                          f"at {sizes[small] / MIB:.2f} MiB of weights")
    return fits[0], sizes


def _load(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    from compiler.llm.hf_import import load_transformers

    if isinstance(model, str | os.PathLike):
        hf, tok = load_transformers(model)
        return hf, tokenizer if tokenizer is not None else tok
    if hasattr(model, "config") and hasattr(model, "state_dict"):
        return model.eval(), tokenizer
    raise NpuccError(f"compress_llm takes a .gguf file, a transformers folder or a causal-LM "
                     f"model, not a {type(model).__name__}")


def _build_target(device: Any) -> tuple[Any, str]:
    """(the device's description, the target the package is built for)."""
    from compiler.llm.compile import ARCH
    from targets.description import load_target

    desc = load_target(device)
    here = ARCH.get(platform.machine(), platform.machine())
    return desc, (device if desc.cpu.arch == here else "host")


def compress_llm(model: Any, text: str, device: Any = "host", *, tokenizer: Any = None,
                 budget_mb: float | None = None, schemes: tuple[str, ...] = SCHEMES,
                 qat_steps: int = 0, seq: int = 128, window: int = 256,
                 eval_fraction: float = 0.2, max_eval_windows: int = 8,
                 max_context: int = 512, chunk: int = 32, lr: float = 2e-5,
                 scale_lr: float = 2e-3, temperature: float = 1.0,
                 output: str | os.PathLike | None = None,
                 say: Callable[[str], None] = print) -> LlmCompressResult:
    """Plan, quantize (PTQ, or QAT with distillation when ``qat_steps``), compile; prints
    every stage's held-out perplexity (see the module docstring)."""
    import torch

    from compiler.compress.llm_qat import (
        LlmQATConfig,
        llm_qat_spec,
        logits_perplexity,
        perplexity,
        prepare_llm_qat,
        train_llm_qat,
    )
    from compiler.llm.compile import compile_llm
    from compiler.llm.estimate import estimate_decode
    from compiler.llm.hf_import import spec_from_transformers

    hf, tok = _load(model, tokenizer)
    if tok is None:
        raise NpuccError("compress_llm needs the model's tokenizer to read the text "
                         "(tokenizer=, or a model folder / .gguf that has one)")
    desc, build_for = _build_target(device)
    ids = list(tok(text)["input_ids"])
    train_ids, windows = split_tokens(ids, eval_fraction, window)
    windows = windows[:max_eval_windows]
    say(f"compress {getattr(hf.config, 'model_type', 'llm')} for {desc.name}: "
        f"{len(ids)} tokens of text, {len(train_ids)} for calibration/training, "
        f"{len(windows)} x {window} held out; budget_mb={budget_mb}")
    scheme, sizes = choose_scheme(spec_from_transformers(hf, tok), budget_mb, schemes, say)
    say(f"plan: {scheme}" + (f", QAT {qat_steps} steps of {seq} tokens with distillation"
                             if qat_steps and scheme.startswith(QAT_GRIDS) else ""))
    stages = {"float": perplexity(hf, windows)}
    say(f"  float: perplexity {stages['float']:.3f}")
    training = None
    source: Any = hf
    quantize = None if scheme == "f32" else scheme
    if scheme.startswith(QAT_GRIDS):
        bits, group = int(scheme[3]), int(scheme.split("-g")[1])
        student = prepare_llm_qat(hf, LlmQATConfig(bits=bits, group_size=group))
        stages["ptq"] = perplexity(student, windows)
        say(f"  PTQ {scheme}: perplexity {stages['ptq']:.3f}")
        if qat_steps > 0:
            torch.manual_seed(0)
            training = train_llm_qat(student, hf, train_ids, steps=qat_steps, seq=seq, lr=lr,
                                     scale_lr=scale_lr, temperature=temperature, progress=say)
            stages["qat"] = perplexity(student, windows)
            say(f"  QAT: perplexity {stages['qat']:.3f} ({training['steps']} steps, "
                f"{training['seconds']:.0f} s)")
            source, quantize = llm_qat_spec(student, tok), None
    t0 = time.perf_counter()
    m = compile_llm(source, build_for, max_context=max(max_context, window), chunk=chunk,
                    quantize=quantize, tokenizer=tok, output=output)
    stages["compiled"] = logits_perplexity(m.logits, windows)
    est = estimate_decode(m, desc)
    say(f"  compiled for {build_for} in {time.perf_counter() - t0:.0f} s: perplexity "
        f"{stages['compiled']:.3f}, {m.stats()['weight_bytes'] / MIB:.2f} MiB weights; "
        f"decode on {desc.name}: {est['summary']}")
    if budget_mb is not None and m.stats()["weight_bytes"] > budget_mb * MIB:
        raise BudgetError(f"{scheme} compiled to {m.stats()['weight_bytes'] / MIB:.2f} MiB of "
                          f"weights, over budget_mb={budget_mb}")
    return LlmCompressResult(m, scheme, sizes, stages, training, est)
