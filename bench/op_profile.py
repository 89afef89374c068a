"""Where a model's time goes, op kind by op kind: npucc's kernels beside onnxruntime's nodes.

    python bench/op_profile.py [--model mobilenet_v2] [--threads 2,1] [--repeat 30] [--reuse]

For one model of ``bench/models.py`` (its builders), at each thread count, in separate
processes: npucc's per-step medians (``Executable.profile``, ``TVM_NUM_THREADS`` = threads;
the median over 5 short profiles, each timing every step and then whole runs, so that the
kernel sum and the whole run come from the same stretch of time) and onnxruntime's per-node
kernel times (``SessionOptions.enable_profiling``, default optimizations,
``intra_op_num_threads`` = threads; the median of each node's ``*_kernel_time`` over the
runs). Both are summed by op kind:

- ``stem conv`` (3 input channels), ``1x1 conv``, ``kxk conv`` (other dense convs),
  ``depthwise``, ``SE conv`` (a conv on a 1x1 map: squeeze-excite), ``dense``, ``pool``,
  ``add``, ``mul``, ``activation``, ``layout`` (transposes, onnxruntime's NCHWc reorders) and
  the op's own name otherwise.

Printed per thread count: ms per kind for each engine, npucc / onnxruntime, the node counts,
the sum of the kernels, and each engine's whole-run median (npucc's run includes the Python
step loop; onnxruntime's ``model_run`` event its executor). The package is compiled into
examples' cache dir (``op-profile-<model>``) and kept; ``--reuse`` loads it instead of
compiling again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ACTIVATIONS = {"relu", "clip", "sigmoid", "hardsigmoid", "hardswish", "silu", "gelu", "tanh",
               "hard_sigmoid", "hard_swish", "relu6"}
POOLS = {"globalaveragepool", "averagepool", "maxpool", "reducemean", "global_avg_pool",
         "avg_pool2d", "max_pool2d", "global_max_pool"}
DENSE = {"gemm", "fusedgemm", "matmul", "fusedmatmul", "dense", "linear", "batch_matmul"}
ROUNDS = 5     # npucc: short profiles whose medians are combined (see profile_npucc)
LAYOUT = {"transpose", "reorderinput", "reorderoutput", "reshape", "flatten", "squeeze",
          "unsqueeze"}


def conv_kind(in_channels: int, kh: int, kw: int, depthwise: bool, out_hw: int) -> str:
    """The kind of a convolution, from its geometry (both engines)."""
    if depthwise:
        return "depthwise"
    if out_hw == 1:
        return "SE conv"
    if in_channels == 3:
        return "stem conv"
    return "1x1 conv" if kh == kw == 1 else "kxk conv"


def op_kind(op: str) -> str:
    """The kind of a non-conv op (both engines' names, lower-cased)."""
    o = op.lower()
    if o in POOLS:
        return "pool"
    if o in DENSE:
        return "dense"
    if o in ("add", "sum"):
        return "add"
    if o == "mul":
        return "mul"
    if o in ACTIVATIONS:
        return "activation"
    if o in LAYOUT:
        return "layout"
    return o


# -- npucc (child) -------------------------------------------------------------------------
def npucc_step_kind(op: str, in_shapes: list[tuple[int, ...]],
                    out_shape: tuple[int, ...]) -> str:
    """A package step's kind. Conv weights are packed: depthwise ``[KH, KW, C]``, dense
    ``[O/b, KH, KW, I, b]``; the activation is NHWC."""
    if op != "conv2d" or len(in_shapes) < 2:
        return op_kind(op)
    w = in_shapes[1]
    out_hw = out_shape[1] * out_shape[2] if len(out_shape) == 4 else 0
    if len(w) == 3:
        return conv_kind(0, w[0], w[1], True, out_hw)
    kh, kw = (w[1], w[2]) if len(w) == 5 else (w[-2], w[-1])
    return conv_kind(in_shapes[0][-1], kh, kw, False, out_hw)


def profile_npucc(package: str, inputs: str, names: list[str], repeat: int) -> dict[str, Any]:
    import numpy as np

    import runtime

    m = runtime.load(package)
    data = np.load(inputs)
    feeds = dict(zip(m.input_names, (data[n] for n in names), strict=True))
    m.profile(feeds, repeat=1, warmup=3)
    # ROUNDS short profiles, each timing every step and then whole runs: the kernel sum and
    # the whole run come from the same stretch of time (one long profile timed the steps
    # first and the runs after; on a shared host whose speed changes 1.7x between seconds the
    # kernel sum read 24.6 ms against a 14.5 ms whole run)
    profs = [m.profile(feeds, repeat=max(1, repeat // ROUNDS), warmup=0) for _ in range(ROUNDS)]
    tensors = m.package.tensors
    rows = []
    for j, st in enumerate(m.package.steps):
        shapes = [tuple(tensors[i]["shape"]) for i in st.inputs]
        kind = npucc_step_kind(st.op, shapes, tuple(tensors[st.outputs[0]]["shape"]))
        rows.append((kind, statistics.median(p.steps[j].median_ms for p in profs)))
    return {"rows": rows, "total_ms": statistics.median(p.total_ms for p in profs)}


# -- onnxruntime (child) -------------------------------------------------------------------
def ort_node_kind(op: str, in_shapes: list[list[int]], out_shape: list[int]) -> str:
    """An onnxruntime node's kind, from its profile record (shapes as executed)."""
    if op.lower() not in ("conv", "fusedconv") or len(in_shapes) < 2:
        return op_kind(op)
    w = in_shapes[1]  # [O, I/group, KH, KW]
    out_hw = out_shape[2] * out_shape[3] if len(out_shape) == 4 else 0
    depthwise = len(w) == 4 and w[1] == 1 and w[0] > 1
    return conv_kind(w[1], w[2], w[3], depthwise, out_hw)


def _shapes(arg: list[dict[str, list[int]]]) -> list[list[int]]:
    return [next(iter(d.values())) for d in arg]


def profile_ort(onnx_path: str, inputs: str, names: list[str], threads: int,
                repeat: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    data = np.load(inputs)
    feeds = {n: data[n] for n in names}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feeds)
        for _ in range(repeat):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e["dur"] / 1e3 for e in events if e.get("name") == "model_run"][3:]
    per_node: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        node = e["name"][:-len("_kernel_time")]
        per_node[node].append(e["dur"] / 1e3)
        if node not in kinds:
            outs = _shapes(a.get("output_type_shape", []))
            kinds[node] = ort_node_kind(a.get("op_name", "?"), _shapes(a.get("input_type_shape",
                                                                             [])),
                                        outs[0] if outs else [])
    rows = [(kinds[n], statistics.median(ts[3:] or ts)) for n, ts in per_node.items()]
    return {"rows": rows, "total_ms": statistics.median(runs) if runs else 0.0}


# -- parent --------------------------------------------------------------------------------
def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    from bench.common import run_child

    return run_child(__file__, args, env)


def prepare(name: str, reuse: bool) -> dict[str, Any]:
    """Child: the model's ONNX file, inputs and compiled package (kept in the cache dir)."""
    import numpy as np

    from bench.models import BUILDERS
    from examples.models import cache_dir

    d = cache_dir() / f"op-profile-{name}"
    d.mkdir(parents=True, exist_ok=True)
    path, feeds, _, _ = BUILDERS[name]()
    pkg = d / "model.npkg"
    if not (reuse and pkg.exists()):
        from compiler import compile as npucc_compile

        m = npucc_compile(path, target="host", progress=False)
        m.save(pkg)
    import onnx

    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    np.savez(d / "inputs.npz", **{n: feeds[n] for n in names})
    return {"onnx": str(path), "package": str(pkg), "inputs": str(d / "inputs.npz"),
            "names": names}


def by_kind(rows: list[list[Any]]) -> dict[str, tuple[float, int]]:
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for kind, ms in rows:
        out[kind][0] += ms
        out[kind][1] += 1
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def table(ours: dict[str, Any], theirs: dict[str, Any], threads: int) -> str:
    a, b = by_kind(ours["rows"]), by_kind(theirs["rows"])
    kinds = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
    lines = [f"-- {threads} thread(s): ms per op kind (nodes)",
             f"{'kind':<14}{'npucc':>14}{'onnxruntime':>16}{'ratio':>8}"]
    for k in kinds:
        (x, n), (y, m) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
        ratio = f"{x / y:.2f}" if y > 0 else "-"
        lines.append(f"{k:<14}{x:>9.3f} ({n:>3}){y:>10.3f} ({m:>3}){ratio:>8}")
    sa, sb = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    lines.append(f"{'kernel sum':<14}{sa:>15.3f}{sb:>16.3f}{sa / max(sb, 1e-9):>8.2f}")
    lines.append(f"{'whole run':<14}{ours['total_ms']:>15.3f}{theirs['total_ms']:>16.3f}"
                 f"{ours['total_ms'] / max(theirs['total_ms'], 1e-9):>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2", help="a model of bench/models.py")
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=30, help="profiled runs per engine")
    ap.add_argument("--reuse", action="store_true", help="load the kept package, no compile")
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prep", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        print("RESULT " + json.dumps(prepare(args.prepare, args.reuse)), flush=True)
        return 0
    if args.engine:
        p = json.loads(args.prep)
        if args.engine == "npucc":
            res = profile_npucc(p["package"], p["inputs"], p["names"], args.repeat)
        else:
            res = profile_ort(p["onnx"], p["inputs"], p["names"], int(args.threads),
                              args.repeat)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    from bench.common import cpu_header
    from bench.models import BUILDERS, child_env

    if args.model not in BUILDERS:
        ap.error(f"--model {args.model!r}: choose from {', '.join(BUILDERS)}")
    print(cpu_header(), flush=True)
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    env = child_env()
    prep = _child(["--prepare", args.model] + (["--reuse"] if args.reuse else []), env)
    for t in (int(x) for x in args.threads.split(",")):
        cenv = dict(env, TVM_NUM_THREADS=str(t))
        common = ["--prep", json.dumps(prep), "--repeat", str(args.repeat), "--threads", str(t)]
        ours = _child(["--engine", "npucc", *common], cenv)
        theirs = _child(["--engine", "onnxruntime", *common], cenv)
        print(f"\n{args.model}\n" + table(ours, theirs, t), flush=True)
    print(f"\nload after: {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)  # bench.<name> only, never bare
    sys.exit(main())
