"""What real exported models need from the ONNX importer: If folded on a constant condition,
data-dependent shapes refused with the cut that fixes them, symbolic inputs given concrete
shapes, older opsets and initializers that are not inputs (onnxruntime's optimised models),
and validation (values assigned twice, attributes the opset does not declare)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compiler import compile
from compiler.errors import ImportError_, UnsupportedOpsError
from compiler.frontends import from_onnx
from compiler.ir import interpret
from tests.test_onnx_import import F, check, make_model, run_ort
from tests.test_onnx_light import light_model, randomised

I64 = TensorProto.INT64
rng = np.random.default_rng(11)


def _branch(name, op, out):
    return helper.make_graph([helper.make_node(op, ["x"], [out])], name, [],
                             [helper.make_tensor_value_info(out, F, [2, 3])])


def _if_model(cond_from_shape: bool):
    """y = If(cond, then: relu(x), else: neg(x)); cond constant (shape test) or an input."""
    nodes = []
    inputs = [("x", F, [2, 3])]
    if cond_from_shape:  # "if x.shape[0] == 2", the way exporters write shape checks
        nodes += [helper.make_node("Shape", ["x"], ["s"]),
                  helper.make_node("Constant", [], ["i0"], value_ints=[0]),
                  helper.make_node("Gather", ["s", "i0"], ["d0"]),
                  helper.make_node("Constant", [], ["two"], value_ints=[2]),
                  helper.make_node("Equal", ["d0", "two"], ["c1"]),
                  helper.make_node("Squeeze", ["c1"], ["cond"])]
    else:
        inputs.append(("cond", TensorProto.BOOL, []))
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if",
                                  then_branch=_branch("then", "Relu", "t"),
                                  else_branch=_branch("else", "Neg", "e")))
    return make_model(nodes, inputs, [("y", F, [2, 3])])


def test_if_with_a_constant_condition_imports_the_taken_branch():
    x = rng.standard_normal((2, 3)).astype(np.float32)
    g = check(_if_model(True), {"x": x})
    assert [n.op for n in g.nodes if n.op != "const"] == ["relu"]


def test_if_with_a_runtime_condition_is_refused_naming_the_node():
    with pytest.raises(ImportError_, match=r"the_if.*condition 'cond' is computed at run time"):
        from_onnx(_if_model(False))


def _nonzero_model():
    """y = relu(x) * 2 -> NonZero(y) (post-processing with a data-dependent shape)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["k"], value_float=2.0),
             helper.make_node("Mul", ["r", "k"], ["scores"], name="scale"),
             helper.make_node("NonZero", ["scores"], ["idx"], name="find_boxes")]
    return make_model(nodes, [("x", F, [4, 5])], [("idx", I64, None)])


def test_data_dependent_shape_refused_with_the_cut_to_make():
    with pytest.raises(ImportError_) as e:
        from_onnx(_nonzero_model())
    msg = str(e.value)
    assert "find_boxes (NonZero)" in msg and "data-dependent" in msg
    assert "outputs=[" in msg and "--outputs" in msg


def test_outputs_cut_before_post_processing_compiles_and_matches(tmp_path):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    g = from_onnx(_nonzero_model(), outputs=["scores"])
    assert [v.name for v in g.outputs] == ["scores"]
    assert "NonZero" not in str(g)
    m = compile(_nonzero_model(), outputs=["scores"], work_dir=tmp_path)
    (y,) = m.run({"x": x})
    np.testing.assert_allclose(np.asarray(y), np.maximum(x, 0) * 2, rtol=1e-6)
    with pytest.raises(ImportError_, match="'nope'"):
        from_onnx(_nonzero_model(), outputs=["nope"])


def test_nonzero_of_a_constant_folds():
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor(
                 "c", F, [2, 3], [0, 1, 0, 2, 0, 3])),
             helper.make_node("NonZero", ["c"], ["nz"]),
             helper.make_node("Cast", ["nz"], ["nzf"], to=F),
             helper.make_node("ReduceSum", ["nzf"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, [("x", F, [2])], [("y", F, [2])])
    check(model, {"x": np.ones(2, np.float32)})


EMB = rng.standard_normal((50, 8)).astype(np.float32)


def _dynamic_model():
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0)]
    model = make_model(nodes, [("input_ids", I64, ["batch", "seq"])], [("y", F, None)],
                       inits={"emb": EMB},
                       opset=17)
    return model


def test_symbolic_inputs_listed_and_given_shapes_compile(tmp_path):
    with pytest.raises(ImportError_, match=r"'input_ids' dimension 0 \('batch'\), dimension 1 "
                                           r"\('seq'\).*input_shapes=.*--input-shape"):
        from_onnx(_dynamic_model())
    ids = rng.integers(0, 50, (1, 16)).astype(np.int64)
    m = compile(_dynamic_model(), input_shapes={"input_ids": [1, 16]}, work_dir=tmp_path)
    (got,) = m.run({"input_ids": ids})
    (want,) = run_ort(_dynamic_model(), {"input_ids": ids})
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_cli_input_shape_accepts_x_separators():
    from compiler.cli import shape_arg  # noqa: PLC2701  (the argparse type under test)

    assert shape_arg("input_ids=1x128") == ("input_ids", (1, 128))
    assert shape_arg("x=1,3,224,224") == ("x", (1, 3, 224, 224))


def test_a_value_written_twice_is_refused_naming_both_writers():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Neg", ["x"], ["a"], name="second"),
             helper.make_node("Abs", ["a"], ["y"])]
    model = make_model(nodes, [("x", F, [3])], [("y", F, [3])])
    with pytest.raises(ImportError_, match=r"second \(Neg\) writes 'a'.*already defines"):
        from_onnx(model)


def test_an_attribute_from_a_later_opset_is_refused():
    # Split's num_outputs exists from opset 18; an opset-17 model may not use it
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], name="sp", axis=0, num_outputs=2)]
    model = make_model(nodes, [("x", F, [4])], [("a", F, [2]), ("b", F, [2])], opset=17)
    with pytest.raises(ImportError_, match=r"sp \(Split\) sets the attribute 'num_outputs'.*"
                                           r"opset 17.*Split-18"):
        from_onnx(model)
    model.opset_import[0].version = 18
    check(model, {"x": np.arange(4, dtype=np.float32)})


def test_a_dangling_graph_output_is_refused():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [("x", F, [3])], [("y", F, [3]), ("ghost", F, [3])])
    with pytest.raises(ImportError_, match="'ghost' is not produced"):
        from_onnx(model)


@pytest.mark.parametrize("opset", [7, 9, 11, 12])
def test_older_opsets_with_initializers_that_are_not_inputs(opset):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Softmax", ["f"], ["y"], axis=1)]
    model = make_model(nodes, [("x", F, [1, 3, 5, 5])], [("y", F, [1, 100])],
                       inits={"w": w}, opset=opset)
    model.ir_version = 4 if opset < 11 else 6  # initializers need not be inputs from IR 4
    assert "w" not in {i.name for i in model.graph.input}
    check(model, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("name,level", [("squeezenet", "BASIC"), ("inception_v1", "BASIC"),
                                        ("shufflenet", "BASIC"), ("squeezenet", "EXTENDED"),
                                        ("inception_v1", "EXTENDED")])
def test_onnxruntime_optimised_opset9_light_model(name, level):
    """onnxruntime's optimized_model_filepath output (opset 9, IR 3, folded initializers
    no longer inputs, stale input declarations; at ORT_ENABLE_EXTENDED also its
    com.microsoft FusedConv) imports and matches onnxruntime. (ORT_ENABLE_ALL writes NCHWc
    ops for this machine's SIMD width, which onnxruntime says to use only where optimised.)"""
    src = onnx.load(str(Path(onnx.__file__).parent / "backend/test/data/light"
                        / f"light_{name}.onnx"))
    rand = randomised(light_model(name))  # random weights, opset 13 ...
    weights = {t.name: t for t in rand.graph.initializer}  # ... put in the opset-9 original
    src_inits = {t.name for t in src.graph.initializer}
    for node_out, t in weights.items():
        if node_out not in src_inits:
            src.graph.initializer.append(t)
    keep = [n for n in src.graph.node if not (n.op_type == "ConstantOfShape"
                                               and n.output[0] in weights)]
    del src.graph.node[:]
    src.graph.node.extend(keep)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              f"ORT_ENABLE_{level}")
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        sess = ort.InferenceSession(src.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    assert {o.domain: o.version for o in opt.opset_import}[""] == 9
    if level == "EXTENDED":
        assert any(n.op_type == "FusedConv" for n in opt.graph.node)
    declared = {i.name for i in opt.graph.input}
    assert any(t.name not in declared for t in opt.graph.initializer)
    g = from_onnx(opt)
    x = rng.standard_normal(sess.get_inputs()[0].shape).astype(np.float32)
    (want,) = sess.run(None, {sess.get_inputs()[0].name: x})
    (got,) = interpret(g, {g.inputs[0].name: x})
    assert float(np.abs(want).max()) > 0
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4


def test_unsupported_and_data_dependent_nodes_are_listed_together():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("Loop", ["", ""], ["c"], name="the_loop")]
    model = make_model(nodes, [("x", F, [3])], [("nz", I64, None), ("c", F, None)])
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(model)
    assert [n[:2] for n in e.value.nodes] == [("nz", "NonZero"), ("the_loop", "Loop")]
    assert "input values" in e.value.nodes[0][2]


def _tiny_bert_export(path: Path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, ids, mask):
            return self.bert(ids, mask)[0]

    ids = torch.randint(0, 100, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(Hidden().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return Hidden().eval()


def test_dynamic_axes_export_needs_and_takes_input_shapes(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bert_dynamic.onnx"
    module = _tiny_bert_export(path)
    with pytest.raises(ImportError_) as e:
        from_onnx(str(path))
    assert "'input_ids' dimension 0 ('batch')" in str(e.value)
    assert "'attention_mask' dimension 0 ('batch')" in str(e.value)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    m = compile(str(path), input_shapes={"input_ids": [2, 12], "attention_mask": [2, 12]},
                work_dir=tmp_path / "build", progress=False)
    (got,) = m.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = module(ids, mask).numpy()
    assert float(np.abs(np.asarray(got) - want).max() / np.abs(want).max()) <= 1e-4


def test_cli_compile_with_input_shape_and_outputs(tmp_path, capsys):
    from compiler.cli import main

    path = tmp_path / "nz.onnx"
    onnx.save(_nonzero_model(), str(path))
    assert main(["compile", str(path), "-o", str(tmp_path / "p.npkg"), "--no-progress",
                 "--outputs", "scores"]) == 0
    assert "wrote" in capsys.readouterr().out
    dyn = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_model(), str(dyn))
    assert main(["compile", str(dyn), "-o", str(tmp_path / "d.npkg"), "--no-progress",
                 "--input-shape", "input_ids=1x16"]) == 0
