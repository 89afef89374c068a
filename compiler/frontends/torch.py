"""The PyTorch importer: ``torch.nn.Module`` + example inputs -> a verified :class:`Graph`.

The module is captured with ``torch.export.export`` (static shapes, the example inputs fix
every dimension), then decomposed to the core ATen op set except for a few composite ops
that map one-to-one onto our catalogue (``linear`` -> ``dense``, ``matmul``, ``layer_norm``,
``conv2d``, ``hardswish``...; see :data:`KEEP`). Each ATen node is converted by an entry of
:data:`compiler.frontends._torch_ops.CONVERTERS`.

Contract:
- Parameters, buffers and lifted constants become weight consts named by their state_dict
  names (``h.0.attn.c_attn.weight``).
- Static arguments (shapes, dims, permutations, slice bounds, pads) become attributes;
  shapes are taken from torch's own shape propagation (``node.meta["val"]``), and every
  converted node's type is checked against it.
- Subexpressions whose operands are all constants and that do not read a trainable
  parameter fold at import through the ops' reference implementations (masks, position
  ids, index arithmetic), when the result has at most ``fold_limit`` elements.
- Every ATen op without a converter is collected; one :class:`UnsupportedOpsError` lists
  them all (fx node name, ATen target, and the module that produced it).
- Graph inputs are named after the module's forward parameters unless ``input_names``.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from compiler.errors import ImportError_, NpuccError, UnsupportedOpsError
from compiler.ir.graph import Graph, Value
from compiler.ir.registry import get_op
from compiler.ir.types import TensorType
from compiler.ir.verify import verify

__all__ = ["from_torch", "KEEP", "supported_aten_ops"]

FOLD_LIMIT = 1 << 16

# composite ATen ops kept through decomposition because one catalogue op is their meaning
KEEP = (
    "linear.default", "matmul.default", "layer_norm.default", "conv2d.default",
    "hardswish.default", "hardsigmoid.default", "adaptive_avg_pool2d.default",
    "reflection_pad1d.default", "reflection_pad2d.default", "replication_pad1d.default",
    "replication_pad2d.default",
)


class Unsupported(Exception):
    """Raised by a converter: this node (or this variant of its op) cannot be imported."""


def _torch():
    import torch

    return torch


def torch_dtype_to_ir(dtype: Any) -> str:
    torch = _torch()
    table = {
        torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
        torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
        torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
    }
    try:
        return table[dtype]
    except KeyError:
        raise Unsupported(f"dtype {dtype} has no IR dtype") from None


def _module_path(node: Any) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


class TorchImporter:
    """Walks an exported fx graph and builds the IR graph. Converters call its helpers."""

    def __init__(self, graph: Graph, fold_limit: int = FOLD_LIMIT):
        self.graph = graph
        self.fold_limit = fold_limit
        self.env: dict[str, Any] = {}
        self.params: set[int] = set()  # ids of const values holding trainable parameters
        self.node: Any = None  # the fx node being converted

    # -- helpers for converters ---------------------------------------------------------
    def emit(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        """Add a single-result node, folding it to a constant when all operands are."""
        return self.emit_multi(op, list(inputs), attrs)[0]

    def emit_multi(self, op: str, inputs: list[Value], attrs: dict[str, Any]) -> list[Value]:
        g = self.graph
        name = _module_path(self.node) if self.node is not None else ""
        opdef = get_op(op)
        attrs = opdef.normalize_attrs(attrs)
        types = opdef.infer_types(g, inputs, attrs)
        out_names = []
        for _ in types:
            out_names.append(self.fresh_name())
            g.claim_name(out_names[-1])
        g._names.difference_update(out_names)  # make_node claims them
        node = g.make_node(op, inputs, attrs, types=types, name=name, out_names=out_names)
        consts = [g.const_value(v) for v in inputs]
        foldable = (all(c is not None for c in consts)
                    and not any(id(v) in self.params for v in inputs)
                    and sum(v.type.size for v in node.outputs) <= self.fold_limit)
        if not foldable:
            return node.outputs
        from compiler.ir.interpreter import run_node

        results = run_node(g, node, consts)
        outs = []
        for v, r in zip(node.outputs, results, strict=True):
            c = g.add_const(np.array(r, copy=True, order="C"), name=self.fresh_name())
            g.replace_all_uses(v, c)
            outs.append(c)
        g.remove_node(node)
        return outs

    def fresh_name(self) -> str:
        """An unused value name derived from the fx node's name (not yet claimed)."""
        base = self.node.name if self.node is not None else "c"
        taken = self.graph._names
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    def const(self, array: Any, dtype: str) -> Value:
        from compiler.ir.types import to_numpy_dtype

        arr = np.asarray(array).astype(to_numpy_dtype(dtype))
        return self.graph.add_const(arr, name=self.fresh_name())

    def tensor(self, x: Any, dtype: str | None = None) -> Value:
        """A Value for ``x`` (a Value or a Python scalar), cast to ``dtype`` when given."""
        if isinstance(x, Value):
            if dtype is not None and x.dtype != dtype:
                return self.emit("cast", x, to=dtype)
            return x
        if x is None:
            raise Unsupported("an operand is None")
        if dtype is None:
            dtype = "bool" if isinstance(x, bool) else "i64" if isinstance(x, int) else "f32"
        return self.const(x, dtype)

    def out_type(self, i: int | None = None) -> TensorType:
        """The type torch computed for the current node's result (``i`` for tuples)."""
        val = self.node.meta.get("val")
        if i is not None:
            val = val[i]
        if val is None or not hasattr(val, "shape"):
            raise Unsupported("torch recorded no tensor type for this result")
        shape = []
        for d in val.shape:
            if not isinstance(d, int):
                raise Unsupported(f"dynamic dimension {d} (shapes must be static)")
            shape.append(d)
        return TensorType(tuple(shape), torch_dtype_to_ir(val.dtype))


def _bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    schema = target._schema
    bound: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            bound[a.name] = None
    return bound


def _as_tensor_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    torch = _torch()

    def conv(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        return x

    if isinstance(example_inputs, dict):
        return (), {k: conv(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor | np.ndarray):
        return (conv(example_inputs),), {}
    return tuple(conv(x) for x in example_inputs), {}


def export_program(module: Any, example_inputs: Any) -> Any:
    """torch.export + decomposition to core ATen (minus :data:`KEEP`); ImportError_ on failure."""
    torch = _torch()
    args, kwargs = _as_tensor_inputs(example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch.export's own pytree deprecation noise, not the user's business
            warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
            ep = torch.export.export(module, args, kwargs=kwargs)
            table = torch.export.default_decompositions()
            for name in KEEP:
                packet, overload = name.split(".")
                table.pop(getattr(getattr(torch.ops.aten, packet), overload), None)
            return ep.run_decompositions(table)
    except NpuccError:
        raise
    except Exception as e:
        raise ImportError_(f"torch.export could not capture {type(module).__name__}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                           "\nThe module must be traceable with static shapes for the "
                           "example inputs given.") from e
    finally:
        module.train(was_training)


def supported_aten_ops() -> list[str]:
    from compiler.frontends._torch_ops import CONVERTERS

    return sorted(CONVERTERS)


MISSING = object()   # an fx node we could not import (past the cut, or unsupported)


def from_torch(module: Any, example_inputs: Any, input_names: Sequence[str] | None = None,
               *, name: str | None = None, fold_limit: int = FOLD_LIMIT,
               outputs: Sequence[str] | None = None) -> Graph:
    """Import a ``torch.nn.Module`` (eval mode) as a verified :class:`Graph`.

    ``example_inputs``: a tensor or numpy array, a tuple/list of them (positional
    arguments of ``forward``), or a dict (keyword arguments). Their shapes and dtypes become
    the graph's input types. ``outputs``: names of exported-program nodes to return instead
    of the module's outputs; only what they need is imported.
    """
    from compiler.frontends.cut import data_dependent_error, fx_needed

    ep = export_program(module, example_inputs)
    sig = ep.graph_signature
    g = Graph(name or type(module).__name__)
    imp = TorchImporter(g, fold_limit)
    user_inputs = list(sig.user_inputs)
    if input_names is not None and len(input_names) != len(user_inputs):
        raise ImportError_(f"input_names has {len(input_names)} name(s) but the module takes "
                           f"{len(user_inputs)} tensor input(s): {', '.join(user_inputs)}")
    rename = dict(zip(user_inputs, input_names or user_inputs, strict=True))
    walk = _Walk(imp, fx_needed(ep.graph, list(outputs)) if outputs else None)
    specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    tensors = {**ep.constants, **dict(ep.named_buffers()), **dict(ep.named_parameters())}
    for node in ep.graph.nodes:
        imp.node = node
        if node.op == "placeholder":
            _placeholder(imp, node, specs.get(node.name), tensors, rename)
        elif node.op == "output":
            break
        else:
            imp.env[node.name] = walk.call(node)
    if walk.data_dependent and all(u[0] in walk.tainted for u in walk.unsupported):
        raise data_dependent_error([f"{n.name} ({n.target})" for n in walk.data_dependent],
                                   [a.name for a in walk.data_dependent[0].all_input_nodes])
    if walk.unsupported:
        raise UnsupportedOpsError(walk.unsupported)
    _graph_outputs(imp, ep, outputs)
    g.remove_dead()
    if outputs:
        g.inputs = [v for v in g.inputs if v.uses or v in g.outputs]
    try:
        verify(g)
    except NpuccError as e:
        raise ImportError_(f"the imported graph does not verify (an importer bug): {e}") from e
    return g


def _placeholder(imp: TorchImporter, node: Any, spec: Any, tensors: dict[str, Any],
                 rename: dict[str, str]) -> None:
    """A graph input for a user input; a weight for a parameter, buffer or constant."""
    torch = _torch()
    kinds = torch.export.graph_signature.InputKind
    g = imp.graph
    if spec is not None and spec.kind == kinds.USER_INPUT:
        try:
            ty = imp.out_type()
        except Unsupported as e:
            raise ImportError_(f"input {node.name!r}: {e}") from None
        imp.env[node.name] = g.add_input(rename[node.name], ty)
        return
    if spec is None or spec.kind not in (kinds.PARAMETER, kinds.BUFFER, kinds.CONSTANT_TENSOR):
        raise ImportError_(f"input {node.name!r} of kind {getattr(spec, 'kind', '?')} is not "
                           "supported")
    target = spec.target
    t = tensors.get(target)
    if not isinstance(t, torch.Tensor):
        raise ImportError_(f"constant {target!r} is not a tensor")
    arr = t.detach().cpu().contiguous().numpy().copy()
    imp.node = None
    v = g.add_weight(target, arr)
    if spec.kind == kinds.PARAMETER:
        imp.params.add(id(v))
    imp.env[node.name] = v


class _Walk:
    """Converts the call nodes of one exported graph, collecting what it cannot import."""

    def __init__(self, imp: TorchImporter, needed: set[str] | None):
        self.imp, self.needed = imp, needed
        self.unsupported: list[tuple[str, str, str]] = []
        self.data_dependent: list[Any] = []
        self.tainted: set[str] = set()

    def call(self, node: Any) -> Any:
        """The imported value of ``node`` (``MISSING`` when it cannot be imported)."""
        from compiler.frontends.cut import fx_data_dependent

        torch = _torch()
        env = self.imp.env
        if node.op != "call_function":
            self.unsupported.append((node.name, node.op, "not an ATen call"))
            return MISSING
        args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.target is operator.getitem:
            return self._getitem(node, *args)
        if self.needed is not None and node.name not in self.needed:
            return MISSING  # past the cut
        if fx_data_dependent(node) or any(a.name in self.tainted for a in node.all_input_nodes):
            self.tainted.add(node.name)  # shapes, or checks on shapes, that depend on values
            if fx_data_dependent(node) and hasattr(node.meta.get("val"), "shape"):
                self.data_dependent.append(node)
        return self._convert(node, args, kwargs)

    def _getitem(self, node: Any, src: Any, i: int) -> Any:
        if src is MISSING:
            return MISSING
        if not isinstance(src, list | tuple) or src[i] is None:
            self.unsupported.append((node.name, f"getitem {i} of {node.args[0].target}",
                                     "this result of the op cannot be imported"))
            return MISSING
        return src[i]

    def _convert(self, node: Any, args: Any, kwargs: Any) -> Any:
        from compiler.frontends._torch_ops import CONVERTERS

        conv = CONVERTERS.get(str(node.target).removeprefix("aten."))
        where = _module_path(node)
        if conv is None:
            self.unsupported.append((node.name, str(node.target), f"in {where}" if where else ""))
            return MISSING
        flat = [*args, *kwargs.values()]
        flat += [x for a in flat if isinstance(a, list | tuple) for x in a]
        if any(a is MISSING for a in flat):
            return MISSING
        try:
            result = conv(self.imp, _bind(node.target, args, kwargs))
            _check_types(self.imp, node, result)
        except Unsupported as e:
            self.unsupported.append((node.name, str(node.target),
                                     str(e) + (f" (in {where})" if where else "")))
            return MISSING
        except ImportError_:
            raise
        except Exception as e:  # an op verifier refusing our node is an importer bug too
            raise ImportError_(f"node {node.name} ({node.target}"
                               f"{', in ' + where if where else ''}) could not be converted: "
                               f"{type(e).__name__}: {e}") from e
        return result


def _graph_outputs(imp: TorchImporter, ep: Any, outputs: Sequence[str] | None) -> None:
    """The module's outputs (or the named cut points) become the graph's outputs."""
    torch = _torch()
    g = imp.graph
    outs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    user_out = list(ep.graph_signature.output_specs)
    if outputs:
        outs = [next(n for n in ep.graph.nodes if n.name == o) for o in outputs]
        user_out = [None] * len(outs)
    for spec, o in zip(user_out, outs, strict=True):
        if spec is not None and spec.kind != torch.export.graph_signature.OutputKind.USER_OUTPUT:
            raise ImportError_(f"the module mutates {spec.target!r} in forward; "
                               "only pure (eval-mode) modules can be imported")
        v = imp.env.get(o.name) if isinstance(o, torch.fx.Node) else None
        if not isinstance(v, Value):
            raise ImportError_(f"output {o} is not a tensor the graph computes")
        if v.producer is not None and v.producer.op == "const" or v in g.inputs \
                or v in g.outputs:
            v = g.add("identity", v)
        g.outputs.append(v)


def _check_types(imp: TorchImporter, node: Any, result: Any) -> None:
    """Compare converter results with torch's own shape/dtype propagation."""
    if isinstance(result, Value):
        results, vals = [result], [node.meta.get("val")]
    elif isinstance(result, list | tuple):
        results, vals = list(result), list(node.meta.get("val") or [])
    else:
        return
    for r, val in zip(results, vals, strict=False):
        if r is None or val is None or not hasattr(val, "shape"):
            continue
        want = TensorType(tuple(int(d) for d in val.shape), torch_dtype_to_ir(val.dtype))
        if r.type != want:
            raise ImportError_(f"node {node.name} ({node.target}): imported as {r.type}, "
                               f"torch computes {want} (an importer bug)")

