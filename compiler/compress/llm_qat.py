"""Quantization-aware training of decoder LLMs (transformers causal LMs) for ``compile_llm``.

```python
student = prepare_llm_qat(model, LlmQATConfig(bits=4, group_size=128))
train_llm_qat(student, teacher=model, ids=train_ids, steps=200)   # KL on logits, temperature
spec = llm_qat_spec(student, tokenizer)       # codes + learned scales, as compile_llm reads them
m = compile_llm(spec)                          # the package computes what ``student`` computes
```

``prepare_llm_qat`` copies the model and replaces every projection of every layer (q, k, v,
o, gate, up, down: the ones ``compile_llm`` quantizes) with :class:`GroupQuantLinear`:
weight-only, symmetric, groups along K (the group ``compile_llm`` uses for that K:
``effective_group``, so SmolLM2's K=576 at g128 is g64), scales initialised as the
quantizer's round-to-nearest ones (Q4_0's ``d = signed max / -8``; for b bits
``/ -2^(b-1)``, codes ``-2^(b-1) .. 2^(b-1)-1``) and rounded to f16 in every forward pass
(the package stores f16 scales). With ``learn_scales`` each group's scale is ``d0 * exp(u)``
with ``u`` trained (LSQ-style: the gradient reaches ``u`` through the straight-through
rounding); with ``train_weights`` the float weights are trained too (the straight-through
estimator). The token embedding (and an untied output head) are snapped once to the int8 grid
``compile_llm`` gives them and frozen, so the student's forward pass is the package's
arithmetic up to f32 summation order.

``llm_qat_spec`` turns the student into the quantized :class:`compiler.llm.hf_import.LlmSpec`
``compile_llm`` takes as it is: the codes and learned f16 scales of each projection go in
exactly (no re-quantization).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from compiler.errors import NpuccError

__all__ = ["LlmQATConfig", "GroupQuantLinear", "GroupFakeQuant", "prepare_llm_qat",
           "train_llm_qat", "llm_qat_spec", "qat_codes", "perplexity", "logits_perplexity",
           "token_windows", "PROJECTION_PATHS"]

# our projection names (compiler.llm.quantize.PROJECTIONS) -> the Llama module path
PROJECTION_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                    "down": "mlp.down_proj"}


@dataclass(frozen=True)
class LlmQATConfig:
    """``bits``: 2, 3 or 4; ``group_size``: along K; ``asym``: a scale and an offset per group
    (None: compile_llm's grid for ``bits``: symmetric Q4_0 at 4 bits, asymmetric at 3/2 bits,
    which compile_llm only stores asymmetric); ``learn_scales``: train a gain per group scale
    (and the offsets); ``train_weights``: train the float weights (straight-through);
    ``train_norms``: train the RMSNorm weights."""

    bits: int = 4
    group_size: int = 128
    asym: bool | None = None
    learn_scales: bool = True
    train_weights: bool = True
    train_norms: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise NpuccError(f"LlmQATConfig: bits={self.bits} is not 2, 3 or 4 (the group "
                             f"grids compile_llm stores)")
        if self.group_size < 8:
            raise NpuccError(f"LlmQATConfig: group_size={self.group_size} is below 8")
        if self.asym is False and self.bits < 4:
            raise NpuccError(f"LlmQATConfig: {self.bits}-bit groups are asymmetric in "
                             f"compile_llm; asym=False is int4 only")

    @property
    def label(self) -> str:
        """compile_llm's name of the grid (``int4-g128``, ``int4-g128-asym``, ``int3-g128``)."""
        return f"int{self.bits}-g{self.group_size}" + ("-asym" if self.asym and self.bits == 4
                                                        else "")


def signed_group_scales(wg: torch.Tensor, bits: int) -> torch.Tensor:
    """``gptq.group_scales`` generalised to b bits for ``wg[N, G, g]``: f16 ``m / -2^(b-1)``
    (``m`` the signed largest-magnitude weight of the group) as float32 ``[N, G]``; an
    all-zero group gets 1, an f16 underflow the smallest f16 subnormal with its sign."""
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(wg, -1, idx)[..., 0]
    d = torch.clamp(m / -float(2 ** (bits - 1)), -65504.0, 65504.0)
    d16 = d.half()
    tiny = (d16 == 0) & (d != 0)
    d16 = torch.where(tiny, torch.sign(d).half() * torch.tensor(6e-8, dtype=torch.float16), d16)
    return torch.where(d == 0, torch.ones_like(d16), d16).float()


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, identity gradient to ``x``."""
    return x + (value - x).detach()


class GroupFakeQuant(torch.autograd.Function):
    """``clip(rint((w - c) / d), qlo, qhi) * d + c`` for ``w[N, G, g]``, ``d[N, G, 1]`` and an
    optional offset ``c[N, G, 1]`` (None: 0), with the straight-through gradient to ``w``
    (inside the grid) and LSQ+'s to ``d`` (``q - (w - c) / d`` inside, ``q`` where clipped)
    and ``c`` (1 where clipped). Only ``w``, ``d`` and ``c`` are kept for the backward pass
    (an autograd graph of the same arithmetic keeps four weight-sized tensors per
    projection: 4.5 GB more for SmolLM2)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None, qlo: int,
                qhi: int) -> torch.Tensor:
        ctx.save_for_backward(w, d, c)
        ctx.qlo, ctx.qhi = qlo, qhi
        if c is None:
            return torch.clamp(torch.round(w / d), qlo, qhi) * d
        return torch.clamp(torch.round((w - c) / d), qlo, qhi) * d + c

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        w, d, c = ctx.saved_tensors
        x = w / d if c is None else (w - c) / d
        r = torch.round(x)
        inside = (r >= ctx.qlo) & (r <= ctx.qhi)
        gw = torch.where(inside, gy, torch.zeros_like(gy)) if ctx.needs_input_grad[0] else None
        gd = gc = None
        if ctx.needs_input_grad[1]:
            gd = (gy * (torch.clamp(r, ctx.qlo, ctx.qhi) - torch.where(inside, x, 0.0))
                  ).sum(dim=-1, keepdim=True)
        if c is not None and ctx.needs_input_grad[2]:
            gc = torch.where(inside, 0.0, gy).sum(dim=-1, keepdim=True)
        return gw, gd, gc, None, None


class GroupQuantLinear(nn.Module):
    """A ``Linear`` whose weight is fake-quantized group-wise: ``W = clip(rint((w - c) / d))
    * d + c`` with ``d = f16(d0 * exp(u))`` per group (``u`` learned with ``learn_scales``)
    and, on an asymmetric grid, an offset ``c`` per group (learned too; f16 where
    compile_llm stores it f16). Initial ``d0`` and ``c``: compile_llm's round-to-nearest
    ones (``quantize_projection``), so the untrained module is its PTQ."""

    def __init__(self, linear: nn.Linear, scheme: Any, group: int, learn_scales: bool,
                 train_weights: bool):
        super().__init__()
        from compiler.llm.quantize import quantize_asym

        self.weight = linear.weight
        self.weight.requires_grad_(train_weights)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.bits, self.group, self.asym = scheme.bits, group, scheme.asym
        self.qlo, self.qhi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        n, k = self.weight.shape
        w = self.weight.detach()
        self.offset, self.offset_f16 = None, False
        if self.asym:
            _, s, c = quantize_asym(w.numpy(), group, self.bits)
            d0 = torch.from_numpy(s.astype(np.float32))
            self.offset_f16 = c.dtype == np.float16
            self.offset = nn.Parameter(torch.from_numpy(c.astype(np.float32)),
                                       requires_grad=learn_scales)
        else:
            with torch.no_grad():
                d0 = signed_group_scales(w.reshape(n, k // group, group), self.bits)
        self.register_buffer("d0", d0)
        self.log_gain = nn.Parameter(torch.zeros_like(d0), requires_grad=learn_scales)

    def scales(self) -> torch.Tensor:
        """The f16-exact group scales (float32 ``[N, K/g]``), with gradient to ``log_gain``."""
        d = self.d0 * torch.exp(self.log_gain)
        d16 = d.detach().half().float()
        d16 = torch.where(d16 == 0, torch.sign(self.d0) * 6e-8, d16)   # f16 underflow
        return _ste(d, d16)

    def offsets(self) -> torch.Tensor | None:
        """The offsets as stored (f16-exact at 3/2 bits), with their gradient; None if
        symmetric."""
        if self.offset is None or not self.offset_f16:
            return self.offset
        return _ste(self.offset, self.offset.detach().half().float())

    def quantized_weight(self) -> torch.Tensor:
        n, k = self.weight.shape
        d = self.scales()[..., None]
        c = self.offsets()
        wg = self.weight.reshape(n, k // self.group, self.group)
        return GroupFakeQuant.apply(wg, d, None if c is None else c[..., None], self.qlo,
                                    self.qhi).reshape(n, k)

    @torch.no_grad()
    def codes(self) -> dict[str, np.ndarray]:
        """What the package stores: ``q`` i8 ``[N, K]``, ``scales`` f16 ``[N, K/g]`` and,
        asymmetric, ``offsets`` (f16 at 3/2 bits, f32 at 4)."""
        n, k = self.weight.shape
        d = self.scales()
        c = self.offsets()
        wg = self.weight.reshape(n, k // self.group, self.group)
        x = wg / d[..., None] if c is None else (wg - c[..., None]) / d[..., None]
        q = torch.clamp(torch.round(x), self.qlo, self.qhi)
        out = {"q": q.reshape(n, k).to(torch.int8).numpy(), "scales": d.half().numpy()}
        if c is not None:
            out["offsets"] = c.half().numpy() if self.offset_f16 else c.numpy().copy()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model.config, "model_type", None) not in ("llama", "mistral",
                                                                           "qwen2"):
        raise NpuccError(f"LLM QAT supports Llama-like causal LMs (llama, mistral, qwen2); "
                         f"got {getattr(model.config, 'model_type', type(model).__name__)!r}")
    return layers


@torch.no_grad()
def _snap_int8_rows(weight: torch.Tensor, f16_scales: bool) -> None:
    """In place: ``weight[V, D]`` onto compile_llm's int8 per-row grid (``max|w| / 127``; f32
    for the embedding table, f16 for an untied output head as ``quantize_rtn`` makes it)."""
    amax = weight.abs().amax(dim=1)
    row = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    if f16_scales:
        row = row.half().float()
    weight.copy_(torch.clamp(torch.round(weight / row[:, None]), -127, 127) * row[:, None])


def prepare_llm_qat(model: nn.Module, config: LlmQATConfig | None = None) -> nn.Module:
    """A copy of ``model`` (f32, train mode) with fake quantization in every projection; only
    the parameters the config trains require grad."""
    from compiler.llm.quantize import group_for, parse_scheme

    cfg = config or LlmQATConfig()
    scheme = parse_scheme(cfg.label)
    qm = copy.deepcopy(model)
    layers = _layers(qm)
    for p in qm.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for name, path in PROJECTION_PATHS.items():
            parent_path, attr = path.split(".")
            parent = getattr(layer, parent_path)
            lin = getattr(parent, attr)
            g = group_for(lin.in_features, scheme, name)
            setattr(parent, attr, GroupQuantLinear(lin, scheme, g, cfg.learn_scales,
                                                   cfg.train_weights))
        if cfg.train_norms:
            for mod in (layer.input_layernorm, layer.post_attention_layernorm):
                mod.weight.requires_grad_(True)
    embed = qm.get_input_embeddings().weight
    _snap_int8_rows(embed, f16_scales=False)
    head = qm.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embed.data_ptr():
        _snap_int8_rows(head.weight, f16_scales=True)
    return qm.train()


def token_windows(ids: Sequence[int], seq: int) -> list[list[int]]:
    """``ids`` cut into consecutive windows of ``seq`` tokens (the remainder dropped)."""
    return [list(ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]


def train_llm_qat(student: nn.Module, teacher: nn.Module, ids: Sequence[int], *,
                  steps: int = 200, seq: int = 128, batch: int = 1, lr: float = 1e-5,
                  scale_lr: float = 1e-3, temperature: float = 1.0, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Distil ``teacher`` (the float model) into ``student`` (``prepare_llm_qat``'s) on
    windows of ``seq`` tokens from ``ids``: ``T^2 KL(softmax(t/T) || softmax(s/T))`` on every
    position's logits (:class:`compiler.compress.distill.Distiller`), AdamW (weights and
    norms at ``lr``, scale gains at ``scale_lr``, cosine decay). Returns the steps, seconds
    and the first/last losses."""
    from compiler.compress.distill import Distiller

    windows = token_windows(ids, seq)
    if len(windows) < batch:
        raise NpuccError(f"QAT needs at least {batch * seq} training tokens, got {len(ids)}")
    grid = ("log_gain", "offset")      # the quantization grid's parameters: at scale_lr
    gains = [p for n, p in student.named_parameters() if n.endswith(grid) and p.requires_grad]
    others = [p for n, p in student.named_parameters() if not n.endswith(grid)
              and p.requires_grad]
    if not gains and not others:
        raise NpuccError("QAT: nothing to train (the config trains no weights, scales or norms)")
    groups = [{"params": g, "lr": r, "weight_decay": 0.0}
              for g, r in ((others, lr), (gains, scale_lr)) if g]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    dist = Distiller(teacher, student, response="kl", temperature=temperature, alpha=1.0)
    rng = np.random.default_rng(seed)
    student.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        pick = rng.choice(len(windows), size=batch, replace=False)
        x = torch.tensor([windows[i] for i in pick])
        loss = dist(x).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(f"  step {step + 1}/{steps}: KL {np.mean(losses[-10:]):.4f} "
                     f"({time.perf_counter() - t0:.0f} s)")
    student.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "seq": seq, "batch": batch,
            "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}


def qat_codes(student: nn.Module) -> dict[str, tuple[dict[str, np.ndarray], int, int]]:
    """Per projection prefix (``l{i}.q`` ...): ``(GroupQuantLinear.codes(), bits, group)``."""
    out = {}
    for i, layer in enumerate(_layers(student)):
        for name, path in PROJECTION_PATHS.items():
            mod = layer.get_submodule(path)
            if not isinstance(mod, GroupQuantLinear):
                raise NpuccError(f"layer {i} {path} is not fake-quantized: prepare_llm_qat first")
            out[f"l{i}.{name}"] = (mod.codes(), mod.bits, mod.group)
    return out


def _plain(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with plain ``Linear`` projections (the quantized weights)."""
    plain = copy.deepcopy(student).eval()
    for layer in _layers(plain):
        for path in PROJECTION_PATHS.values():
            parent_path, attr = path.split(".")
            parent = getattr(layer, parent_path)
            mod = getattr(parent, attr)
            n, k = mod.weight.shape
            lin = nn.Linear(k, n, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.quantized_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            setattr(parent, attr, lin)
    return plain


def llm_qat_spec(student: nn.Module, tokenizer: Any = None):
    """The quantized ``LlmSpec`` of ``student``: its norms and biases, the int8 embedding
    (and head) ``compile_llm`` makes, and each projection's QAT codes, f16 scales (and
    offsets) exactly. ``compile_llm(spec)`` compiles it without quantizing again."""
    from compiler.ir.ops.quant_weight import pack_bits
    from compiler.llm.hf_import import spec_from_transformers
    from compiler.llm.quantize import parse_scheme, quantize_spec

    codes = qat_codes(student)
    mods = [m for m in student.modules() if isinstance(m, GroupQuantLinear)]
    grids = {(m.bits, m.asym) for m in mods}
    if len(grids) != 1:
        raise NpuccError(f"llm_qat_spec: one grid per model, got {sorted(grids)}")
    bits, asym = grids.pop()
    group = max(g for *_, g in codes.values())
    label = f"int{bits}-g{group}" + ("-asym" if asym and bits == 4 else "")
    spec = spec_from_transformers(_plain(student), tokenizer)
    # the embedding / head as compile_llm's own quantizer makes them; the projections' codes,
    # scales and offsets are then replaced by the trained ones
    spec = quantize_spec(spec, parse_scheme(label))
    weights = dict(spec.weights)
    quant = dict(spec.quant)
    for prefix, (parts, b, g) in codes.items():
        weights[f"{prefix}.wq"] = pack_bits(parts["q"], b)
        weights[f"{prefix}.scales"] = parts["scales"]
        if "offsets" in parts:
            weights[f"{prefix}.offsets"] = parts["offsets"]
        quant[prefix] = (b, g)
    return replace(spec, weights=weights, quant=quant, scheme=f"{label}-qat")


def logits_perplexity(logits_fn: Callable[[list[int]], np.ndarray],
                      windows: Sequence[Sequence[int]]) -> float:
    """``exp`` of the mean next-token NLL over ``windows`` (each scored from position 0),
    ``logits_fn(window)`` giving ``[len(window), vocab]`` logits (a package's ``m.logits``)."""
    tot, cnt = 0.0, 0
    for w in windows:
        z = np.asarray(logits_fn(list(w)), np.float64)[:-1]
        z = z - z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=-1))
        tot += float((lse - z[np.arange(len(w) - 1), list(w[1:])]).sum())
        cnt += len(w) - 1
    return math.exp(tot / cnt)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Sequence[Sequence[int]]) -> float:
    """:func:`logits_perplexity` of a transformers causal LM (eval mode)."""
    model.eval()
    return logits_perplexity(lambda w: model(torch.tensor([w])).logits[0].numpy(), windows)
