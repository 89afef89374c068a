"""ATen converters one by one: small modules imported with from_torch, run by the reference
interpreter, compared with torch eager."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from compiler.frontends import from_torch  # noqa: E402
from compiler.ir import interpret, parse  # noqa: E402


class Fn(torch.nn.Module):
    def __init__(self, fn, params: dict | None = None):
        super().__init__()
        self.fn = fn
        for k, v in (params or {}).items():
            self.register_parameter(k, torch.nn.Parameter(v))

    def forward(self, *xs):
        return self.fn(self, *xs)


def rand_tensor(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)
                            .astype(np.float32))


X4 = rand_tensor(2, 3, 8, 8)
X3 = rand_tensor(2, 5, 6)
X2 = rand_tensor(4, 6)
IDS = torch.tensor([[0, 3, 1], [2, 2, 5]])

CASES = {
    "conv1d": (lambda m, x: F.conv1d(x, m.w, m.b, stride=2, padding=1),
               {"w": rand_tensor(4, 5, 3), "b": rand_tensor(4)}, (X3,)),
    "conv2d_grouped_dilated": (lambda m, x: F.conv2d(x, m.w, None, 1, 2, 2, 3),
                               {"w": rand_tensor(6, 1, 3, 3)}, (X4,)),
    "conv_transpose2d": (lambda m, x: F.conv_transpose2d(x, m.w, stride=2, padding=1),
                         {"w": rand_tensor(3, 4, 3, 3)}, (X4,)),
    "max_avg_pool": (lambda m, x: F.max_pool2d(x, 3, 2, 1) + F.avg_pool2d(x, 2, 2)[..., :4, :4]
                     * 0 + F.avg_pool2d(x, 3, 2, 1), None, (X4,)),
    "adaptive_pool_2x2": (lambda m, x: F.adaptive_avg_pool2d(x, 2), None, (X4,)),
    "activations": (lambda m, x: F.silu(x) + F.hardswish(x) + F.hardsigmoid(x) + F.elu(x) * 0
                    + F.leaky_relu(x, 0.2) + F.relu6(x) + torch.sigmoid(x) + F.softplus(x, 2.0)
                    + F.gelu(x, approximate="tanh"), None, (X2,)),
    "unary": (lambda m, x: torch.rsqrt(x.abs() + 1) + torch.log1p(x.abs()) + torch.expm1(x)
              + torch.exp(x) * torch.cos(x) - torch.sin(x).neg() + x.sign() + x.floor()
              + x.ceil() + torch.erf(x), None, (X2,)),
    "binary_scalars": (lambda m, x: (2.0 - x) * 3 / (x.abs() + 1) + x ** 2 + torch.pow(2.0, x)
                       + torch.maximum(x, x.flip(0) * 0) + torch.fmod(x, 0.7)
                       + torch.remainder(x, 0.7) + torch.div(x, 0.3, rounding_mode="floor")
                       + torch.div(x, 0.3, rounding_mode="trunc"), None, (X2,)),
    "compare_where": (lambda m, x: torch.where((x > 0) & (x != 0.5) | (x <= -1), x, -x)
                      + x.masked_fill(x < 0.1, 7.0) + x.clamp(-0.5, 0.5)
                      + torch.clamp(x, min=x.mean()), None, (X2,)),
    "shapes": (lambda m, x: torch.cat([x.transpose(1, 2), x.permute(0, 2, 1)], 1)
               .reshape(2, -1).unsqueeze(0).squeeze(0).flatten().view(12, 10).t()
               .expand(2, 10, 12).repeat(1, 2, 1), None, (X3,)),
    "split_slice_select": (lambda m, x: x.split(2, dim=2)[1] + x[:, :, 1:5:2]
                           + x[:, -1:, ::3] * x.select(1, 2).unsqueeze(1)[..., :2]
                           + x.flip(-1)[..., :2], None, (X3,)),
    "index_gather": (lambda m, x: x[:, [0, 2, -1]] + x[[1, 0]][:, [1, 1, 1]]
                     + x[torch.tensor([0, 1])[:, None], torch.tensor([[4, 3, 2]])],
                     None, (X3,)),
    "embedding_int_input": (lambda m, i: F.embedding(i, m.w).sum(1), {"w": rand_tensor(6, 4)}, (IDS,)),
    "reductions": (lambda m, x: x.mean((1, 2), keepdim=True).squeeze() + x.sum(-1).amax(1)
                   + x.amin(1).sum(-1) + x.max(dim=1).values.mean(-1)
                   + x.argmax(dim=2).float().sum(1) + x.prod(2).sum(1), None, (X3,)),
    "softmax_norms": (lambda m, x: F.log_softmax(x, 1).mean(1) + F.softmax(x, 0).sum(1)
                      + F.layer_norm(x, (6,), m.w, None, 1e-3).sum(1), {"w": rand_tensor(6)}, (X2,)),
    "batch_norm_eval": (lambda m, x: F.batch_norm(x, m.rm, m.rv, m.w, m.b, False, 0.1, 1e-3),
                        {"rm": rand_tensor(3), "rv": rand_tensor(3).abs() + 0.5, "w": rand_tensor(3), "b": rand_tensor(3)}, (X4,)),
    "linear_matmul_addmm": (lambda m, x: F.linear(x, m.w, m.b) @ m.w2
                            + torch.addmm(m.b2, x.reshape(6, 6), m.w3, beta=0.5, alpha=2.0)
                            .reshape(2, 3, 6)
                            + torch.baddbmm(m.b2, x, m.w3.expand(2, 6, 6), alpha=0.5),
                            {"w": rand_tensor(4, 6), "b": rand_tensor(4), "w2": rand_tensor(4, 6), "b2": rand_tensor(6),
                             "w3": rand_tensor(6, 6)}, (rand_tensor(2, 3, 6),)),
    "factories_cumsum_tril": (lambda m, x: torch.tril(x, -1) + torch.triu(x) * 2
                              + torch.ones(4, 6).cumsum(0) + torch.arange(6.0)
                              + torch.full((4, 1), 3.0) + x.cumsum(1), None, (X2,)),
    "sdpa_causal": (lambda m, q: F.scaled_dot_product_attention(q, q * 0.5, q + 1, is_causal=True)
                    + q.any(-1, keepdim=True).float() + (q > 0).all(-1, keepdim=True).float(),
                    None, (rand_tensor(1, 2, 8, 4),)),
    "group_norm_var_std": (lambda m, x: F.group_norm(x, 3, m.w, m.b, 1e-3)
                           + x.var(1, keepdim=True) + x.std((2, 3), keepdim=True, correction=0)
                           + torch.trunc(x * 3) + x.index_select(2, torch.tensor([1, 0, 7, 2,
                                                                                   3, 3, 4, 5])),
                           {"w": rand_tensor(3), "b": rand_tensor(3)}, (X4,)),
    "upsample_reflect_pad": (lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")
                             + F.interpolate(x, size=(16, 16), mode="bilinear")
                             + F.interpolate(x, size=(16, 16), mode="bilinear",
                                             align_corners=True)
                             + F.pad(x, (4, 4, 4, 4), mode="reflect")
                             + F.pad(x, (3, 5, 4, 4), mode="replicate"), None, (X4,)),
    "pad": (lambda m, x: F.pad(x, (1, 2, 0, 3), value=0.5), None, (X4,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_aten_converter(name):
    fn, params, inputs = CASES[name]
    m = Fn(fn, params).eval()
    g = from_torch(m, inputs)
    with torch.no_grad():
        want = m(*inputs).numpy()
    (got,) = interpret(g, [x.numpy() for x in inputs])
    assert got.dtype == want.dtype and got.shape == want.shape
    err = np.max(np.abs(got.astype(np.float64) - want)) / max(np.max(np.abs(want)), 1e-6)
    assert err <= 1e-5, err
    text = str(g)
    assert str(parse(text)) == text


def test_every_converter_names_an_aten_overload():
    from compiler.frontends.torch import KEEP, supported_aten_ops

    for key in [*supported_aten_ops(), *KEEP]:
        packet, overload = key.split(".")
        assert hasattr(getattr(torch.ops.aten, packet), overload), key
