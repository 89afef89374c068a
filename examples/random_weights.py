"""onnx's light models with meaningful weights, as graphs ready to compile.

The light models (``onnx/backend/test/data/light``) are opset 9 and their weights are
ConstantOfShape placeholders (one value everywhere), so outputs are degenerate. After
import, ``fold-constants`` turns every placeholder into a weight, and :func:`randomise_weights`
replaces each by a seeded random array: He-scaled conv / FC weights, batch-norm scales and
variances near one, small biases and means. :func:`expose_logits` also returns the operand
of a final softmax, so a saturated softmax cannot hide an error.

Used by tests/test_compile_models.py and bench/models.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from compiler.ir.graph import Graph

__all__ = ["LIGHT_MODELS", "light_graph", "light_inputs", "light_onnx", "randomise_weights",
           "expose_logits"]

LIGHT_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                "shufflenet", "squeezenet", "vgg19", "zfnet512")


def _random_weight(rng: np.random.Generator, shape: tuple[int, ...], role: tuple[str, int]
                   ) -> np.ndarray:
    op, idx = role
    if op == "conv2d" and idx == 1:  # [O, I/g, KH, KW]
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    if op in ("gemm", "matmul", "dense") and idx == 1 and len(shape) == 2:
        return rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(max(shape)))
    if op == "batch_norm" and idx in (1, 4):  # scale, var
        return rng.uniform(0.5, 1.5, shape)
    return rng.uniform(-0.2, 0.2, shape)  # biases, BN bias and mean, other parameters


def randomise_weights(graph: Graph, seed: int = 0) -> int:
    """Replace every used float weight of ``graph`` by a random array of its shape, in place.

    The role (conv weight, BN variance...) comes from the weight's first user. Returns how
    many weights were replaced.
    """
    rng = np.random.default_rng(seed)
    n = 0
    for node in graph.find("const"):
        ref = node.attrs.get("ref")
        arr = graph.weights.get(ref) if ref else None
        if arr is None or arr.dtype.kind != "f" or not node.output.uses:
            continue
        user = node.output.uses[0]
        role = (user.op, user.inputs.index(node.output))
        graph.weights[ref] = np.ascontiguousarray(
            _random_weight(rng, arr.shape, role).astype(arr.dtype))
        n += 1
    return n


def expose_logits(graph: Graph) -> None:
    """Also return the operand of a final softmax (a saturated softmax hides errors)."""
    out = graph.outputs[0]
    if out.producer is not None and out.producer.op == "softmax":
        graph.outputs = [out, out.producer.inputs[0]]


def light_graph(name: str, seed: int = 0, logits: bool = True) -> Graph:
    """Light model ``name`` imported (the importer upgrades its opset 9 to 13), constants
    folded, every weight random (seeded); with ``logits`` the softmax operand is a second
    output."""
    from compiler.frontends import from_onnx
    from compiler.pass_manager import run_pipeline
    from examples.models import light_model_path

    graph = run_pipeline(from_onnx(light_model_path(name)), "fold-constants")
    if randomise_weights(graph, seed) == 0:
        raise ValueError(f"light model {name!r}: no float weight to randomise")
    if logits:
        expose_logits(graph)
    return graph


def light_inputs(graph: Graph, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every (float) input of ``graph``."""
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.np_dtype)
            for v in graph.inputs}


def light_onnx(name: str, seed: int = 0, logits: bool = True):
    """Light model ``name`` as an ONNX ModelProto (opset 13, an IR version onnxruntime loads)
    whose ConstantOfShape placeholders are seeded random initializers: He-scaled normal
    values for tensors of rank >= 2, uniform in [0.5, 1.5] for vectors (biases, batch-norm
    parameters). onnxruntime and ``compile`` can then run the very same weights. With
    ``logits`` the operand of a final Softmax is a second graph output."""
    import math

    import onnx
    from onnx import numpy_helper, version_converter

    from examples.models import ONNX_IR_VERSION, light_model_path

    model = version_converter.convert_version(onnx.load(str(light_model_path(name))), 13)
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            if len(shape) >= 2:
                scale = np.float32(math.sqrt(2.0 / math.prod(shape[1:])))
                arr = rng.standard_normal(shape, np.float32) * scale
            else:
                arr = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    live = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    inputs = [i for i in model.graph.input if i.name not in dropped]  # opset-9 style: weights
    del model.graph.input[:]                                          # are inputs too
    model.graph.input.extend(inputs)
    last = keep[-1]
    if logits and last.op_type == "Softmax" and last.output[0] == model.graph.output[0].name:
        elem = model.graph.output[0].type.tensor_type.elem_type
        model.graph.output.append(onnx.helper.make_tensor_value_info(last.input[0], elem, None))
    return model
