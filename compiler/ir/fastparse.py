"""The IR text's fast path: the printer's own layout, one statement per line, read with
regular expressions in O(lines).

``grammar.lark`` defines the text form and ``parser.parse`` stays the reference: lark's LALR
parser costs ~90 µs a statement (a million-node graph: minutes), while text the printer
wrote (or a person wrote the same way) needs only a few regular expressions per line. Any
line this module does not recognise, and any semantic problem (an undefined value, a bad
attribute, a wrong weight), raises :class:`NotFast`, and ``parse`` then reads the whole text
with lark, which gives the exact error with line and column. So this path never decides
what is valid: it accepts a subset of what the grammar accepts and builds the same graph
(``tests/test_compile_scaling.py`` checks that on every test graph).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op, has_op
from compiler.ir.types import TensorType, to_numpy_dtype

__all__ = ["NotFast", "parse_fast"]


class NotFast(Exception):
    """The text is not in the fast path's subset (or is wrong): read it with lark."""


_NAME = r"%[A-Za-z0-9_.\-/]+"
_TYPE = r"(?:f64|f32|f16|bf16|i64|i32|i16|i8|i4|u64|u32|u16|u8|u4|bool)\[[-0-9,]*\]"
_STR = r'"(?:[^"\\]|\\.)*"'
_TAIL = rf"(?: loc\(({_STR})\))?(?: on ({_STR}))?"
_HEADER = re.compile(rf"graph @([A-Za-z0-9_.\-/]+)\(((?:{_NAME}: {_TYPE}(?:, )?)*)\) -> "
                     rf"\(((?:{_TYPE}(?:, )?)*)\) \{{\Z")
_OP = re.compile(rf" *({_NAME}(?:, {_NAME})*) = ([a-z_][a-z0-9_]*)\(((?:{_NAME}(?:, )?)*)\)"
                 rf"(?: \{{(.*)\}})? : ({_TYPE}(?:, {_TYPE})*){_TAIL} *\Z")
_CONST = re.compile(rf" *({_NAME}) = const (?:({_STR})|\[([^\]]*)\]) : ({_TYPE}){_TAIL} *\Z")
_RETURN = re.compile(rf" *return ({_NAME}(?:, {_NAME})*) *\Z")
_INT = r"-?[0-9]+"
_FLOAT = r"-?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+|inf|nan)"
_SCALAR = rf"(?:{_STR}|{_FLOAT}|{_INT}|true|false)"
_ATTR = re.compile(rf"([a-z_][a-z0-9_]*)=(\[(?:{_SCALAR}(?:,{_SCALAR})*)?\]|{_SCALAR})(?:, |\Z)")
_SCALARS = re.compile(rf"({_STR})|({_FLOAT})|({_INT})|(true)|(false)")
_NUMBER = re.compile(rf"\A(?:({_FLOAT})|({_INT}))\Z")


def _scalar(tok: str):
    m = _SCALARS.fullmatch(tok)
    if m is None:
        raise NotFast(tok)
    s, f, i, t, _ = m.groups()
    if s is not None:
        return json.loads(s)
    if f is not None:
        return float(f)
    if i is not None:
        return int(i)
    return t is not None


def _attrs(text: str | None) -> dict:
    if not text:
        return {}
    out, pos = {}, 0
    while pos < len(text):
        m = _ATTR.match(text, pos)
        if m is None or m.group(1) in out:
            raise NotFast(text)
        value = m.group(2)
        if value.startswith("["):
            inner = value[1:-1]
            out[m.group(1)] = [_scalar(t) for t in _split_scalars(inner)] if inner else []
        else:
            out[m.group(1)] = _scalar(value)
        pos = m.end()
    return out


def _split_scalars(text: str) -> list[str]:
    if '"' not in text:
        return text.split(",")
    return [m.group(0) for m in _SCALARS.finditer(text)]


class _Reader:
    def __init__(self, weights: Mapping[str, np.ndarray] | None):
        self.weights = weights
        self.env: dict[str, Value] = {}
        self.types: dict[str, TensorType] = {}

    def type(self, text: str) -> TensorType:
        t = self.types.get(text)
        if t is None:
            dtype, _, dims = text[:-1].partition("[")
            try:
                t = TensorType(tuple(int(d) for d in dims.split(",") if d), dtype)
            except (NpuccError, ValueError):
                raise NotFast(text) from None
            self.types[text] = t
        return t

    def define(self, g: Graph, name: str, ty: TensorType) -> Value:
        name = name[1:]
        if name in self.env:
            raise NotFast(name)
        v = Value(name, ty)
        g.claim_name(name)
        self.env[name] = v
        return v

    def use(self, name: str) -> Value:
        v = self.env.get(name[1:])
        if v is None:
            raise NotFast(name)
        return v

    def const(self, g: Graph, m: re.Match) -> None:
        res, ref_text, array_text, ty_text, loc, dev = m.groups()
        ty = self.type(ty_text)
        if ref_text is not None:
            ref = json.loads(ref_text)
            attrs = {"ref": ref, "value": None}
            if self.weights is not None:
                arr = self.weights.get(ref)
                if arr is None:
                    raise NotFast(ref)
                arr = np.asarray(arr)
                if TensorType.of(arr) != ty:
                    raise NotFast(ref)
                g.weights[ref] = arr
        else:
            attrs = {"ref": "", "value": self.array(array_text, ty)}
        out = self.define(g, res, ty)
        g.nodes.append(Node("const", [], [out], attrs, name=_json(loc) or "",
                            device=_json(dev) or None))

    @staticmethod
    def array(text: str, ty: TensorType) -> np.ndarray:
        toks = [t.strip() for t in text.split(",")] if text.strip() else []
        if len(toks) != ty.size:
            raise NotFast(text)
        vals, floats = [], False
        for t in toks:
            m = _NUMBER.match(t)
            if m is None:
                raise NotFast(t)
            floats |= m.group(1) is not None
            vals.append(float(t) if m.group(1) is not None else int(t))
        try:
            with np.errstate(all="ignore"):
                arr = np.array(vals, dtype=np.float64 if floats else np.int64)
                return arr.astype(to_numpy_dtype(ty.dtype)).reshape(ty.shape)
        except (OverflowError, ValueError, NpuccError):
            raise NotFast(text) from None

    def op(self, g: Graph, m: re.Match) -> None:
        res, op, args, attr_text, types, loc, dev = m.groups()
        if not has_op(op):
            raise NotFast(op)
        operands = [self.use(a) for a in args.split(", ")] if args else []
        opdef = get_op(op)
        try:
            opdef.check_arity(len(operands))
            attrs = opdef.normalize_attrs(_attrs(attr_text))
        except NpuccError:
            raise NotFast(op) from None
        names, tys = res.split(", "), types.split(", ")
        if len(names) != len(tys):
            raise NotFast(res)
        outs = [self.define(g, n, self.type(t)) for n, t in zip(names, tys, strict=True)]
        g.nodes.append(Node(op, operands, outs, attrs, name=_json(loc) or "",
                            device=_json(dev) or None))


def _json(text: str | None) -> str | None:
    return json.loads(text) if text is not None else None


def parse_fast(text: str, weights: Mapping[str, np.ndarray] | None = None) -> Graph:
    """The graph of printer-formatted ``text``; raises :class:`NotFast` on anything else."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) < 3 or lines[-1].strip() != "}":
        raise NotFast("layout")
    head = _HEADER.match(lines[0].strip())
    ret = _RETURN.match(lines[-2])
    if head is None or ret is None:
        raise NotFast("layout")
    r = _Reader(weights)
    g = Graph(head.group(1))
    if head.group(2):
        for param in head.group(2).split(", "):
            name, _, ty = param.partition(": ")
            g.inputs.append(r.define(g, name, r.type(ty)))
    for line in lines[1:-2]:
        if " = const " in line:
            m = _CONST.match(line)
            if m is None:
                raise NotFast(line)
            r.const(g, m)
        else:
            m = _OP.match(line)
            if m is None:
                raise NotFast(line)
            r.op(g, m)
    g.outputs = [r.use(n) for n in ret.group(1).split(", ")]
    declared = [r.type(t) for t in head.group(3).split(", ")] if head.group(3) else []
    if [v.type for v in g.outputs] != declared:
        raise NotFast("result types")
    return g
