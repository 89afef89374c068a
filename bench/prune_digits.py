"""Structured channel pruning of the digits CNN: 50% of conv channels removed, short torch
fine-tune, top-1 / latency / package size against the unpruned model.

    OMP_NUM_THREADS=1 python bench/prune_digits.py [--sparsity 0.5] [--epochs 10] [--seed 0]

The CNN (examples/digits_cnn.py) is trained here from its seed on ``load_digits_split()``'s
training part (seconds). ``compile(model, prune={"method": "channel", "ops": ["conv2d"]})``
removes half of every conv's output channels (L1 norm of the BN-folded weights); the plan is
applied to the torch module (``apply_to_torch``: a smaller nn.Sequential), fine-tuned for
``--epochs`` epochs, and compiled again. Both compiled models are timed interleaved (batch 1,
and batch 64 with ``--batch``), and saved to measure the package size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from bench.common import interleaved_ms  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    from compiler import compile
    from examples.digits_cnn import accuracy, load_digits_split, make_model, train
    from passes.pruning.torch_bridge import apply_to_torch

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split()
    torch.manual_seed(args.seed)        # make_model's initialisation
    base = train(make_model(), xtr, ytr)
    ex = (torch.from_numpy(xte[:1]),)
    calib = [{"input": xtr[i:i + 1]} for i in range(32)]
    t0 = time.perf_counter()
    mb = compile(base, "host", example_inputs=ex, progress=False)
    pruned = compile(base, "host", example_inputs=ex, progress=False, calibration=calib,
                     prune={"method": "channel", "sparsity": args.sparsity, "ops": ["conv2d"]})
    plan = pruned.prune_plan
    small = apply_to_torch(base, plan)
    acc_nf = accuracy(lambda x: pruned.run({"input": x})[0], xte, yte)
    small = train(small, xtr, ytr, epochs=args.epochs, lr=1e-3, seed=1)
    mp = compile(small, "host", example_inputs=ex, progress=False)
    t_compile = time.perf_counter() - t0
    acc_b = accuracy(lambda x: mb.run({"input": x})[0], xte, yte)
    acc_p = accuracy(lambda x: mp.run({"input": x})[0], xte, yte)
    with torch.no_grad():
        acc_torch = accuracy(lambda x: small(torch.from_numpy(x)).numpy(), xte, yte)
    convs = [(k, e["channels_before"], e["channels_after"]) for k, e in plan["layers"].items()]
    removed = 1 - sum(a for _, _, a in convs) / sum(b for _, b, _ in convs)
    x1 = {"input": xte[:1]}
    lb, lp = interleaved_ms([lambda: mb.run(x1), lambda: mp.run(x1)], 200, warmup=10)
    xb = xte[:args.batch]
    bb = compile(base, "host", example_inputs=(torch.from_numpy(xb),), progress=False)
    bp = compile(small, "host", example_inputs=(torch.from_numpy(xb),), progress=False)
    xbf = {"input": xb}
    lbb, lpb = interleaved_ms([lambda: bb.run(xbf), lambda: bp.run(xbf)], 100, warmup=10)
    tmp = Path(tempfile.mkdtemp(prefix="prune-digits-"))
    sb, sp = dir_bytes(mb.save(tmp / "base.npkg")), dir_bytes(mp.save(tmp / "pruned.npkg"))
    wb, wp = mb.stats()["weight_bytes"], mp.stats()["weight_bytes"]
    print(f"digits CNN, channel pruning {100 * args.sparsity:.0f}% of conv channels "
          f"(L1), fine-tune {args.epochs} epochs; {len(xte)} test images; "
          f"compiles {t_compile:.0f} s")
    print("conv channels: " + ", ".join(f"{k}: {b}->{a}" for k, b, a in convs)
          + f" ({100 * removed:.0f}% removed)")
    print(f"{'':30}{'unpruned':>12}{'pruned':>12}{'ratio':>10}")
    print(f"{'top-1 (compiled)':30}{acc_b:>12.4f}{acc_p:>12.4f}{acc_p - acc_b:>+10.4f}")
    print(f"{'top-1 pruned, no fine-tune':30}{acc_b:>12.4f}{acc_nf:>12.4f}"
          f"{acc_nf - acc_b:>+10.4f}")
    print(f"{'top-1 torch (fine-tuned)':30}{'':>12}{acc_torch:>12.4f}")
    print(f"{'latency batch 1 (ms)':30}{lb:>12.4f}{lp:>12.4f}{lp / lb:>10.3f}")
    print(f"{f'latency batch {len(xb)} (ms)':30}{lbb:>12.4f}{lpb:>12.4f}{lpb / lbb:>10.3f}")
    print(f"{'weight bytes':30}{wb:>12}{wp:>12}{wp / wb:>10.3f}")
    print(f"{'package bytes (directory)':30}{sb:>12}{sp:>12}{sp / sb:>10.3f}")
    ok = acc_p >= acc_b - 0.01 and lp < lb and sp < sb
    print("acceptance (top-1 within 1 point, latency and size drop):", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
