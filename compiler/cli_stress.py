"""``npucc stress``: many concurrent callers, every output checked, memory and threads watched.

    npucc stress PKG --concurrency 100 --runs 10000 [--input NAME=FILE.npy ...]

Exit status 0 when every output was bit-identical to a single-threaded run of the same input
and neither RSS nor the thread count grew past the limits after the warm-up; 1 otherwise (the
report says why). See ``runtime/stress.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compiler.errors import NpuccError

__all__ = ["configure_stress"]


def _input_arg(text: str) -> tuple[str | None, str]:
    name, eq, path = text.partition("=")
    return (name, path) if eq else (None, text)


def configure_stress(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="a package folder")
    p.add_argument("--concurrency", type=int, default=100, metavar="N",
                   help="concurrent caller threads (default 100)")
    p.add_argument("--runs", type=int, default=10000, metavar="N",
                   help="runs after the warm-up, all callers together (default 10000)")
    p.add_argument("--input", action="append", type=_input_arg, default=[],
                   metavar="NAME=FILE.npy", help="an input array (repeatable; NAME= may be left "
                   "out for a single-input model); default: seeded random inputs (floats "
                   "N(0,1), integers 0/1)")
    p.add_argument("--variants", type=int, default=4, metavar="K",
                   help="input variants taking turns (the input rolled by 7k elements), so a "
                   "mixed-up result is caught (default 4)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="concurrent runs before the memory baseline (default 2 x concurrency)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0, metavar="MB",
                   help="fail if RSS grows more than this after the warm-up (default 64)")
    p.add_argument("--max-thread-growth", type=int, default=0, metavar="N",
                   help="fail if the process has more than N more threads at the end than "
                   "after the warm-up (default 0)")
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="a public key the package must be signed with (repeatable); default: "
                   "NPUCC_TRUSTED_KEYS")
    p.add_argument("--mode", default=None, help="the mode of a package with several modes")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_stress)


def _inputs(args: argparse.Namespace, names: list[str]) -> dict | None:
    import numpy as np

    if not args.input:
        return None
    feeds = {}
    for name, path in args.input:
        if name is None:
            if len(names) != 1:
                raise NpuccError(f"the model has inputs {', '.join(names)}: write "
                                 f"--input NAME=FILE.npy")
            name = names[0]
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise NpuccError(f"cannot read input {name!r} from {path}: {e}") from None
    missing = [n for n in names if n not in feeds]
    if missing:
        raise NpuccError(f"no --input for {', '.join(missing)} (the model's inputs: "
                         f"{', '.join(names)})")
    return feeds


def _cmd_stress(args: argparse.Namespace) -> int:
    import runtime
    from runtime.stress import stress

    for flag in ("concurrency", "runs", "variants"):
        if getattr(args, flag) < 1:
            raise NpuccError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    m = runtime.load(args.package, trusted_keys=args.trusted_key or None, mode=args.mode)
    report = stress(m, _inputs(args, list(m.input_names)), concurrency=args.concurrency,
                    runs=args.runs, variants=args.variants, warmup=args.warmup,
                    max_rss_growth_mb=args.max_rss_growth_mb,
                    max_thread_growth=args.max_thread_growth)
    print(f"{args.package}:\n{report.text()}")
    if args.json:
        Path(args.json).write_text(json.dumps(vars(report) | {"ok": report.ok}, indent=1))
    sys.stdout.flush()
    return 0 if report.ok else 1
