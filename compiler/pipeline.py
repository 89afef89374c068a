"""Pipeline text <-> a list of configured passes.

``fold-constants,fuse-conv-act{activations=relu,relu6,verbose=true},to-nhwc``

Grammar (``pipeline.lark``): passes separated by commas; options in braces as ``key=value``;
a list value is its items separated by commas (the list runs until the next ``key=`` or the
closing brace) or in brackets (``[relu,relu6]``; ``[]`` is the empty list); a value holding
``,{}[]=`` or spaces is a JSON-quoted string. Option keys may use ``-`` or ``_``.

Values are converted to the pass's dataclass field types: ``bool`` (true/false, 1/0,
yes/no, on/off), ``int``, ``float`` (also inf/nan), ``str``, ``Literal[...]``, ``X | None``
(``none``) and tuples of those (``tuple[str, ...]`` takes any number of items, a bare
single value is a 1-tuple). Every error is a :class:`PipelineError` with the column and the
valid choices. ``format_pipeline(parse_pipeline(t))`` is the canonical text, which parses
back to equal passes (``Pass.pipeline_text`` is one entry of it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from compiler.errors import PipelineError
from compiler.pass_base import Pass, lookup_pass, pass_registry

__all__ = ["parse_pipeline", "format_pipeline", "get_pass_class", "as_passes",
           "describe_pass", "option_help"]


@functools.cache
def _lark():
    from lark import Lark

    grammar = Path(__file__).with_name("pipeline.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_EXPECTED = {"COMMA": "','", "NAME": "a name", "KEY_EQ": "key=", "LBRACE": "'{'",
             "RBRACE": "'}'", "LSQB": "'['", "RSQB": "']'", "STRING": "a string",
             "$END": "the end"}


@dataclasses.dataclass
class _RawOption:
    key: str
    column: int
    items: list[tuple[str, bool, int]]  # (text, was quoted, column)
    bracketed: bool


def get_pass_class(name: str, text: str | None = None, column: int | None = None
                   ) -> type[Pass]:
    """The registered pass called ``name``; a PipelineError lists every known pass if none."""
    cls = lookup_pass(name)
    if cls is not None:
        return cls
    known = sorted(pass_registry())
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise PipelineError(f"unknown pass '{name}'{hint}; known passes: "
                        + (", ".join(known) or "none registered"), text, column)


def parse_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into configured pass instances (see the module docstring)."""
    from lark import Token
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

    flat = " ".join(text.splitlines())  # one line, so a column is enough to point at
    try:
        tree = _lark().parse(flat)
    except UnexpectedCharacters as e:
        raise PipelineError(f"unexpected character {flat[e.pos_in_stream]!r}", flat,
                            e.column) from None
    except UnexpectedEOF:
        raise PipelineError("unexpected end of the pipeline (unclosed '{' or '['?)", flat,
                            len(flat) + 1) from None
    except UnexpectedInput as e:
        tok = getattr(e, "token", None)
        what = repr(str(tok)) if tok is not None and str(tok) else "end of the pipeline"
        hint = ""
        if tok is not None and tok.type == "$END":
            what, hint = "end of the pipeline", " (unclosed '{' or '['?)"
        if tok is not None and tok.type == "NAME":
            hint = " (an option is written key=value)"
        col = getattr(e, "column", None)
        if col is None or col < 1 or (tok is not None and tok.type == "$END"):
            col = len(flat) + 1
        expected = sorted({_EXPECTED.get(t, t) for t in getattr(e, "expected", None) or ()})
        if expected and not hint:
            hint = "; expected " + " or ".join(expected)
        raise PipelineError(f"unexpected {what}{hint}", flat, col) from None
    out: list[Pass] = []
    for entry in tree.children:
        if entry is None:  # empty pipeline
            continue
        name_tok: Token = entry.children[0]
        cls = get_pass_class(str(name_tok), flat, name_tok.column)
        raw = _group_options(entry.children[1], flat) if len(entry.children) > 1 and \
            entry.children[1] is not None else []
        out.append(_make_pass(cls, raw, flat, name_tok.column))
    return out


def _group_options(tree, text: str) -> list[_RawOption]:
    opts: list[_RawOption] = []
    for part in tree.children:
        if part is None:  # `name{}`
            continue
        kids = part.children
        if part.data == "more":
            tok = kids[0]
            if not opts or opts[-1].bracketed:
                raise PipelineError(f"expected key=value, got {str(tok)!r}", text, tok.column)
            opts[-1].items.append(_item(tok))
            continue
        key_tok = kids[0]
        key = str(key_tok).rstrip("=").strip()
        items = [_item(t) for t in kids[1:] if t is not None]
        opts.append(_RawOption(key, key_tok.column, items, part.data == "key_list"))
    return opts


def _item(tok) -> tuple[str, bool, int]:
    if tok.type == "STRING":
        return json.loads(str(tok)), True, tok.column
    return str(tok), False, tok.column


def _make_pass(cls: type[Pass], raw: list[_RawOption], text: str, column: int) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for opt in raw:
        fname = opt.key.replace("-", "_")
        if fname not in fields:
            raise PipelineError(f"unknown option '{opt.key}' for pass '{cls.name}'; "
                                + option_help(cls), text, opt.column)
        if fname in kwargs:
            raise PipelineError(f"option '{opt.key}' of pass '{cls.name}' is given twice",
                                text, opt.column)
        kwargs[fname] = _convert_option(cls, fname, hints[fname], opt, text)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the pass's own __post_init__ checks
        raise PipelineError(f"bad options for pass '{cls.name}': {e}", text, column) from None


def _convert_option(cls: type[Pass], fname: str, tp: Any, opt: _RawOption, text: str) -> Any:
    origin = typing.get_origin(tp)
    where = f"option '{opt.key}' of pass '{cls.name}'"
    if origin is tuple:
        args = typing.get_args(tp)
        elem_types = [args[0]] * len(opt.items) if len(args) == 2 and args[1] is Ellipsis \
            else list(args)
        if len(elem_types) != len(opt.items):
            raise PipelineError(f"{where} takes {len(elem_types)} values "
                                f"({_type_name(tp)}), got {len(opt.items)}", text, opt.column)
        return tuple(_convert_scalar(et, it, where, text)
                     for et, it in zip(elem_types, opt.items, strict=True))
    if opt.bracketed or len(opt.items) > 1:
        raise PipelineError(f"{where} takes one value ({_type_name(tp)}), got a list of "
                            f"{len(opt.items)}; quote a string holding commas", text,
                            opt.column)
    item = opt.items[0] if opt.items else ("", False, opt.column + len(opt.key) + 1)
    return _convert_scalar(tp, item, where, text)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert_scalar(tp: Any, item: tuple[str, bool, int], where: str, text: str) -> Any:
    s, quoted, col = item
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if s.lower() == "none" and not quoted and len(args) < len(typing.get_args(tp)):
            return None
        for a in args:
            try:
                return _convert_scalar(a, item, where, text)
            except PipelineError:
                continue
        raise PipelineError(f"{where}: {s!r} is not a {_type_name(tp)}", text, col)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c).lower() == s.lower() if isinstance(c, bool) else str(c) == s:
                return c
        raise PipelineError(f"{where}: {s!r} is not one of "
                            + ", ".join(map(str, choices)), text, col)
    try:
        if tp is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(s, 0) if not s.lstrip("+-").isdigit() else int(s)
        if tp is float:
            return float(s)
        if tp is str:
            return s
    except ValueError:
        raise PipelineError(f"{where}: {s!r} is not a {_type_name(tp)}"
                            + (" (true or false)" if tp is bool else ""), text, col) from None
    if tp is Any:
        return s
    raise PipelineError(f"{where} has type {_type_name(tp)}, which pipeline text cannot set",
                        text, col)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return str(tp).replace("typing.", "")


def _fmt_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "(required)"
    from compiler.pass_base import format_option_value

    return "= " + format_option_value(v)


def option_help(cls: type[Pass]) -> str:
    """``its options: name: type = default, ...`` (or ``it takes no options``)."""
    fields = dataclasses.fields(cls)
    if not fields:
        return "it takes no options"
    hints = typing.get_type_hints(cls)
    return "its options: " + ", ".join(
        f"{f.name.replace('_', '-')}: {_type_name(hints[f.name])} {_fmt_default(f)}"
        for f in fields)


def describe_pass(cls: type[Pass]) -> str:
    """One line for help listings: the name and the docstring's first sentence."""
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated docstring
        doc = ""
    para = " ".join(doc.split("\n\n")[0].split())
    first = para.split(". ")[0].rstrip(".")
    if len(first) > 90:
        first = first[:87] + "..."
    return f"{cls.name}: {first}" if first else cls.name


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The canonical pipeline text of ``passes`` (options that differ from defaults)."""
    return ",".join(p.pipeline_text for p in passes)


def as_passes(pipeline: str | Pass | type[Pass] | Sequence[Pass | type[Pass] | str]
              ) -> list[Pass]:
    """Accept pipeline text, a pass, a pass class, or a sequence of those."""
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, Pass):
        return [pipeline]
    if isinstance(pipeline, type) and issubclass(pipeline, Pass):
        return [pipeline()]
    out: list[Pass] = []
    for p in pipeline:
        out.extend(as_passes(p))
    return out
