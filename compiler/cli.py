"""The ``npucc`` command.

    npucc import MODEL.onnx -o m.ir [--input-shape name=1,3,224,224]
    npucc opt IN.ir -p PIPELINE [-o OUT.ir] [--print-ir-after-all] [--time-passes] ...
    npucc diff A.ir B.ir

Subcommands are entries of ``COMMANDS`` (name -> (help, configure)); ``configure(parser)``
adds the arguments and sets ``func``. Importing this module stays cheap: every command
imports what it needs when it runs. Errors the user caused print ``npucc: error: ...`` and
exit 1, never a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "COMMANDS", "shape_arg", "read_ir_text", "read_ir_weights"]



# -- helpers ------------------------------------------------------------------------
def shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, eq, dims = text.rpartition("=")
    try:
        if not eq or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=D0,D1,... or NAME=D0xD1x... (e.g. input=1,3,224,224 or "
            f"input_ids=1x128), got {text!r}") from None


def read_ir_weights(path: str) -> dict[str, Any] | None:
    from compiler.errors import ImportError_
    from compiler.ir.serialize import weights_path

    if path == "-":
        return None
    wpath = weights_path(path)
    if not wpath.exists():
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(str(wpath))
    except Exception as e:
        raise ImportError_(f"cannot read weights {wpath}: {e}") from None


def read_ir_text(path: str) -> str:
    from compiler.errors import NpuccError

    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise NpuccError(f"cannot read {path}: {e}") from None


# -- npucc import ---------------------------------------------------------------------
def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an ONNX file")
    p.add_argument("-o", "--output", required=True, help="the .ir file to write "
                   "(weights go beside it as .safetensors)")
    p.add_argument("--input-shape", action="append", type=shape_arg, default=[],
                   metavar="NAME=D0,D1,...", help="fix a dynamic input shape (repeatable)")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from compiler.errors import NpuccError

    try:
        from compiler.frontends import from_onnx
    except ImportError as e:
        raise NpuccError(f"the ONNX importer is not available: {e}") from None
    from compiler.ir.serialize import save

    shapes = {name: list(dims) for name, dims in args.input_shape}
    graph = from_onnx(args.model, input_shapes=shapes or None)
    out = save(graph, args.output, inputs=[args.model])
    print(f"wrote {out} ({len(graph.nodes)} nodes, {len(graph.weights)} weights)",
          file=sys.stderr)
    return 0


# -- npucc diff -----------------------------------------------------------------------
def _configure_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="an .ir file")
    p.add_argument("b", help="another .ir file")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context")
    p.set_defaults(func=_cmd_diff)


def _node_signatures(text: str, source: str) -> Any:
    """Op counts and a multiset of node signatures (op, attributes, types), or None if the
    text does not parse (the text diff is still shown)."""
    from collections import Counter

    from compiler.errors import NpuccError
    from compiler.ir.parser import parse
    from compiler.ir.printer import format_attr

    try:
        g = parse(text, source=source)
    except NpuccError:
        return None
    sigs = Counter()
    for n in g.nodes:
        attrs = ",".join(f"{k}={format_attr(v)}" for k, v in sorted(n.attrs.items())
                         if k != "value")
        sigs[f"{n.op}{{{attrs}}} : " + ", ".join(str(v.type) for v in n.outputs)] += 1
    return g.op_counts(), sigs, len(g.nodes)


def _cmd_diff(args: argparse.Namespace) -> int:
    import difflib

    a, b = read_ir_text(args.a), read_ir_text(args.b)
    if a == b:
        print(f"{args.a} and {args.b} are identical")
        return 0
    diff = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                fromfile=args.a, tofile=args.b, n=args.context)
    sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in diff)
    sa, sb = _node_signatures(a, args.a), _node_signatures(b, args.b)
    if sa is not None and sb is not None:
        (ca, siga, na), (cb, sigb, nb) = sa, sb
        removed = sum((siga - sigb).values())
        added = sum((sigb - siga).values())
        print(f"\nnodes: {na} -> {nb} ({nb - na:+d}); {removed} removed, {added} added "
              "(by op, attributes and types)")
        print("op counts:")
        for op in sorted(set(ca) | set(cb)):
            x, y = ca.get(op, 0), cb.get(op, 0)
            mark = f" ({y - x:+d})" if x != y else ""
            print(f"  {op:<20} {x} -> {y}{mark}")
    return 1


# -- main -----------------------------------------------------------------------------
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], bool]] = {
    # name: (help, configure, add argparse's own -h)
    "import": ("import an ONNX model to an .ir file", _configure_import, True),
    "opt": ("run a pass pipeline on an .ir file (with pass-level debugging)",
            lambda p: _opt().configure_opt(p), False),
    "diff": ("compare two .ir files: text diff and op-count summary (exit 1 if they differ)",
             _configure_diff, True),
    "compile": ("compile a model for a target into a runnable package",
                lambda p: _build().configure_compile(p), True),
    "compress": ("choose sparsity and precision for a target and budgets, compile the plan",
                 lambda p: _compress().configure_compress(p), True),
    "run": ("run a compiled package on .npy inputs", lambda p: _build().configure_run(p), True),
    "targets": ("list the built-in targets, or show one",
                lambda p: _build().configure_targets(p), True),
    "report": ("quantization report: per-layer error vs float, sizes (JSON, HTML, heatmap)",
               lambda p: _report().configure_report(p), True),
    "compile-llm": ("compile a decoder LLM (GGUF / transformers) to a prefill + decode package",
                    lambda p: _llm().configure_compile_llm(p), True),
    "generate": ("generate text with an LLM package, streaming, with tok/s",
                 lambda p: _llm().configure_generate(p), True),
    "keygen": ("create a signing key pair (ECDSA P-256, PEM) for packages",
               lambda p: _trust().configure_keygen(p), True),
    "sign": ("sign a package (OpenSSF model-signing format, model.sig)",
             lambda p: _trust().configure_sign(p), True),
    "verify": ("verify a package's signature and files against trusted public keys",
               lambda p: _trust().configure_verify(p), True),
    "calibrate": ("fit a target's cost model to measured latencies, write a calibrated copy",
                  lambda p: _calibrate().configure_calibrate(p), True),
    "update": ("over-the-air delta updates: make a signed delta, apply one atomically",
               lambda p: __import__("compiler.cli_update").cli_update.configure_update(p), True),
    "stress": ("run a package from many concurrent callers: outputs checked, RSS/threads watched",
               lambda p: __import__("compiler.cli_stress").cli_stress.configure_stress(p), True),
    "monitor": ("run a load on a package, write a self-contained dashboard.html",
                lambda p: __import__("compiler.cli_monitor").cli_monitor.configure_monitor(p),
                True),
}


def _opt():
    from compiler import cli_opt

    return cli_opt


def _build():
    from compiler import cli_build

    return cli_build


def _compress():
    from compiler import cli_compress

    return cli_compress


def _report():
    from compiler import cli_report

    return cli_report


def _trust():
    from compiler import cli_trust

    return cli_trust


def _calibrate():
    from compiler import cli_calibrate

    return cli_calibrate


def _llm():
    from compiler.llm import cli

    return cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npucc", description="A model compiler for "
                                     "phone NPUs.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, own_help) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=own_help)
        configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from compiler.errors import NpuccError
    from runtime.errors import RuntimeError_

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (NpuccError, RuntimeError_) as e:
        if args.traceback:
            raise
        print(f"npucc: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `npucc opt ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
