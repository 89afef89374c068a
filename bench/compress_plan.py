"""compress(..., device="kirin990", budget_mb=...) on MobileNetV2 and MiniLM: two budgets,
two plans, both compiled packages within their budget.

    OMP_NUM_THREADS=1 python bench/compress_plan.py [--model mobilenet|minilm|both]
        [--resolution 224] [--seq 64]

For each model the candidates (channel sparsity 0 / 0.5 for MobileNetV2, head sparsity
0 / 0.5 for MiniLM, x float / int8 / int4) are planned once on kirin990; the loose budget is
the int8 unpruned candidate's weights + 10%, the tight one the smallest candidate's + 10%
(kernels pad packed weights: the plan's bytes are up to ~6% under the package's). Each
budget goes through ``compress`` (plan → prune → PTQ on 2 sample inputs → compile), which
prints its plan table and the compiled package's figures; this script prints the two plans
side by side with the measured weight bytes and the kirin990 cost-model latency. MobileNetV2
has seeded weights (examples/models.py), MiniLM is the trained all-MiniLM-L6-v2.

Measured (AMD EPYC Zen 4 class, 2 shared cores), weights / package / kirin990 estimate:
MobileNetV2 224: budget 3.97 MiB -> 0% channels + int8, 3.68 / 5.24 MiB, 2.105 ms;
budget 1.13 MiB -> 50% channels + int4, 1.09 / 2.59 MiB, 1.144 ms. MiniLM (seq 64):
budget 24.06 MiB -> 0% heads + int8, 21.95 / 22.66 MiB, 2.955 ms; budget 17.97 MiB ->
0% heads + int4, 17.29 / 17.88 MiB, 2.750 ms (50% heads + int4, 16.33 MiB, costs more
by the plan's order: embeddings dominate MiniLM's bytes, heads are a small share).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare


def _model(name: str, args):
    import torch

    from examples import models

    if name == "mobilenet":
        m = models.mobilenet_v2(resolution=args.resolution)
        x = [models.mobilenet_inputs(args.resolution, seed=s) for s in range(2)]
        return m, (torch.from_numpy(x[0]),), [{"x": xi} for xi in x], "channel"
    model, tok = models.minilm()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    from examples.sentences import CALIBRATION

    feeds = [models.minilm_inputs(tok, CALIBRATION[i:i + 1], seq=args.seq) for i in range(2)]
    data = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]}
            for f in feeds]
    ex = tuple(torch.from_numpy(data[0][k]) for k in ("input_ids", "attention_mask"))
    return Hidden(model), ex, data, "head"


def run(name: str, args) -> None:
    from compiler.compress.plan import MIB, compress, plan_compression

    model, ex, data, method = _model(name, args)
    from compiler.driver import CompileOptions, import_model

    names = [v.name for v in import_model(model, CompileOptions(example_inputs=ex)).inputs]
    data = [dict(zip(names, d.values(), strict=True)) for d in data]
    t = time.perf_counter()
    cands = plan_compression(model, data, "kirin990", example_inputs=ex,
                             sparsities=(0.0, 0.5), prune_method=method)
    t_plan = time.perf_counter() - t
    by = {(c.sparsity, c.precision): c for c in cands}
    budgets = {"loose": by[(0.0, "int8")].weight_bytes / MIB * 1.1,
               "tight": min(c.weight_bytes for c in cands) / MIB * 1.1}
    results = {}
    for label, b in budgets.items():
        t = time.perf_counter()
        r = compress(model, data, "kirin990", budget_mb=b, example_inputs=ex,
                     sparsities=(0.0, 0.5), prune_method=method)
        results[label] = (b, r, time.perf_counter() - t)
    print(f"\n{name} on kirin990 (planning {t_plan:.0f} s):")
    print(f"{'budget':>16}{'plan':>22}{'weights MiB':>13}{'package MiB':>13}"
          f"{'latency ms':>12}{'meets':>7}{'time s':>8}")
    for label, (b, r, dt) in results.items():
        mw = r.measured["weight_bytes"] / MIB
        ok = mw <= b
        plan = f"{100 * r.plan.sparsity:.0f}% {r.plan.unit} + {r.plan.precision}"
        print(f"{label + f' {b:.2f} MiB':>16}{plan:>22}{mw:13.2f}"
              f"{r.measured['package_bytes'] / MIB:13.2f}{r.measured['latency_ms']:12.3f}"
              f"{'yes' if ok else 'NO':>7}{dt:8.0f}")
    a, b = results["loose"][1].plan, results["tight"][1].plan
    print("different plans:", "PASS" if (a.sparsity, a.precision) != (b.sparsity, b.precision)
          else "FAIL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="both", choices=("mobilenet", "minilm", "both"))
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    for name in ("mobilenet", "minilm") if args.model == "both" else (args.model,):
        run(name, args)


if __name__ == "__main__":
    main()
