"""Code generation: every node of a lowered graph -> one TVM kernel in one shared library.

``build_library(graph, cpu, out_dir)`` asks the kernel registry (``targets/kernels``) for a
scheduled PrimFunc per distinct node (identical requests share a kernel), names them
``k<NNN>_<op>[_<activation>]``, compiles them in one ``tvm.IRModule`` for
``cpu.tvm_target``, and writes ``out_dir/kernels.so`` atomically. The returned
:class:`KernelLibrary` is what the runtime consumes: which kernel each node calls with which
values, and every constant array the kernels read (packed weights already transformed).

Kernels use destination-passing style: ``lib[symbol](*operands, *extra_consts, *results)``.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.ir.graph import Graph, Node
from compiler.ir.types import TensorType
from targets.kernels.base import CpuInfo, KernelImpl, KernelRequest, get_kernel_builder

__all__ = ["KernelStep", "KernelLibrary", "CodegenError", "build_library", "host_cpu",
           "export_with_launcher", "request_for", "compile_funcs", "empty_kernel"]


class CodegenError(NpuccError):
    """A node cannot be turned into a kernel (no builder for its op, or the builder refused)."""


@dataclass
class KernelStep:
    """One call of the execution plan: ``symbol(*inputs, *extra_consts, *outputs)``.

    ``inputs`` are value names, except that a constant operand the kernel reads transformed
    (packed) is replaced by the name of its transformed array in ``KernelLibrary.weights``;
    ``extra_consts`` (names in ``weights``) follow the operands. ``const_inputs`` marks which
    entries of ``inputs`` are names in ``weights`` rather than graph values.
    """

    symbol: str
    node: str           # node label, for error messages and per-kernel stats
    op: str
    inputs: list[str]
    outputs: list[str]
    const_inputs: list[bool] = field(default_factory=list)
    extra_consts: list[str] = field(default_factory=list)
    packed: dict[int, str] = field(default_factory=dict)  # operand index -> packed weight name

    @property
    def args(self) -> list[str]:
        """Every argument name in call order (operands, extra consts, results)."""
        return [*self.inputs, *self.extra_consts, *self.outputs]


@dataclass
class KernelInfo:
    symbol: str
    op: str
    key: str
    note: str
    build_seconds: float   # time spent in the builder (TE + schedule), not in LLVM
    uses: int              # how many nodes call it (> 1: reused)


@dataclass
class KernelLibrary:
    """What codegen hands the runtime.

    - ``lib_path``: the shared library (``tvm.runtime.load_module(lib_path)[symbol]``).
    - ``steps``: one per non-const node, in graph order.
    - ``weights``: name -> array for every constant a kernel reads: constant operands by the
      value name of the const node (untransformed), packed ones under ``<value>.packed.<sym>``,
      extra constants under ``<symbol>.extra<i>``.
    - ``kernels``: symbol -> :class:`KernelInfo` (op, note, builder time, how often reused).
    - ``compile_seconds``: time in ``tvm.compile`` + ``export_library``.
    - ``cpu``: the CPU it was built for (its ISA features are what the package records).
    """

    lib_path: Path
    steps: list[KernelStep]
    weights: dict[str, np.ndarray]
    kernels: dict[str, KernelInfo]
    compile_seconds: float = 0.0
    cpu: CpuInfo | None = None

    @property
    def reused(self) -> list[str]:
        return [s for s, k in self.kernels.items() if k.uses > 1]


def _short_error(e: Exception) -> str:
    """The first line of an error, plus TVM's "Error message:" line when it has one (a TVM
    ScheduleError carries the whole underlined TIR, hundreds of lines per node)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return ""
    keep = [lines[0][:300]]
    keep += [ln.strip()[:300] for ln in lines[1:] if "Error message:" in ln][:1]
    return " ".join(keep)


def _contig(a) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.require(np.asarray(a), requirements="C")


def host_cpu(cpu: str | None = None) -> CpuInfo:
    """The kernel builders' view of this machine, detected (``targets.host``), or of the
    portable level ``cpu`` names (``"x86-64-v3"``...)."""
    from targets.host import detect_host

    return detect_host(cpu).cpu_info()


def request_for(graph: Graph, node: Node, cpu: CpuInfo) -> KernelRequest:
    """The kernel request of one node: constant operands come with their arrays."""
    consts: dict[int, np.ndarray] = {}
    for i, v in enumerate(node.inputs):
        arr = graph.const_value(v)
        if arr is not None:
            consts[i] = arr
    return KernelRequest(op=node.op, attrs=dict(node.attrs),
                         input_types=[v.type for v in node.inputs],
                         output_types=[v.type for v in node.outputs],
                         const_inputs=consts, cpu=cpu, node_label=node.label)


def empty_kernel(input_types: list[TensorType], output_types: list[TensorType]) -> Any:
    """A PrimFunc with the given parameters that computes nothing (all results empty)."""
    from tvm import te, tirx

    from targets.kernels._te import tvm_dtype

    ins = [te.placeholder(t.shape, tvm_dtype(t.dtype), name=f"in{i}")
           for i, t in enumerate(input_types)]
    def zeros(t: TensorType, j: int):
        dt = tvm_dtype(t.dtype)
        return te.compute(t.shape, lambda *i: tirx.const(0, dt), name=f"out{j}")

    outs = [zeros(t, j) for j, t in enumerate(output_types)]
    return te.create_prim_func([*ins, *outs])


def _symbol(index: int, req: KernelRequest) -> str:
    tail = req.attrs.get("activation")
    name = f"k{index:03d}_{req.op}" + (f"_{tail}" if tail and tail != "none" else "")
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def compile_funcs(funcs: dict[str, Any], cpu: CpuInfo, path: str | Path, *,
                  cross_compiler: Callable | None = None) -> Path:
    """Compile named PrimFuncs into one shared library at ``path`` (written atomically)."""
    import tvm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target(cpu.tvm_target)
    exe = tvm.compile(mod, target=target)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".kernels-", dir=path.parent)
    os.close(fd)
    try:
        export_with_launcher(exe, tmp, cross_compiler)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_with_launcher(exe: Any, path: str, cross_compiler: Callable | None = None) -> None:
    """``exe.export_library(path)`` with npucc's parallel launcher (``runtime.pool``) linked
    in by the same compiler. If that compiler cannot build the launcher, the library is built
    without it and keeps TVM's thread pool (a warning says so)."""
    import warnings

    from runtime.pool import launcher_addons

    kw = {"fcompile": cross_compiler} if cross_compiler is not None else {}
    addons = launcher_addons(cross=cross_compiler is not None)
    try:
        exe.export_library(path, addons=list(addons), **kw)
    except Exception as e:  # TVM's compiler wrapper raises RuntimeError with the output
        warnings.warn(f"the parallel launcher (runtime/native/npucc_pool.c) did not compile "
                      f"({str(e).strip().splitlines()[-1] if str(e).strip() else e}); this "
                      f"library keeps TVM's thread pool", RuntimeWarning, stacklevel=3)
        exe.export_library(path, **kw)


def build_library(graph: Graph, cpu: CpuInfo, out_dir: str | Path, *,
                  cross_compiler: Callable | None = None,
                  progress: Callable[[str], None] | None = None) -> KernelLibrary:
    """Build one kernel per distinct non-const node of a lowered ``graph``.

    Raises :class:`CodegenError` listing every node whose op has no kernel builder, or whose
    builder failed.
    """
    say = progress or (lambda msg: None)
    nodes = [n for n in graph.nodes if n.op != "const"]
    missing = [n for n in nodes if get_kernel_builder(n.op) is None]
    if missing:
        from targets.kernels.base import registered_ops

        lines = [f"{n.label}: no kernel for op {n.op!r}" for n in missing]
        raise CodegenError(f"{len(missing)} node(s) have no kernel:\n  " + "\n  ".join(lines)
                           + "\nops with kernels: " + ", ".join(registered_ops()))

    by_key: dict[str, tuple[str, KernelImpl]] = {}
    kernels: dict[str, KernelInfo] = {}
    funcs: dict[str, Any] = {}
    steps: list[KernelStep] = []
    weights: dict[str, np.ndarray] = {}
    failures: list[str] = []
    for node in nodes:
        req = request_for(graph, node, cpu)
        key = req.key
        if key not in by_key:
            sym = _symbol(len(by_key), req)
            t0 = time.perf_counter()
            try:
                if all(t.size == 0 for t in req.output_types):
                    impl = KernelImpl(empty_kernel(req.input_types, req.output_types),
                                      note="zero-size result: nothing to compute")
                else:
                    impl = get_kernel_builder(node.op)(req)
            except NpuccError as e:
                failures.append(f"{node.label}: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (a builder bug, reported per node)
                failures.append(f"{node.label}: kernel builder failed: {type(e).__name__}: "
                                f"{_short_error(e)}")
                continue
            dt = time.perf_counter() - t0
            by_key[key] = (sym, impl)
            funcs[sym] = impl.prim_func
            kernels[sym] = KernelInfo(sym, node.op, key, impl.note, dt, 0)
            say(f"{sym}: {impl.note or node.op} ({dt * 1e3:.0f} ms)")
        sym, impl = by_key[key]
        kernels[sym].uses += 1
        step = KernelStep(symbol=sym, node=node.label, op=node.op,
                          inputs=[v.name for v in node.inputs],
                          outputs=[v.name for v in node.outputs])
        for i, v in enumerate(node.inputs):
            arr = req.const_inputs.get(i)
            is_const = arr is not None
            if is_const and i in impl.weight_transforms:
                name = f"{v.name}.packed.{sym}"
                if name not in weights:
                    weights[name] = _contig(impl.weight_transforms[i](arr))
                step.inputs[i] = name
                step.packed[i] = name
            elif is_const:
                weights.setdefault(v.name, _contig(arr))
            step.const_inputs.append(is_const)
        for j, arr in enumerate(impl.extra_const_inputs):
            name = f"{sym}.extra{j}"
            weights.setdefault(name, _contig(arr))
            step.extra_consts.append(name)
        steps.append(step)
    if failures:
        raise CodegenError(f"{len(failures)} node(s) could not be compiled:\n  "
                           + "\n  ".join(failures))

    lib_path = Path(out_dir) / "kernels.so"
    t0 = time.perf_counter()
    if funcs:
        say(f"compiling {len(funcs)} kernels for {cpu.tvm_target}")
        compile_funcs(funcs, cpu, lib_path, cross_compiler=cross_compiler)
    compile_s = time.perf_counter() - t0
    return KernelLibrary(lib_path=lib_path, steps=steps, weights=weights, kernels=kernels,
                         compile_seconds=compile_s, cpu=cpu)
