"""Whole-model steps before conversion: loading, opset checks and upgrades, validation
(references, single assignment, attributes declared at the opset) and output cuts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiler.errors import ImportError_

__all__ = ["MIN_OPSET", "MAX_OPSET", "load_model", "opset_of", "node_label", "check_model",
           "upgrade", "cut_outputs", "names_read", "initializers_as_inputs",
           "undeclared_attributes"]

MIN_OPSET, MAX_OPSET = 13, 21


def load_model(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes | bytearray):
        try:
            return onnx.load_model_from_string(bytes(model))
        except Exception as e:  # protobuf DecodeError and friends
            raise ImportError_(f"cannot decode the ONNX model bytes: {e}") from None
    if not isinstance(model, str | Path):
        raise ImportError_(f"from_onnx takes a path, bytes or onnx.ModelProto, "
                           f"got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise ImportError_(f"no ONNX file at {str(path)!r}")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise ImportError_(f"cannot read {str(path)!r} as an ONNX model (truncated or not "
                           f"ONNX?): {type(e).__name__}: {e}") from None


def opset_of(model) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    v = versions.get("", versions.get("ai.onnx"))
    if v is None:
        raise ImportError_("the model imports no version of the default ONNX opset")
    if v > MAX_OPSET or v < MIN_OPSET and v < 7:
        raise ImportError_(
            f"the model uses ONNX opset {v}; npucc imports opsets {MIN_OPSET} to {MAX_OPSET}. "
            f"Convert it first: onnx.version_converter.convert_version(model, 17)")
    return v


def node_label(node, index: int) -> str:
    return f"{node.name or f'#{index}'} ({node.op_type})"


def check_model(model, opset: int) -> None:
    """Every node input must be defined earlier (graph input, initializer or node output),
    every value defined once, every attribute declared by the op at the model's opset."""
    defined = {vi.name for vi in model.graph.input} | {t.name for t in model.graph.initializer}
    problems = []
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name and name not in defined:
                problems.append(f"node {node_label(node, i)} reads {name!r}, which no graph "
                                "input, initializer or earlier node defines")
        for name in node.output:
            if name and name in defined:
                problems.append(f"node {node_label(node, i)} writes {name!r}, which a graph "
                                "input, initializer or earlier node already defines (ONNX "
                                "values are assigned once)")
        problems += undeclared_attributes(node, i, opset)
        defined.update(o for o in node.output if o)
        # onnx's C++ shape inference aborts the process on this one; refuse it first
        if node.op_type == "Split":
            for a in node.attribute:
                if a.name == "num_outputs" and a.i != len(node.output):
                    problems.append(f"node {node_label(node, i)} has num_outputs={a.i} but "
                                    f"{len(node.output)} outputs")
    for vi in model.graph.output:
        if vi.name not in defined:
            problems.append(f"graph output {vi.name!r} is not produced by any node")
    if not model.graph.output:
        problems.append("the graph declares no outputs")
    if problems:
        raise ImportError_("the model is malformed:\n  " + "\n  ".join(problems[:20]))


def undeclared_attributes(node, index: int, opset: int) -> list[str]:
    """Attributes the op's schema at ``opset`` does not declare (e.g. an opset-18 attribute
    written under an opset-17 import), each with the opset that introduced it if known."""
    from onnx import defs

    if node.domain not in ("", "ai.onnx") or not node.attribute:
        return []
    try:
        schema = defs.get_schema(node.op_type, opset)
    except Exception:  # noqa: BLE001  (no schema: the converter decides)
        return []
    out = []
    for a in node.attribute:
        if a.name in schema.attributes:
            continue
        since = ""
        try:
            latest = defs.get_schema(node.op_type, MAX_OPSET)
            if a.name in latest.attributes:
                since = (f" (it was added in {node.op_type}-{latest.since_version}: the model "
                         f"should import opset {latest.since_version} or later)")
        except Exception:  # noqa: BLE001
            pass
        out.append(f"node {node_label(node, index)} sets the attribute {a.name!r}, which "
                   f"{node.op_type} at opset {opset} (version {schema.since_version}) does not "
                   f"declare{since}")
    return out


def upgrade(model, opset: int):
    """Models older than opset 13 (the onnx package's light models are opset 9) go through
    onnx's own version converter first, like onnxruntime accepting old opsets."""
    if opset >= MIN_OPSET:
        return model, opset
    from onnx import version_converter

    try:
        return version_converter.convert_version(initializers_as_inputs(model),
                                                 MIN_OPSET), MIN_OPSET
    except Exception as e:
        raise ImportError_(
            f"the model uses ONNX opset {opset}; npucc imports opsets {MIN_OPSET} to "
            f"{MAX_OPSET} and onnx's version converter could not upgrade it: "
            f"{type(e).__name__}: {str(e)[:300]}") from None


def names_read(node) -> set[str]:
    """Every value name ``node`` reads, including those its subgraphs read."""
    from onnx import AttributeProto

    names = {n for n in node.input if n}
    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else \
            list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for g in graphs:
            for sub in g.node:
                names |= names_read(sub)
    return names


def cut_outputs(model, names: list[str]):
    """A copy of ``model`` whose outputs are the values ``names`` (any node output or graph
    input), keeping only the nodes and inputs they need."""
    import onnx

    g = model.graph
    known = {o for n in g.node for o in n.output if o} | {i.name for i in g.input}
    unknown = [n for n in names if n not in known]
    if unknown:
        sample = ", ".join(repr(o) for n in g.node[-8:] for o in n.output if o)
        raise ImportError_(f"outputs= names {', '.join(map(repr, unknown))}, which no node or "
                           f"input of the model defines (the last nodes write {sample})")
    needed, keep = set(names), []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= names_read(node)
    typed = {vi.name: vi for vi in (*g.value_info, *g.output, *g.input)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(reversed(keep))
    del out.graph.output[:]
    out.graph.output.extend(typed[n] if n in typed else onnx.ValueInfoProto(name=n)
                            for n in names)
    inputs = [i for i in g.input if i.name in needed]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def initializers_as_inputs(model):
    """A copy of ``model`` declaring every initializer as a graph input too: onnx's version
    converter follows the IR < 4 rule that only graph inputs are defined ("Input w is
    undefined!"), which models written by onnxruntime's optimizer and newer exporters break
    (their initializers are not inputs). The importer treats such inputs as constants."""
    import onnx

    declared = {vi.name for vi in model.graph.input}
    missing = [t for t in model.graph.initializer if t.name not in declared]
    if not missing:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                           for t in missing)
    return out
