"""Pruning at the graph level (reference interpreter only; fast): magnitude / 2:4 patterns,
channel pruning across residual adds, concat, depthwise convs, pools and flatten, attention
heads, sensitivity, sparse storage encodings, the torch bridge."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import NpuccError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import interpret
from compiler.ir.types import TensorType
from compiler.ir.verify import verify
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline
from passes.pruning import Prune
from passes.pruning.magnitude import check_nm

GPT2_SMALL = dict(vocab=128, n_layer=2, n_head=4, d_model=32, seq=16)   # head size 8
FUSE = "canonicalize,fuse-matmul-add,fuse-gemm,fold-batchnorm,fuse-conv-relu,fuse-dense-act"


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _prune(g: Graph, options: dict, samples=None) -> tuple[Graph, dict]:
    ctx = PassContext(resources={"calib": samples} if samples else {})
    prune = Prune.from_options(options, calibration="@calib" if samples else "")
    out = run_pipeline(g.copy(), [prune], ctx=ctx)
    verify(out)
    return out, ctx.options["prune_plan"]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def cnn_graph(seed: int = 0) -> Graph:
    """conv -> (conv a | conv b) add (residual) -> concat with conv c -> depthwise (no bias)
    -> per-channel mul -> pool -> conv -> flatten -> dense -> dense (output). Every op on the
    channel path maps a zero channel to zero, so masking and removing agree exactly."""
    rng = np.random.default_rng(seed)
    g = Graph("cnn")
    x = g.add_input("x", TensorType((1, 3, 8, 8), "f32"))

    def conv(v, o, i, k=3, act="relu", name="", **kw):
        w = g.add_weight(f"{name}.w", _w(rng, o, i, k, k))
        b = g.add_weight(f"{name}.b", _w(rng, o))
        return g.make_node("conv2d", [v, w, b], {"pads": [k // 2] * 4, "activation": act,
                                                 **kw}, name=name).output

    c0 = conv(x, 8, 3, name="c0")
    a = conv(c0, 8, 8, name="a", act="none")
    b = conv(c0, 8, 8, name="b", act="none")
    s = g.add("relu", g.add("add", a, b))
    c = conv(c0, 4, 8, name="c")
    cat = g.make_node("concat", [s, c], {"axis": 1}).output
    dw = g.add_weight("dw.w", _w(rng, 12, 1, 3, 3))
    d = g.make_node("conv2d", [cat, dw], {"pads": [1] * 4, "groups": 12}, name="dw").output
    m = g.add("mul", d, g.add_weight("scale", np.abs(_w(rng, 1, 12, 1, 1)) + 0.5))
    p = g.make_node("max_pool2d", [m], {"kernel": [2, 2], "strides": [2, 2]}).output
    e = conv(p, 6, 12, name="e")
    f = g.make_node("reshape", [e], {"shape": [1, 6 * 16]}).output
    h = g.make_node("dense", [f, g.add_weight("fc1.w", _w(rng, 16, 96)),
                              g.add_weight("fc1.b", _w(rng, 16))],
                    {"activation": "relu"}, name="fc1").output
    y = g.make_node("dense", [h, g.add_weight("fc2.w", _w(rng, 5, 16))], name="fc2").output
    g.outputs = [y]
    verify(g)
    return g


def _masked(g: Graph, plan: dict) -> Graph:
    """``g`` with the pruned channels' producer rows and biases zeroed (same shapes)."""
    m = g.copy()
    for n in m.nodes:
        e = plan["layers"].get(n.name)
        if not e or "keep" not in e:
            continue
        drop = np.setdiff1d(np.arange(e["channels_before"]), e["keep"])
        for i in (1, 2)[:len(n.inputs) - 1]:
            ref = n.inputs[i].producer.attrs["ref"]
            arr = m.weights[ref].copy()
            arr[drop] = 0
            m.weights[ref] = arr
    return m


def test_magnitude_per_layer_and_global():
    g = cnn_graph()
    out, plan = _prune(g, {"method": "magnitude", "sparsity": 0.6})
    for name, e in plan["layers"].items():
        assert abs(e["sparsity"] - 0.6) < 0.01, name
    out, plan = _prune(g, {"method": "magnitude", "sparsity": 0.6, "scope": "global"})
    total = sum(e["size"] for e in plan["layers"].values())
    nnz = sum(e["params_after"] for e in plan["layers"].values())
    assert abs(1 - nnz / total - 0.6) < 0.01
    assert len({round(e["sparsity"], 2) for e in plan["layers"].values()}) > 1
    # shapes unchanged: weights stay dense with zeros
    assert [v.type for v in out.outputs] == [v.type for v in g.outputs]


def test_two_four_pattern():
    g = cnn_graph()
    out, plan = _prune(g, {"method": "2:4"})
    from passes.pruning.common import layers

    for lay in layers(out):
        e = plan["layers"][lay.name]
        if "skipped" in e:
            # c0: 3 input channels x 3 x 3 = 27; the depthwise dw: 1 x 3 x 3 = 9
            assert lay.name in ("c0", "dw")
            continue
        assert check_nm(lay.weight, lay.node.op), lay.name
        assert e["sparsity"] == pytest.approx(0.5)
    # conv groups run along the input channels at each kernel position
    w = out.const_value(next(n for n in out.nodes if n.name == "a").inputs[1])
    assert ((w.transpose(0, 2, 3, 1).reshape(-1, 4) == 0).sum(1) == 2).all()


def test_channel_residual_concat_depthwise_flatten():
    g = cnn_graph()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, plan = _prune(g, {"method": "channel", "sparsity": 0.5})
    L = plan["layers"]
    # the residual add's producers are one group and keep the same channels
    assert L["a"]["keep"] == L["b"]["keep"] and L["a"]["group"] == L["b"]["group"]
    assert L["a"]["channels_after"] == 4 and L["c"]["channels_after"] == 2
    assert "keep" not in L["fc2"] and L["fc2"]["kept_because"] == "a graph output"
    dw = next(n for n in out.nodes if n.name == "dw")
    assert dw.attrs["groups"] == 6 and dw.outputs[0].shape == (1, 6, 8, 8)
    fc1 = next(n for n in out.nodes if n.name == "fc1")
    assert fc1.inputs[1].shape == (8, 3 * 16)
    got = interpret(out, [x])[0]
    want = interpret(_masked(g, plan), [x])[0]
    assert _rel(got, want) < 1e-5


def test_channel_calibrated_and_options():
    g = cnn_graph()
    xs = [{"x": np.random.default_rng(s).standard_normal((1, 3, 8, 8)).astype(np.float32)}
          for s in range(2)]
    out, plan = _prune(g, {"method": "channel", "sparsity": 0.5, "importance": "calibrated",
                           "ops": ["conv2d"], "multiple": 4}, xs)
    assert "fc1" not in plan["layers"]
    assert plan["layers"]["c0"]["channels_after"] == 4
    assert plan["layers"]["e"]["channels_after"] == 4      # 6 -> 3, rounded up to 4
    assert _rel(interpret(out, xs[0])[0], interpret(_masked(g, plan), xs[0])[0]) < 1e-5
    with pytest.raises(NpuccError, match="needs calibration samples"):
        _prune(g, {"method": "channel", "importance": "calibrated"})


def test_errors_name_what_is_accepted():
    g = cnn_graph()
    for opts, pat in (({"method": "lottery"}, "accepted: magnitude"),
                      ({"method": "magnitude", "scope": "model"}, "'layer', 'global'"),
                      ({"method": "magnitude", "sparsity": 1.5}, r"\[0, 1\)")):
        with pytest.raises(NpuccError, match=pat):
            _prune(g, opts)


@pytest.fixture(scope="module")
def gpt2_graph():
    import torch

    from compiler.frontends import from_torch
    from examples.models import gpt2_decoder, gpt2_inputs

    torch.set_num_threads(1)
    cfg = GPT2_SMALL
    model = gpt2_decoder(**cfg)
    ids = gpt2_inputs(**cfg)
    return run_pipeline(from_torch(model, (torch.from_numpy(ids),)), FUSE,
                        ctx=PassContext()), ids


@pytest.mark.parametrize("importance", ["contribution", "output-error", "weight"])
def test_heads_gpt2(gpt2_graph, importance):
    from passes.pruning.heads import find_attention

    g, ids = gpt2_graph
    assert len(find_attention(g)) == 2
    out, plan = _prune(g, {"method": "head", "sparsity": 0.5, "importance": importance},
                       [{"input_ids": ids}])
    # oracle: the unpruned graph with the removed heads' output-projection columns zeroed
    masked = g.copy()
    for n in masked.nodes:
        e = plan["layers"].get(n.name)
        if n.op == "dense" and e is not None:
            drop = np.setdiff1d(np.arange(e["heads_before"]), e["keep"])
            ref = n.inputs[1].producer.attrs["ref"]
            w = masked.weights[ref].copy()
            for h in drop:
                w[:, h * 8:(h + 1) * 8] = 0
            masked.weights[ref] = w
    for e in plan["layers"].values():
        assert e["heads_after"] == 2
    assert _rel(interpret(out, [ids])[0], interpret(masked, [ids])[0]) < 1e-5
    qkv = [n for n in out.nodes if n.op == "split"]
    assert all(n.attrs["sizes"] == [16, 16, 16] for n in qkv)


def test_heads_bias_correction_reduces_error(gpt2_graph):
    g, ids = gpt2_graph
    ref = interpret(g, [ids])[0]
    errs = {}
    for corr in (False, True):
        out, plan = _prune(g, {"method": "head", "sparsity": 0.5, "bias_correction": corr},
                           [{"input_ids": ids}])
        assert all(e["bias_correction"] == corr for e in plan["layers"].values())
        errs[corr] = _rel(interpret(out, [ids])[0], ref)
    assert errs[True] < errs[False]


def test_heads_global_scope_and_no_attention(gpt2_graph):
    g, ids = gpt2_graph
    _, plan = _prune(g, {"method": "head", "sparsity": 0.5, "scope": "global",
                         "importance": "weight"})
    assert sum(e["heads_after"] for e in plan["layers"].values()) == 4
    assert all(e["heads_after"] >= 1 for e in plan["layers"].values())
    with pytest.raises(NpuccError, match="no attention block"):
        _prune(cnn_graph(), {"method": "head"})


def test_sensitivity_plan_reaches_target(gpt2_graph):
    from passes.pruning.sensitivity import choose_sparsities

    sens = {"robust": {"size": 1000, "errors": {0.3: 0.01, 0.5: 0.02, 0.7: 0.03, 0.9: 0.3}},
            "fragile": {"size": 1000, "errors": {0.3: 0.2, 0.5: 0.5, 0.7: 0.9, 0.9: 1.5}}}
    chosen = choose_sparsities(sens, 0.5)
    assert chosen["robust"] == 0.7 and chosen["fragile"] == 0.3
    g, ids = gpt2_graph
    _, plan = _prune(g, {"method": "magnitude", "plan": "sensitivity", "sparsity": 0.5},
                     [{"input_ids": ids}])
    sp = plan["options"]["sensitivity"]["sparsities"]
    size = {k: e["size"] for k, e in plan["layers"].items()}
    removed = sum(sp[k] * size[k] for k in sp) / sum(size.values())
    assert removed >= 0.5 - 1e-6
    assert len(set(sp.values())) > 1


@pytest.mark.parametrize("sparsity,shape,encoding", [(0.5, (64, 3, 3, 3), "bitmask"),
                                                     (0.99, (16, 4096), "csr")])
def test_sparse_encodings_round_trip_bit_exact(sparsity, shape, encoding):
    from runtime.sparse import decode_all, encode

    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    w.reshape(-1)[:3] = [-0.0, np.nan, np.inf]
    entries, rec = encode("w", w)
    assert rec["encoding"] == encoding
    assert sum(a.nbytes for a in entries.values()) < w.nbytes
    back = decode_all(entries, {"w": rec})["w"]
    assert back.dtype == w.dtype and back.shape == w.shape and back.tobytes() == w.tobytes()
    dense, rec = encode("d", rng.standard_normal((8, 8)).astype(np.float32))
    assert rec is None                   # not smaller: stored dense


def test_torch_bridge_channel_and_masks():
    import torch

    from compiler.frontends import from_torch
    from examples.digits_cnn import make_model
    from passes.pruning.torch_bridge import apply_to_torch

    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    g = run_pipeline(from_torch(model, (torch.from_numpy(x),)), FUSE, ctx=PassContext())
    out, plan = _prune(g, {"method": "channel", "sparsity": 0.5, "ops": ["conv2d"]})
    small = apply_to_torch(model, plan)
    assert [m.out_channels for m in small if isinstance(m, torch.nn.Conv2d)] == [8, 16]
    with torch.no_grad():
        want = small(torch.from_numpy(x)).numpy()
    assert _rel(interpret(out, [x])[0], want) < 1e-5
    out, plan = _prune(g, {"method": "2:4"})
    masked = apply_to_torch(make_model().eval(), plan)
    w = masked[3].weight.detach().numpy()
    assert check_nm(w, "conv2d") and hasattr(masked[3], "weight_mask")


def test_channel_mobilenet_v2_depthwise_and_residuals():
    import torch

    from compiler.frontends import from_torch
    from examples.models import mobilenet_inputs, mobilenet_v2

    model = mobilenet_v2(num_classes=10, width=0.35, resolution=32)
    x = mobilenet_inputs(32)
    g = run_pipeline(from_torch(model, (torch.from_numpy(x),)), FUSE, ctx=PassContext())
    out, plan = _prune(g, {"method": "channel", "sparsity": 0.5})
    L = plan["layers"]
    groups: dict[str, list] = {}
    for e in L.values():
        if "keep" in e:
            groups.setdefault(e["group"], []).append(e["keep"])
    assert any(len(ks) > 1 for ks in groups.values())          # residual adds were grouped
    assert all(all(k == ks[0] for k in ks) for ks in groups.values())
    assert [k for k, e in L.items() if "keep" not in e] == ["classifier.1"]
    dws = [n for n in out.nodes if n.op == "conv2d" and n.attrs["groups"] > 1]
    assert dws and all(n.attrs["groups"] == n.inputs[0].shape[1] for n in dws)
    assert interpret(out, [x])[0].shape == (1, 10)
