"""Distiller losses against values computed by hand (numpy, written out), teacher weights
from validation accuracy, and that distillation trains a student toward its teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from compiler.compress.distill import Distiller, teacher_weights  # noqa: E402
from compiler.errors import NpuccError  # noqa: E402


class Fixed(nn.Module):
    """Returns given logits whatever the input (a teacher with known outputs)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) if self.logits.dim() == 1 else self.logits


def _kl_by_hand(s, t, T):
    """sum_b sum_c p_t log(p_t / p_s) / B * T^2, written out."""
    total = 0.0
    for sb, tb in zip(s, t, strict=True):
        es = [math.exp(v / T) for v in sb]
        et = [math.exp(v / T) for v in tb]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    return total / len(s) * T * T


def test_response_kl_with_temperature_and_task_loss():
    s = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
    t = [[1.0, 1.0, 0.0], [-1.0, 2.0, 2.5]]
    student, teacher = Fixed(s), Fixed(t)
    student.logits.requires_grad_(True)
    d = Distiller(teacher, student, temperature=2.0, alpha=0.3)
    y = torch.tensor([0, 2])
    loss = d(torch.zeros(2, 1), labels=y)
    kl = _kl_by_hand(s, t, 2.0)
    ce = -(math.log(math.exp(2.0) / sum(math.exp(v) for v in s[0]))
           + math.log(math.exp(3.0) / sum(math.exp(v) for v in s[1]))) / 2
    assert loss.response.item() == pytest.approx(kl, rel=1e-6)
    assert loss.task.item() == pytest.approx(ce, rel=1e-6)
    assert loss.feature.item() == 0.0
    assert loss.total.item() == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-6)
    loss.total.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0


def test_multi_teacher_probabilities_are_weighted():
    s = [[0.5, -0.5, 1.5]]
    t1, t2 = [[3.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]]
    d = Distiller([Fixed(t1), Fixed(t2)], Fixed(s), temperature=1.0, alpha=1.0,
                  teacher_weights=[3.0, 1.0])          # normalised to 0.75 / 0.25
    loss = d(torch.zeros(1, 1))
    p1 = np.exp(t1[0]) / np.exp(t1[0]).sum()
    p2 = np.exp(t2[0]) / np.exp(t2[0]).sum()
    pt = 0.75 * p1 + 0.25 * p2
    ps = np.exp(s[0]) / np.exp(s[0]).sum()
    assert loss.response.item() == pytest.approx(float(np.sum(pt * np.log(pt / ps))), rel=1e-5)
    assert loss.total.item() == pytest.approx(loss.response.item())


class Feat(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Conv2d(1, width, 1, bias=False)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_feature_mse_with_learned_projection():
    torch.manual_seed(0)
    teacher, student = Feat(3), Feat(2)
    d = Distiller(teacher, student, response="none", features=[("body", "body")], beta=2.0)
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 4) / 8
    loss = d(x)
    proj = d.proj["0"]
    assert isinstance(proj, nn.Conv2d) and proj.weight.shape == (3, 2, 1, 1)
    with torch.no_grad():   # by hand: features are w * x per channel, the projection mixes them
        ws = student.body.weight.reshape(2).numpy()
        wt = teacher.body.weight.reshape(3).numpy()
        P = proj.weight.reshape(3, 2).numpy()
    xs = x.numpy().reshape(-1)
    fs = ws[:, None] * xs[None, :]              # [2, 8]
    ft = wt[:, None] * xs[None, :]              # [3, 8]
    mse = float(np.mean((P @ fs - ft) ** 2))
    assert loss.feature.item() == pytest.approx(mse, rel=1e-5)
    assert loss.total.item() == pytest.approx(2.0 * mse, rel=1e-5)
    assert loss.response.item() == 0.0 and loss.task.item() == 0.0
    # the projection is trained with the student
    ids = {id(p) for p in d.trainable_parameters()}
    assert id(proj.weight) in ids and id(student.body.weight) in ids
    assert not any(id(p) in ids for p in teacher.parameters())


def test_same_width_features_need_no_projection_and_mse_response():
    torch.manual_seed(1)
    teacher, student = Feat(3), Feat(3)
    d = Distiller(teacher, student, response="mse", features=[("body", "body")], alpha=0.5)
    x = torch.rand(2, 1, 3, 3)
    loss = d(x)
    assert isinstance(d.proj["0"], nn.Identity)
    with torch.no_grad():
        feat = torch.mean((student.body(x) - teacher.body(x)) ** 2).item()
        resp = torch.mean((student(x) - teacher(x)) ** 2).item()
    assert loss.feature.item() == pytest.approx(feat, rel=1e-6)
    assert loss.total.item() == pytest.approx(0.5 * resp + feat, rel=1e-6)


def test_teacher_weights_from_validation_accuracy():
    x = torch.zeros(4, 1)
    y = torch.tensor([0, 0, 1, 2])
    right_half = Fixed([5.0, 0.0, 0.0])     # predicts 0: 2 of 4
    quarter = Fixed([0.0, 0.0, 5.0])        # predicts 2: 1 of 4
    never = Fixed([0.0, 0.0, 0.0, 5.0])     # class 3: 0 of 4
    w = teacher_weights([right_half, quarter, never], [(x, y)])
    assert w == pytest.approx([0.5 / 0.75, 0.25 / 0.75, 0.0])


def test_errors_name_the_problem():
    with pytest.raises(NpuccError, match="no module 'nope'"):
        Distiller(Feat(2), Feat(2), features=[("nope", "body")])
    with pytest.raises(NpuccError, match="response="):
        Distiller(Feat(2), Feat(2), response="cosine-ish")
    with pytest.raises(NpuccError, match="2 teachers"):
        Distiller([Feat(2), Feat(2)], Feat(2), teacher_weights=[1.0])


def test_distillation_moves_the_student_toward_the_teacher():
    """A real (short) run on the digits: a narrow student distilled from the trained CNN ends
    closer to it (KL) than before."""
    from examples.digits_cnn import load_digits_split, make_model, train

    torch.set_num_threads(1)
    xtr, ytr, _, _ = load_digits_split()
    torch.manual_seed(0)
    teacher = train(make_model(), xtr, ytr, epochs=2)
    student = make_model(width=4)
    d = Distiller(teacher, student, features=[("3", "3")], temperature=4.0, alpha=1.0)
    x = torch.from_numpy(xtr[:256])
    before = d(x).response.item()
    opt = torch.optim.Adam(d.trainable_parameters(), lr=3e-3)
    student.train()
    for _ in range(6):
        for i in range(0, 256, 32):
            loss = d(x[i:i + 32])
            opt.zero_grad()
            loss.total.backward()
            opt.step()
    student.eval()
    assert d(x).response.item() < 0.6 * before
