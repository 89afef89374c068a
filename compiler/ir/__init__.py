"""The npucc graph IR: types, graph, op registry, text form, verifier, interpreter."""

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.interpreter import interpret
from compiler.ir.parser import parse
from compiler.ir.registry import Attr, OpDef, all_ops, get_op, register_op
from compiler.ir.serialize import load, save
from compiler.ir.types import TensorType
from compiler.ir.verify import verify

__all__ = [
    "Graph", "Node", "Value", "TensorType", "Attr", "OpDef", "register_op", "get_op", "all_ops",
    "parse", "verify", "interpret", "save", "load",
]
