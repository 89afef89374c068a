"""Parse the IR text form (grammar in ``grammar.lark``) back into a Graph.

Every failure is a :class:`ParseError` with line:column and what was expected; lark's own
exceptions never escape. Weights are looked up in ``weights`` (a name -> array mapping, e.g.
the safetensors file beside the text); a graph parsed without them prints identically but
cannot be interpreted until they are attached.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

from compiler.errors import NpuccError, OpError, ParseError
from compiler.ir.fastparse import NotFast, parse_fast
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.registry import get_op, has_op
from compiler.ir.types import TensorType, to_numpy_dtype
from runtime.bulk import bulk_work

__all__ = ["parse", "parse_with_lark"]

_TOKEN_NAMES = {
    "VALUE": "a value like %x", "GRAPH_NAME": "a graph name like @main", "OP_NAME": "an op name",
    "ATTR_NAME": "an attribute name", "DTYPE": "a dtype like f32", "INT": "an integer",
    "FLOAT": "a float", "STRING": "a string", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
    "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "COLON": "':'",
    "EQUAL": "'='", "__ANON_0": "'->'", "RETURN": "'return'", "CONST": "'const'",
    "GRAPH": "'graph'", "LOC": "'loc'", "ON": "'on'", "TRUE": "'true'", "FALSE": "'false'",
}


@functools.cache
def _lark() -> Lark:
    grammar = (Path(__file__).with_name("grammar.lark")).read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _describe_expected(expected) -> str:
    names = sorted({_TOKEN_NAMES.get(e, e) for e in expected})
    if len(names) > 8:
        names = names[:8] + ["..."]
    return ", ".join(names)


def parse(text: str, weights: Mapping[str, np.ndarray] | None = None,
          source: str | None = None) -> Graph:
    """Parse IR text into a verified-shape Graph. Raises ParseError with line:column.

    Text in the printer's layout takes the linear-time fast path (``fastparse``); anything
    else, and every error, is read by lark, which reports the exact position."""
    with bulk_work():
        try:
            return parse_fast(text, weights)
        except NotFast:
            pass
        return parse_with_lark(text, weights, source)


def parse_with_lark(text: str, weights: Mapping[str, np.ndarray] | None = None,
                    source: str | None = None) -> Graph:
    """The reference parser: lark's LALR parser over ``grammar.lark`` (any layout, comments,
    exact error positions). ``parse`` uses it for what the fast path does not take."""
    try:
        tree = _lark().parse(text)
    except UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "end of input"
        allowed = _describe_expected(e.allowed or [])
        raise ParseError(f"unexpected character {ch!r}; expected {allowed}",
                         e.line, e.column, source) from None
    except UnexpectedEOF as e:
        raise ParseError(f"unexpected end of input; expected {_describe_expected(e.expected)}",
                         text.count("\n") + 1, len(text) - text.rfind("\n"), source) from None
    except UnexpectedInput as e:
        tok = getattr(e, "token", None)
        expected = getattr(e, "expected", None) or getattr(e, "allowed", None) or []
        line, col = getattr(e, "line", None), getattr(e, "column", None)
        if tok is None or tok.type == "$END" or not str(tok):
            got = "end of input"
            line, col = text.count("\n") + 1, len(text) - text.rfind("\n")
        else:
            got = repr(str(tok))
        raise ParseError(f"unexpected {got}; expected {_describe_expected(expected)}",
                         line, col, source) from None
    except (LarkError, RecursionError) as e:
        raise ParseError(f"cannot parse: {e}", 1, 1, source) from None
    return _Builder(weights, source).build(tree.children[0])


def _name(tok: Token, sigil: str) -> str:
    s = str(tok)[len(sigil):]
    return json.loads(s) if s.startswith('"') else s


class _Builder:
    def __init__(self, weights: Mapping[str, np.ndarray] | None, source: str | None):
        self.weights = weights
        self.source = source
        self.env: dict[str, Value] = {}

    def err(self, msg: str, item) -> ParseError:
        line = getattr(item, "line", None)
        col = getattr(item, "column", None)
        if line is None and isinstance(item, Tree) and not item.meta.empty:
            line, col = item.meta.line, item.meta.column
        return ParseError(msg, line, col, self.source)

    def build(self, tree: Tree) -> Graph:
        name_tok, *rest = tree.children
        g = Graph(_name(name_tok, "@"))
        params, types, stmts, ret = [], [], [], None
        for c in rest:
            if c is None:
                continue
            if c.data == "param":
                params.append(c)
            elif c.data == "type":
                types.append(c)
            elif c.data == "ret":
                ret = c
            else:
                stmts.append(c)
        for p in params:
            tok, ty = p.children
            name = _name(tok, "%")
            if name in self.env:
                raise self.err(f"%{name} is defined twice", tok)
            v = Value(name, self.type(ty))
            g.claim_name(name)
            g.inputs.append(v)
            self.env[name] = v
        for s in stmts:
            self.stmt(g, s)
        assert ret is not None
        g.outputs = [self.use(t) for t in ret.children]
        if len(g.outputs) != len(types):
            raise self.err(f"the signature declares {len(types)} result(s) but return gives "
                           f"{len(g.outputs)}", ret)
        for i, (v, ty_tree) in enumerate(zip(g.outputs, types, strict=True)):
            ty = self.type(ty_tree)
            if v.type != ty:
                raise self.err(f"result {i} is declared {ty} but %{v.name} is {v.type}", ty_tree)
        return g

    def use(self, tok: Token) -> Value:
        name = _name(tok, "%")
        try:
            return self.env[name]
        except KeyError:
            raise self.err(f"%{name} is used before it is defined", tok) from None

    def define(self, g: Graph, tok: Token, ty: TensorType) -> Value:
        name = _name(tok, "%")
        if name in self.env:
            raise self.err(f"%{name} is defined twice", tok)
        v = Value(name, ty)
        g.claim_name(name)
        self.env[name] = v
        return v

    def type(self, tree: Tree) -> TensorType:
        dtype, *dims = tree.children
        try:
            return TensorType(tuple(int(d) for d in dims if d is not None), str(dtype))
        except (OpError, ValueError) as e:
            raise self.err(str(e), dtype) from None

    def tail(self, children) -> tuple[str, str | None]:
        loc = dev = ""
        for c in children:
            if isinstance(c, Tree) and c.data == "loc":
                loc = json.loads(str(c.children[0]))
            elif isinstance(c, Tree) and c.data == "device":
                dev = json.loads(str(c.children[0]))
        return loc, (dev or None)

    def stmt(self, g: Graph, s: Tree) -> None:
        if s.data == "const_stmt":
            results, body, ty_tree, *tail = s.children
            if len(results.children) != 1:
                raise self.err("const has exactly one result", results)
            ty = self.type(ty_tree)
            if isinstance(body, Token):
                ref = json.loads(str(body))
                attrs = {"ref": ref, "value": None}
                if self.weights is not None:
                    if ref not in self.weights:
                        raise self.err(f"weight {ref!r} is not in the weights file", body)
                    arr = np.asarray(self.weights[ref])
                    if TensorType.of(arr) != ty:
                        raise self.err(f"weight {ref!r} is {TensorType.of(arr)} in the weights "
                                       f"file but declared {ty}", body)
                    g.weights[ref] = arr
            else:
                attrs = {"ref": "", "value": self.array(body, ty)}
            loc, dev = self.tail(tail)
            out = self.define(g, results.children[0], ty)
            g.nodes.append(Node("const", [], [out], attrs, name=loc, device=dev))
            return
        results, op_tok, *rest = s.children
        op = str(op_tok)
        if not has_op(op):
            raise self.err(f"unknown op {op!r}", op_tok)
        operands, attrs_tree, types, tail = [], None, [], []
        for c in rest:
            if c is None:
                continue
            if isinstance(c, Token):
                operands.append(self.use(c))
            elif c.data == "attrs":
                attrs_tree = c
            elif c.data == "type":
                types.append(self.type(c))
            else:
                tail.append(c)
        opdef = get_op(op)
        raw = {}
        if attrs_tree is not None:
            for a in attrs_tree.children:
                if a is None:
                    continue
                key_tok, val = a.children
                key = str(key_tok)
                if key in raw:
                    raise self.err(f"attribute {key!r} is given twice", key_tok)
                raw[key] = self.attr_value(val)
        try:
            opdef.check_arity(len(operands))
            attrs = opdef.normalize_attrs(raw)
        except OpError as e:
            raise self.err(str(e), op_tok) from None
        if len(types) != len(results.children):
            raise self.err(f"{len(results.children)} result(s) but {len(types)} type(s)",
                           op_tok)
        outs = [self.define(g, t, ty) for t, ty in zip(results.children, types, strict=True)]
        loc, dev = self.tail(tail)
        g.nodes.append(Node(op, operands, outs, attrs, name=loc, device=dev))

    def attr_value(self, t):
        if isinstance(t, Tree) and t.data == "list":
            return [self.attr_value(c) for c in t.children if c is not None]
        kind = t.data
        tok = t.children[0] if t.children else None
        if kind == "int":
            return int(tok)
        if kind == "float":
            return float(tok)
        if kind == "string":
            return json.loads(str(tok))
        return kind == "true"

    def array(self, tree: Tree, ty: TensorType) -> np.ndarray:
        vals = [self.attr_value(c) for c in tree.children if c is not None]
        if len(vals) != ty.size:
            raise self.err(f"inline constant has {len(vals)} element(s) but {ty} needs "
                           f"{ty.size}", tree)
        try:
            with np.errstate(all="ignore"):
                arr = np.array(vals, dtype=np.float64 if any(isinstance(v, float) for v in vals)
                               else np.int64)
                return arr.astype(to_numpy_dtype(ty.dtype)).reshape(ty.shape)
        except (OverflowError, ValueError, NpuccError) as e:
            raise self.err(f"inline constant does not fit {ty}: {e}", tree) from None
