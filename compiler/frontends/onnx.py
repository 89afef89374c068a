"""ONNX importer: ``from_onnx(model, input_shapes, outputs) -> Graph``.

Contract:
- Opsets 13..21 of the default domain; opsets 7..12 are upgraded with onnx's version
  converter first (initializers that are not inputs included); anything else is refused.
- The model is validated first (:mod:`onnx_model`): every value defined once before use,
  every attribute declared by its op at the model's opset, every graph output produced.
- Every graph input must have a static shape, from the model or from ``input_shapes``; all
  symbolic inputs are named in one error otherwise.
- ``outputs`` cuts the model at those values before conversion. Nodes whose output shape
  depends on input values (NonZero, NonMaxSuppression...) are refused in one error naming
  them and that cut, unless their inputs fold to constants; an ``If`` is replaced by the
  branch its constant condition selects (a run-time condition is refused).
- Initializers become weight constants named like the ONNX initializer.
- Tensor operands that the catalogue makes static (shapes, axes, pads, bounds, ...) must
  be constant after folding: a node whose inputs are all constant and whose outputs are
  small (<= 4096 elements) or integer typed (<= 4M elements) is evaluated at import with the
  ops' reference implementations; ``Shape`` of a static tensor is always a constant.
- Every unsupported node is reported at once (:class:`UnsupportedOpsError`); anything else
  wrong with the model is an :class:`ImportError_` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ImportError_, NpuccError, UnsupportedOpsError
from compiler.frontends.onnx_ctx import (
    CONVERTERS,
    Ctx,
    DataDependent,
    Unsupported,
    converter_key,
    onnx_dtype,
)
from compiler.frontends.onnx_model import (
    MAX_OPSET,
    MIN_OPSET,
    check_model,
    cut_outputs,
    load_model,
    node_label,
    opset_of,
    upgrade,
)
from compiler.ir.graph import Graph, Value
from compiler.ir.interpreter import interpret
from compiler.ir.types import TensorType, is_float
from compiler.ir.verify import verify

__all__ = ["from_onnx", "cut_outputs", "SUPPORTED_OPS", "MIN_OPSET", "MAX_OPSET"]

FOLD_LIMIT = 4096  # largest float constant a node may fold to
INT_FOLD_LIMIT = 1 << 22  # largest integer/bool constant a node may fold to
DATA_PROP_LIMIT = 1 << 16  # longest 1-D value with which onnx's data propagation runs
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                      "RandomUniformLike", "Multinomial", "Bernoulli"})


def _input_types(model, input_shapes: Mapping[str, list[int]] | None,
                 ) -> dict[str, TensorType]:
    """Static types of the real graph inputs (those without an initializer)."""
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if model.ir_version < 4:
        # IR 3 declares every weight as an input; optimizers (onnxruntime's
        # optimized_model_filepath) drop folded weights but leave their declarations
        # behind. Like onnxruntime, an input that nothing reads is not an input then.
        read = {n for node in model.graph.node for n in node.input}
        read |= {o.name for o in model.graph.output}
        real = [i for i in real if i.name in read]
    given = dict(input_shapes or {})
    unknown = [k for k in given if k not in {i.name for i in real}]
    if unknown:
        raise ImportError_(f"input_shapes names unknown input(s) {', '.join(unknown)}; the "
                           f"model's inputs are {', '.join(i.name for i in real) or 'none'}")
    out: dict[str, TensorType] = {}
    symbolic: dict[str, list[str]] = {}
    for vi in real:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None:
            raise ImportError_(f"input {vi.name!r} is not a tensor; only tensor inputs are "
                               "supported")
        dtype = onnx_dtype(tt.elem_type)
        if dtype is None:
            raise ImportError_(f"input {vi.name!r} has an unsupported element type "
                               f"{tt.elem_type}")
        dims = list(tt.shape.dim) if tt.HasField("shape") else None
        if vi.name in given:
            shape = [int(d) for d in given[vi.name]]
            if dims is not None:
                if len(dims) != len(shape):
                    raise ImportError_(f"input_shapes[{vi.name!r}] = {shape} has rank "
                                       f"{len(shape)}; the model declares rank {len(dims)}")
                for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
                    if d.HasField("dim_value") and d.dim_value != s:
                        raise ImportError_(f"input_shapes[{vi.name!r}] = {shape} sets dim {i} "
                                           f"to {s}; the model fixes it at {d.dim_value}")
        else:
            if dims is None:
                raise ImportError_(f"input {vi.name!r} has no shape; pass input_shapes="
                                   f"{{{vi.name!r}: [...]}}")
            shape = []
            for d in dims:
                shape.append(d.dim_value if d.HasField("dim_value") else -1)
            if -1 in shape:
                symbolic[vi.name] = [str(d.dim_value) if d.HasField("dim_value")
                                     else d.dim_param or "?" for d in dims]
                continue
        try:
            out[vi.name] = TensorType(tuple(shape), dtype)
        except NpuccError as e:
            raise ImportError_(f"input {vi.name!r}: {e}") from None
    if symbolic:
        listed = "; ".join(
            f"{n!r} " + ", ".join(f"dimension {i} ({p!r})" for i, p in enumerate(d)
                                   if not p.isdigit()) + f" of [{', '.join(d)}]"
            for n, d in symbolic.items())
        example = ", ".join(f"{n!r}: [...]" for n in symbolic)
        cli = " ".join(f"--input-shape {n}=..." for n in symbolic)
        raise ImportError_(f"the model has symbolic (dynamic) dimensions in {len(symbolic)} "
                           f"input(s): {listed}. npucc compiles static shapes: give them, "
                           f"e.g. compile(model, input_shapes={{{example}}}) or npucc "
                           f"compile {cli} (dims separated by x or ,)")
    return out


def _light_copy(model):
    """A copy of ``model`` whose large initializers are graph inputs (type only, no data):
    shape inference needs only the small ones' values, and copying weights is slow."""
    import onnx

    src = model.graph
    g = onnx.GraphProto(name=src.name)
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or math.prod(t.dims) <= 4096:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    m = onnx.ModelProto(ir_version=model.ir_version, graph=g)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    return m


def _with_static_inputs(model, types: dict[str, TensorType], strict: bool = True):
    """A copy of ``model`` whose inputs carry the static shapes, shape-inferred."""
    import onnx

    m = _light_copy(model)
    for vi in m.graph.input:
        if vi.name in types:
            shape = vi.type.tensor_type.shape
            shape.Clear()
            for d in types[vi.name].shape:
                shape.dim.add().dim_value = d
    if m.functions:
        try:
            from onnx import inliner

            m = inliner.inline_local_functions(m)
        except Exception as e:
            raise ImportError_(f"cannot inline the model's local functions: {e}") from None
    try:
        plain = onnx.shape_inference.infer_shapes(m, check_type=strict, strict_mode=strict)
        if _has_long_vector(plain):
            return plain
        return onnx.shape_inference.infer_shapes(m, check_type=strict, strict_mode=strict,
                                                 data_prop=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ImportError_("ONNX shape inference rejects the model: "
                           + (msg[-1] if msg else type(e).__name__)) from None


def _has_long_vector(model) -> bool:
    """Whether a 1-D value is longer than DATA_PROP_LIMIT: onnx's data propagation spends
    ~100 bytes and ~1 us per element of every 1-D value (a [2**40] input exhausts memory),
    so inference runs without it then; only shape arithmetic needs it, on short vectors."""
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].dim_value > DATA_PROP_LIMIT:
            return True
    return False


def _inferred_types(model) -> dict[str, TensorType]:
    out: dict[str, TensorType] = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        dtype = onnx_dtype(tt.elem_type)
        if dtype is None or not tt.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = TensorType(tuple(d.dim_value for d in tt.shape.dim), dtype)
    return out


def _unsupported_types(model) -> dict[int, tuple[str, str, str]]:
    """Nodes whose op type has no converter, by node index."""
    bad = {}
    for i, node in enumerate(model.graph.node):
        key = converter_key(node.domain, node.op_type)
        if node.domain not in ("", "ai.onnx") and key not in CONVERTERS:
            bad[i] = (node.name or f"#{i}", key,
                      f"the domain {node.domain!r} is not supported")
        elif key not in CONVERTERS:
            bad[i] = (node.name or f"#{i}", node.op_type, "no converter for this op type")
    return bad


def _data_dependent_error(nodes: list[tuple[str, str]]) -> ImportError_:
    listed = "\n  ".join(f"{label}: {why}" for label, why in nodes[:5])
    more = f"\n  ... and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return ImportError_(
        f"{len(nodes)} node(s) have data-dependent output shapes (npucc compiles static "
        f"shapes only):\n  {listed}{more}\nCut the graph before this post-processing: "
        "compile(model, outputs=[...]) or npucc compile --outputs NAME,... with the values to "
        "return instead (e.g. a detector's box and score head outputs), and run the "
        "post-processing (thresholds, NMS) on the results")


class _Importer:
    def __init__(self, model, opset: int, input_types: dict[str, TensorType]):
        self.model = model
        self.opset = opset
        name = model.graph.name or "main"
        self.graph = Graph(name)
        self.env: dict[str, Value | np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}  # initializers not yet materialised
        self.materialised: dict[str, Value] = {}
        self.inferred = _inferred_types(model)
        self.poisoned: set[str] = set()
        self.unsupported: list[tuple[str, str, str]] = []
        self.data_dependent: list[tuple[str, str]] = []   # (node label, why)
        for vi in model.graph.input:
            if vi.name in input_types:
                self.env[vi.name] = self.graph.add_input(vi.name, input_types[vi.name])

    def load_initializers(self, initializers) -> None:
        from onnx import numpy_helper

        for t in initializers:
            try:
                arr = numpy_helper.to_array(t)
            except Exception as e:
                raise ImportError_(f"initializer {t.name!r} cannot be read: {e}") from None
            try:
                TensorType.of(arr)
            except NpuccError:
                raise ImportError_(f"initializer {t.name!r} has the unsupported element type "
                                   f"{arr.dtype}") from None
            self.env[t.name] = arr
            self.weights[t.name] = arr

    def materialise(self, name: str, arr: np.ndarray) -> Value:
        """The graph value for the constant ``name`` (created at first use)."""
        v = self.materialised.get(name)
        if v is None:
            if name in self.weights:
                v = self.graph.add_weight(name, arr)
            else:
                v = self.graph.add_const(arr, name=name)
            self.materialised[name] = v
        return v

    def run(self, known_bad: dict[int, tuple[str, str, str]]) -> Graph:
        """Convert every node; ``known_bad`` nodes (no converter) are listed, not run."""
        for i, node in enumerate(self.model.graph.node):
            if i in known_bad:
                self.unsupported.append(known_bad[i])
                self.poisoned.update(o for o in node.output if o)
                continue
            self.convert(i, node)
        if self.data_dependent and len(self.data_dependent) == len(self.unsupported):
            raise _data_dependent_error(self.data_dependent)
        if self.unsupported:
            raise UnsupportedOpsError(self.unsupported)
        self.finish_outputs()
        self.graph.remove_dead()
        try:
            verify(self.graph)
        except NpuccError as e:
            raise ImportError_(f"the imported graph does not verify (an importer bug): {e}") \
                from None
        return self.graph

    def convert(self, index: int, node) -> None:
        label = node_label(node, index)
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            self.convert_if(label, node)
            return
        for name in node.input:
            if name and name not in self.env and name not in self.poisoned:
                raise ImportError_(f"node {label} reads {name!r}, which no node, graph input "
                                   "or initializer defines")
        if any(name in self.poisoned for name in node.input):
            self.poisoned.update(o for o in node.output if o)
            return
        conv = CONVERTERS[converter_key(node.domain, node.op_type)]
        all_const = all(isinstance(self.env[n], np.ndarray) for n in node.input if n)
        try:
            outs = None
            if all_const and node.op_type not in _NO_FOLD:
                outs = self.try_fold(node, conv)
            if outs is None:
                outs = self.emit(node, conv)
        except Unsupported as e:
            if isinstance(e, DataDependent):
                self.data_dependent.append((label, str(e)))
            self.unsupported.append((node.name or f"#{index}", node.op_type, str(e)))
            self.poisoned.update(o for o in node.output if o)
            return
        except NpuccError as e:
            raise ImportError_(f"node {label}: {e}") from None
        except Exception as e:  # a malformed node (missing attribute, bad tensor...)
            raise ImportError_(f"node {label} cannot be converted: "
                               f"{type(e).__name__}: {e}") from None
        if len(outs) < len([o for o in node.output if o]):
            raise ImportError_(f"node {label} has {len(node.output)} outputs; npucc produces "
                               f"{len(outs)}")
        for name, val in zip(node.output, outs, strict=False):
            if not name:
                continue
            want = self.inferred.get(name)
            got = TensorType.of(val) if isinstance(val, np.ndarray) else val.type
            # dtype and rank only: onnx's shape arithmetic has bugs of its own (ceil-mode
            # pools, ConvTranspose auto_pad) where onnxruntime agrees with us
            if want is not None and (want.dtype, want.rank) != (got.dtype, got.rank):
                raise ImportError_(f"node {label}: output {name!r} converts to {got} but ONNX "
                                   f"infers {want}")
            self.env[name] = val

    def convert_if(self, label: str, node) -> None:
        """An ``If`` whose condition is constant at import becomes the chosen branch's nodes
        (they may read any value of the enclosing graph); any other ``If`` is refused."""
        from onnx import helper

        cond_name = node.input[0] if node.input else ""
        if cond_name in self.poisoned:
            self.poisoned.update(o for o in node.output if o)
            return
        cond = self.env.get(cond_name)
        if not isinstance(cond, np.ndarray):
            raise ImportError_(
                f"node {label}: its condition {cond_name!r} is computed at run time; npucc "
                "compiles one static graph, so an If must have a condition that folds to a "
                "constant at import (give input_shapes= so shape tests fold, or cut the graph "
                "before it with outputs=)")
        if cond.size != 1:
            raise ImportError_(f"node {label}: the condition has {cond.size} elements, not one")
        branches = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        branch = branches.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if branch is None:
            raise ImportError_(f"node {label} has no then_branch/else_branch graph")
        if len(branch.output) != len(node.output):
            raise ImportError_(f"node {label}: the branch {branch.name!r} has "
                               f"{len(branch.output)} outputs, the node {len(node.output)}")
        self.load_initializers(branch.initializer)
        for j, sub in enumerate(branch.node):
            if sub.op_type not in CONVERTERS or sub.domain not in ("", "ai.onnx"):
                self.unsupported.append((sub.name or f"{label}/#{j}", sub.op_type,
                                         "no converter for this op type"))
                self.poisoned.update(o for o in sub.output if o)
                continue
            self.convert(j, sub)
        for name, bo in zip(node.output, branch.output, strict=True):
            if not name:
                continue
            if bo.name in self.poisoned:
                self.poisoned.add(name)
            else:
                self.env[name] = self.env[bo.name]

    def _ctx(self, graph: Graph, node, inline: bool) -> Ctx:
        def value_of(name: str) -> Value | np.ndarray:
            return self.env[name]

        if inline:
            def mat(name: str, arr: np.ndarray) -> Value:
                return graph.add_const(arr, inline_limit=1 << 62)
        else:
            mat = self.materialise
        return Ctx(graph, node, self.opset, value_of, mat)

    def try_fold(self, node, conv) -> list[Value | np.ndarray] | None:
        """Evaluate an all-constant node; None when its results are too large to fold."""
        scratch = Graph("fold")
        ctx = self._ctx(scratch, node, inline=True)
        outs = conv(ctx)
        values = [o for o in outs if isinstance(o, Value)]
        if not values:
            return outs
        for v in values:
            if v.type.size > (FOLD_LIMIT if is_float(v.type.dtype) else INT_FOLD_LIMIT):
                return None
        scratch.outputs = values
        arrays = iter(interpret(scratch, {}))
        return [next(arrays) if isinstance(o, Value) else o for o in outs]

    def emit(self, node, conv) -> list[Value | np.ndarray]:
        start = len(self.graph.nodes)
        outs = conv(self._ctx(self.graph, node, inline=False))
        created = self.graph.nodes[start:]
        new_values = {id(v) for n in created for v in n.outputs}
        for n in created:
            if n.op != "const":
                n.name = node.name
        renamed: set[int] = set()
        for name, val in zip(node.output, outs, strict=False):
            if name and isinstance(val, Value) and id(val) in new_values \
                    and id(val) not in renamed:
                val.name = self.graph.unique_name(name)
                renamed.add(id(val))
        return outs

    def finish_outputs(self) -> None:
        g = self.graph
        outs: list[Value] = []
        seen: set[int] = set()
        inputs = {id(v) for v in g.inputs}
        for vi in self.model.graph.output:
            if vi.name not in self.env:
                raise ImportError_(f"graph output {vi.name!r} is not produced by any node")
            val = self.env[vi.name]
            if isinstance(val, np.ndarray):
                v = self.graph.add_const(val, name=vi.name) if vi.name not in self.weights \
                    else self.materialise(vi.name, val)
            else:
                v = val
            if id(v) in seen or id(v) in inputs:
                v = g.make_node("identity", [v], out_names=[vi.name]).output
            seen.add(id(v))
            outs.append(v)
        g.outputs = outs


def from_onnx(model: str | Path | Any, input_shapes: Mapping[str, list[int]] | None = None,
              outputs: list[str] | None = None) -> Graph:
    """Import an ONNX model (path, bytes or ``onnx.ModelProto``) as a verified Graph.

    ``outputs``: value names to return instead of the model's outputs; only the nodes they
    need are imported (a cut before post-processing with data-dependent shapes)."""
    try:
        return _from_onnx(model, input_shapes, outputs)
    except NpuccError:
        raise
    except Exception as e:  # protobuf decoding surprises (bad UTF-8 names...), anything else
        raise ImportError_(f"the ONNX model is malformed: {type(e).__name__}: {e}") from None


def _from_onnx(model: Any, input_shapes: Mapping[str, list[int]] | None,
               outputs: list[str] | None = None) -> Graph:
    proto = load_model(model)
    proto, opset = upgrade(proto, opset_of(proto))
    if outputs:
        proto = cut_outputs(proto, list(outputs))
    bad = _unsupported_types(proto)
    check_model(proto, opset)
    try:
        types = _input_types(proto, input_shapes)
        # onnx's strict inference refuses ops it has no schema for; those are ours to list
        # (nor has it schemas for the vendor ops we convert)
        vendor = any(n.domain not in ("", "ai.onnx") for n in proto.graph.node)
        inferred = _with_static_inputs(proto, types, strict=not bad and not vendor)
    except NpuccError:
        if bad:  # the unsupported ops are the more useful report
            raise UnsupportedOpsError(list(bad.values())) from None
        raise
    imp = _Importer(inferred, opset, types)
    imp.load_initializers(proto.graph.initializer)
    return imp.run(bad)


def _supported() -> frozenset[str]:
    import compiler.frontends.onnx_ops  # noqa: F401  (registers the converters)

    return frozenset(CONVERTERS)


SUPPORTED_OPS: frozenset[str] = _supported()
