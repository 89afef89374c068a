"""What an ONNX op converter sees: :class:`Ctx`, the converter table, dtype mapping.

A converter is ``fn(ctx) -> list[Value | np.ndarray]``, one entry per ONNX output: a graph
value, or a numpy array when the output is a constant known at import (e.g. ``Shape``).
It raises :class:`Unsupported` with a reason for a node it cannot express (the importer
collects every such node and reports them together).

Attributes are checked against the op's ONNX schema when the Ctx is made: one whose type
differs from the declared one (an int where a list of ints belongs...) is an
:class:`ImportError_` naming the attribute, before any converter reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.errors import ImportError_
from compiler.ir.graph import Graph, Value
from compiler.ir.types import TensorType

__all__ = ["Ctx", "Unsupported", "DataDependent", "CONVERTERS", "converter", "converter_key", "onnx_dtype", "ir_to_onnx_dtype"]

Converter = Callable[["Ctx"], list[Any]]
CONVERTERS: dict[str, Converter] = {}

# TensorProto.DataType -> IR dtype
_ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 4: "u16", 5: "i16", 6: "i32", 7: "i64", 9: "bool",
                10: "f16", 11: "f64", 12: "u32", 13: "u64", 16: "bf16", 21: "u4", 22: "i4"}
_TO_ONNX = {v: k for k, v in _ONNX_DTYPES.items()}


def onnx_dtype(elem_type: int) -> str | None:
    return _ONNX_DTYPES.get(int(elem_type))


def ir_to_onnx_dtype(dtype: str) -> int:
    return _TO_ONNX[dtype]


_ATTR_KINDS = {1: "a float", 2: "an int", 3: "a string", 4: "a tensor", 5: "a graph",
               6: "a list of floats", 7: "a list of ints", 8: "a list of strings",
               9: "a list of tensors", 10: "a list of graphs", 11: "a sparse tensor",
               12: "a list of sparse tensors", 13: "a type", 14: "a list of types"}


@functools.cache
def _declared_attr_types(op_type: str, opset: int) -> dict[str, int]:
    """Attribute name -> AttributeProto type that the op's ONNX schema declares."""
    from onnx import defs

    try:
        schema = defs.get_schema(op_type, opset)
    except Exception:  # no schema (the converter decides what it accepts)
        return {}
    return {name: int(a.type) for name, a in schema.attributes.items()}


class Unsupported(Exception):  # noqa: N818  (a signal, reported as UnsupportedOpsError)
    """This node cannot be imported; the message says why."""


class DataDependent(Unsupported):
    """This node's output shape depends on input values (NonZero, NMS...): the importer
    refuses the model with one error naming such nodes and how to cut the graph."""


def converter_key(domain: str, op_type: str) -> str:
    """The :data:`CONVERTERS` key of a node: its op type in the default domain, else
    ``domain.op_type`` (e.g. ``com.microsoft.FusedConv`` from onnxruntime's optimizer)."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return deco


class Ctx:
    """One ONNX node being converted into ``graph``."""

    def __init__(self, graph: Graph, node: Any, opset: int,
                 lookup: Callable[[str], Value | np.ndarray],
                 materialise: Callable[[str, np.ndarray], Value]):
        from onnx import helper

        self.graph = graph
        self.node = node
        self.op_type: str = node.op_type
        self.opset = opset
        self._lookup = lookup
        self._materialise = materialise
        self.attrs: dict[str, Any] = {}
        declared = _declared_attr_types(node.op_type, opset)
        for a in node.attribute:
            want = declared.get(a.name)
            if want is not None and a.type != want:
                raise ImportError_(
                    f"attribute {a.name!r} is {_ATTR_KINDS.get(a.type, a.type)}; "
                    f"{node.op_type}-{opset} declares it {_ATTR_KINDS.get(want, want)}")
            try:
                v = helper.get_attribute_value(a)
            except Exception as e:  # an attribute without a known type
                raise ImportError_(f"attribute {a.name!r} cannot be read: {e}") from None
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            self.attrs[a.name] = v

    # -- operands ---------------------------------------------------------------------
    @property
    def n_inputs(self) -> int:
        return len(self.node.input)

    @property
    def n_outputs(self) -> int:
        """Outputs the model actually names (trailing optional ones may be absent)."""
        return len(self.node.output)

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and bool(self.node.input[i])

    def output_used(self, i: int) -> bool:
        return i < len(self.node.output) and bool(self.node.output[i])

    def raw(self, i: int) -> Value | np.ndarray:
        if not self.has(i):
            raise Unsupported(f"input {i} is missing")
        return self._lookup(self.node.input[i])

    def const(self, i: int) -> np.ndarray | None:
        """Input ``i`` as an array if it is constant at import, else None."""
        if not self.has(i):
            return None
        v = self.raw(i)
        return v if isinstance(v, np.ndarray) else None

    def static(self, i: int, what: str) -> np.ndarray:
        """Input ``i`` (``what``), which must be a constant."""
        if not self.has(i):
            raise Unsupported(f"the {what} input is missing")
        v = self.raw(i)
        if not isinstance(v, np.ndarray):
            raise Unsupported(f"the {what} input ({self.node.input[i]!r}) is computed at run "
                              "time; npucc needs it constant")
        return v

    def ints(self, i: int, what: str) -> list[int]:
        return [int(x) for x in self.static(i, what).reshape(-1)]

    def value(self, i: int) -> Value:
        """Input ``i`` as a graph value (constants are materialised on first use)."""
        v = self.raw(i)
        if isinstance(v, np.ndarray):
            return self._materialise(self.node.input[i], v)
        return v

    def type(self, i: int) -> TensorType:
        v = self.raw(i)
        return TensorType.of(v) if isinstance(v, np.ndarray) else v.type

    def shape(self, i: int) -> tuple[int, ...]:
        return self.type(i).shape

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    # -- emission -------------------------------------------------------------------
    def emit(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        return self.graph.make_node(op, list(inputs), attrs).output

    def emit_multi(self, op: str, inputs: list[Value], **attrs: Any) -> list[Value]:
        return list(self.graph.make_node(op, inputs, attrs).outputs)

    def const_value(self, arr: np.ndarray | Any, dtype: str | None = None) -> Value:
        """A new constant value (inline when small)."""
        return self.graph.add_const(np.asarray(arr), dtype)
