"""2:4 and unstructured 50% pruning of the GPT-2-style decoder: exact package round trip and
package bytes against the dense package.

    OMP_NUM_THREADS=1 python bench/prune_decoder.py [--config bench|test]

The decoder (examples/models.py ``gpt2_decoder``, seeded random weights) is compiled for host
unpruned, with ``prune={"method": "2:4"}`` and with ``{"method": "magnitude", "sparsity": 0.5}``
(per layer). Every conv/dense weight is pruned, the tied embedding / lm_head included (pruned
once, for both readers). Each package is saved and loaded back with ``runtime.load``: the
weights must come back bit-exact and the outputs identical; the sparse-stored weights file and
the whole package directory are compared with the dense ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def same_weights(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        np.asarray(a[k]).reshape(-1).tobytes() == np.asarray(b[k]).reshape(-1).tobytes()
        for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench", choices=("bench", "test"))
    args = ap.parse_args()
    import torch

    import runtime
    from compiler import compile
    from examples.models import gpt2_config, gpt2_decoder, gpt2_inputs
    from passes.pruning.magnitude import check_nm

    torch.set_num_threads(1)
    cfg = gpt2_config(args.config)
    model = gpt2_decoder(**cfg)
    ids = gpt2_inputs(**cfg)
    calib = [{"input_ids": gpt2_inputs(**cfg, seed=s)} for s in range(1, 3)]
    ex = (torch.from_numpy(ids),)
    tmp = Path(tempfile.mkdtemp(prefix="prune-decoder-"))
    dense = compile(model, "host", example_inputs=ex, progress=False)
    dpath = dense.save(tmp / "dense.npkg")
    rows = []
    for label, prune in (("2:4", {"method": "2:4"}),
                         ("magnitude 50%", {"method": "magnitude", "sparsity": 0.5})):
        m = compile(model, "host", example_inputs=ex, progress=False, prune=prune,
                    calibration=calib)
        rep = m.prune_report(show=False)
        path = m.save(tmp / f"{label.split()[0].replace(':', 'x')}.npkg")
        loaded = runtime.load(path)
        exact = same_weights(m.package.weights(), runtime.package.Package.load(path).weights())
        same_out = all(np.array_equal(a, b) for a, b in
                       zip(m.run({"input_ids": ids}), loaded.run({"input_ids": ids}),
                           strict=True))
        nm_ok = None
        if prune["method"] == "2:4":
            nm_ok = all(check_nm(lay.weight, lay.node.op) for lay in _layers(m.graph))
        enc = m.package.manifest.get("weight_encoding", {})
        kinds = {e["encoding"] for e in enc.values()}
        rows.append((label, rep, exact, same_out, nm_ok,
                     (path / "weights.safetensors").stat().st_size, dir_bytes(path), kinds))
    wd = (dpath / "weights.safetensors").stat().st_size
    dd = dir_bytes(dpath)
    print(f"GPT-2-style decoder ({args.config}: {cfg}); dense weights file {wd} B, "
          f"package {dd} B")
    print(f"{'':16}{'sparsity':>9}{'cosine':>9}{'weights B':>11}{'ratio':>7}{'package B':>11}"
          f"{'ratio':>7}  round trip / outputs / pattern / encodings")
    ok = True
    for label, rep, exact, same_out, nm_ok, wb, db, kinds in rows:
        ok &= exact and same_out and wb <= 0.6 * wd and nm_ok is not False
        print(f"{label:16}{100 * rep['sparsity']:>8.1f}%{rep['output_error']['cosine']:>9.4f}"
              f"{wb:>11}{wb / wd:>7.3f}{db:>11}{db / dd:>7.3f}  "
              f"{'exact' if exact else 'DIFFERS'} / {'identical' if same_out else 'DIFFER'} / "
              f"{'' if nm_ok is None else ('2:4 holds' if nm_ok else '2:4 BROKEN')} / "
              f"{','.join(sorted(kinds))}")
    print("acceptance (exact round trip, weights file <= 0.6x dense):", "PASS" if ok else "FAIL")


def _layers(graph):
    """conv2d/dense layers of the lowered graph whose weights are still in the IR's layout
    (dense w[N, K]); after to-nhwc, convs are OHWI, dense unchanged."""
    from passes.pruning.common import layers

    return [lay for lay in layers(graph, ("dense",))]


if __name__ == "__main__":
    main()
