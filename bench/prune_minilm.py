"""Attention-head pruning of MiniLM (all-MiniLM-L6-v2): 25% of heads removed by importance on
the calibration sentences, no fine-tune; embedding cosine on 200 other sentences; latency.

    OMP_NUM_THREADS=1 python bench/prune_minilm.py [--sparsity 0.25] [--scope global]

MiniLM's ONNX export (examples/models.py) is compiled for host at batch 1 x ``--seq`` tokens,
unpruned and with ``prune={"method": "head", "sparsity": 0.25}``; head importance is measured
on ``MINILM_SENTENCES`` (the calibration set) as the outputs' error when the head alone is
removed (``importance="output-error"`` on the last hidden state, 72 reference-interpreter runs
per sentence), ranked over the whole model (``scope="global"``: layers lose different numbers
of heads). Measured alternatives: ``--scope layer`` (3 heads per layer) 0.947 mean cosine,
per-layer ``--importance contribution`` (one run) 0.946, the same on the 64 shared
calibration sentences (``--calibration shared``) 0.948. The sentence embedding is the
mask-aware mean of the last hidden state over real tokens (sentence-transformers' pooling);
the figure is the mean (and worst) cosine between unpruned and pruned embeddings on the 200
``EVALUATION`` sentences of examples/sentences.py (shared with the quantization bench; none is
a calibration sentence). Latency: both compiled models timed interleaved on one sentence.
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

from bench.common import cosine, interleaved_ms, mean_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--importance", default="output-error",
                    choices=("contribution", "output-error", "weight"))
    ap.add_argument("--scope", default="global", choices=("layer", "global"))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--all-outputs", action="store_true",
                    help="output-error over both outputs (default: last_hidden_state only)")
    ap.add_argument("--calibration", default="minilm", choices=("minilm", "shared"),
                    help="MINILM_SENTENCES (3) or examples/sentences.py CALIBRATION (64)")
    args = ap.parse_args()
    import torch

    from compiler import compile
    from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs
    from examples.sentences import CALIBRATION, EVALUATION

    torch.set_num_threads(1)
    model, tok = minilm()
    one = minilm_inputs(tok, MINILM_SENTENCES[:1], seq=args.seq)
    onnx_path = export_onnx(model, one)
    sents = MINILM_SENTENCES if args.calibration == "minilm" else CALIBRATION
    calib = [minilm_inputs(tok, [s], seq=args.seq) for s in sents]
    t0 = time.perf_counter()
    base = compile(str(onnx_path), "host", progress=False)
    pruned = compile(str(onnx_path), "host", progress=False, calibration=calib,
                     prune={"method": "head", "sparsity": args.sparsity,
                            "importance": args.importance, "scope": args.scope,
                            **({} if args.all_outputs else {"outputs": [0]})})
    tc = time.perf_counter() - t0
    names = base.input_names
    plan = pruned.prune_plan["layers"]
    hb = sum(e["heads_before"] for e in plan.values())
    ha = sum(e["heads_after"] for e in plan.values())
    cos = []
    for s in EVALUATION:
        feed = {k: v for k, v in minilm_inputs(tok, [s], seq=args.seq).items() if k in names}
        a = mean_pool(base.run(feed)[0], feed["attention_mask"])
        b = mean_pool(pruned.run(feed)[0], feed["attention_mask"])
        cos.append(cosine(a, b))
    feed = {k: v for k, v in calib[0].items() if k in names}
    lb, lp = interleaved_ms([lambda: base.run(feed), lambda: pruned.run(feed)], 60)
    wb, wp = base.stats()["weight_bytes"], pruned.stats()["weight_bytes"]
    print(f"MiniLM-L6 head pruning: {hb} -> {ha} heads ({100 * (1 - ha / hb):.0f}% removed, "
          f"importance={args.importance}, scope={args.scope}, calibration "
          f"{len(calib)} sentences), no fine-tune; seq {args.seq}; compiles {tc:.0f} s")
    print("heads kept per layer: " + ", ".join(str(e["heads_after"]) for e in plan.values()))
    print(f"embedding cosine on {len(cos)} other sentences: mean {np.mean(cos):.4f}, "
          f"min {np.min(cos):.4f}")
    print(f"{'':24}{'unpruned':>12}{'pruned':>12}{'ratio':>10}")
    print(f"{'latency (ms)':24}{lb:>12.2f}{lp:>12.2f}{lp / lb:>10.3f}")
    print(f"{'weight bytes':24}{wb:>12}{wp:>12}{wp / wb:>10.3f}")
    ok = np.mean(cos) >= 0.95 and lp < lb
    print("acceptance (mean cosine >= 0.95, latency drops):", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
