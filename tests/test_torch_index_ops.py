"""ATen gathers and writes (gather, scatter*, slice/select_scatter, index_put, copy):
imported with from_torch, run by the reference interpreter and compiled through the TVM
kernels, both compared with torch eager."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compiler import compile  # noqa: E402
from compiler.frontends import from_torch  # noqa: E402
from compiler.ir import interpret, parse  # noqa: E402
from tests.test_torch_ops import Fn, rand_tensor  # noqa: E402

X = rand_tensor(3, 6, 5)
rng = np.random.default_rng(5)
IDX_DUP = torch.from_numpy(rng.integers(0, 6, (3, 4, 5)))
PERM = torch.from_numpy(np.stack([rng.permutation(6)[:4] for _ in range(3)]))  # unique rows
ROWS = torch.tensor([4, 0, 2])


def _sliced(m, x, s):
    y = x.clone()
    y[:, 2:5] = s
    return y


def _strided(m, x, s):
    y = x.clone()
    y[:, ::2] = s
    return y * 2


def _selected(m, x, s):
    y = x.clone()
    y[:, 1] = s
    return y


def _put_rows(m, x, i):
    y = x.clone()
    y[i] = m.v
    return y


def _put_mid(m, x, i):
    y = x.clone()
    y[:, i] = -1.0
    return y


def _put_acc(m, x, i):
    return x.index_put((i,), m.v, accumulate=True)


def _masked(m, x):
    y = x.clone()
    y[y > 0.5] = 0.0
    return y


def _shift_mask(m, x):
    # swin's shifted-window mask: slice assignments on a constant, folded at import
    mask = torch.zeros(6, 5)
    cnt = 0
    for h in (slice(0, 2), slice(2, 4), slice(4, None)):
        for w in (slice(0, 3), slice(3, None)):
            mask[h, w] = cnt
            cnt += 1
    return x + mask


CASES = {
    "gather_dim1": (lambda m, x, i: torch.gather(x, 1, i), {}, (X, IDX_DUP)),
    "gather_buffer_ids": (lambda m, x: x + torch.gather(m.ids, 1, torch.zeros_like(
        x[..., 0], dtype=torch.long)[:, :1].expand(3, 6)).float().unsqueeze(-1), {}, (X,)),
    "scatter_src": (lambda m, x, i: x.scatter(1, i, m.s), {"s": rand_tensor(3, 4, 5)}, (X, PERM[..., None]
                                                                              .expand(3, 4, 5))),
    "scatter_value": (lambda m, x, i: x.scatter(1, i, 2.5), {}, (X, PERM[..., None]
                                                                 .expand(3, 4, 5))),
    "scatter_add_dups": (lambda m, x, i: x.scatter_add(1, i, torch.ones(3, 4, 5)), {},
                         (X, IDX_DUP)),
    "scatter_reduce_amax": (lambda m, x, i: x.scatter_reduce(1, i, m.s, "amax"),
                            {"s": rand_tensor(3, 4, 5)}, (X, IDX_DUP)),
    "slice_scatter": (_sliced, {}, (X, rand_tensor(3, 3, 5))),
    "slice_scatter_strided": (_strided, {}, (X, rand_tensor(3, 3, 5))),
    "select_scatter": (_selected, {}, (X, rand_tensor(3, 5))),
    "index_put_rows": (_put_rows, {"v": rand_tensor(3, 6, 5)}, (X, ROWS[:3] % 3)),
    "index_put_middle_dim": (_put_mid, {}, (X, ROWS)),
    "index_put_accumulate": (_put_acc, {"v": rand_tensor(5)}, (X, torch.tensor([0, 2, 0]))),
    "masked_fill_by_index_put": (_masked, {}, (X,)),
    "swin_shift_mask": (_shift_mask, {}, (X,)),
}


def _module(name):
    fn, params, inputs = CASES[name]
    m = Fn(fn, params).eval()
    if name == "gather_buffer_ids":
        m.register_buffer("ids", torch.arange(6).expand(3, 6).contiguous())
    return m, inputs


def _rel_err(got, want):
    return float(np.max(np.abs(got.astype(np.float64) - want))
                 / max(float(np.max(np.abs(want))), 1e-6))


@pytest.mark.parametrize("name", list(CASES))
def test_aten_write_and_gather_ops(name, tmp_path):
    m, inputs = _module(name)
    g = from_torch(m, inputs)
    with torch.no_grad():
        want = m(*inputs).numpy()
    feeds = [x.numpy() for x in inputs]
    (got,) = interpret(g, feeds)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel_err(got, want) <= 1e-6
    text = str(g)
    assert str(parse(text)) == text
    cm = compile(m, example_inputs=inputs, work_dir=tmp_path)
    (y,) = cm.run(dict(zip([v.name for v in g.inputs], feeds, strict=True)))
    assert _rel_err(np.asarray(y), want) <= 1e-5


def test_swin_mask_folds_to_a_constant():
    m, inputs = _module("swin_shift_mask")
    g = from_torch(m, inputs)
    assert [n.op for n in g.nodes if n.op != "const"] == ["add"]


def test_writes_use_the_expected_ops():
    ops = {name: {n.op for n in from_torch(*_module(name)).nodes}
           for name in ("slice_scatter", "slice_scatter_strided", "index_put_rows",
                        "masked_fill_by_index_put", "gather_dim1")}
    assert "concat" in ops["slice_scatter"] and "scatter_elements" not in ops["slice_scatter"]
    assert "scatter_elements" in ops["slice_scatter_strided"]
    assert "scatter_nd" in ops["index_put_rows"]
    assert "where" in ops["masked_fill_by_index_put"]
    assert "gather_elements" in ops["gather_dim1"]


class Detector(torch.nn.Module):
    """A head, then post-processing whose output shape depends on the scores."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        scores = torch.sigmoid(self.head(x))
        keep = torch.nonzero(scores > 0.5)
        return keep.float().sum(0)


def test_data_dependent_shape_refused_naming_the_node_and_the_cut():
    from compiler.errors import ImportError_

    x = rand_tensor(4, 5)
    with pytest.raises(ImportError_) as e:
        from_torch(Detector().eval(), (x,))
    msg = str(e.value)
    assert "nonzero (aten.nonzero.default)" in msg and "data-dependent" in msg
    assert "outputs=[...]" in msg and "'gt'" in msg


def test_outputs_cut_before_post_processing(tmp_path):
    x = rand_tensor(4, 5)
    m = Detector().eval()
    g = from_torch(m, (x,), outputs=["sigmoid"])
    assert "nonzero" not in str(g) and [v.name for v in g.outputs] == ["sigmoid"]
    cm = compile(m, example_inputs=(x,), outputs=["sigmoid"], work_dir=tmp_path)
    (y,) = cm.run({g.inputs[0].name: x.numpy()})
    with torch.no_grad():
        want = torch.sigmoid(m.head(x)).numpy()
    assert _rel_err(np.asarray(y), want) <= 1e-5
