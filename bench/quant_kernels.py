"""dense_wq (int4 / int8 weights, f16 group scales, decoded in the K loop) vs float dense.

Each shape is one ``dense`` graph compiled for the host three times (float, ``w8``, ``int4``
group 128) and profiled through the runtime (median kernel time of ``--repeat`` runs, all
variants interleaved in one process). Also prints the weight bytes each kernel reads.

Run: ``OMP_NUM_THREADS=1 python bench/quant_kernels.py``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

SHAPES = ((1, 1024, 1024), (32, 768, 768), (128, 512, 2048))


def dense_graph(m: int, k: int, n: int, seed: int = 0):
    from compiler.ir.graph import Graph
    from compiler.ir.types import TensorType

    rng = np.random.default_rng(seed)
    g = Graph("dense")
    x = g.add_input("x", TensorType((m, k), "f32"))
    w = g.add_weight("w", (rng.standard_normal((n, k)) * 0.05).astype(np.float32))
    b = g.add_weight("b", rng.standard_normal(n).astype(np.float32))
    g.outputs = [g.make_node("dense", [x, w, b], {}, name="fc").output]
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    from compiler import compile

    variants = (("float", None), ("w8 g128", {"dense": "w8"}),
                ("int4 g128", {"dense": {"precision": "int4", "group_size": 128}}))
    print(f"{'M x K x N':>18s} {'variant':>10s} {'kernel ms':>10s} {'vs float':>9s} "
          f"{'weight B':>10s} {'max |diff|':>11s}")
    for m, k, n in SHAPES:
        g = dense_graph(m, k, n)
        x = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
        built = {name: compile(g, "host", quantize=q, calibration=[x], progress=False)
                 for name, q in variants}
        times = {name: [] for name in built}
        for _ in range(3):  # interleave: the machine is shared
            for name, cm in built.items():
                prof = cm.profile(x, repeat=args.repeat)
                times[name].append(min(s.median_ms for s in prof.steps if s.op.startswith(
                    "dense")))
        ref = built["float"].run(x)[0]
        for name, cm in built.items():
            t = min(times[name])
            diff = float(np.abs(cm.run(x)[0] - ref).max())
            print(f"{f'{m} x {k} x {n}':>18s} {name:>10s} {t:10.4f} "
                  f"{min(times['float']) / t:8.2f}x {cm.stats()['weight_bytes']:10d} "
                  f"{diff:11.3g}")


if __name__ == "__main__":
    main()
