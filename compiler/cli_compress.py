"""``npucc compress MODEL --data FOLDER --target kirin990 --budget-mb 4 -o out.npkg``, and for
LLMs ``npucc compress MODEL.gguf --text FILE.txt --device kirin990 --budget-mb 100 -o out.npkg``.

The shell form of :func:`compiler.compress.plan.compress`: sample inputs from a folder of
``.npy`` files (each one array for the model's first input) or ``.npz`` files (arrays by input
name), the plan table and the measured result printed, the package written. With ``--text``
the model is a decoder LLM (a .gguf file or a transformers folder) and the route is
:func:`compiler.compress.llm_plan.compress_llm`: the text split into training tokens and
held-out windows, the precision chosen from the budget, QAT with distillation for
``--qat-steps``, the perplexity printed at each stage, the LLM package written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError

__all__ = ["configure_compress", "load_samples"]


def load_samples(folder: str | Path, input_names: list[str]) -> list[dict[str, Any]]:
    """Sample input dicts from ``folder``'s .npy / .npz files, in name order."""
    root = Path(folder)
    if not root.is_dir():
        raise NpuccError(f"--data {root}: not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise NpuccError(f"--data {root}: no .npy or .npz files")
    out = []
    for f in files:
        if f.suffix == ".npy":
            out.append({input_names[0]: np.load(f, allow_pickle=False)})
            continue
        with np.load(f, allow_pickle=False) as z:
            missing = [n for n in input_names if n not in z.files]
            if missing:
                raise NpuccError(f"{f}: no array for input(s) {missing}; it has {z.files}")
            out.append({n: z[n] for n in input_names})
    return out


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def configure_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an .onnx or .ir file; with --text an LLM (.gguf file or "
                   "transformers folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data",
                     help="a folder of .npy (first input) or .npz (by input name) sample inputs")
    src.add_argument("--text", metavar="FILE.txt",
                     help="LLMs: a UTF-8 text; its first part trains/calibrates, the rest "
                     "(--eval-fraction) measures perplexity")
    p.add_argument("-t", "--target", "--device", dest="target", default="host",
                   help="a built-in target name (npucc targets) or a target .toml file")
    p.add_argument("-o", "--output", required=True, help="the package folder to write (.npkg)")
    p.add_argument("--budget-mb", type=float, default=None, help="weight bytes budget (MiB)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="estimated device latency budget (ms, the target's cost model)")
    p.add_argument("--sparsities", type=_floats, default=(0.0, 0.3, 0.5, 0.7),
                   metavar="S,S,...", help="channel sparsities to consider")
    p.add_argument("--precisions", default="float,int8,int4", metavar="P,P,...",
                   help="precisions to consider (float, fp16, int8, int4)")
    p.add_argument("--prune-method", default="channel", choices=("channel", "head"))
    llm = p.add_argument_group("LLMs (--text)")
    llm.add_argument("--qat-steps", type=int, default=0,
                     help="QAT steps with distillation from the float model (int4; default 0: "
                     "PTQ)")
    llm.add_argument("--seq", type=int, default=128, help="tokens per QAT step (default 128)")
    llm.add_argument("--window", type=int, default=256,
                     help="tokens per perplexity window (default 256)")
    llm.add_argument("--eval-fraction", type=float, default=0.2,
                     help="the held-out end of the text (default 0.2)")
    llm.add_argument("--max-context", type=int, default=512,
                     help="positions of the package's KV cache (default 512)")
    llm.add_argument("--chunk", type=int, default=32, help="tokens per prefill call")
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> int:
    from compiler.compress.plan import compress
    from compiler.driver import CompileOptions, import_model
    from runtime.package_save import check_replaceable

    check_replaceable(Path(args.output))
    if args.text is not None:
        return _compress_llm(args)
    names = [v.name for v in import_model(args.model, CompileOptions()).inputs]
    data = load_samples(args.data, names)
    r = compress(args.model, data, args.target, budget_mb=args.budget_mb,
                 latency_ms=args.latency_ms, sparsities=args.sparsities,
                 precisions=tuple(args.precisions.split(",")),
                 prune_method=args.prune_method)
    out = r.compiled.save(args.output)
    print(f"wrote {out}: {100 * r.plan.sparsity:.0f}% channels + {r.plan.precision}, "
          f"{r.measured['weight_bytes'] / 2**20:.2f} MiB weights, "
          f"{r.measured['latency_ms']:.3f} ms estimated")
    return 0


def _compress_llm(args: argparse.Namespace) -> int:
    from compiler.compress.llm_plan import compress_llm

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NpuccError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from e
    r = compress_llm(args.model, text, args.target, budget_mb=args.budget_mb,
                     qat_steps=args.qat_steps, seq=args.seq, window=args.window,
                     eval_fraction=args.eval_fraction, max_context=args.max_context,
                     chunk=args.chunk, output=args.output)
    stages = ", ".join(f"{k} {v:.3f}" for k, v in r.stages.items())
    print(f"wrote {args.output}: {r.model.config['quantize'] or 'f32'}, "
          f"{r.model.stats()['weight_bytes'] / 2**20:.2f} MiB weights; perplexity {stages}")
    return 0
