"""``compile(model, target=...)``: import → pass pipeline → TVM kernels → package → runnable.

```python
from compiler import compile
m = compile("resnet50.onnx", target="kirin990")
(y,) = m.run({"data": x})
m.save("resnet50.npkg")           # runtime.load("resnet50.npkg") reads it back
```

Each stage is a plain call on plain data (DESIGN.md): the importers give a Graph, the pass
manager returns a Graph, codegen returns a KernelLibrary, the runtime plans memory and
returns a Package. Nothing reaches back up the chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import NpuccError

__all__ = ["CompileOptions", "compile", "compile_pipeline", "import_model", "runnable_cpu"]


@dataclass
class CompileOptions:
    """Everything ``compile`` accepts besides the model (IREE's CompilerOptions, in spirit)."""

    target: Any = "host"
    pipeline: str | None = None          # None: the target's default pipeline
    example_inputs: Any = None           # torch modules: the inputs torch.export traces with
    input_shapes: Mapping[str, Sequence[int]] | None = None   # ONNX inputs with symbolic dims
    input_names: Sequence[str] | None = None                  # torch: names of the inputs
    # value names to return instead of the model's outputs: the graph is cut there (e.g.
    # before detection post-processing whose shapes depend on the data)
    outputs: Sequence[str] | None = None
    work_dir: str | os.PathLike | None = None   # where the kernel library is built (temp dir)
    # sign saved packages with this private key (PEM path or key object; runtime/signing.py)
    sign_key: Any = None
    # the model's version, written to the manifest ("3", "1.4.0"); over-the-air updates
    # (runtime/update.py) refuse to install an older version than the installed one
    version: str | int | None = None
    # the CPU the runnable kernels are built for: None = this machine (detected), or an LLVM
    # CPU name / portable level ("x86-64-v3", "x86-64-v4", "znver4"...) for packages that
    # must run on other machines (targets/host.py)
    cpu: str | None = None
    # compression (passes/quantization, passes/pruning): the driver adds their passes to the
    # pipeline before the layout pass and hands these to them through the PassContext.
    quantize: str | Mapping[str, Any] | None = None   # "int8" | "int4" | a config mapping
    calibration: Any = None              # an iterable of input dicts (calibration samples)
    calibration_method: str = "minmax"   # "minmax" | "percentile" | "entropy" | "mse"
    size_budget_mb: float | None = None  # mixed precision: fit the weights in this budget
    prune: Mapping[str, Any] | None = None   # {"method": "magnitude" | "2:4" | ..., ...}
    progress: bool | None = None         # a progress display on the long steps (default: tty)


def import_model(model: Any, options: CompileOptions):
    """Any model form we accept → a verified Graph (a copy: the caller's object is untouched),
    returning ``options.outputs`` when given (ONNX and torch models are cut before
    conversion, so what lies past the cut is never imported)."""
    from compiler.ir.graph import Graph

    if isinstance(model, Graph):
        return _cut(model.copy(), options)
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.exists():
            raise NpuccError(f"model file {path} does not exist")
        if path.suffix == ".ir":
            from compiler.ir import load

            return _cut(load(path), options)
        from compiler.frontends import from_onnx

        return from_onnx(path, input_shapes=options.input_shapes, outputs=options.outputs)
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx":
        from compiler.frontends import from_onnx

        return from_onnx(model, input_shapes=options.input_shapes, outputs=options.outputs)
    if kind == "torch" or _is_torch_module(model):
        if options.example_inputs is None:
            raise NpuccError("a torch module needs example_inputs=(tensor, ...) to be traced")
        from compiler.frontends import from_torch

        return from_torch(model, options.example_inputs, input_names=options.input_names,
                          outputs=options.outputs)
    raise NpuccError(f"cannot compile a {type(model).__name__}: give an .onnx or .ir path, an "
                     "onnx.ModelProto, a torch.nn.Module (with example_inputs) or a Graph")


def _cut(graph, options: CompileOptions):
    if not options.outputs:
        return graph
    from compiler.frontends import select_outputs

    return select_outputs(graph, list(options.outputs))


def _is_torch_module(model: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


class _Progress:
    """Named phases, timed; a rich status line while one runs when showing progress."""

    def __init__(self, show: bool):
        self.show = show
        self.times: dict[str, float] = {}
        self._console = None
        if show:
            from rich.console import Console

            self._console = Console(stderr=True)

    @contextlib.contextmanager
    def phase(self, name: str, text: str) -> Iterator[Any]:
        t0 = time.perf_counter()
        if self._console is None:
            yield lambda msg: None
        else:
            with self._console.status(text) as status:
                yield lambda msg: status.update(f"{text} — {msg}")
        self.times[name] = time.perf_counter() - t0
        if self._console is not None:
            self._console.log(f"{text}: {self.times[name]:.1f} s")


def value_tensors(graph, weights: Mapping[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, Any] = {v.name: v for v in graph.inputs}
    for n in graph.nodes:
        if n.op == "const":
            continue
        for v in (*n.inputs, *n.outputs):
            seen.setdefault(v.name, v)
    for v in graph.outputs:
        seen.setdefault(v.name, v)
    return [{"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}
            for v in seen.values() if v.name not in weights]


def inplace_steps(steps) -> list[int]:
    from compiler.ir.registry import get_op

    # the op definitions say which kernels may write over a dying operand (same size: the
    # memory planner checks)
    return [i for i, s in enumerate(steps) if get_op(s.op).elementwise or get_op(s.op).inplace]


def _interface_values(graph, names: Sequence[str]) -> None:
    """Graph outputs must be distinct computed values named as the user's model named them.

    An output that is a graph input, a constant, or a value returned twice gets an
    ``identity`` node so every output has its own tensor; passes that replaced an output's
    producer gave it a new name, so the original name is given back when it is free.
    """
    seen: set[int] = set()
    new_outputs = []
    for v in graph.outputs:
        if id(v) in seen or v.producer is None or v.producer.op == "const":
            v = graph.make_node("identity", [v]).output
        seen.add(id(v))
        new_outputs.append(v)
    graph.outputs = new_outputs
    taken = {v.name for v in graph.values()}
    for v, name in zip(graph.outputs, names, strict=True):
        if v.name != name and name not in taken:
            taken.discard(v.name)
            v.name = name
            taken.add(name)
            graph.claim_name(name)


def compile(model: Any, target: Any = "host", pipeline: str | None = None,  # noqa: A001
            debug: Any = None, *, options: CompileOptions | None = None, **kwargs: Any):
    """Compile ``model`` for ``target`` and return a runnable :class:`CompiledModel`.

    ``model``: an .onnx or .ir path, an ``onnx.ModelProto``, a ``torch.nn.Module`` (with
    ``example_inputs=``) or a Graph. ``target``: a built-in target name (``npucc targets``), a
    path to a target .toml, or a loaded description. ``pipeline``: pipeline text replacing the
    target's default. ``debug``: a :class:`compiler.pass_manager.DebugOptions` or dict (print
    IR after passes, timing, numeric checks... see ``npucc opt --help``). Other keyword
    arguments are fields of :class:`CompileOptions`. ``modes={"performance": {...},
    "accuracy": {...}}`` compiles one package holding several precision plans
    (:func:`compiler.modes.compile_modes`; it returns a ``CompiledModes``).
    """
    if kwargs.get("modes") is not None:
        from compiler.modes import compile_modes

        return compile_modes(model, target, kwargs.pop("modes"), pipeline=pipeline,
                             debug=debug, **kwargs)
    kwargs.pop("modes", None)
    from compiler.compiled import CompiledModel
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    opts = options or CompileOptions()
    for key, value in kwargs.items():
        if not hasattr(opts, key):
            known = ", ".join(CompileOptions.__dataclass_fields__)
            raise NpuccError(f"compile() got an unknown option {key!r}; known: {known}")
        setattr(opts, key, value)
    opts.target, opts.pipeline = target, pipeline
    if opts.version is not None:   # checked before the work, not after it
        from runtime.manifest_schema import parse_version

        parse_version(opts.version, "compile(version=...)")
    desc = load_target(target, cpu=opts.cpu)
    show = opts.progress if opts.progress is not None else _stderr_is_tty()
    prog = _Progress(show)

    with prog.phase("import", "importing the model"):
        graph = import_model(model, opts)
    source = graph.copy()
    with prog.phase("passes", f"running the {desc.name} pipeline"):
        ctx = PassContext(target=desc)
        text = compile_pipeline(opts.pipeline or desc.default_pipeline, opts, desc, ctx)
        graph = run_pipeline(graph, text, ctx=ctx, debug=debug)
        _interface_values(graph, [v.name for v in source.outputs])
        if any(n.device is None for n in graph.nodes if n.op != "const"):
            # every node gets a device, also when the pipeline did not partition
            graph = run_pipeline(graph, compile_pipeline("partition", CompileOptions(),
                                                         desc, ctx), ctx=ctx)
    budget = _budget(desc)
    refs = {n.attrs.get("ref") for n in graph.find("const")}
    _check_budget(desc, budget, 0, sum(int(a.nbytes) for r, a in graph.weights.items()
                                       if r in refs))
    from compiler.limits import check_graph_limits

    check_graph_limits(graph, budget, desc.name)   # after the total: it says what budget fits
    work = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="npucc-"))
    try:
        cpu = runnable_cpu(desc, opts.cpu)
        with prog.phase("codegen", f"generating kernels for "
                        f"{cpu.tvm_target.get('mcpu', 'cpu')}") as say:
            from targets.tvm_codegen import build_library

            lib = build_library(graph, cpu, work, progress=say)
        with prog.phase("package", "planning memory and packaging"):
            from runtime import build_package

            pkg = build_package(
                {"name": desc.name, "tvm": cpu.tvm_target, "arch": cpu.arch},
                [v.name for v in graph.inputs], [v.name for v in graph.outputs], lib.steps,
                value_tensors(graph, lib.weights), lib.weights, lib.lib_path,
                inplace_steps(lib.steps))
            mem = pkg.memory
            _check_budget(desc, budget, mem["arena_bytes"], mem["weight_bytes"])
    except BaseException:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not opts.work_dir:   # our temporary folder lives as long as the package that uses it
        weakref.finalize(pkg, shutil.rmtree, str(work), True)
    pkg.sign_key = opts.sign_key
    if opts.version is not None:
        pkg.manifest["version"] = str(opts.version)
    return CompiledModel(pkg, graph=graph, source=source, target=desc, library=lib,
                         phase_seconds=prog.times, pass_context=ctx, work_dir=work)


COMPRESSION_ANCHORS = ("to-nhwc", "partition")


def compile_pipeline(pipeline: str, opts: CompileOptions, desc, ctx) -> str:
    """The pipeline ``compile`` runs, as text that says everything: ``pipeline`` with the
    pruning and quantization passes the options ask for, each with its settings as options,
    and the target named in every pass that reads one (``partition{target=kirin990}``).

    Pruning goes before the first layout/partition pass (it sees the fused float graph in its
    original layout); ``quantize,lower-quantized`` go after the layout pass, before
    ``partition`` (so partitioning sees the integer ops), or at the end. Calibration samples
    are bound in ``ctx.resources`` as ``@calibration`` (``compiler/samples.py``), so
    ``npucc opt -p TEXT --target T --calibration calib.npz`` replays the same passes.
    """
    from compiler.pipeline import format_pipeline, get_pass_class, parse_pipeline
    from targets.reference import target_reference

    passes = parse_pipeline(pipeline)
    calibration = ""
    if opts.calibration is not None:
        ctx.resources["calibration"] = [dict(s) for s in opts.calibration]
        calibration = "@calibration"
    if opts.prune is not None:
        prune = get_pass_class("prune").from_options(opts.prune, calibration=calibration)
        at = next((i for i, p in enumerate(passes) if p.name in COMPRESSION_ANCHORS),
                  len(passes))
        passes.insert(at, prune)
    if opts.quantize is not None or opts.size_budget_mb is not None:
        from passes.quantization.insert import precision_text

        quantize = get_pass_class("quantize")(
            precision=precision_text(opts.quantize if opts.quantize is not None else "int8"),
            method=opts.calibration_method, calibration=calibration,
            budget_mb=opts.size_budget_mb)
        # quantization sees the final layout (NHWC convs, OHWI weights): quantize/dequantize
        # pairs would otherwise stop to-nhwc's transposes; it goes before partitioning
        at = next((i for i, p in enumerate(passes) if p.name == "partition"), len(passes))
        passes[at:at] = [quantize, get_pass_class("lower-quantized")()]
        # the float depthwise + 1x1 kernel would keep the 1x1 projections out of int8
        passes = [dataclasses.replace(p, depthwise_pointwise=False)
                  if p.name == "fuse-conv-blocks" and getattr(p, "depthwise_pointwise", False)
                  else p for p in passes]
    ref = target_reference(desc)
    if ref is not None:
        passes = [dataclasses.replace(p, target=ref) if _reads_target(p) else p
                  for p in passes]
    return format_pipeline(passes)


def _reads_target(p) -> bool:
    return any(f.name == "target" for f in dataclasses.fields(p)) and not p.target


def _stderr_is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _budget(desc) -> int | None:
    mem = getattr(desc, "memory", None)
    return mem.budget_bytes if mem is not None and mem.budget_mb else None


def _check_budget(desc, budget: int | None, arena: int, weights: int) -> None:
    """Arena + weights over the target's ``[memory] budget_mb`` is the user's error: say by how
    much, and what budget would be accepted. Checked on the weights alone before codegen
    (``arena=0``), so a model that cannot fit fails before its kernels are built."""
    if budget is None or arena + weights <= budget:
        return
    mib = 2**20
    need = (f"{arena / mib:.2f} MiB of activations (arena) + {weights / mib:.2f} MiB of "
            f"weights" if arena else f"{weights / mib:.2f} MiB of weights alone")
    raise NpuccError(
        f"the model does not fit the memory budget of target {desc.name!r} "
        f"({desc.file or desc.name}): it needs {need} = {(arena + weights) / mib:.2f} MiB, "
        f"the budget is [memory] budget_mb = {desc.memory.budget_mb:g}; raise budget_mb to at "
        f"least {-(-(arena + weights) // mib)}, or make the model smaller (pruning, "
        f"quantization)")


def runnable_cpu(desc, cpu: str | None = None):
    """The CPU the runnable package's kernels are built for (a ``CpuInfo``): this machine's
    architecture always.

    A target whose CPU is this machine's architecture builds its own kernels (``host``: the
    detected CPU, or ``cpu`` when named); a foreign one (kirin990: aarch64) runs here on host
    kernels built from the same lowered graph, for the detected host or the named ``cpu``,
    and its device library is built separately (see ``CompiledModel.export_device``).
    """
    from runtime.cpu import host_arch
    from targets.host import cpu_info_for
    from targets.tvm_codegen import host_cpu

    if desc.cpu.arch != host_arch():
        return host_cpu(cpu)
    info = desc.cpu_info()
    if cpu is None or desc.cpu.detected is not None:   # detected targets applied cpu at load
        return info
    return cpu_info_for({"kind": "llvm", "mcpu": cpu, "num-cores": info.num_cores},
                        arch=info.arch, num_cores=info.num_cores, l1d_bytes=info.l1d_bytes,
                        l2_bytes=info.l2_bytes)
