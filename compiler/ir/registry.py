"""The op registry: one declared entry per op.

An entry states the op's operand count, attribute schema, type inference (which also
verifies operand types and attribute values), and a numpy reference implementation that the
interpreter runs. Op families register themselves from ``compiler/ir/ops/*.py``.

Writing an op::

    register_op(OpDef(
        "relu", inputs=(1, 1), attrs={},
        infer=same_type, reference=lambda xs, a: [np.maximum(xs[0], 0)],
        elementwise=True))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import OpError
from compiler.ir.types import DTYPES, TensorType

if TYPE_CHECKING:
    from compiler.ir.graph import Graph, Value

__all__ = ["Attr", "OpDef", "REQUIRED", "TRAITS", "register_op", "get_op", "has_op", "all_ops",
           "declare_traits", "declare_flops", "ops_with"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

ATTR_KINDS = ("int", "float", "str", "bool", "ints", "floats", "strs", "dtype", "tensor")


@dataclass(frozen=True)
class Attr:
    """One attribute of an op: its kind, default (``REQUIRED`` if none) and allowed values."""

    kind: str
    default: Any = REQUIRED
    choices: tuple | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}")

    def coerce(self, name: str, value: Any) -> Any:
        """Check and normalise one attribute value; raises OpError naming the attribute."""
        k = self.kind
        try:
            if k == "int":
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise TypeError
                out: Any = int(value)
            elif k == "float":
                if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                    raise TypeError
                out = float(value)
            elif k == "bool":
                if not isinstance(value, bool | np.bool_):
                    raise TypeError
                out = bool(value)
            elif k in ("str", "dtype"):
                if not isinstance(value, str):
                    raise TypeError
                out = value
                if k == "dtype" and value not in DTYPES:
                    raise OpError(f"attribute {name}={value!r}: unknown dtype; "
                                  f"known: {', '.join(DTYPES)}")
            elif k in ("ints", "floats", "strs"):
                if not isinstance(value, list | tuple):
                    raise TypeError
                elem = _ELEMENT[k]
                out = [elem.coerce(name, v) for v in value]
            else:  # tensor
                if not isinstance(value, np.ndarray):
                    raise TypeError
                out = value
        except TypeError:
            raise OpError(f"attribute {name}={_short(value)} should be of kind {k}") from None
        if self.choices is not None:
            vals = out if isinstance(out, list) else [out]
            bad = [v for v in vals if v not in self.choices]
            if bad:
                raise OpError(f"attribute {name}={_short(value)} is not one of "
                              f"{', '.join(map(repr, self.choices))}")
        return out


_ELEMENT = {k: Attr(k[:-1]) for k in ("ints", "floats", "strs")}  # what a list kind holds


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."


InferFn = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
RefFn = Callable[[list[np.ndarray], dict[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class OpDef:
    """A registered op.

    - ``inputs``: (min, max) operand count; max ``None`` means variadic.
    - ``infer``: result types from operand types and attributes; raises OpError when the
      operands or attributes are not acceptable (this is the op's verifier for types).
    - ``verify``: optional extra checks of attributes alone (e.g. list lengths).
    - ``reference``: numpy implementation; returns one array per result.
    - ``elementwise``: result i has the shape and dtype of operand 0 and may be computed in
      place over it (the memory planner uses this).
    - ``inplace``: the kernel reads element i of its operands before writing element i of
      the result, so the result may take a dying operand's memory of the same size (binary
      broadcasting ops, reshape); ``elementwise`` implies it.
    - ``traits``: what passes, the cost model and exporters ask of an op (``TRAITS``);
      declared once per op in ``compiler/ir/ops/traits.py`` and read with
      :func:`ops_with` / :meth:`has`.
    - ``flops``: arithmetic per output element for ops that are not one-op-per-element
      (softmax: 5), with ``flops_source`` saying where the figure comes from.
    """

    name: str
    inputs: tuple[int, int | None]
    attrs: dict[str, Attr]
    infer: InferFn
    reference: RefFn
    verify: Callable[[dict[str, Any]], None] | None = None
    elementwise: bool = False
    inplace: bool = False
    doc: str = ""
    family: str = field(default="", compare=False)
    traits: frozenset[str] = frozenset()
    flops: float | None = None
    flops_source: str = ""

    def has(self, trait: str) -> bool:
        if trait not in TRAITS:
            raise KeyError(f"unknown op trait {trait!r}; known: {', '.join(TRAITS)}")
        return trait in self.traits

    def normalize_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown or missing attributes, coerce kinds."""
        unknown = [k for k in attrs if k not in self.attrs]
        if unknown:
            known = ", ".join(self.attrs) or "none"
            raise OpError(f"{self.name}: unknown attribute(s) {', '.join(unknown)}; "
                          f"known: {known}")
        out: dict[str, Any] = {}
        for key, spec in self.attrs.items():
            if key in attrs and not (attrs[key] is None and spec.default is None):
                out[key] = spec.coerce(key, attrs[key])
            elif spec.default is REQUIRED:
                raise OpError(f"{self.name}: missing required attribute {key!r}")
            else:
                out[key] = spec.default
        if self.verify is not None:
            self.verify(out)
        return out

    def check_arity(self, n: int) -> None:
        lo, hi = self.inputs
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
            raise OpError(f"{self.name} takes {want} operand(s), got {n}")

    def infer_types(self, graph: Graph | None, inputs: Sequence[Value],
                    attrs: dict[str, Any]) -> list[TensorType]:
        self.check_arity(len(inputs))
        return list(self.infer([v.type for v in inputs], attrs))

    def is_default(self, key: str, value: Any) -> bool:
        d = self.attrs[key].default
        if d is REQUIRED:
            return False
        if isinstance(d, list | tuple) or isinstance(value, list | tuple):
            return list(d) == list(value) if isinstance(d, list | tuple) else False
        return type(d) is type(value) and d == value


_REGISTRY: dict[str, OpDef] = {}
_LOADED = False


# The op traits (compiler/ir/ops/traits.py declares which ops have each).
TRAITS: dict[str, str] = {
    "broadcast": "binary element-wise with numpy broadcasting (operands may be constants)",
    "activation": "a unary activation a producer (conv2d, dense) can fuse",
    "pool": "pools over the layout's spatial axes (H, W)",
    "reduction": "reduces over axes given as attributes",
    "axis": "has one axis attribute that a layout change must remap",
    "view": "changes only the shape: no data is copied",
    "data-movement": "copies or rearranges data without arithmetic",
    "quantizable": "has an integer (int8) kernel the quantize pass can lower to",
    "layout": "has a layout attribute (NCHW/NHWC) that to-nhwc rewrites",
}


def declare_traits(trait: str, *ops: str) -> None:
    """Give ``ops`` the ``trait`` (traits.py, once per op and trait)."""
    if trait not in TRAITS:
        raise ValueError(f"unknown op trait {trait!r}; known: {', '.join(TRAITS)}")
    for name in ops:
        if name not in _REGISTRY:
            raise ValueError(f"trait {trait!r}: unknown op {name!r}")
        op = _REGISTRY[name]
        _REGISTRY[name] = replace(op, traits=op.traits | {trait})


def declare_flops(name: str, flops: float, source: str) -> None:
    """Arithmetic per output element of ``name`` and where the figure comes from."""
    _REGISTRY[name] = replace(_REGISTRY[name], flops=float(flops), flops_source=source)


def ops_with(trait: str) -> frozenset[str]:
    """The names of the ops that have ``trait``."""
    _load()
    if trait not in TRAITS:
        raise KeyError(f"unknown op trait {trait!r}; known: {', '.join(TRAITS)}")
    return frozenset(n for n, op in _REGISTRY.items() if trait in op.traits)


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise ValueError(f"op {opdef.name!r} registered twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import compiler.ir.ops  # noqa: F401  (registers every family)


def get_op(name: str) -> OpDef:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OpError(f"unknown op {name!r}; known ops: {', '.join(sorted(_REGISTRY))}") from None


def has_op(name: str) -> bool:
    _load()
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    _load()
    return dict(_REGISTRY)
