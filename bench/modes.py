"""Two precisions in one package: all-MiniLM-L6-v2 in the default modes on kirin990.

    OMP_NUM_THREADS=1 python bench/modes.py [--seq 128] [--batch 8] [--repeat 20]

Compiles the trained MiniLM once per mode (``compile``) and once as a two-mode package
(``compile_modes``), calibrated on the first 32 sentences of ``examples/sentences.py``
CALIBRATION, and prints per mode: package bytes, the kirin990 cost-model estimate and its
NPU/CPU split, the host latency (median, modes interleaved) and the sentence-embedding
agreement with torch fp32 on ``--batch`` EVALUATION sentences (cosine of mean-pooled
embeddings, worst and mean; relative L2 of the hidden states). Then the two-mode package's
bytes against the two single packages, that each mode of it is bitwise its single compile,
and what the always-on metrics cost per run (run with recording on vs off, interleaved).

Measured on a shared 2-core AMD EPYC (LLVM znver4: AVX-512 + VNNI) while other jobs ran (load
average 14.6 -> 19.1), seq 128, batch 8, after the kirin990 [cost] refit of 12eacfa:
performance 21,792,068 B, embedding cosine vs torch 0.9787 worst / 0.9805 mean, host 983 ms,
kirin990 estimate 248.9 ms (168 NPU / 73 CPU nodes); accuracy 37,746,540 B, 0.9994 / 0.9995,
2321 ms, 232.9 ms (107 / 124); two-mode package 47,557,316 B = 0.799x the two; both modes
bitwise their single compiles; metrics 2.55 us per recorded run. (The working tree's quantizer
was being changed by others meanwhile: one earlier run gave worse cosines, 0.92-0.95.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    import numpy as np
    import torch

    import runtime
    from bench.common import cosine, cpu_header, interleaved_ms, mean_pool
    from compiler import compile
    from compiler.modes import DEFAULT_MODES, compile_modes
    from examples.models import MINILM_SENTENCES, export_onnx, minilm, minilm_inputs
    from examples.sentences import CALIBRATION, EVALUATION

    torch.set_num_threads(1)
    print(cpu_header())
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    model, tok = minilm()
    feeds = minilm_inputs(tok, sentences=EVALUATION[:args.batch], seq=args.seq)
    # traced on the README's sentences: an export traced on EVALUATION[:3] at seq 16 compiles
    # to a model 0.5 rel-L2 off torch on every input while onnxruntime runs it exactly (an
    # importer issue, reported; not this benchmark's subject)
    onnx_path = export_onnx(model, minilm_inputs(
        tok, sentences=(MINILM_SENTENCES * args.batch)[:args.batch], seq=args.seq))
    calib = [minilm_inputs(tok, sentences=CALIBRATION[i:i + args.batch], seq=args.seq)
             for i in range(0, 32, args.batch)]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}
                    ).last_hidden_state.numpy()
    ref_emb = mean_pool(ref, feeds["attention_mask"])
    work = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    singles, sizes = {}, {}
    for mode, opts in DEFAULT_MODES.items():
        singles[mode] = compile(onnx_path, "kirin990", calibration=calib, progress=False, **opts)
        singles[mode].package.save(work / f"{mode}.npkg")
        sizes[mode] = _size(work / f"{mode}.npkg")
    mm = compile_modes(onnx_path, "kirin990", calibration=calib, progress=False)
    mm.save(work / "two.npkg", device_libraries=False)
    sizes["two-mode"] = _size(work / "two.npkg")
    m = runtime.load(work / "two.npkg")

    print(f"\nMiniLM-L6 seq {args.seq}, batch {args.batch}, kirin990 (host kernels here)")
    print(f"{'mode':<12} {'bytes':>12} {'est. ms':>8} {'NPU/CPU nodes':>14} {'host ms':>8} "
          f"{'emb cos min':>11} {'emb cos mean':>12} {'rel L2':>8}  recipe")
    lat = interleaved_ms([lambda mode=mode: m.executor(mode).run(feeds) for mode in m.modes],
                         repeat=args.repeat)
    for mode, ms in zip(m.modes, lat, strict=True):
        out = m.executor(mode).run(feeds)[0]
        same = all(np.array_equal(a, b) for a, b in zip(m.executor(mode).run(feeds),
                                                         singles[mode].run(feeds), strict=True))
        emb = mean_pool(out, feeds["attention_mask"])
        cos = [cosine(a, b) for a, b in zip(emb, ref_emb, strict=True)]
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        rep = m.report(mode)
        split = f"{rep['nodes_per_device']['npu']}/{rep['nodes_per_device']['cpu']}"
        print(f"{mode:<12} {sizes[mode]:>12,} {rep['estimate_ms']:>8.3f} {split:>14} "
              f"{ms:>8.2f} {min(cos):>11.5f} {np.mean(cos):>12.5f} {rel:>8.4f}  "
              f"{DEFAULT_MODES[mode]['quantize']}")
        print(f"{'':<12} two-mode package's {mode} is bitwise its single compile: {same}")
    base = compile(onnx_path, "kirin990", progress=False).run(feeds)[0]
    emb = mean_pool(base, feeds["attention_mask"])
    cos = [cosine(a, b) for a, b in zip(emb, ref_emb, strict=True)]
    print(f"{'(fp32 ref.)':<12} {'':>12} {'':>8} {'':>14} {'':>8} {min(cos):>11.5f} "
          f"{np.mean(cos):>12.5f} {np.linalg.norm(base - ref) / np.linalg.norm(ref):>8.4f}  "
          f"no quantize= (kirin990's own float numerics)")
    pair = sizes["performance"] + sizes["accuracy"]
    print(f"two-mode package {sizes['two-mode']:,} bytes vs the two single packages {pair:,} "
          f"= {sizes['two-mode'] / pair:.3f}x")

    import timeit

    from runtime.metrics import Metrics

    rec = Metrics()
    per_record = min(timeit.repeat(lambda: rec.record(1e-3, "x"), number=20000, repeat=5)
                     ) / 20000 * 1e6
    print(f"metrics always on: {per_record:.2f} us per recorded run = "
          f"{per_record / (min(lat) * 1e3):.2e} of the fastest mode's run")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
