"""The PyTorch importer: each example model imported with from_torch and run by the reference
interpreter matches torch eager (max |error| / max |reference| <= 1e-4); every imported graph
prints and re-parses identically; unsupported ATen ops are all listed in one error."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compiler.errors import ImportError_, UnsupportedOpsError  # noqa: E402
from compiler.frontends import from_torch  # noqa: E402
from compiler.ir import interpret, parse, verify  # noqa: E402

TOL = 1e-4


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max absolute error relative to the largest reference magnitude."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


def assert_roundtrip(g) -> None:
    text = str(g)
    assert str(parse(text)) == text


def test_gpt2_decoder(gpt2_model):
    model, ids = gpt2_model
    g = from_torch(model, (ids,))
    verify(g)
    assert [v.name for v in g.inputs] == ["input_ids"]
    assert g.inputs[0].type.dtype == "i64"
    # parameters keep their state_dict names; linear maps to dense, the mask folds away
    assert "h.0.attn.c_attn.weight" in g.weights
    assert g.weights["h.1.mlp.c_fc.bias"] is not None
    ops = g.op_counts()
    assert ops["dense"] == 9 and ops["layer_norm"] == 5 and ops["softmax"] == 2
    assert "equal" not in ops  # the causal-mask comparison was folded at import
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    (got,) = interpret(g, {"input_ids": ids})
    assert rel_error(got, want) <= TOL
    assert_roundtrip(g)


def test_mobilenet_v2(mobilenet_model):
    model, x = mobilenet_model
    g = from_torch(model, x, input_names=["image"])
    assert [v.name for v in g.inputs] == ["image"]
    assert "features.1.conv.0.1.running_var" in g.weights  # BN buffers by state_dict name
    ops = g.op_counts()
    assert ops["conv2d"] == 52 and ops["batch_norm"] == 52 and ops["clip"] == 35
    assert ops["add"] == 10 and ops["global_avg_pool"] == 1
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert want.std() > 1e-3  # a model whose outputs carry signal
    (got,) = interpret(g, [x])
    assert rel_error(got, want) <= TOL
    assert_roundtrip(g)


def test_minilm(minilm_model):
    model, _, inputs = minilm_model
    g = from_torch(model, inputs)
    assert [v.name for v in g.inputs] == list(inputs)
    assert "encoder.layer.5.output.dense.weight" in g.weights
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    got = interpret(g, inputs)
    assert rel_error(got[0], want.last_hidden_state.numpy()) <= TOL
    assert rel_error(got[1], want.pooler_output.numpy()) <= TOL
    assert_roundtrip(g)


def test_folding_keeps_parameters_and_folds_buffers():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8))
            self.register_buffer("scale", torch.full((8,), 2.0))

        def forward(self, x):
            s = self.scale * 3.0 + 1.0  # buffer arithmetic: folds to one constant
            return torch.nn.functional.linear(x * s, self.w)

    m = M().eval()
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    g = from_torch(m, (x,))
    assert g.op_counts() == {"const": 2, "mul": 1, "dense": 1}
    assert "w" in g.weights and "scale" not in g.weights
    (got,) = interpret(g, [x])
    assert rel_error(got, m(torch.from_numpy(x)).detach().numpy()) <= TOL


def test_input_names_and_errors():
    lin = torch.nn.Linear(3, 2).train()
    x = np.ones((1, 3), np.float32)
    g = from_torch(lin, {"input": x})
    assert [v.name for v in g.inputs] == ["input"]
    assert lin.training  # the module's mode is restored after export
    with pytest.raises(ImportError_, match="input_names has 2 name"):
        from_torch(lin, (x,), input_names=["a", "b"])
    with pytest.raises(ImportError_, match="torch.export could not capture"):
        from_torch(lin, (np.ones((1, 4), np.float32),))


def test_unsupported_ops_listed_in_one_error():
    class M(torch.nn.Module):
        def forward(self, x):
            a = torch.atan(x)  # no converter
            b = torch.special.i0(x)  # no converter
            return torch.relu(a) + b  # supported, fed by unsupported: not reported

    x = torch.randn(2, 3)
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(M(), (x,))
    err = info.value
    targets = sorted(op for _, op, _ in err.nodes)
    assert targets == ["aten.atan.default", "aten.i0.default"], err.nodes
    assert {name for name, _, _ in err.nodes} == {"atan", "i0"}
    assert "2 unsupported node(s)" in str(err)
