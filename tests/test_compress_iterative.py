"""Iterative pruning (compiler/compress/iterative.py): exact target sparsity after N rounds
with fine-tuning between them, per-layer tiers from measured sensitivity, and structured
channel rounds whose compiled model really is smaller."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compiler.compress.iterative import (  # noqa: E402
    IterativePruner,
    exact_counts,
    fine_tune,
    measure_sensitivity,
    prune_channels_iteratively,
    schedule,
    tier_sparsities,
)
from compiler.errors import NpuccError  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from examples.digits_cnn import load_digits_split, make_model, train

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split()
    torch.manual_seed(0)
    return train(make_model(), xtr, ytr, epochs=3), xtr, ytr, xte, yte


def _batches(xtr, ytr, n=256, b=64):
    return [(torch.from_numpy(xtr[i:i + b]), torch.from_numpy(ytr[i:i + b]))
            for i in range(0, n, b)]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_exact_counts_meet_the_target_exactly():
    sizes = {"a": 144, "b": 4608, "c": 32768, "d": 640}
    counts = exact_counts(sizes, dict.fromkeys(sizes, 0.37), 0.37)
    assert sum(counts.values()) == round(0.37 * sum(sizes.values()))
    tiers = {"a": 0.2, "b": 0.4, "c": 0.7, "d": 0.2}
    counts = exact_counts(sizes, tiers, 0.6)
    assert sum(counts.values()) == round(0.6 * sum(sizes.values()))
    # the tiers' order survives the scaling
    frac = {k: counts[k] / sizes[k] for k in sizes}
    assert frac["c"] > frac["b"] > frac["a"]
    assert exact_counts(sizes, tiers) == {k: round(tiers[k] * n) for k, n in sizes.items()}
    with pytest.raises(NpuccError, match="at most"):
        exact_counts(sizes, tiers, 0.99)


def test_schedule_is_monotone_and_ends_at_one():
    for kind in ("cubic", "linear"):
        vals = [schedule(r, 4, kind) for r in range(1, 5)]
        assert vals == sorted(vals) and vals[-1] == 1.0
    assert schedule(1, 4, "cubic") > schedule(1, 4, "linear")   # prune early, slow down


def test_iterative_rounds_reach_the_exact_sparsity_and_keep_zeros(digits):
    import copy

    model, xtr, ytr, xte, yte = digits
    m = copy.deepcopy(model)
    pruner = IterativePruner(m, sparsity=0.8, rounds=3)
    seen = []

    def tune(mod, r):
        seen.append((r, pruner.total_sparsity()))
        fine_tune(mod, _batches(xtr, ytr), epochs=1, lr=1e-3)
        # fine-tuning did not bring pruned weights back
        assert pruner.total_sparsity() == seen[-1][1]

    pruner.run(tune)
    final = pruner.finalize()
    ws = [mod.weight for mod in final.modules() if isinstance(mod, (torch.nn.Conv2d,
                                                                    torch.nn.Linear))]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.8 * total)
    assert [r for r, _ in seen] == [1, 2, 3]
    assert seen[0][1] < seen[1][1] < seen[2][1]
    once = IterativePruner(copy.deepcopy(model), sparsity=0.8, rounds=1)
    once.run()                                   # one shot, no fine-tuning
    assert _acc(final, xte, yte) > max(0.8, _acc(once.finalize(), xte, yte))


def test_sensitivity_tiers_follow_the_measurement(digits):
    import copy

    model, xtr, ytr, xte, yte = digits
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    sens = measure_sensitivity(m, lambda mod: _acc(mod, xte, yte), probe=0.9)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert set(sens) == {"0", "3", "8", "10"}
    tiers = tier_sparsities(sens)
    order = sorted(sens, key=sens.get)
    assert tiers[order[0]] == 0.7 and tiers[order[-1]] == 0.2
    pruner = IterativePruner(m, sparsity=None, sparsities=tiers, rounds=2)
    pruner.run(lambda mod, r: fine_tune(mod, _batches(xtr, ytr), epochs=1))
    got = pruner.sparsity()
    sizes = {k: mod.weight.numel() for k, mod in pruner.layers.items()}
    for k in tiers:
        assert got[k] * sizes[k] == round(tiers[k] * sizes[k])


def test_channels_removed_in_rounds_compile_smaller_and_exact(digits):
    model, xtr, ytr, xte, yte = digits
    calib = [{"input": xtr[i:i + 1]} for i in range(8)]
    rounds_seen = []

    def tune(mod, r):
        rounds_seen.append([mod[0].out_channels, mod[3].out_channels])
        fine_tune(mod, _batches(xtr, ytr), epochs=1)

    ex = (torch.from_numpy(xte[:1]),)
    small, info = prune_channels_iteratively(
        model, ex, sparsity=0.5, sparsities={"3": 0.75}, rounds=3, fine_tune=tune,
        calibration=calib)
    assert info["final_channels"] == {"0": 8, "3": 8}
    assert rounds_seen[-1] == [8, 8] and rounds_seen[0][0] > 8     # gradually
    assert small[8].in_features == 8 * 16
    from compiler import compile

    big = compile(model, "host", example_inputs=ex, progress=False)
    sm = compile(small, "host", example_inputs=ex, progress=False)
    assert sm.stats()["weight_bytes"] < 0.5 * big.stats()["weight_bytes"]
    with torch.no_grad():
        ref = small(torch.from_numpy(xte[:4])).numpy()
    out = np.concatenate([sm.run({"input": xte[i:i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
