"""Head importance by output error for MiniLM (all-MiniLM-L6-v2), serial vs Ray: same ranking,
both wall times.

    python bench/ray_heads.py [--seq 64] [--sentences 2] [--workers 2]

The imported, fused MiniLM graph; ``head_importance(..., "output-error")`` removes each of the
6 x 12 heads alone and measures the output error over the calibration sentences with the
reference interpreter (72 x sentences interpreter runs), once in this process and once as Ray
tasks on a local cluster of ``--workers`` CPUs (``compiler/parallel.py``). The rankings must be
equal (they are the same arithmetic); the speedup is bounded by the cores of the machine and
whatever else runs on it (one run on the shared 2-core AMD EPYC, other jobs running, 72
ablations x 2 sentences at seq 64: serial 60.1 s, ray 16.8 s — more than 2x, so the serial
figure was inflated by the load of the moment: one noisy run, not a speedup to quote) — on a cluster (``NPUCC_RAY_ADDRESS``) the same call scales out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--sentences", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import ray
    import torch

    from compiler.frontends import from_onnx
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs
    from passes.pruning.heads import find_attention, head_importance
    from runtime.cpu import cpu_brand

    torch.set_num_threads(1)
    model, tok = minilm()
    one = minilm_inputs(tok, MINILM_SENTENCES[:1], seq=args.seq)
    g = from_onnx(str(export_onnx(model, one)))
    g = run_pipeline(g, "canonicalize,fuse-matmul-add,fuse-gemm,fuse-dense-act",
                     ctx=PassContext())
    names = {v.name for v in g.inputs}
    samples = [{k: v for k, v in minilm_inputs(tok, [s], seq=args.seq).items() if k in names}
               for s in MINILM_SENTENCES[:args.sentences]]
    blocks = find_attention(g)
    heads = sum(a.heads for a in blocks)
    t0 = time.perf_counter()
    serial = head_importance(g, blocks, "output-error", samples, "attention_mask", [0])
    t1 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        t2 = time.perf_counter()
        par = head_importance(g, blocks, "output-error", samples, "attention_mask", [0],
                              executor="ray")
        t3 = time.perf_counter()
    finally:
        ray.shutdown()
    flat = lambda imp: np.concatenate([imp[i] for i in sorted(imp)])  # noqa: E731
    same = all(np.array_equal(serial[i], par[i]) for i in serial)
    rank_s, rank_r = np.argsort(flat(serial)), np.argsort(flat(par))
    print(f"MiniLM-L6 head importance (output-error): {len(blocks)} layers x "
          f"{heads // len(blocks)} heads = {heads} ablations x {len(samples)} sentences, seq "
          f"{args.seq}; CPU: {cpu_brand()}, "
          f"{os.cpu_count()} cores (other jobs were running)")
    print(f"serial: {t1 - t0:.1f} s; ray, {args.workers} workers (local cluster): "
          f"{t3 - t2:.1f} s (ray.init not counted); speedup {(t1 - t0) / (t3 - t2):.2f}x")
    print(f"importances identical: {same}; ranking equal: {np.array_equal(rank_s, rank_r)}")
    print("least important 8 heads (layer.head): " +
          ", ".join(f"{j // (heads // len(blocks))}.{j % (heads // len(blocks))}"
                    for j in rank_s[:8]))


if __name__ == "__main__":
    main()
