"""The ``const`` op: a weight by name (``ref``) or a small inline tensor (``value``)."""

from __future__ import annotations

from compiler.errors import OpError
from compiler.ir.registry import Attr, OpDef, register_op


def _verify(attrs):
    has_ref, has_val = bool(attrs["ref"]), attrs["value"] is not None
    if has_ref == has_val:
        raise OpError("const needs exactly one of ref= (a weight name) or an inline value")


def _infer(types, attrs):
    if attrs["value"] is not None:
        from compiler.ir.types import TensorType

        return [TensorType.of(attrs["value"])]
    raise OpError("the type of a const reading a weight is declared, not inferred")


def _reference(inputs, attrs):
    return [attrs["value"]]


register_op(OpDef(
    "const", inputs=(0, 0),
    attrs={"ref": Attr("str", ""), "value": Attr("tensor", None)},
    infer=_infer, reference=_reference, verify=_verify,
    doc="A constant. Weight constants are resolved by the interpreter from graph.weights.",
    family="core",
))
