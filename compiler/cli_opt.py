"""``npucc opt``: run a pass pipeline on an .ir file, with every debugging instrument.

    npucc opt m.ir -p "canonicalize,to-nhwc" --print-ir-after-all --time-passes
    npucc opt m.ir -p "$(cat pipeline.txt)" --target kirin990 --calibration calib.npz
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compiler.cli import read_ir_text, read_ir_weights

__all__ = ["configure_opt", "passes_help", "split_input_file", "SPLIT_MARKER"]

SPLIT_MARKER = "// -----"


def _int_range_arg(text: str) -> tuple[str | None, tuple[int, int]]:
    name, eq, rng = text.rpartition("=")
    try:
        lo, hi = (int(x) for x in rng.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI or NAME=LO,HI (half-open), got {text!r}") from None
    return (name if eq else None), (lo, hi)


def _names_arg(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def split_input_file(text: str) -> list[tuple[int, str]]:
    """Split at lines that are exactly ``// -----``; returns (first line index, chunk)."""
    chunks: list[tuple[int, str]] = []
    start, cur = 0, []
    for i, line in enumerate(text.splitlines(keepends=True)):
        if line.strip() == SPLIT_MARKER:
            chunks.append((start, "".join(cur)))
            start, cur = i + 1, []
        else:
            cur.append(line)
    chunks.append((start, "".join(cur)))
    return chunks



class _OptHelp(argparse.Action):
    """``npucc opt --help``: the usage, then every registered pass with its options (the
    registry is imported only here, so other commands stay fast)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for spec in getattr(namespace, "load_plugin", None) or []:
            from compiler.pass_base import load_plugin

            load_plugin(spec)
        parser.print_help()
        print("\n" + passes_help())
        parser.exit()


def passes_help() -> str:
    import dataclasses

    from compiler.pass_base import pass_registry
    from compiler.pipeline import describe_pass, option_help

    lines = ["passes (pipeline: name{option=value,...},name,...):"]
    for _name, cls in sorted(pass_registry().items()):
        lines.append("  " + describe_pass(cls))
        if dataclasses.fields(cls):
            lines.append("      " + option_help(cls).removeprefix("its options: "))
    return "\n".join(lines)


def configure_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action=_OptHelp,
                   help="show this help and every registered pass, then exit")
    p.add_argument("input", help="an .ir file ('-' for stdin); weights are read from the "
                   ".safetensors beside it")
    p.add_argument("-p", "--pipeline", "--passes", default="",
                   help="pipeline text, e.g. 'fold-constants,fuse-conv-act{activations="
                   "relu,relu6}'")
    p.add_argument("-o", "--output", help="write the result here (with its weights); "
                   "default: print the IR to stdout")
    g = p.add_argument_group("what the passes read (compile() names these in its pipeline)")
    g.add_argument("--target", metavar="NAME|FILE.toml", help="the target description for "
                   "passes whose target option is empty (partition, npu-numerics)")
    g.add_argument("--calibration", action="append", default=[], metavar="[NAME=]FILE.npz",
                   help="bind a sample set to @NAME (default @calibration), as options such "
                   "as quantize{calibration=@calibration} name it (repeatable)")
    g.add_argument("--print-pipeline", action="store_true",
                   help="print the pipeline text before running it (to stderr)")
    g = p.add_argument_group("IR printing (to stderr, like mlir-opt)")
    g.add_argument("--print-ir-after-all", action="store_true")
    g.add_argument("--print-ir-before-all", action="store_true")
    g.add_argument("--print-ir-after", type=_names_arg, action="append", default=[],
                   metavar="NAME[,NAME]")
    g.add_argument("--print-ir-before", type=_names_arg, action="append", default=[],
                   metavar="NAME[,NAME]")
    g.add_argument("--print-ir-after-change", action="store_true",
                   help="print after a pass only if it changed the graph")
    g.add_argument("--dump-dir", metavar="DIR", help="write the selected stages (all, if "
                   "none is selected) as numbered DIR/NN-<pass>.ir files")
    g = p.add_argument_group("checking and timing")
    g.add_argument("--time-passes", action="store_true",
                   help="per-pass wall time, node counts and stats (to stderr)")
    g.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True,
                   help="verify the graph after every pass (default: on)")
    g.add_argument("--verify-roundtrip", action="store_true",
                   help="check after every pass that the IR text parses back identically")
    g.add_argument("--pass-limit", type=int, metavar="N",
                   help="run only the first N passes of the pipeline")
    g.add_argument("--numeric-check", action="store_true", help="compare every pass's "
                   "result with the unoptimised graph on sample inputs (table to stderr)")
    g.add_argument("--bisect", action="store_true", help="find the first pass whose "
                   "numeric error exceeds --tolerance; prints it instead of the IR")
    g.add_argument("--tolerance", type=float, help="numeric check: fail past this error "
                   "(naming the pass); bisect: default 1e-4")
    g.add_argument("--tolerance-metric", choices=("max_abs", "max_rel", "cosine"),
                   default="max_abs", help="the figure the tolerance bounds (cosine: "
                   "1 - cosine similarity)")
    g.add_argument("--inputs", metavar="FILE.npz", help="sample inputs (arrays named as "
                   "the graph inputs); default: random, from --seed")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--int-range", type=_int_range_arg, action="append", default=[],
                   metavar="[NAME=]LO,HI", help="range of generated integer inputs, "
                   "half-open (default 0,100); e.g. input_ids=0,30522")
    g = p.add_argument_group("failures and inputs")
    g.add_argument("--crash-dir", default="npucc-crash", metavar="DIR",
                   help="where a failing pass's input IR is saved (default ./npucc-crash)")
    g.add_argument("--no-crash-reproducer", action="store_true",
                   help="do not write a reproducer when a pass fails")
    g.add_argument("--split-input-file", action="store_true",
                   help="process each '// -----' chunk separately; outputs are joined "
                   "by '// -----'")
    g.add_argument("--load-plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a module that registers passes (repeatable)")
    p.set_defaults(func=_cmd_opt)


def _debug_options(args: argparse.Namespace) -> Any:
    import numpy as np

    from compiler.errors import NpuccError
    from compiler.pass_manager import DebugOptions

    inputs = None
    if args.inputs:
        try:
            with np.load(args.inputs) as z:
                inputs = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise NpuccError(f"cannot read sample inputs {args.inputs}: {e}") from None
    ranges = dict(args.int_range)
    int_range: Any = ranges.pop(None, (0, 100))
    if ranges:
        int_range = {**{k: v for k, v in ranges.items()}, "*": int_range}
    return DebugOptions(
        print_pipeline=args.print_pipeline,
        print_ir_before_all=args.print_ir_before_all,
        print_ir_before=tuple(n for ns in args.print_ir_before for n in ns),
        print_ir_after_all=args.print_ir_after_all,
        print_ir_after=tuple(n for ns in args.print_ir_after for n in ns),
        print_ir_after_change=args.print_ir_after_change,
        print_ir_stream=sys.stderr, dump_dir=args.dump_dir, time_passes=args.time_passes,
        verify_each=args.verify_each, verify_roundtrip=args.verify_roundtrip,
        pass_limit=args.pass_limit, numeric_check=args.numeric_check,
        sample_inputs=inputs, seed=args.seed, int_range=int_range,
        tolerance=args.tolerance, tolerance_metric=args.tolerance_metric,
        crash_dir=None if args.no_crash_reproducer else args.crash_dir,
        report_stream=sys.stderr)


def _pass_context(args: argparse.Namespace) -> Any:
    """The PassContext of ``npucc opt``: ``--target`` and the ``--calibration`` sample sets."""
    from compiler.errors import NpuccError
    from compiler.pass_base import PassContext
    from compiler.samples import load_samples

    resources = {}
    for spec in args.calibration:
        name, eq, file = spec.partition("=")
        name, file = (name, file) if eq else ("calibration", spec)
        if not name.isidentifier():
            raise NpuccError(f"--calibration {spec!r}: give FILE.npz or NAME=FILE.npz")
        resources[name] = load_samples(file)
    target = None
    if args.target:
        from targets.description import load_target

        target = load_target(args.target)
    return PassContext(target=target, resources=resources)


def _cmd_opt(args: argparse.Namespace) -> int:
    import dataclasses

    from compiler.errors import NpuccError
    from compiler.ir.parser import parse
    from compiler.pass_base import PassContext, load_plugin
    from compiler.pass_manager import run_pipeline
    from compiler.pipeline import parse_pipeline

    for spec in args.load_plugin:
        load_plugin(spec)
    passes = parse_pipeline(args.pipeline)
    ctx = _pass_context(args)
    debug = _debug_options(args)
    debug.instruments()  # check the pass names given to --print-ir-* before any work
    text = read_ir_text(args.input)
    weights = read_ir_weights(args.input)
    source = "<stdin>" if args.input == "-" else args.input
    chunks = split_input_file(text) if args.split_input_file else [(0, text)]
    outputs: list[str] = []
    graphs = []
    failed = False
    for n, (first_line, chunk) in enumerate(chunks):
        chunk_debug = debug
        if debug.dump_dir is not None and len(chunks) > 1:
            chunk_debug = dataclasses.replace(debug, dump_dir=Path(debug.dump_dir) / f"{n}")
        try:
            graph = parse("\n" * first_line + chunk, weights, source=source)
            if args.bisect:
                outputs.append(_bisect(graph, passes, args, debug))
                continue
            graph = run_pipeline(graph, passes, debug=chunk_debug,
                                 ctx=PassContext(target=ctx.target, resources=ctx.resources))
            graphs.append(graph)
            outputs.append(str(graph))
        except NpuccError as e:
            if len(chunks) == 1:
                raise
            where = f"{source}: chunk {n + 1} (line {first_line + 1})"
            print(f"npucc: error: {where}: {e}", file=sys.stderr)
            outputs.append(f"// error: {str(e).splitlines()[0]}\n")
            failed = True
    if args.output and not args.bisect:
        from compiler.ir.serialize import atomic_write, check_output, save

        inputs = [] if args.input == "-" else [args.input]
        if len(graphs) == 1 and len(chunks) == 1:
            save(graphs[0], args.output, inputs=inputs)
        else:
            check_output(args.output, inputs)
            atomic_write(args.output, f"{SPLIT_MARKER}\n".join(outputs))
    else:
        sys.stdout.write(f"{SPLIT_MARKER}\n".join(outputs))
        sys.stdout.flush()
    return 1 if failed else 0


def _bisect(graph: Any, passes: list, args: argparse.Namespace, debug: Any) -> str:
    from compiler.numeric import bisect

    res = bisect(graph, passes, debug.sample_inputs, args.tolerance if args.tolerance
                 is not None else 1e-4, metric=args.tolerance_metric, seed=args.seed,
                 int_range=debug.int_range, verify_each=args.verify_each)
    return str(res) + "\n"
