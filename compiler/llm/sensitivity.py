"""How much each weight matrix of a float LLM minds being quantized, per bit-width.

Two measures per matrix (``l{i}.q/k/v/o/gate/up/down``, ``embed``, an untied ``lm_head``),
both on calibration tokens run through the float model (numpy, f32):

- **SNR of the matrix's output** (the cheap proxy, every matrix x every candidate scheme,
  on an even sample of its output rows):
  ``10 log10(|X W^T|^2 / |X (W - Q(W))^T|^2)`` with ``X`` the matrix's real input captured
  from the float forward pass;
- **perplexity change** when only that matrix is quantized (the costly one, run for the
  ``measure`` most sensitive matrices by the proxy, at the ``probe`` scheme, and for the
  embedding at every one of its candidate schemes): the forward pass
  restarts at the matrix's layer from the captured residual stream, and reports the mean
  next-token NLL change (``log`` of the perplexity ratio) and the KL divergence of the
  next-token distribution from the float model's.

The predicted loss of matrix ``m`` at scheme ``c`` is ``lambda_m * NSR(m, c)``
(``NSR = 10^(-SNR/10)``): first order, a small output perturbation costs KL proportional to
its energy. ``lambda_m = KL_m(probe) / NSR(m, probe)`` where measured, else the median over the
measured matrices of the same kind (q, k, ..., down), else over all measured ones. The
embedding's loss per scheme is its measured KL (one matrix, a handful of schemes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.hf_import import LlmSpec
from compiler.llm.quantize import Scheme, parse_scheme, scheme_label

__all__ = ["CANDIDATES", "TABLE_CANDIDATES", "Sensitivity", "measure_sensitivity",
           "FloatForward", "calibration_ids"]

CANDIDATES = tuple(parse_scheme(t) for t in (
    "int8", "int4-g32", "int4-g128", "int4-g32-asym", "int3-g32", "int3-g128", "int2-g32",
    "int2-g64", "int2-g128"))
#: the embedding table: int16 / int8 rows, or groups like a projection (a tied model's output
#: projection reads the same table: ``embed_wq`` + ``dense_wq``)
TABLE_CANDIDATES = (Scheme(16, None, "rtn"), Scheme(8, None, "rtn")) + tuple(
    parse_scheme(t) for t in ("int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "int3-g64",
                              "int3-g128", "int2-g64", "int2-g128"))


@dataclass
class Sensitivity:
    """Per matrix: shape, SNR (dB) per scheme label, the measured perplexity effect at the
    probe scheme, and the predicted loss (KL, nats per token) per scheme label."""
    shapes: dict[str, tuple[int, int]]
    snr_db: dict[str, dict[str, float]]
    probe: str
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # m -> dnll, kl
    loss: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def table(self, top: int = 20) -> str:
        """The ``top`` matrices by predicted loss at the probe scheme."""
        rows = sorted(self.loss, key=lambda m: -self.loss[m].get(self.probe, 0.0))[:top]
        lines = [f"{'matrix':10} {'SNR dB @' + self.probe:>18} {'dNLL':>9} {'KL':>9} "
                 f"{'pred KL':>9}"]
        for m in rows:
            meas = self.measured.get(m, {})
            lines.append(f"{m:10} {self.snr_db[m].get(self.probe, float('nan')):18.2f} "
                         f"{meas.get('dnll', float('nan')):9.5f} "
                         f"{meas.get('kl', float('nan')):9.5f} "
                         f"{self.loss[m].get(self.probe, float('nan')):9.5f}")
        return "\n".join(lines)


def calibration_ids(spec: LlmSpec, calibration: str | Sequence[int] | None, tokens: int
                    ) -> np.ndarray:
    """Token ids of the calibration text (default: :func:`quantize.calibration_text`, never
    the pydoc topics text perplexity is evaluated on)."""
    from compiler.llm.quantize import calibration_token_ids

    ids = calibration_token_ids(spec, calibration, "sensitivity")
    if len(ids) < 16:
        raise NpuccError(f"the calibration text has {len(ids)} tokens; sensitivity needs "
                         f"at least 16")
    return np.asarray(ids[:tokens], np.int64)


class FloatForward:
    """The float model's forward pass over one sequence (numpy, f32, causal), Llama family
    (RMSNorm, RoPE rotate-half, grouped-query attention, SiLU-gated MLP; Qwen2's biases).

    ``run()`` captures the residual stream entering each layer and each projection's input;
    ``run(start, swap)`` restarts at layer ``start`` with weights ``swap`` replaced."""

    def __init__(self, spec: LlmSpec, ids: np.ndarray):
        from compiler.ir.ops.llm import rope_tables

        if spec.arch != "llama":
            raise NpuccError(f"sensitivity runs Llama-family models (Llama, Qwen2); this one "
                             f"is {spec.arch!r}")
        self.s, self.ids = spec, np.asarray(ids)
        t = len(self.ids)
        cos, sin = rope_tables(t, spec.head_dim, spec.rope_theta)
        self.cos = np.concatenate([cos, cos], -1)[:, None, :]
        self.sin = np.concatenate([sin, sin], -1)[:, None, :]
        self.mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
        self.resid: list[np.ndarray] = []          # input of layer i
        self.inputs: dict[str, np.ndarray] = {}    # projection prefix -> its input X
        self.base_logp: np.ndarray | None = None

    def _w(self, name: str, swap: dict[str, np.ndarray]) -> np.ndarray | None:
        return swap[name] if name in swap else self.s.weights.get(name)

    def _dense(self, x, prefix, swap, capture):
        if capture:
            self.inputs[prefix] = x
        y = x @ self._w(f"{prefix}.w", swap).T
        b = self._w(f"{prefix}.b", swap)
        return y + b if b is not None else y

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.s.eps) * w

    def _rope(self, x):
        half = x.shape[-1] // 2
        return x * self.cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * self.sin

    def _layer(self, i, x, swap, capture):
        s, t = self.s, x.shape[0]
        h = self._norm(x, self._w(f"l{i}.attn_norm.w", swap))
        q = self._rope(self._dense(h, f"l{i}.q", swap, capture).reshape(t, s.heads, -1))
        k = self._rope(self._dense(h, f"l{i}.k", swap, False).reshape(t, s.kv_heads, -1))
        v = self._dense(h, f"l{i}.v", swap, False).reshape(t, s.kv_heads, -1)
        if capture:
            self.inputs[f"l{i}.k"] = self.inputs[f"l{i}.v"] = h
        rep = s.heads // s.kv_heads
        k, v = np.repeat(k, rep, 1).transpose(1, 2, 0), np.repeat(v, rep, 1).transpose(1, 0, 2)
        sc = q.transpose(1, 0, 2) @ k / np.float32(math.sqrt(s.head_dim)) + self.mask
        p = np.exp(sc - sc.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True)) @ v                       # [H, T, Dh]
        x = x + self._dense(a.transpose(1, 0, 2).reshape(t, -1), f"l{i}.o", swap, capture)
        h = self._norm(x, self._w(f"l{i}.mlp_norm.w", swap))
        g = self._dense(h, f"l{i}.gate", swap, capture)
        if capture:
            self.inputs[f"l{i}.up"] = h
        m = g / (1 + np.exp(-g)) * self._dense(h, f"l{i}.up", swap, False)
        return x + self._dense(m, f"l{i}.down", swap, capture)

    def run(self, start: int = 0, swap: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Next-token log-probabilities ``[T, V]`` (f32); the first call (start 0, no swap)
        captures the activations later calls restart from."""
        swap = swap or {}
        capture = not self.resid
        if start == 0:
            x = self._w("embed", swap)[self.ids].astype(np.float32)
        else:
            x = self.resid[start]
        for i in range(start, self.s.layers):
            if capture:
                self.resid.append(x)
            x = self._layer(i, x, swap, capture)
        x = self._norm(x, self._w("norm.w", swap))
        head = self._w("embed" if self.s.tied else "lm_head", swap)
        logits = x @ head.T
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        if capture:
            self.base_logp = logp
        return logp

    def effect(self, logp: np.ndarray) -> dict[str, float]:
        """Mean next-token NLL change and KL(float || this) against the float run."""
        base, ids = self.base_logp, self.ids
        nxt = np.arange(len(ids) - 1)
        dnll = float(-(logp[nxt, ids[1:]] - base[nxt, ids[1:]]).mean())
        kl = float((np.exp(base) * (base - logp)).sum(-1).mean())
        return {"dnll": dnll, "kl": kl}


def _dequantized(w: np.ndarray, scheme: Scheme) -> np.ndarray:
    from compiler.ir.ops.quant_weight import dequantize_groups
    from compiler.llm.quantize import quantize_projection

    parts, g = quantize_projection(w, scheme)
    wd = dequantize_groups(parts["wq"], parts["scales"], scheme.bits)
    if "offsets" in parts:
        wd += np.repeat(parts["offsets"].astype(np.float32), g, axis=1)
    return wd


def _table(w: np.ndarray, scheme: Scheme) -> np.ndarray:
    """The embedding table as a scheme of :data:`TABLE_CANDIDATES` stores it, dequantized."""
    from compiler.llm.quantize import quantize_rows

    if scheme.group is not None:
        return _dequantized(w, scheme)
    q, rs = quantize_rows(w, scheme.bits)
    return q.astype(np.float32) * rs[:, None]


def _table_label(scheme: Scheme) -> str:
    return f"int{scheme.bits}" if scheme.group is None else scheme_label(scheme)


def measure_sensitivity(spec: LlmSpec, calibration: str | Sequence[int] | None = None, *,
                        tokens: int = 128, measure: int | None = 14, rows: int = 128,
                        probe: str = "int2-g128",
                        candidates: Sequence[Scheme] = CANDIDATES,
                        progress=None) -> Sensitivity:
    """See the module docstring. ``measure``: how many matrices get the perplexity
    measurement (the most sensitive by output SNR at ``probe``; None: all); ``rows``: output
    rows per matrix sampled for the SNR."""
    import time

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    fwd = FloatForward(spec, calibration_ids(spec, calibration, tokens))
    fwd.run()
    shapes, snr = {}, {}
    for prefix, x in fwd.inputs.items():
        w = spec.weights[f"{prefix}.w"]
        shapes[prefix] = w.shape
        # rows are quantized independently: the SNR over an even sample of output rows
        w = w[np.linspace(0, len(w) - 1, min(rows, len(w))).astype(int)]
        y2 = float(np.square(x @ w.T).sum())
        snr[prefix] = {}
        for sch in candidates:
            e2 = float(np.square(x @ (w - _dequantized(w, sch)).T).sum())
            snr[prefix][scheme_label(sch)] = 10 * math.log10(y2 / e2) if e2 > 0 else math.inf
    say(f"sensitivity: output SNR of {len(snr)} matrices x {len(candidates)} schemes "
        f"({time.perf_counter() - t0:.0f} s)")
    table = spec.weights["embed"]
    shapes["embed"] = table.shape
    emb_in = table[fwd.ids]
    snr["embed"], table_kl = {}, {}
    for sch in TABLE_CANDIDATES:
        deq = _table(table, sch)
        e2 = float(np.square(emb_in - deq[fwd.ids]).sum())
        lab = _table_label(sch)
        snr["embed"][lab] = 10 * math.log10(float(np.square(emb_in).sum()) / e2) \
            if e2 > 0 else math.inf
        # one matrix, a few schemes: the effect of each is measured, not predicted (a tied
        # table changes both the input rows and the output projection)
        table_kl[lab] = fwd.effect(fwd.run(0, {"embed": deq}))
    say(f"sensitivity: the embedding at {len(table_kl)} schemes "
        f"({time.perf_counter() - t0:.0f} s)")
    sens = Sensitivity(shapes, snr, probe, tokens=len(fwd.ids))
    probe_s = parse_scheme(probe)
    for m in _most_sensitive(snr, probe, measure):
        layer = int(m.split(".")[0][1:])
        w = spec.weights[f"{m}.w"]
        sens.measured[m] = fwd.effect(fwd.run(layer, {f"{m}.w": _dequantized(w, probe_s)}))
    sens.measured["embed"] = table_kl["int8"]
    say(f"sensitivity: perplexity effect of {len(sens.measured)} matrices "
        f"({time.perf_counter() - t0:.0f} s)")
    _predict(sens, "int8")
    sens.loss["embed"] = {lab: max(e["kl"], 0.0) for lab, e in table_kl.items()}
    sens.seconds = time.perf_counter() - t0
    return sens


def _most_sensitive(snr: dict[str, dict[str, float]], probe: str, count: int | None
                    ) -> list[str]:
    """Matrices by output SNR at ``probe``, lowest first, taken in turn from each kind
    (q, k, ...: every kind gets measurements to scale its unmeasured matrices by)."""
    kinds: dict[str, list[str]] = {}
    for m in sorted((m for m in snr if m != "embed"), key=lambda m: snr[m][probe]):
        kinds.setdefault(m.split(".")[-1], []).append(m)
    order: list[str] = []
    depth = max((len(v) for v in kinds.values()), default=0)
    for r in range(depth):
        order += [v[r] for v in kinds.values() if r < len(v)]
    return order if count is None else order[:count]


def _nsr(snr_db: float) -> float:
    return 0.0 if math.isinf(snr_db) else 10 ** (-snr_db / 10)


def _predict(sens: Sensitivity, table_probe: str) -> None:
    """``loss[m][scheme] = lambda_m * NSR`` (module docstring)."""
    lam: dict[str, float] = {}
    for m, meas in sens.measured.items():
        probe = table_probe if m == "embed" else sens.probe
        nsr = _nsr(sens.snr_db[m][probe])
        if nsr > 0:
            lam[m] = max(meas["kl"], 0.0) / nsr
    by_kind: dict[str, list[float]] = {}
    for m, v in lam.items():
        by_kind.setdefault(m.split(".")[-1], []).append(v)
    every = [v for m, v in lam.items() if m != "embed"] or [1.0]
    for m, snrs in sens.snr_db.items():
        kind = m.split(".")[-1]
        lm = lam.get(m, float(np.median(by_kind.get(kind, every))))
        sens.loss[m] = {lab: lm * _nsr(v) for lab, v in snrs.items()}

