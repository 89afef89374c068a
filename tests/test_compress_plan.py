"""compress(model, data, device=..., budget_mb=..., latency_ms=...): the plan follows the
budgets and the kirin990 description, the compiled package meets them, and an impossible
budget is refused with the closest achievable numbers."""

from __future__ import annotations

import re
import warnings

import pytest

torch = pytest.importorskip("torch")

from compiler.compress.plan import MIB, BudgetError, compress, plan_compression  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from examples.digits_cnn import load_digits_split, make_model, train

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split()
    torch.manual_seed(0)
    model = train(make_model(), xtr, ytr, epochs=2)
    data = [{"input": xtr[i:i + 1]} for i in range(4)]
    return model, data, (torch.from_numpy(xte[:1]),)


@pytest.fixture(scope="module")
def candidates(digits):
    model, data, ex = digits
    return plan_compression(model, data, "kirin990", example_inputs=ex,
                            sparsities=(0.0, 0.5, 0.7))


def test_candidates_are_ordered_and_shrink(candidates):
    assert [c.cost for c in candidates] == sorted(c.cost for c in candidates)
    by = {(c.sparsity, c.precision): c for c in candidates}
    # float runs in f16 on the Kirin NPU (npu-numerics): int8 halves the bytes
    assert by[(0.0, "int8")].weight_bytes < 0.6 * by[(0.0, "float")].weight_bytes
    assert by[(0.0, "int4")].weight_bytes < by[(0.0, "int8")].weight_bytes
    assert by[(0.5, "float")].weight_bytes < 0.6 * by[(0.0, "float")].weight_bytes
    assert all(c.latency_ms > 0 for c in candidates)


def test_two_budgets_two_plans_both_met(digits, candidates):
    model, data, ex = digits
    by = {(c.sparsity, c.precision): c for c in candidates}
    loose = by[(0.0, "int8")].weight_bytes / MIB * 1.01
    tight = by[(0.5, "int4")].weight_bytes / MIB * 1.01
    kw = {"example_inputs": ex, "sparsities": (0.0, 0.5, 0.7), "verbose": False}
    a = compress(model, data, "kirin990", budget_mb=loose, **kw)
    b = compress(model, data, "kirin990", budget_mb=tight, **kw)
    assert (a.plan.sparsity, a.plan.precision) != (b.plan.sparsity, b.plan.precision)
    assert b.plan.cost > a.plan.cost
    for r, budget in ((a, loose), (b, tight)):
        assert r.measured["weight_bytes"] <= budget * MIB
        # the cost model's latency of the compiled graph is what the plan estimated
        assert r.measured["latency_ms"] == pytest.approx(r.plan.latency_ms, rel=1e-6)
        assert r.compiled.run(data[0])[0].shape == (1, 10)
    lat = compress(model, data, "kirin990", latency_ms=a.plan.latency_ms * 1.0001, **kw)
    assert lat.measured["latency_ms"] <= a.plan.latency_ms * 1.0001


def test_impossible_budget_names_the_closest_numbers(digits, candidates):
    model, data, ex = digits
    smallest = min(c.weight_bytes for c in candidates) / MIB
    with pytest.raises(BudgetError) as e:
        compress(model, data, "kirin990", budget_mb=smallest / 4, example_inputs=ex,
                 sparsities=(0.0, 0.5, 0.7), verbose=False)
    msg = str(e.value)
    assert f"{smallest:.2f} MiB" in msg and "fastest" in msg and "kirin990" in msg
    fastest = min(c.latency_ms for c in candidates)
    with pytest.raises(BudgetError, match=f"{fastest:.3f} ms"):
        compress(model, data, "kirin990", latency_ms=fastest / 10, example_inputs=ex,
                 sparsities=(0.0, 0.5, 0.7), verbose=False)


def test_npucc_compress_from_the_shell(tmp_path, capsys):
    import numpy as np

    from compiler.cli import main
    from examples.digits_cnn import load_digits_split
    from runtime import load

    xtr = load_digits_split()[0]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        np.save(data / f"{i}.npy", xtr[i:i + 1])
    np.savez(data / "3.npz", image=xtr[3:4])
    model = "examples/digits_cnn.onnx"
    out = tmp_path / "m.npkg"
    rc = main(["compress", model, "--data", str(data), "-t", "kirin990", "--budget-mb", "0.03",
               "--sparsities", "0,0.5", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "plan:" in text and "wrote" in text
    with warnings.catch_warnings():   # unsigned: the runtime warns once per process
        warnings.simplefilter("ignore", UserWarning)
        pkg = load(out)
    assert pkg.run({"image": xtr[:1]})[0].shape == (1, 10)
    assert main(["compress", model, "--data", str(data), "-t", "kirin990", "--budget-mb",
                 "0.0001", "--sparsities", "0,0.5", "-o", str(tmp_path / "x.npkg")]) == 1
    assert "smallest model is" in capsys.readouterr().err


def test_training_route_prunes_qat_distills_and_meets_the_budget(digits, candidates, capsys):
    """compress(train=...): iterative channel pruning with distillation, then QAT with
    distillation, compiled with the learned ranges; every stage prints its top-1."""
    from examples.digits_cnn import load_digits_split

    model, data, ex = digits
    xtr, ytr, xte, yte = load_digits_split()
    train = [(torch.from_numpy(xtr[i:i + 64]), torch.from_numpy(ytr[i:i + 64]))
             for i in range(0, 512, 64)]
    val = [(torch.from_numpy(xte[:120]), torch.from_numpy(yte[:120]))]
    by = {(c.sparsity, c.precision): c for c in candidates}
    # kernels pad their packed weights (8192 -> 8320 B here): the plan's bytes are an estimate
    budget = by[(0.5, "int8")].weight_bytes / MIB * 1.3
    assert budget * MIB < by[(0.5, "float")].weight_bytes
    r = compress(model, data, "kirin990", budget_mb=budget, example_inputs=ex,
                 sparsities=(0.0, 0.5, 0.7), precisions=("float", "int8"), train=train,
                 val=val, epochs=1)
    out = capsys.readouterr().out
    assert (r.plan.sparsity, r.plan.precision) == (0.5, "int8"), out
    assert "pruned 50% channels in 2 rounds" in out and "QAT + distillation" in out
    assert r.measured["weight_bytes"] <= budget * MIB
    ops = r.compiled.graph.op_counts()
    assert ops.get("qconv2d") == 2 and ops.get("qdense") == 2
    final = float(out.rsplit("compiled: top-1 ", 1)[1].split()[0])
    assert final > 0.8


class _ResidualDigits(torch.nn.Module):
    """Not an nn.Sequential: a residual conv block, then the head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 16, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv(h))
        return self.head(torch.flatten(torch.nn.functional.max_pool2d(h, 2), 1))


@pytest.mark.slow
def test_training_route_takes_a_module_that_is_not_sequential(capsys):
    """QAT + distillation on a residual module (no pruning: apply_to_torch rebuilds
    nn.Sequential only): planned at sparsity 0, compiled with the learned ranges."""
    from examples.digits_cnn import load_digits_split, train

    xtr, ytr, xte, yte = load_digits_split()
    torch.manual_seed(0)
    model = train(_ResidualDigits(), xtr, ytr, epochs=1)
    batches = [(torch.from_numpy(xtr[i:i + 64]), torch.from_numpy(ytr[i:i + 64]))
               for i in range(0, 256, 64)]
    val = [(torch.from_numpy(xte[:100]), torch.from_numpy(yte[:100]))]
    r = compress(model, [{"x": xtr[:1]}], "kirin990", example_inputs=(batches[0][0][:1],),
                 sparsities=(0.0, 0.5), precisions=("int8",), train=batches, val=val, epochs=1)
    out = capsys.readouterr().out
    assert "is not an nn.Sequential" in out and "QAT + distillation" in out
    assert (r.plan.sparsity, r.plan.precision) == (0.0, "int8")
    ops = r.compiled.graph.op_counts()
    assert ops.get("qconv2d") == 2 and ops.get("qdense") == 1
    def top1(stage: str) -> float:
        return float(out.split(stage + ": top-1 ", 1)[1].split()[0])

    # the compiled integer model is the QAT model, and no worse than the model it started from
    qat = float(re.search(r"QAT \+ distillation \d+ epochs: top-1 ([0-9.]+)", out).group(1))
    assert abs(top1("compiled") - qat) <= 0.02, out
    assert top1("compiled") >= top1("float") - 0.02, out
