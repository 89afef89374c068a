"""Quantization-aware training (compiler/compress): the fake quantizers equal the quantize
passes' numpy bit for bit, and the package compile() builds from ``convert`` reproduces the
fake-quantized torch model (real TVM kernels, real runtime)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compiler.compress import QATConfig, convert, prepare_qat  # noqa: E402
from compiler.compress.fake_quant import (  # noqa: E402
    fake_quant_act,
    fake_quant_weight_int4,
    fake_quant_weight_int8,
)
from compiler.errors import NpuccError  # noqa: E402
from passes.quantization.gptq import quantize_rtn  # noqa: E402
from passes.quantization.insert import activation_params, quantize_weight  # noqa: E402


def test_weight_fake_quant_equals_the_pass_bitwise():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 8, 3, 3)) * rng.uniform(0.01, 2, (16, 1, 1, 1))
         ).astype(np.float32)
    w[3] = 0.0                                       # an all-zero channel: scale 1
    q, s = quantize_weight(w, 0)
    got = fake_quant_weight_int8(torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(got, q.astype(np.float32) * s.reshape(-1, 1, 1, 1))
    w2 = rng.standard_normal((24, 64)).astype(np.float32)
    w2[0, :32] = 0.0                                 # an all-zero group
    q4, d = quantize_rtn(w2, 4, 32)
    ref = (q4.reshape(24, 2, 32) * d.astype(np.float32)[..., None]).reshape(24, 64)
    np.testing.assert_array_equal(fake_quant_weight_int4(torch.from_numpy(w2), 32).numpy(), ref)


@pytest.mark.parametrize("dtype", ["u8", "i8"])
def test_activation_fake_quant_equals_quantize_dequantize(dtype):
    from compiler.ir.ops.quant import qrange

    x = np.random.default_rng(1).uniform(-3, 5, 4096).astype(np.float32)
    lo, hi = -1.7, 4.2                               # values outside are clipped
    s, zp = activation_params(lo, hi, dtype)
    qlo, qhi = qrange(dtype)
    ref = (np.clip(np.rint(x / s) + zp, qlo, qhi) - zp) * s
    got = fake_quant_act(torch.from_numpy(x), torch.tensor(lo), torch.tensor(hi), dtype)
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))


def test_ste_and_learned_range_get_gradients():
    x = torch.linspace(-2, 6, 101, requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(4.0, requires_grad=True)
    y = fake_quant_act(x, lo, hi)
    y.sum().backward()
    xd = x.detach()
    inside, outside = (xd > -0.95) & (xd < 3.95), (xd < -1.05) | (xd > 4.05)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)
    assert hi.grad is not None and hi.grad.item() != 0   # clipped elements pull on the range
    assert lo.grad is not None and lo.grad.item() != 0


@pytest.fixture(scope="module")
def digits():
    from examples.digits_cnn import load_digits_split, make_model, train

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split()
    torch.manual_seed(0)
    return train(make_model(), xtr, ytr, epochs=3), xtr, ytr, xte, yte


def _qat_steps(qm, xtr, ytr, steps=10, lr=1e-4):
    opt = torch.optim.Adam([p for p in qm.parameters() if p.requires_grad], lr=lr)
    qm.train()
    for i in range(steps):
        xb = torch.from_numpy(xtr[32 * i:32 * i + 32])
        yb = torch.from_numpy(ytr[32 * i:32 * i + 32])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(qm(xb), yb).backward()
        opt.step()
    return qm.eval()


@pytest.mark.parametrize("cfg", [QATConfig(), QATConfig(learn_scales=True),
                                 QATConfig(linear="int4", group_size=32)],
                         ids=["int8", "int8-lsq", "int8conv-int4linear"])
def test_compiled_package_reproduces_fake_quant_model(digits, cfg):
    model, xtr, ytr, xte, _ = digits
    calib = [torch.from_numpy(xtr[i:i + 32]) for i in range(0, 128, 32)]
    qm = _qat_steps(prepare_qat(model, cfg, calibration=calib), xtr, ytr)
    conv = convert(qm)
    assert conv.quantize["smooth"] == 0 and "0" in conv.quantize["activation_ranges"]
    c = conv.compile((torch.from_numpy(xte[:1]),))
    ops = c.graph.op_counts()
    assert ops.get("qconv2d") == 2
    if cfg.linear == "int4":
        assert ops.get("dense_wq") == 2 and "qdense" not in ops
    else:
        assert ops.get("qdense") == 2
    # the integer graph took the given ranges: the input's scale is range/255
    lo, hi = conv.quantize["activation_ranges"]["0"]
    s_in = [c.graph.const_value(n.inputs[1]) for n in c.graph.find("quantize")][0]
    assert float(s_in) == float(activation_params(lo, hi, "u8")[0])
    x = xte[:48]
    with torch.no_grad():
        ref = qm(torch.from_numpy(x)).numpy()
    out = np.concatenate([c.run({"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.abs(out - ref).max() <= _one_step_bound(qm, cfg), np.abs(out - ref).max()
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.95
    # and most images agree to float rounding (no requantization tie on their path)
    assert np.mean(np.abs(out - ref).max(1) <= 1e-4) >= 0.5


def _one_step_bound(qm, cfg) -> float:
    """What the logits may differ by when every input code of the last layer is one step off
    (the fixed-point requantization of an earlier layer rounds a tie the other way), plus
    float rounding."""
    last = qm[10]
    w = last.layer.weight.detach()
    if cfg.linear == "int8":
        from compiler.compress.fake_quant import fake_quant_weight_int8

        w = fake_quant_weight_int8(w, last.w_scale).detach()
        return last.act.params()[0] * float(w.abs().sum(1).max()) + 1e-4
    # int4 weight-only: the float input of the int4 layers comes from a qconv2d epilogue
    first = qm[8]
    x_bound = qm[3].act.params()[0] * float(qm[3].layer.weight.detach().abs().sum((1, 2, 3))
                                            .max())
    return x_bound * float(first.layer.weight.detach().abs().sum(1).max()) \
        * float(w.abs().sum(1).max()) + 1e-4


def test_ptq_ranges_differ_from_the_learned_ones(digits):
    """The equivalence above is not vacuous: calibrating the converted module on other data
    (PTQ) gives another integer graph, whose outputs are further from the fake-quant model."""
    model, xtr, ytr, xte, _ = digits
    qm = _qat_steps(prepare_qat(model, QATConfig(learn_scales=True),
                                calibration=[torch.from_numpy(xtr[:16])]), xtr, ytr, lr=1e-3)
    conv = convert(qm)
    cfg = {k: v for k, v in conv.quantize.items() if k != "activation_ranges"}
    from compiler import compile

    ptq = compile(conv.module, "host", example_inputs=(torch.from_numpy(xte[:1]),),
                  quantize=cfg, calibration=[{"input": xte[i:i + 1]} for i in range(8)],
                  progress=False)
    qat = conv.compile((torch.from_numpy(xte[:1]),))
    x = xte[:32]
    with torch.no_grad():
        ref = qm(torch.from_numpy(x)).numpy()
    d_qat = max(np.abs(qat.run({"input": x[i:i + 1]})[0] - ref[i]).max() for i in range(32))
    d_ptq = max(np.abs(ptq.run({"input": x[i:i + 1]})[0] - ref[i]).max() for i in range(32))
    assert d_qat <= _one_step_bound(qm, QATConfig()) < d_ptq, (d_qat, d_ptq)


def test_unknown_range_name_is_refused(digits):
    model, xtr, _, xte, _ = digits
    conv = convert(prepare_qat(model, calibration=[torch.from_numpy(xtr[:8])]))
    conv.quantize["activation_ranges"]["no.such.layer"] = (0.0, 1.0)
    with pytest.raises(NpuccError, match="no.such.layer.*known: .*0"):
        conv.compile((torch.from_numpy(xte[:1]),))


def test_uncalibrated_model_is_refused(digits):
    model, *_ = digits
    qm = prepare_qat(model).eval()
    with pytest.raises(NpuccError, match="never observed"):
        qm(torch.zeros(1, 1, 8, 8))
