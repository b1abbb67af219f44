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


# --------------------------------------------------------------------------- the engine's loss
# ``cbdlib.engine.losses.job_loss`` is what the one-model loop and the grouped loop train with;
# each expectation below is computed by hand from the paper's formula, not by cbdlib.


def _cross_entropy(logits, labels):
    total = 0.0
    for row, label in zip(logits, labels):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(labels)


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _mean_one_minus_cosine(students, targets):
    values = [1 - sum(x * y for x, y in zip(_unit(s), _unit(t))) for s, t in zip(students, targets)]
    return sum(values) / len(values)


def _student_job(**changes):
    from cbdlib.engine.loop import Job
    from cbdlib.models import ModelSpec

    values = dict(name="cbd_ens", train_seed=1, spec=ModelSpec("resnet_tiny", 3), loss="cbd", alpha=0.3, beta=7.0)
    values.update(changes)
    return Job(**values)


LOGITS = [[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]]
LABELS = [0, 2]


def _engine_loss(job, features, teacher_features, teacher_logits=None):
    from cbdlib.engine.losses import class_terms, job_loss

    terms = class_terms(torch.tensor([6.0, 3.0, 1.0]))  # log prior: log([0.6, 0.3, 0.1])
    return job_loss(job, torch.tensor(features), torch.tensor(LOGITS), torch.tensor(LABELS), terms,
                    [torch.tensor(t) for t in teacher_features],
                    None if teacher_logits is None else [torch.tensor(t) for t in teacher_logits])


def test_the_engine_trains_students_on_one_minus_alpha_ce_plus_alpha_beta_distill():
    # Projection on: the student's feature (size 5) matches the two teachers' concatenation (2 + 3).
    t1 = [[3.0, 4.0], [1.0, 0.0]]
    t2 = [[0.0, 0.0, 2.0], [0.0, 1.0, 1.0]]
    s = [[1.0, -1.0, 0.0, 2.0, 1.0], [-2.0, 0.0, 1.0, 1.0, 0.0]]
    ce = _cross_entropy(LOGITS, LABELS)
    distill = _mean_one_minus_cosine(s, [_unit(a) + _unit(b) for a, b in zip(t1, t2)])
    loss, got_ce, got_distill = _engine_loss(_student_job(), s, [t1, t2])
    assert got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert got_distill.item() == pytest.approx(distill, rel=1e-5)
    # alpha 0.3, beta 7: swapping alpha and 1 - alpha, or dropping beta, gives another number.
    assert loss.item() == pytest.approx(0.7 * ce + 0.3 * 7.0 * distill, rel=1e-5)
    assert abs(loss.item() - (0.3 * ce + 0.7 * 7.0 * distill)) > 0.1
    assert abs(loss.item() - (0.7 * ce + 0.3 * distill)) > 0.1


def test_without_projection_the_target_is_the_normalised_mean_of_the_normalised_teachers():
    # The student's feature (size 3) is one teacher's size: no concatenation, but the mean direction.
    t1 = [[3.0, 0.0, 4.0], [0.0, 10.0, 0.0]]   # norms 5 and 10: normalising first matters
    t2 = [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    s = [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]]
    targets = [[(x + y) / 2 for x, y in zip(_unit(a), _unit(b))] for a, b in zip(t1, t2)]
    distill = _mean_one_minus_cosine(s, targets)
    raw_mean = _mean_one_minus_cosine(s, [[(x + y) / 2 for x, y in zip(a, b)] for a, b in zip(t1, t2)])
    first_only = _mean_one_minus_cosine(s, t1)
    assert min(abs(distill - raw_mean), abs(distill - first_only)) > 0.01  # the example tells them apart
    loss, ce, got = _engine_loss(_student_job(), s, [t1, t2])
    assert got.item() == pytest.approx(distill, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * _cross_entropy(LOGITS, LABELS) + 2.1 * distill, rel=1e-5)


def test_logit_distillation_adds_weight_times_t2_kl_from_the_teachers_mean_logits():
    t = [[1.0, 0.0], [0.0, 1.0]]
    s = [[1.0, 0.5], [0.2, 1.0]]
    teacher_logits = [[[1.0, 0.0, 3.0], [0.5, 0.5, 0.5]], [[3.0, 0.0, -1.0], [2.0, -1.0, 0.0]]]
    weight, temperature = 0.5, 2.0
    kl = 0.0
    for b in range(2):
        mean = [(x + y) / 2 for x, y in zip(teacher_logits[0][b], teacher_logits[1][b])]
        p_teacher = _softmax([v / temperature for v in mean])
        p_student = _softmax([v / temperature for v in LOGITS[b]])
        kl += sum(p * math.log(p / q) for p, q in zip(p_teacher, p_student))
    kl /= 2
    base = 0.7 * _cross_entropy(LOGITS, LABELS) + 2.1 * _mean_one_minus_cosine(s, t)
    job = _student_job(logit_distill_weight=weight, logit_distill_temperature=temperature)
    loss, _, _ = _engine_loss(job, s, [t], teacher_logits)
    assert loss.item() == pytest.approx(base + weight * temperature**2 * kl, rel=1e-5)
    assert kl > 0.05  # the term is not negligible in this example
    assert _engine_loss(_student_job(), s, [t], teacher_logits)[0].item() == pytest.approx(base, rel=1e-5)


def test_balanced_softmax_trains_on_logits_plus_the_log_prior():
    from cbdlib.engine.loop import Job
    from cbdlib.models import ModelSpec

    job = Job(name="balanced_softmax", train_seed=1, spec=ModelSpec("resnet_tiny", 3, "linear"),
              loss="balanced_softmax")
    shifted = [[v + math.log(p) for v, p in zip(row, (0.6, 0.3, 0.1))] for row in LOGITS]
    loss, ce, distill = _engine_loss(job, [[0.0]], [])
    assert loss.item() == pytest.approx(_cross_entropy(shifted, LABELS), rel=1e-5) and distill.item() == 0.0
