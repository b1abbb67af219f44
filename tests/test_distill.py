"""The feature-distillation loss against its formula, and gradients reaching the student only."""
import math

import pytest
import torch

from cbdlib.distill import cbd_loss, feature_distillation_loss


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_loss_equals_the_formula_on_hand_made_tensors():
    # Two teachers of different sizes (2 and 3); the student's feature has size 5.
    t1 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 1.0, 1.0]])
    expected = []
    for b in range(2):
        target = _unit(_unit(t1[b].tolist()) + _unit(t2[b].tolist()))
        student = _unit(s[b].tolist())
        expected.append(1 - sum(x * y for x, y in zip(student, target)))
    loss = feature_distillation_loss(s, [t1, t2])
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_identical_direction_gives_zero_and_opposite_gives_two():
    t = [torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]])]
    target = torch.cat([t[0] / t[0].norm(), t[1] / t[1].norm()], 1)
    assert feature_distillation_loss(3 * target, t).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distillation_loss(-target, t).item() == pytest.approx(2.0, abs=1e-6)


def test_only_the_student_gets_gradients():
    student = torch.randn(4, 7, requires_grad=True)
    teachers = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 4, requires_grad=True)]
    feature_distillation_loss(student, teachers).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(t.grad is None for t in teachers)


def test_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="do not match"):
        feature_distillation_loss(torch.randn(2, 5), [torch.randn(2, 3)])


def test_cbd_loss_weights_ce_and_distillation():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    s, t = torch.randn(6, 8), [torch.randn(6, 8)]
    total, ce, distill = cbd_loss(logits, labels, s, t, alpha=0.4, beta=100)
    assert total.item() == pytest.approx(0.6 * ce.item() + 40 * distill.item(), rel=1e-6)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_float32_under_bf16_autocast():
    s = torch.randn(3, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = feature_distillation_loss(s, [torch.randn(3, 6).bfloat16()])
    assert loss.dtype == torch.float32
