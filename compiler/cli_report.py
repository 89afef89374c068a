"""``npucc report``: the quantization report of a model, or re-render a saved one.

    npucc report MODEL.onnx|MODEL.ir -q int4 [-t TARGET] [--size-budget-mb MB]
                 [--calibration FILE.npz | --samples N] [--input-shape NAME=D0,...] -o DIR
    npucc report DIR/quant_report.json -o DIR2

A model is imported, run through the target's float passes, quantized exactly as
``compile(..., quantize=..., size_budget_mb=...)`` would (no kernels are built), and compared
with its float version in the reference interpreter (passes/quantization/report.py). ``-q``
takes a preset (int8, int4, w8, fp16) or a JSON mapping (``'{"dense": "int4", "gather":
"int16"}'``). ``--calibration`` is an .npz with one array per input name whose first axis
indexes samples. Writes quant_report.json, quant_report.html and quant_report_heatmap.png to
DIR and prints the per-layer table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["configure_report"]


def configure_report(p: argparse.ArgumentParser) -> None:
    from compiler.cli import shape_arg

    p.add_argument("model", help="an .onnx or .ir model, or a quant_report.json to re-render")
    p.add_argument("-o", "--output", required=True, help="folder for the JSON / HTML / PNG")
    p.add_argument("-q", "--quantize", default="int4",
                   help="a preset (int8, int4, w8, fp16) or a JSON mapping (default int4)")
    p.add_argument("-t", "--target", default="host", help="target whose float passes run first")
    p.add_argument("--size-budget-mb", type=float, default=None,
                   help="mixed precision: fit the weights in this many MB (2^20 bytes)")
    p.add_argument("--calibration", default=None,
                   help=".npz: one array per input, first axis = samples")
    p.add_argument("--samples", type=int, default=4, help="random samples when no .npz given")
    p.add_argument("--method", default="minmax",
                   help="calibration method for int8 (minmax, percentile, entropy, mse)")
    p.add_argument("--input-shape", action="append", type=shape_arg, default=[],
                   metavar="NAME=D0,D1,...", help="fix a dynamic input shape (repeatable)")
    p.set_defaults(func=_cmd_report)


def _parse_quantize(text: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise NpuccError(f"-q/--quantize: not valid JSON ({e}); give a preset such as "
                             f"int4 or a mapping like '{{\"dense\": \"int4\"}}'") from None
    return text


def _load_samples(path: str, graph) -> list[dict[str, Any]]:
    import numpy as np

    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise NpuccError(f"--calibration {path}: cannot read it as .npz ({e})") from None
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in data.files]
    if missing:
        raise NpuccError(f"--calibration {path}: no array for input(s) {', '.join(missing)}; "
                         f"it has {', '.join(data.files) or 'none'}")
    count = min(data[n].shape[0] for n in names)
    return [{n: data[n][i] for n in names} for i in range(count)]


def _cmd_report(args: argparse.Namespace) -> int:
    from passes.quantization.report import write_report

    src = Path(args.model)
    if src.suffix == ".json":
        try:
            rep = json.loads(src.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NpuccError(f"{src}: not a readable report JSON ({e})") from None
        if "layers" not in rep or "outputs" not in rep:
            raise NpuccError(f"{src}: not a quantization report (no 'layers'/'outputs')")
    else:
        rep = _report_model(args)
    files = write_report(rep, args.output)
    _print_table(rep)
    print(f"wrote {files['json']}, {files['html']}, {files['png']}")
    return 0


def _report_model(args: argparse.Namespace) -> dict[str, Any]:
    from compiler.driver import CompileOptions, import_model
    from compiler.numeric import make_sample_inputs
    from compiler.pass_base import PassContext
    from passes.quantization.insert import InsertQuantize, precision_text
    from passes.quantization.report import build_report, float_reference
    from targets.description import load_target

    opts = CompileOptions(input_shapes={n: list(d) for n, d in args.input_shape} or None)
    source = import_model(args.model, opts)
    desc = load_target(args.target)
    float_graph = float_reference(source, desc)
    if args.calibration:
        samples = _load_samples(args.calibration, float_graph)
    else:
        samples = [make_sample_inputs(float_graph, seed=i) for i in range(args.samples)]
    ctx = PassContext(target=desc, sample_inputs=samples)
    quantize = InsertQuantize(precision=precision_text(_parse_quantize(args.quantize)),
                              method=args.method, budget_mb=args.size_budget_mb)
    quant = quantize.run(float_graph.copy(), ctx).graph
    return build_report(float_graph, quant, samples, plan=ctx.options.get("mixed_plan"))


def _print_table(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x: Any) -> str:
        if isinstance(x, float):
            return "inf" if math.isinf(x) else f"{x:.4g}"
        return str(x)

    t = Table(title=f"quantization report ({rep['samples']} samples): weights "
                    f"{rep['bytes']['float']} -> {rep['bytes']['quantized']} B "
                    f"(x{f(rep['bytes']['ratio'])})")
    for c in ("layer", "op", "SNR dB", "local SNR dB", "cosine", "max abs", "bytes"):
        t.add_column(c, justify="left" if c in ("layer", "op") else "right", no_wrap=True)
    for r in rep["layers"]:
        loc = (r.get("local") or {}).get("snr_db")
        t.add_row(r["name"] or r["value"], r["op"], f(r["snr_db"]),
                  "-" if loc is None else f(loc), f(r["cosine"]), f(r["max_abs"]),
                  f"{r['bytes_float']} -> {r['bytes_quant']}")
    for o in rep["outputs"]:
        t.add_row(f"[b]output {o['value']}[/b]", "", f(o["snr_db"]), "", f(o["cosine"]),
                  f(o["max_abs"]), "")
    console = Console()
    if not console.is_terminal:  # piped: do not cut the table at 80 columns
        console = Console(width=160)
    console.print(t)
