"""Arena size vs the lower bound for runtime/memory_pool.py, on real models and random lifetimes.

Real models: ONNX graphs (onnx's light_* models; MobileNetV2, MiniLM and the GPT-2 decoder
from examples/models.py when torch is available), one step per ONNX node in file order, tensor
sizes from ONNX shape inference; nodes whose operands are all constant are folded away (the
light models build their weights with ConstantOfShape). Elementwise steps (may run in place): unary/binary
elementwise ops and the pure reshapes (same bytes). Weights (initializers) are outside the arena.

Random lifetimes: random DAGs of 10..300 steps with random sizes (1 KiB..128 KiB plus noise),
40% of steps elementwise with a same-size operand.

    python bench/memory_plan.py            # everything
    python bench/memory_plan.py --random   # random lifetimes only (no torch, seconds)

Prints, per model: arena / bound / naive (MiB), arena/bound per ordering and for the best, and
the planning time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from runtime.memory_pool import ORDERINGS, PlanStep, PlanTensor, plan_memory  # noqa: E402

ELEMENTWISE = {"Relu", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Clip", "Erf", "Sqrt",
               "Pow", "Exp", "Neg", "LeakyRelu", "HardSigmoid", "HardSwish", "Dropout",
               "Identity", "BatchNormalization", "Cast", "Where", "Reshape", "Flatten",
               "Squeeze", "Unsqueeze", "Softmax", "LRN"}
LIGHT = ["resnet50", "densenet121", "inception_v1", "inception_v2", "squeezenet", "shufflenet",
         "vgg19", "bvlc_alexnet", "zfnet512"]


def onnx_plan_inputs(path: Path):
    import numpy as np
    import onnx
    from onnx import helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    infos = {v.name: v for v in [*g.input, *g.output, *g.value_info]}
    inits = {i.name for i in g.initializer}

    def nbytes(name: str) -> int:
        t = infos[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        return int(np.prod(dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(
            t.elem_type).itemsize

    outputs = {o.name for o in g.output}
    tensors = {}
    for i in g.input:
        if i.name not in inits:
            tensors[i.name] = PlanTensor(i.name, nbytes(i.name), "input")
    steps, elementwise = [], []
    for node in g.node:
        if all(x in inits for x in node.input if x):  # constant-folded at compile time
            inits.update(node.output)
            continue
        reads = tuple(x for x in node.input if x and x not in inits and x in infos)
        writes = tuple(x for x in node.output if x)
        for w in writes:
            if w not in infos:  # shape inference gave up: assume the first operand's size
                size = tensors[reads[0]].nbytes if reads else 4
            else:
                size = nbytes(w)
            tensors[w] = PlanTensor(w, size, "output" if w in outputs else "intermediate")
        if node.op_type in ELEMENTWISE:
            elementwise.append(len(steps))
        steps.append(PlanStep(reads, writes))
    return list(tensors.values()), steps, elementwise


def torch_models(cache: dict) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples import models as M

    out = {}
    mb = M.mobilenet_v2()
    out["mobilenet_v2"] = M.export_onnx(mb, M.mobilenet_inputs())
    cfg = M.gpt2_config("bench")
    out["gpt2_bench"] = M.export_onnx(M.gpt2_decoder(**cfg), M.gpt2_inputs(**cfg))
    model, tok = M.minilm()
    out["minilm_seq128"] = M.export_onnx(model, M.minilm_inputs(tok))
    return out


def report(name: str, tensors, steps, elementwise) -> float:
    t0 = time.perf_counter()
    plan = plan_memory(tensors, steps, elementwise, stop_at_bound=False)
    dt = time.perf_counter() - t0
    plan.check()
    mib = 1 / 2**20
    per = "  ".join(f"{k} {v / plan.lower_bound_bytes:.3f}" for k, v in plan.tried.items())
    print(f"{name:<16} {len(steps):>5} steps  arena {plan.arena_bytes * mib:8.2f}  bound "
          f"{plan.lower_bound_bytes * mib:8.2f}  naive {plan.naive_bytes * mib:8.2f} MiB  "
          f"best {plan.ratio:.3f} ({plan.ordering})  [{per}]  in-place {len(plan.inplace)}  "
          f"{dt * 1e3:.0f} ms")
    return plan.ratio


def random_graph(rng: random.Random, n: int):
    tensors = [PlanTensor("x", rng.choice([1, 4, 16, 64]) * 1024, "input")]
    sizes = {"x": tensors[0].nbytes}
    steps, ew = [], []
    for i in range(n):
        k = rng.randint(1, 3)
        names = list(sizes)
        reads = tuple({names[max(0, len(names) - 1 - int(rng.expovariate(0.3)))]
                       for _ in range(k)})
        size = rng.choice([1, 2, 4, 8, 16, 32, 64, 128]) * 1024 + rng.randint(0, 1000)
        if rng.random() < 0.4:
            size = sizes[reads[0]]
            ew.append(i)
        tensors.append(PlanTensor(f"t{i}", size, "output" if i == n - 1 else "intermediate"))
        sizes[f"t{i}"] = size
        steps.append(PlanStep(reads, (f"t{i}",)))
    return tensors, steps, ew


def random_lifetimes(trials: int = 500, seed: int = 0) -> None:
    rng = random.Random(seed)
    ratios: dict[str, list[float]] = {k: [] for k in [*ORDERINGS, "best"]}
    t0 = time.perf_counter()
    for _ in range(trials):
        tensors, steps, ew = random_graph(rng, rng.randint(10, 300))
        plan = plan_memory(tensors, steps, ew, stop_at_bound=False)   # every ordering's figure
        plan.check()
        for k, v in plan.tried.items():
            ratios[k].append(v / plan.lower_bound_bytes)
        ratios["best"].append(plan.ratio)
    print(f"random lifetimes: {trials} graphs of 10..300 steps, seed {seed}, "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"  {'ordering':<9} {'mean':>6} {'median':>6} {'p95':>6} {'max':>6}  <=1.10")
    for k, v in ratios.items():
        v = sorted(v)
        print(f"  {k:<9} {statistics.mean(v):6.3f} {statistics.median(v):6.3f} "
              f"{v[int(0.95 * len(v))]:6.3f} {v[-1]:6.3f}  "
              f"{100 * sum(x <= 1.10 for x in v) / len(v):5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", action="store_true", help="random lifetimes only")
    ap.add_argument("--trials", type=int, default=500)
    args = ap.parse_args()
    random_lifetimes(args.trials)
    if args.random:
        return
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    print("real models (ONNX node order):")
    for name in LIGHT:
        report(name, *onnx_plan_inputs(folder / f"light_{name}.onnx"))
    try:
        import torch

        torch.set_num_threads(1)
        paths = torch_models({})
    except ImportError as e:
        print(f"(torch models skipped: {e})")
        return
    for name, path in paths.items():
        report(name, *onnx_plan_inputs(path))


if __name__ == "__main__":
    main()
