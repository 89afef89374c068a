"""``npucc compile``, ``npucc run`` and ``npucc targets``: the commands that build and run packages.

    npucc compile MODEL -t TARGET -o OUT.npkg [--cpu x86-64-v3] [-p PIPELINE] [--input-shape ...]
    npucc run OUT.npkg --input name=file.npy [--profile] [--save-outputs DIR]
    npucc targets [show NAME [--cpu LEVEL]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiler.errors import NpuccError

__all__ = ["configure_compile", "configure_run", "configure_targets"]


def configure_compile(p: argparse.ArgumentParser) -> None:
    from compiler.cli import shape_arg

    p.add_argument("model", help="an .onnx or .ir file")
    p.add_argument("-t", "--target", default="host",
                   help="a built-in target name (npucc targets) or a target .toml file")
    p.add_argument("-o", "--output", required=True, help="the package folder to write (.npkg)")
    from runtime.cpu import PORTABLE_LEVELS

    p.add_argument("--cpu", default=None, metavar="NAME",
                   help="build the runnable kernels for this CPU instead of the detected one, "
                   "for packages that run on other machines: a portable level or LLVM CPU "
                   f"name ({', '.join(PORTABLE_LEVELS)}, ...)")
    p.add_argument("-p", "--pipeline", default=None,
                   help="pipeline text replacing the target's default pipeline")
    p.add_argument("--input-shape", action="append", type=shape_arg, default=[],
                   metavar="NAME=D0,D1,...", help="fix a dynamic input shape (repeatable)")
    p.add_argument("--outputs", default=None, metavar="NAMES",
                   help="return these values (comma-separated names) instead of the model's "
                   "outputs: cut the graph before post-processing")
    p.add_argument("--time-passes", action="store_true", help="per-pass timing table")
    p.add_argument("--print-ir-after", default=None, metavar="NAMES",
                   help="print the IR after the named passes (comma-separated)")
    p.add_argument("--dump-dir", default=None, help="write the IR after every pass here")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--sign-key", default=None, metavar="KEY",
                   help="sign the package with this private key (npucc keygen)")
    p.add_argument("--model-version", default=None, metavar="VERSION",
                   help="the model's version in the manifest (\"3\", \"1.4.0\"); npucc update "
                   "refuses to install an older version over a newer one")
    p.add_argument("--password-env", default=None, metavar="VAR",
                   help="the environment variable holding the signing key's password")
    p.set_defaults(func=_cmd_compile)


def _cmd_compile(args: argparse.Namespace) -> int:
    from compiler.driver import compile as compile_model

    debug = {}
    if args.time_passes:
        debug["time_passes"] = True
    if args.print_ir_after:
        debug["print_ir_after"] = args.print_ir_after
    if args.dump_dir:
        debug["dump_dir"] = args.dump_dir
    if debug:
        debug["print_ir_stream"] = sys.stderr
        debug["report_stream"] = sys.stderr
    key = None
    if args.sign_key:
        from compiler.cli_trust import password_from_env
        from runtime.signing import load_private_key

        key = load_private_key(args.sign_key, password_from_env(args.password_env))
    from runtime.package_save import check_replaceable

    check_replaceable(Path(args.output))   # before the work: never after it, never silently
    shapes = {name: list(dims) for name, dims in args.input_shape}
    m = compile_model(args.model, args.target, args.pipeline, debug or None,
                      input_shapes=shapes or None, progress=not args.no_progress,
                      outputs=args.outputs.split(",") if args.outputs else None,
                      cpu=args.cpu, version=args.model_version)
    out = m.save(args.output, sign_key=key)
    s = m.stats()
    summ = m.summary()["nodes_per_device"]
    print(f"wrote {out}: {s['steps']} kernel calls ({s['kernels']} distinct kernels), "
          f"arena {s['arena_bytes'] / 2**20:.2f} MiB (live-set bound "
          f"{s['lower_bound_bytes'] / 2**20:.2f} MiB, naive {s['naive_bytes'] / 2**20:.2f} MiB), "
          f"weights {s['weight_bytes'] / 2**20:.2f} MiB; nodes on npu/cpu: "
          f"{summ.get('npu', 0)}/{summ.get('cpu', 0)}")
    return 0


def _input_arg(text: str) -> tuple[str | None, str]:
    name, eq, path = text.partition("=")
    return (name, path) if eq else (None, text)


def configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="a package folder written by npucc compile")
    p.add_argument("--input", action="append", type=_input_arg, default=[],
                   metavar="NAME=FILE.npy", help="an input array (repeatable; NAME= may be "
                   "left out for a single-input model)")
    p.add_argument("--profile", action="store_true", help="print per-kernel times")
    p.add_argument("--save-outputs", default=None, metavar="DIR",
                   help="write each output as DIR/<name>.npy")
    p.add_argument("--trusted-key", action="append", default=None, metavar="PUB",
                   help="run only if the package is signed by this public key (repeatable; "
                   "default: NPUCC_TRUSTED_KEYS)")
    p.add_argument("--check-finite", action="store_true",
                   help="refuse inputs holding NaN or inf")
    p.add_argument("--remote", default=None, metavar="HOST:PORT",
                   help="run (and --profile) on a device a TVM RPC tracker hands out "
                   "(runtime/remote.py); the package is verified here first")
    p.add_argument("--key", default=None, help="with --remote: the device key (e.g. kirin990)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="with --remote: seconds to wait for a free device")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    import runtime

    if args.remote:
        if not args.key:
            raise NpuccError("--remote needs --key KEY (the device key the RPC servers use)")
        m = runtime.connect(args.remote, args.key, timeout=args.timeout).load(
            args.package, trusted_keys=args.trusted_key)
    else:
        m = runtime.load(args.package, trusted_keys=args.trusted_key)
    if not args.input:
        raise NpuccError(f"give the inputs: --input NAME=FILE.npy for each of "
                         f"{', '.join(m.input_names)}")
    feeds = {}
    for name, path in args.input:
        if name is None:
            if len(m.input_names) != 1:
                raise NpuccError(f"the model has inputs {', '.join(m.input_names)}: write "
                                 f"--input NAME=FILE.npy")
            name = m.input_names[0]
        try:
            feeds[name] = np.load(path)
        except (OSError, ValueError) as e:
            raise NpuccError(f"cannot read input {name!r} from {path}: {e}") from None
    outs = m.run(feeds) if args.remote else m.run(feeds, check_finite=args.check_finite)
    np.set_printoptions(precision=5, threshold=20, edgeitems=4)
    for name, arr in zip(m.output_names, outs, strict=True):
        print(f"{name}: {arr.dtype}{list(arr.shape)}")
        print(f"  {arr}")
        if args.save_outputs:
            Path(args.save_outputs).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_outputs) / f"{name.replace('/', '_')}.npy", arr)
    if args.profile:
        print(m.profile(feeds).table(top=15))
    return 0


def configure_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="with show: a target name or .toml path")
    p.add_argument("--cpu", default=None, metavar="NAME",
                   help="with show: describe a portable level instead of this machine")
    p.set_defaults(func=_cmd_targets)


def _cmd_targets(args: argparse.Namespace) -> int:
    from targets.description import list_targets, load_target

    if args.action == "list":
        for name in list_targets():
            t = load_target(name)
            npu = f"NPU {t.npu.name}" if t.npu is not None else "no NPU"
            print(f"{name:<12} {t.cpu.arch:<8} {npu:<28} {t.description}")
        return 0
    if not args.name:
        raise NpuccError("npucc targets show NAME: which target? (npucc targets lists them)")
    t = load_target(args.name, cpu=args.cpu)
    print(f"# {t.file}")
    print(Path(t.file).read_text())
    if t.cpu.detected is not None:
        print(_detected_text(t))
    return 0


def _detected_text(t) -> str:
    """The [cpu] table detection filled in, as TOML-like lines under a comment header."""
    h, info = t.cpu.detected, t.cpu_info()
    feats = sorted(h.features)
    lines = [f"# detected on this machine{f' (portable level {h.level})' if h.level else ''}:",
             f"# {h.summary()}",
             f'tvm_target = {_toml_inline(t.cpu.tvm_target_dict())}',
             f'arch = "{h.arch}"', f"simd_bits = {info.simd_bits}",
             f"fp16_arith = {str(info.fp16_arith).lower()}",
             f"int8_dot = {str(info.int8_dot).lower()}", f"amx = {str(info.amx).lower()}",
             f"threads = {t.cpu.threads}",
             f"l1d_kb = {t.cpu.l1d_kb}", f"l2_kb = {t.cpu.l2_kb}",
             f"l3_kb = {(h.l3_bytes or 0) // 1024 or None}",
             f"ghz = {h.ghz}", f"features = {feats}"]
    return "\n".join(lines)


def _toml_inline(d: dict) -> str:
    import json

    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"
