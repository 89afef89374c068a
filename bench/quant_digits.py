"""int8 static quantization of the digits CNN: top-1 float vs int8, sizes, kernel times.

    OMP_NUM_THREADS=1 python bench/quant_digits.py [--method minmax] [--calib 64]

Model: the checked-in ``examples/digits_cnn.onnx`` (trained by examples/digits_cnn.py on
``load_digits_split()``'s training part); accuracy on that split's 360 test images, batch 1.
Calibration: the first ``--calib`` training images. Prints one table, float and int8 side by
side: top-1, package weight bytes, and the profiled time of the conv/dense kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare


def kernel_ms(m, x, ops: tuple[str, ...], repeat: int = 20) -> float:
    """Summed median time (ms) of the kernels of ``ops`` in ``m.profile``."""
    prof = m.profile({m.input_names[0]: x}, repeat=repeat)
    return sum(s.median_ms for s in prof.steps if s.op in ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="minmax",
                    choices=("minmax", "percentile", "entropy", "mse"))
    ap.add_argument("--calib", type=int, default=64)
    args = ap.parse_args()
    from compiler import compile
    from examples.digits_cnn import load_digits_split

    xtr, _, xte, yte = load_digits_split()
    model = ROOT / "examples" / "digits_cnn.onnx"
    fm = compile(str(model), "host", progress=False)
    name = fm.input_names[0]
    calib = [{name: xtr[i:i + 1]} for i in range(args.calib)]
    t0 = time.perf_counter()
    qm = compile(str(model), "host", quantize="int8", calibration=calib,
                 calibration_method=args.method, progress=False)
    tq = time.perf_counter() - t0

    def top1(m) -> float:
        return float(np.mean([np.argmax(m.run({name: xte[i:i + 1]})[0]) == yte[i]
                              for i in range(len(xte))]))

    fa, qa = top1(fm), top1(qm)
    fw, qw = fm.stats()["weight_bytes"], qm.stats()["weight_bytes"]
    x = xte[:1]
    fk = kernel_ms(fm, x, ("conv2d", "dense"))
    qk = kernel_ms(qm, x, ("qconv2d", "qdense"))
    print(f"digits CNN, int8 static ({args.method}, {args.calib} calibration images), "
          f"{len(xte)} test images; int8 compile {tq:.1f} s")
    print(f"{'':24}{'float':>12}{'int8':>12}{'ratio':>10}")
    print(f"{'top-1 %':24}{100 * fa:12.2f}{100 * qa:12.2f}{100 * (qa - fa):+10.2f} pt")
    print(f"{'weight bytes':24}{fw:12d}{qw:12d}{qw / fw:10.3f}x")
    print(f"{'conv+dense kernels ms':24}{fk:12.4f}{qk:12.4f}{fk / max(qk, 1e-9):10.2f}x faster")
    print("int8 ops:", {k: v for k, v in qm.graph.op_counts().items()
                        if k in ("qconv2d", "qdense", "quantize", "dequantize", "requantize")})
    ok = abs(qa - fa) <= 0.005
    print(f"acceptance: |top-1 drop| <= 0.5 pt: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
