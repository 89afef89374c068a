"""NPU regions as QDQ ONNX (targets/export_onnx.py), checked with onnxruntime.

The region's inputs and outputs come from the reference interpreter on the lowered graph (the
graph kirin990's pipeline produces: NHWC, f16 NPU regions). The float export must reproduce the
region to f16 precision (the op mapping is right); the QDQ export (int8 weights per channel,
int8 activations per tensor) must stay within cosine 0.99 of it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from npu_helpers import cosine, image, small_cnn

from compiler.ir.interpreter import interpret
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline
from targets.export_onnx import ExportError, export_regions, npu_regions, random_inputs


def lowered(graph, target="kirin990"):
    from targets.description import load_target

    return run_pipeline(graph, load_target(target).default_pipeline,
                        ctx=PassContext(target=target))


def region_values(graph, feeds):
    vals = dict(feeds)

    def keep(node, res):
        for v, a in zip(node.outputs, res, strict=True):
            vals[v.name] = a
    interpret(graph, feeds, observe=keep)
    return vals


def run_region(r, vals):
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: (vals[k].astype(np.float32) if vals[k].dtype.kind == "f" else vals[k])
             for k in r.inputs}
    return dict(zip(r.outputs, sess.run(None, feeds), strict=True))


def check_model(graph, feeds, calibration=None, min_cos=0.99):
    vals = region_values(graph, feeds)
    worst = 1.0
    for quant in (False, True):
        exports = export_regions(graph, target="kirin990", quantize=quant,
                                 calibration=calibration)
        assert exports
        for r in exports:
            got = run_region(r, vals)
            for name, y in got.items():
                ref = vals[name].astype(np.float32)
                c = cosine(y, ref)
                if quant:
                    worst = min(worst, c)
                    assert c >= min_cos, (r.id, name, c)
                else:   # float: the mapping itself, to f16 precision
                    assert c > 0.9999, (r.id, name, c)
                    np.testing.assert_allclose(y, ref, rtol=2e-2,
                                               atol=2e-2 * np.abs(ref).max())
    return worst


def test_small_cnn_regions(tmp_path):
    g = lowered(small_cnn(with_layer_norm=True))
    x = image()
    worst = check_model(g, x)
    print(f"small cnn: worst QDQ region output cosine {worst:.5f}")
    exports = export_regions(g, tmp_path, target="kirin990")
    assert len(exports) == len(npu_regions(g)) >= 1
    m = onnx.load(str(exports[0].path))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 17
    assert "RANDOM" in m.doc_string and "int8 per-channel symmetric weights" in m.doc_string
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and "DequantizeLinear" in ops
    assert {"Conv", "GlobalAveragePool", "Softmax"} & set(ops)
    inits = {t.name: t for t in m.graph.initializer}
    # conv weights: int8 initializers with one scale per output channel, zero points 0
    qw = [t for n, t in inits.items() if n.endswith("_quantized") and t.data_type == 3]
    assert qw
    for t in qw:
        base = t.name[:-len("_quantized")]
        scale = onnx.numpy_helper.to_array(inits[f"{base}_scale"])
        assert scale.ndim == 1 and scale.size > 1
        assert not onnx.numpy_helper.to_array(inits[f"{base}_zp"]).any()
    # NHWC in the IR, NCHW in ONNX: consecutive convs read each other without transposes
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    producers = {o: n for n in m.graph.node for o in n.output}

    def upstream_op(name):
        n = producers[name]
        while n.op_type in ("DequantizeLinear", "QuantizeLinear", "Relu", "Clip"):
            n = producers[n.input[0]]
        return n.op_type
    assert upstream_op(convs[1].input[0]) == "Conv"


def test_calibration_samples_are_used():
    g = lowered(small_cnn())
    samples = random_inputs(g, 2, seed=5)
    (r,) = export_regions(g, target="kirin990", calibration=samples)
    assert "2 calibration sample(s)" in r.model.doc_string and "RANDOM" not in r.model.doc_string
    check_model(g, image(), calibration=samples)


def test_unsupported_op_is_named():
    g = lowered(small_cnn())
    node = next(n for n in g.nodes if n.device == "npu" and n.op == "dense")
    node.op = "lrn"   # pretend: an op the exporter has no mapping for
    with pytest.raises(ExportError, match=r"lrn.*supported: "):
        export_regions(g, target="kirin990", quantize=False)


@pytest.mark.slow
def test_mobilenet_v2_region(mobilenet_model):
    import torch

    from compiler.frontends import from_torch

    model, x = mobilenet_model
    g = lowered(from_torch(model, (torch.from_numpy(x),)))
    worst = check_model(g, {g.inputs[0].name: x})
    print(f"MobileNetV2: worst QDQ region output cosine {worst:.5f}")
