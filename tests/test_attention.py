"""The fused ``attention`` op, the ``fuse-attention`` pass and the attention kernel.

- the op's verifier names what is wrong (mask shape, head columns, causal with too few keys);
- ``fuse-attention{verbose=true}`` says why it left a chain alone (the FileCheck file
  tests/filecheck/fuse-attention.ir checks the fused IR and the chains that must not fuse);
- the kernel matches the op's reference (MiniLM / DeiT / GPT-2 shapes, batch 2 with a
  per-head per-query mask, causal with more keys than queries, NaN in, a fully masked row);
- whole models through the host pipeline match onnxruntime with every attention fused: the
  trained MiniLM (3 sentences, padding mask), a random timm ViT block (197 tokens, fused QKV
  with a 5-D reshape and split) and the GPT-2-style bench decoder (causal).
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import VerificationError
from compiler.ir import parse
from compiler.ir.verify import verify
from compiler.pass_base import PassContext
from compiler.pass_manager import run_pipeline

RNG = np.random.default_rng(18)


def _graph(mask: str, attrs: str, q: str = "f32[1,4,8]") -> str:
    return (f"graph @g(%q: {q}, %m: {mask}) -> (f32[1,4,8]) {{\n"
            f"  %0 = attention(%q, %q, %q, %m) {{{attrs}}} : f32[1,4,8]\n"
            f"  return %0\n}}")


@pytest.mark.parametrize("mask,attrs,q,message", [
    ("f32[1,3,4,4]", "heads=2, head_dim=4, scale=0.5", "f32[1,4,8]",
     r"mask must be an additive f32\[Bm, Hm, Sm, 4\] with Bm in \(1, 1\), Hm in \(1, 2\)"),
    ("f32[1,1,1,4]", "heads=2, head_dim=4, scale=0.5, v_offset=4", "f32[1,4,8]",
     r"value f32\[1,4,8\] has no columns 4..12 for 2 heads of 4 at v_offset=4"),
    ("f32[1,1,1,4]", "heads=2, head_dim=4, scale=0.5", "i8[1,4,8]",
     r"query must be f32\[B, S, N\], got i8\[1,4,8\]"),
])
def test_attention_verifier_names_the_fault(mask, attrs, q, message):
    with pytest.raises(VerificationError, match=message):
        verify(parse(_graph(mask, attrs, q)))


def test_causal_needs_as_many_keys_as_queries():
    text = ("graph @g(%q: f32[1,4,8], %k: f32[1,3,8]) -> (f32[1,4,8]) {\n"
            "  %0 = attention(%q, %k, %k) {heads=2, head_dim=4, scale=0.5, causal=true}"
            " : f32[1,4,8]\n  return %0\n}")
    with pytest.raises(VerificationError, match=r"causal with fewer keys \(3\) than queries"):
        verify(parse(text))


def test_verbose_says_why_a_chain_is_left_alone(capsys):
    text = """graph @g(%x: f32[1,4,4], %mask: f32[1,1,1,4]) -> (f32[1,4,4]) {
  %q4 = reshape(%x) {shape=[1,4,2,2]} : f32[1,4,2,2]
  %qh = transpose(%q4) {perm=[0,2,1,3]} : f32[1,2,4,2]
  %kt = transpose(%q4) {perm=[0,2,3,1]} : f32[1,2,2,4]
  %s = matmul(%qh, %kt) : f32[1,2,4,4]
  %c = const [0.5] : f32[]
  %sm = add(%s, %mask) : f32[1,2,4,4]
  %ss = mul(%sm, %c) : f32[1,2,4,4]
  %p = softmax(%ss) : f32[1,2,4,4] loc("late_scale")
  %o = matmul(%p, %qh) : f32[1,2,4,2]
  %ot = transpose(%o) {perm=[0,2,1,3]} : f32[1,4,2,2]
  %om = reshape(%ot) {shape=[1,4,4]} : f32[1,4,4]
  return %om
}"""
    g = parse(text)
    before = str(g)
    ctx = PassContext()
    out = run_pipeline(g, "fuse-attention{verbose=true}", ctx=ctx)
    assert str(out) == before
    err = capsys.readouterr().err
    assert "left softmax 'late_scale' (%p) as it was: mask_before_scale" in err
    assert any("mask_before_scale" in r for r in ctx.remarks)


def _cases():
    from kernel_harness import Case

    def x(*shape):
        return RNG.standard_normal(shape).astype(np.float32)
    pad = np.zeros((1, 1, 128, 128), np.float32)
    pad[..., 100:] = np.finfo(np.float32).min                  # BERT's padding mask
    qkv_vit, qkv_gpt, qkv_wide = x(1, 197, 576), x(1, 64, 768), x(1, 9, 768)
    mask = x(2, 3, 5, 7)
    mask[1, 2, 3, :] = -np.inf                                  # a fully masked row
    q = x(2, 5, 48)
    q[0, 2, 5] = np.nan                                         # NaN in: its row is NaN
    return [
        Case("attention", [x(1, 128, 384), x(1, 128, 384), x(1, 128, 384), pad],
             {"heads": 12, "head_dim": 32, "scale": 32 ** -0.5}),
        Case("attention", [qkv_vit] * 3, {"heads": 3, "head_dim": 64, "scale": 0.125,
                                          "k_offset": 192, "v_offset": 384}),
        Case("attention", [qkv_gpt] * 3, {"heads": 8, "head_dim": 32, "scale": 32 ** -0.5,
                                          "causal": True, "k_offset": 256, "v_offset": 512}),
        Case("attention", [q, x(2, 7, 48), x(2, 7, 56), mask],
             {"heads": 3, "head_dim": 16, "scale": 0.25, "v_offset": 8}),
        Case("attention", [x(1, 5, 8), x(1, 7, 8), x(1, 7, 8)],
             {"heads": 2, "head_dim": 4, "scale": 0.5, "causal": True}),
        # 128-wide heads: P @ V in column chunks (value_chunk), 9 rows: a ragged last tile
        Case("attention", [qkv_wide] * 3, {"heads": 2, "head_dim": 128, "scale": 128 ** -0.5,
                                           "k_offset": 256, "v_offset": 512}),
    ]


def test_kernel_matches_reference(tmp_path):
    from kernel_harness import reference, run_cases

    cases = _cases()
    for i, (case, got) in enumerate(zip(cases, run_cases(cases, tmp_path), strict=True)):
        with np.errstate(invalid="ignore"):
            want = reference(case)[0]
        g = got[0]
        assert np.array_equal(np.isnan(g), np.isnan(want)), f"case {i}: NaN positions differ"
        if i == 3:
            assert np.isnan(want[0, 2, :16]).all() and np.isnan(want[1, 3, 32:48]).all()
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=2e-5, err_msg=f"case {i}")


def _compare(path, feeds: dict[str, np.ndarray], heads: int, causal: bool) -> None:
    import onnxruntime as ort

    from compiler import compile as npucc_compile

    m = npucc_compile(path, target="host", progress=False)
    counts = m.graph.op_counts()
    assert counts.get("attention", 0) == heads and "softmax" not in counts \
        and "matmul" not in counts, counts
    assert all(n.attrs["causal"] == causal for n in m.graph.find("attention"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    want = sess.run(None, {n: feeds[n] for n in names})
    got = m.run(dict(zip(m.input_names, (feeds[n] for n in names), strict=True)))
    for g, w in zip(got, want, strict=False):
        err = float(np.abs(g.astype(np.float64) - w).max() / np.abs(w).max())
        assert err <= 1e-4, err


@pytest.mark.slow
def test_minilm_fused_matches_onnxruntime(minilm_model):
    """The trained MiniLM, 3 sentences padded to 128 (a real padding mask, batch 3)."""
    from examples.models import export_onnx

    model, _, inputs = minilm_model
    _compare(export_onnx(model, inputs), inputs, 6, False)


@pytest.mark.slow
def test_gpt2_bench_decoder_fused_causal_matches_onnxruntime():
    from examples.models import export_onnx, gpt2_config, gpt2_decoder, gpt2_inputs

    cfg = gpt2_config("bench")
    model, ids = gpt2_decoder(**cfg), gpt2_inputs(**cfg)
    _compare(export_onnx(model, ids, input_names=["input_ids"]), {"input_ids": ids},
             cfg["n_layer"], True)


@pytest.mark.slow
def test_vit_block_fused_matches_onnxruntime():
    """A random timm ViT block as in deit_tiny: 197 tokens, 3 heads of 64, one QKV dense read
    through a 5-D reshape, a transpose and a split, q and k each scaled by D^-1/4."""
    import torch

    from examples.models import export_onnx
    from examples.vision import import_torchvision

    import_torchvision()
    vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    block = vit.Block(dim=192, num_heads=3, qkv_bias=True).eval()

    class Wrapped(torch.nn.Module):     # Block's optional arguments are not traced inputs
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x)

    x = torch.randn(1, 197, 192, generator=torch.Generator().manual_seed(1))
    _compare(export_onnx(Wrapped(), x, input_names=["x"]), {"x": x.numpy()}, 1, False)


@pytest.mark.parametrize("level", ["x86-64-v3", "cortex-a76"])
def test_kernel_builds_vector_code_for_other_cpus(level):
    """Built (not run) for AVX2 and the Cortex-A76: the lanes come from the target (8 and 4
    f32), and the products are vector FMAs of that width."""
    import re

    import tvm

    from compiler.ir.registry import get_op
    from compiler.ir.types import TensorType
    from targets.host import cpu_info_for
    from targets.kernels.base import KernelRequest, get_kernel_builder

    target = {"x86-64-v3": {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2},
              "cortex-a76": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                             "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"],
                             "num-cores": 2}}[level]
    cpu = cpu_info_for(target)
    attrs = get_op("attention").normalize_attrs(
        {"heads": 3, "head_dim": 64, "scale": 0.125, "k_offset": 192, "v_offset": 384})
    req = KernelRequest("attention", attrs, [TensorType((1, 197, 576), "f32")] * 3,
                        [TensorType((1, 197, 192), "f32")], {}, cpu)
    func = get_kernel_builder("attention")(req).prim_func
    mod = tvm.IRModule({"f": func.with_attr("global_symbol", "f")})
    ll = tvm.compile(mod, target=tvm.target.Target(cpu.tvm_target)).mod.inspect_source("ll")
    lanes = cpu.lanes("f32")
    assert lanes == {"x86-64-v3": 8, "cortex-a76": 4}[level]
    assert len(re.findall(rf"@llvm\.fmuladd\.v{lanes}f32", ll)) >= 8
