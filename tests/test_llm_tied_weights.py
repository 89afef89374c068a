"""fuse-matmul-add keeps one copy of a tied embedding: ONNX exports of a tied LM store the
output projection's weight again, transposed; transposing it back for ``dense`` must reuse the
embedding table, not add a third array."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 16)
        self.head = torch.nn.Linear(16, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.emb(ids)))


def test_tied_output_projection_reads_the_embedding():
    from compiler.driver import CompileOptions, import_model
    from compiler.ir.interpreter import interpret
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.tensor([[1, 2, 3]])
    f = io.BytesIO()
    torch.onnx.export(m, (ids,), f, dynamo=False, input_names=["ids"])
    g = import_model(onnx.load_from_string(f.getvalue()), CompileOptions())
    assert len(g.weights) == 2                 # the exporter wrote the table twice
    desc = load_target("host")
    out = run_pipeline(g, "canonicalize,fuse-matmul-add,canonicalize",
                       ctx=PassContext(target=desc))
    used = {n.attrs["ref"] for n in out.nodes if n.op == "const" and "ref" in n.attrs}
    assert len(used) == 1
    dense = out.find("dense")[0]
    gather = out.find("gather")[0]
    assert dense.inputs[1] is gather.inputs[0]
    (y,) = interpret(out, {"ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, m(ids).numpy(), rtol=1e-5, atol=1e-6)
