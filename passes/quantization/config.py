"""What to quantize how: the ``quantize=`` option of ``compile`` as data.

``quantize="int8"``
    static int8 for every op with an integer kernel (dense, conv2d; int8 embedding tables for
    gather through the ``w8`` handler); the rest float.
``quantize="int4"``
    weight-only int4, group 128, for dense (and matmul with a constant right operand).
``quantize={...}``
    a mapping. Keys are

    - an **op type** (``"dense"``, ``"conv2d"``, ``"matmul"``, ``"layer_norm"``, ``"gather"``,
      any registered op name), or
    - a **node-name pattern**: any other key is a Python regex matched with ``re.search``
      against ``Node.name`` (so ``"attention"`` matches every node whose name contains it;
      anchor with ``^...$`` for an exact match), or
    - a reserved key: ``"default"`` (precision of unmatched nodes, ``"float"`` unless given),
      ``"activations"`` (``"u8"`` default, or ``"i8"``), ``"weights"`` (``"per_channel"``
      default, or ``"per_tensor"``), ``"method"`` (``"rtn"`` default, or ``"gptq"``),
      ``"group_size"`` (weight-only groups, default 128), ``"smooth"`` (int8 dense layers:
      SmoothQuant migration strength in [0, 1], default 0.7; 0 turns it off),
      ``"activation_ranges"`` (``{node name or value name: (lo, hi)}``: the int8 input range
      of that node's activation operand, or of that value, given instead of calibrated, e.g.
      learned by quantization-aware training (compiler/compress/qat.py); ``"NAME:1"`` names
      a matmul's second operand; given ranges are not smoothed).

    Values are a precision string, or a dict ``{"precision": ..., "group_size": ...,
    "method": ...}``. Precedence: a matching name pattern (the first in mapping order) beats
    the op type, which beats ``"default"``.

Precisions: ``"int8"`` static int8 (weights and activations, this package's insert.py),
``"int4"`` / ``"w8"`` weight-only int4 / int8, ``"int16"`` (e.g. embeddings), ``"fp16"``,
``"float"`` (untouched). Everything but int8 and float is applied by the handler named in
:data:`HANDLERS` (``module:function`` with signature ``apply(graph, node, spec, ctx) -> bool``,
True when it rewrote the node).

``plan_precisions(graph, config)`` gives every non-const node its :class:`PrecisionSpec`;
nodes a precision cannot apply to (an int8 spec on a softmax) are the inserting pass's to
skip, so a blanket ``default`` is harmless.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from compiler.errors import NpuccError
from compiler.ir.registry import has_op, ops_with

if TYPE_CHECKING:
    from compiler.ir.graph import Graph, Node

__all__ = ["PRECISIONS", "RESERVED_KEYS", "HANDLERS", "PrecisionSpec", "QuantConfig",
           "parse_config", "plan_precisions", "INT8_OPS", "QuantConfigError"]

PRECISIONS = ("int8", "int4", "w8", "int16", "fp16", "float")
RESERVED_KEYS = ("default", "activations", "weights", "method", "group_size", "smooth",
                 "activation_ranges")
# ops the int8 path quantizes (they have integer kernels); others stay float around them
INT8_OPS = ops_with("quantizable")   # compiler/ir/ops/traits.py
# precision -> "module:function" applying it to one node: apply(graph, node, spec, ctx) -> bool
HANDLERS: dict[str, str] = {
    "int4": "passes.quantization.weight_only:apply",
    "w8": "passes.quantization.weight_only:apply",
    "int16": "passes.quantization.weight_only:apply",
    "fp16": "passes.quantization.weight_only:apply",
}


class QuantConfigError(NpuccError):
    """A ``quantize=`` value that does not parse; the message lists what is accepted."""


@dataclass(frozen=True)
class PrecisionSpec:
    """How one node is quantized."""

    precision: str = "float"
    activations: str = "u8"          # int8: activation dtype, "u8" | "i8"
    weights: str = "per_channel"     # int8: weight scales, "per_channel" | "per_tensor"
    method: str = "rtn"              # weight rounding: "rtn" | "gptq"
    group_size: int = 128            # weight-only: elements per scale group along K
    smooth: float = 0.7              # int8 dense: SmoothQuant strength (0 = off)
    source: str = "default"          # which config key chose it (for reports)

    @property
    def act_dtype(self) -> str:
        return self.activations


@dataclass(frozen=True)
class QuantConfig:
    default: PrecisionSpec
    by_op: dict[str, PrecisionSpec]
    by_name: tuple[tuple[str, re.Pattern, PrecisionSpec], ...]

    def spec_for(self, node: Node) -> PrecisionSpec:
        for _key, pat, spec in self.by_name:
            if node.name and pat.search(node.name):
                return spec
        return self.by_op.get(node.op, self.default)

    @property
    def precisions(self) -> set[str]:
        specs = [self.default, *self.by_op.values(), *(s for _, _, s in self.by_name)]
        return {s.precision for s in specs}


PRESETS: dict[str, dict[str, Any]] = {
    "int8": {"default": "int8", "gather": "w8"},
    "int4": {"dense": {"precision": "int4", "group_size": 128},
             "matmul": {"precision": "int4", "group_size": 128}},
    "w8": {"dense": "w8", "matmul": "w8"},
    "fp16": {"default": "fp16"},
}


def _choice(key: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise QuantConfigError(f"quantize config: {key}={value!r} is not one of "
                               f"{', '.join(map(repr, choices))}")
    return value


def _spec(key: str, value: Any, base: PrecisionSpec) -> PrecisionSpec:
    if isinstance(value, str):
        return replace(base, precision=_choice(key, value, PRECISIONS), source=key)
    if isinstance(value, PrecisionSpec):
        return replace(value, source=key)
    if isinstance(value, Mapping):
        known = ("precision", "group_size", "method", "activations", "weights")
        bad = [k for k in value if k not in known]
        if bad:
            raise QuantConfigError(f"quantize config: {key}: unknown field(s) "
                                   f"{', '.join(map(repr, bad))}; known: {', '.join(known)}")
        spec = replace(base, source=key)
        if "precision" in value:
            spec = replace(spec, precision=_choice(f"{key}.precision", value["precision"],
                                                   PRECISIONS))
        if "group_size" in value:
            spec = replace(spec, group_size=_group(f"{key}.group_size", value["group_size"]))
        if "method" in value:
            spec = replace(spec, method=_choice(f"{key}.method", value["method"],
                                                ("rtn", "gptq")))
        if "activations" in value:
            spec = replace(spec, activations=_choice(f"{key}.activations",
                                                     value["activations"], ("u8", "i8")))
        if "weights" in value:
            spec = replace(spec, weights=_choice(f"{key}.weights", value["weights"],
                                                 ("per_channel", "per_tensor")))
        return spec
    raise QuantConfigError(f"quantize config: {key}: expected a precision "
                           f"({', '.join(PRECISIONS)}) or a dict, got {value!r}")


def _group(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QuantConfigError(f"quantize config: {key} must be a positive int, got {value!r}")
    return int(value)


def parse_config(config: str | Mapping[str, Any] | QuantConfig | None) -> QuantConfig:
    """``"int8"`` / ``"int4"`` / a mapping (see the module docstring) -> QuantConfig."""

    if isinstance(config, QuantConfig):
        return config
    if config is None:
        config = "int8"
    if isinstance(config, str):
        if config not in PRESETS:
            raise QuantConfigError(f"quantize={config!r} is not a preset; give one of "
                                   f"{', '.join(map(repr, PRESETS))} or a mapping")
        config = PRESETS[config]
    if not isinstance(config, Mapping):
        raise QuantConfigError(f"quantize= takes a preset name or a mapping, got "
                               f"{type(config).__name__}")
    base = PrecisionSpec()
    if "activations" in config:
        base = replace(base, activations=_choice("activations", config["activations"],
                                                 ("u8", "i8")))
    if "weights" in config:
        base = replace(base, weights=_choice("weights", config["weights"],
                                             ("per_channel", "per_tensor")))
    if "method" in config:
        base = replace(base, method=_choice("method", config["method"], ("rtn", "gptq")))
    if "group_size" in config:
        base = replace(base, group_size=_group("group_size", config["group_size"]))
    if "smooth" in config:
        sm = config["smooth"]
        if isinstance(sm, bool) or not isinstance(sm, int | float) or not 0 <= sm <= 1:
            raise QuantConfigError(f"quantize config: smooth={sm!r} must be a number in [0, 1]")
        base = replace(base, smooth=float(sm))
    default = _spec("default", config.get("default", "float"), base)
    by_op: dict[str, PrecisionSpec] = {}
    by_name: list[tuple[str, re.Pattern, PrecisionSpec]] = []
    for key, value in config.items():
        if not isinstance(key, str):
            raise QuantConfigError(f"quantize config: keys are op types, name patterns or "
                                   f"{', '.join(RESERVED_KEYS)}; got {key!r}")
        if key in RESERVED_KEYS:
            continue
        spec = _spec(key, value, base)
        if has_op(key):
            by_op[key] = spec
            continue
        try:
            pat = re.compile(key)
        except re.error as e:
            raise QuantConfigError(f"quantize config: key {key!r} is neither an op type nor "
                                   f"a valid name regex ({e})") from None
        by_name.append((key, pat, spec))
    return QuantConfig(default, by_op, tuple(by_name))


def plan_precisions(graph: Graph, config: str | Mapping[str, Any] | QuantConfig | None
                    ) -> dict[Node, PrecisionSpec]:
    """Every non-const node of ``graph`` -> its PrecisionSpec (keys are the Node objects)."""
    cfg = parse_config(config)
    return {n: cfg.spec_for(n) for n in graph.nodes if n.op != "const"}
