"""Each method is what its name says: the decoupled heads against their formulas, tau chosen on
validation, the teacher ensemble the mean of the teachers' logits, students trained from scratch,
and ``cbdlib evaluate`` giving the numbers the run stored.

The first part checks the heads on hand-made tensors; the second recomputes, independently of
the engine, what the shared finished run (``finished_run`` in conftest.py) stored.
"""
import json
import math

import numpy as np
import pytest
import torch

from cbdlib.checkpoint import load_model
from cbdlib.data.device import predict
from cbdlib.engine import loop
from cbdlib.engine.stages import TAU_GRID, first_best
from cbdlib.metrics import accuracy_record, balanced_accuracy
from cbdlib.models import LinearClassifier, LWSClassifier, NCMClassifier, TauNormClassifier
from cbdlib.runs import checkpoint_path, evaluation_path
from cbdlib.seeding import derive_seed

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the heads, by hand


def test_tau_norm_divides_each_class_weight_by_its_norm_to_the_power_tau():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    features = torch.tensor([[1.0, 2.0]])
    for tau, rows in [(1.0, [[0.6, 0.8], [0.0, 1.0]]),
                      (0.5, [[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 2 / math.sqrt(2)]]),
                      (0.0, [[3.0, 4.0], [0.0, 2.0]])]:
        head = TauNormClassifier(weight, tau)
        assert torch.allclose(head.weight, torch.tensor(rows))
        expected = [rows[0][0] * 1 + rows[0][1] * 2, rows[1][0] * 1 + rows[1][1] * 2]  # no bias
        assert torch.allclose(head(features), torch.tensor([expected]))
    assert list(TauNormClassifier(weight, 1.0).parameters()) == []  # nothing left to train


def test_lws_scales_each_class_of_the_frozen_linear_classifier_and_trains_only_the_scales():
    linear = LinearClassifier(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    head = LWSClassifier(linear)
    with torch.no_grad():
        head.class_scale.copy_(torch.tensor([2.0, 0.5]))
    # f = (1, 1): linear logits (3.5, 1.5), scaled (7.0, 0.75)
    assert torch.allclose(head(torch.tensor([[1.0, 1.0]])), torch.tensor([[7.0, 0.75]]))
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["class_scale"]
    before = {k: v.clone() for k, v in head.linear.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(head(torch.tensor([[1.0, 1.0], [0.0, 2.0]])), torch.tensor([1, 1]))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in head.linear.state_dict().items())
    assert not torch.equal(head.class_scale.detach(), torch.tensor([2.0, 0.5]))


def _cl2n_means(features: np.ndarray, labels: np.ndarray, classes: int):
    """Kang et al.'s cl2n, written out: centre on the mean feature, L2-normalise, average per class."""
    centre = features.mean(axis=0)
    treated = features - centre
    treated = treated / np.linalg.norm(treated, axis=1, keepdims=True)
    return centre, np.stack([treated[labels == c].mean(axis=0) for c in range(classes)])


def test_ncm_means_are_the_class_means_of_the_treated_training_features():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 4)) + np.array([2.0, 0.0, -1.0, 0.5])
    labels = np.arange(30) % 3
    centre, means = _cl2n_means(features, labels, 3)
    head = NCMClassifier.from_features(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), 3, "cl2n")
    assert np.allclose(head.centre.numpy(), centre, atol=1e-6)
    assert np.allclose(head.means.numpy(), means, atol=1e-6)
    query = rng.normal(size=(5, 4))
    x = (query - centre) / np.linalg.norm(query - centre, axis=1, keepdims=True)
    distances = ((x[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    assert np.allclose(head(torch.tensor(query, dtype=torch.float32)).numpy(), -distances, atol=1e-5)
    # cosine: class means of the L2-normalised features (no centring), normalised; cosine similarity
    cosine = NCMClassifier.from_features(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), 3, "cosine")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    raw = np.stack([unit[labels == c].mean(axis=0) for c in range(3)])
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    assert np.allclose(cosine(torch.tensor(query, dtype=torch.float32)).numpy(), q @ raw.T, atol=1e-5)


# --------------------------------------------------------------------------- the finished run, recomputed


def _state(run, method):
    return load_model(checkpoint_path(run, 1, method)).state_dict()


def _features_and_logits(model, images, data):
    return predict(model, images, data.mean, data.std, CPU)


def _evaluation(run, method):
    return json.loads(evaluation_path(run, 1, method).read_text())


@pytest.mark.slow
def test_tau_is_chosen_on_the_validation_set_never_on_test(finished_run, digits):
    run = finished_run.out
    ce = load_model(checkpoint_path(run, 1, "ce"))
    # float32, as the engine computes: a near-tie then falls the same way
    weight = ce.classifier.weight.detach().float()
    norms = weight.norm(dim=1, keepdim=True)

    def curve(images, labels):
        features = torch.from_numpy(_features_and_logits(ce, images, digits)[0])
        return [balanced_accuracy((features @ (weight / norms**tau).t()).numpy(), labels) for tau in TAU_GRID]

    val_curve = curve(digits.val_images, digits.val_labels)
    test_curve = curve(digits.test_images, digits.test_labels)
    assert val_curve != pytest.approx(test_curve, abs=1e-6)  # the run can tell the two sets apart
    record = _evaluation(run, "tau_norm")
    assert record["tau_grid"] == list(TAU_GRID)
    assert record["tau_val_curve"] == pytest.approx(val_curve, abs=1e-6)
    assert record["tau"] == TAU_GRID[first_best(val_curve)]
    assert record["tau_val_balanced_acc"] == pytest.approx(max(val_curve), abs=1e-6)


@pytest.mark.slow
def test_decoupled_models_keep_ce_s_backbone_weights_and_lws_its_linear_layer(finished_run):
    run = finished_run.out
    ce = _state(run, "ce")
    weights = [k for k in ce if k.startswith("backbone.") and not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 10
    for method in ("crt", "lws", "tau_norm", "ncm"):
        state = _state(run, method)
        assert all(torch.equal(state[k], ce[k]) for k in weights), method
    lws = _state(run, "lws")
    assert torch.equal(lws["classifier.linear.weight"], ce["classifier.weight"])
    assert torch.equal(lws["classifier.linear.bias"], ce["classifier.bias"])
    assert not torch.equal(lws["classifier.class_scale"], torch.ones(10))  # the scales did train
    crt = _state(run, "crt")
    assert not torch.equal(crt["classifier.weight"], ce["classifier.weight"])  # a new classifier


@pytest.mark.slow
def test_tau_norm_and_ncm_heads_are_built_from_ce_by_their_formulas(finished_run, digits):
    run = finished_run.out
    ce = load_model(checkpoint_path(run, 1, "ce"))
    weight = ce.classifier.weight.detach().double().numpy()
    tau = _evaluation(run, "tau_norm")["tau"]
    expected = weight / np.linalg.norm(weight, axis=1, keepdims=True) ** tau
    assert np.allclose(_state(run, "tau_norm")["classifier.weight"].double().numpy(), expected, atol=1e-6)
    train_features = _features_and_logits(ce, digits.train_images, digits)[0].astype(np.float64)
    centre, means = _cl2n_means(train_features, digits.train_labels, 10)
    ncm = _state(run, "ncm")
    assert np.allclose(ncm["classifier.centre"].numpy(), centre, atol=1e-5)
    assert np.allclose(ncm["classifier.means"].numpy(), means, atol=1e-5)
    # and the stored test accuracy is that of the nearest treated class mean
    test_features = _features_and_logits(ce, digits.test_images, digits)[0].astype(np.float64)
    x = (test_features - centre) / np.linalg.norm(test_features - centre, axis=1, keepdims=True)
    nearest = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    # up to two near-ties that float32 (the engine) and float64 (here) may break differently
    assert abs(_evaluation(run, "ncm")["all"] - (nearest == digits.test_labels).mean()) <= 2 / len(nearest)


@pytest.mark.slow
def test_the_teacher_ensemble_is_the_mean_of_the_teachers_logits(finished_run, digits):
    run, metrics = finished_run.out, finished_run.metrics
    names = ["teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2"]  # the run's teachers
    assert all(n in metrics["methods"] for n in names)
    logits = [_features_and_logits(load_model(checkpoint_path(run, 1, n)), digits.test_images, digits)[1]
              for n in names]
    stored = _evaluation(run, "teacher_ensemble")
    expected = accuracy_record(np.mean(logits, axis=0), digits.test_labels, digits.splits)
    assert stored["members"] == names
    assert stored["confusion"] == expected["confusion"]
    assert stored["per_class"] == pytest.approx(expected["per_class"])
    assert stored["all"] == pytest.approx(expected["all"])
    # The run tells the mean of logits from other ways of combining teachers.
    exps = [np.exp(z - z.max(1, keepdims=True)) for z in logits]
    probabilities = np.mean([e / e.sum(1, keepdims=True) for e in exps], axis=0)
    others = [probabilities, *logits, np.mean(logits[:2], axis=0)]
    for other in others:
        assert accuracy_record(other, digits.test_labels, digits.splits)["confusion"] != expected["confusion"]


@pytest.mark.slow
def test_students_start_from_scratch_not_from_a_teacher(finished_run):
    run = finished_run.out
    starts = finished_run.student_starts
    assert set(starts) == {"cbd", "cbd_ens"}
    teachers = [_state(run, n) for n in ("teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2")]
    for name, (spec, start) in starts.items():
        fresh = loop.init_model(spec, derive_seed(name, 1)).state_dict()
        assert start.keys() == fresh.keys()
        assert all(torch.equal(start[k], fresh[k]) for k in start), name  # a new model of its own seed
        for teacher in teachers:
            shared = [k for k in start if k.startswith("backbone.") and k.endswith("weight")
                      and torch.equal(start[k], teacher[k])]
            assert shared == [], (name, shared[:3])


@pytest.mark.slow
def test_the_students_trained_on_one_minus_alpha_ce_plus_alpha_beta_distill(finished_run):
    run = finished_run.out
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    students = [r for r in rows if r["model"] in ("cbd", "cbd_ens")]
    assert len(students) == 2 * finished_run.settings.epochs
    alpha, beta = finished_run.settings.alpha, finished_run.settings.beta
    assert (alpha, beta) == (0.4, 100.0)
    for r in students:
        assert r["loss"] == pytest.approx((1 - alpha) * r["ce"] + alpha * beta * r["distill"], rel=1e-5), r
    assert any(abs(r["ce"] - beta * r["distill"]) > 0.05 * r["loss"] for r in students)  # alpha <-> 1 - alpha shows
    for r in (r for r in rows if r["model"] in ("ce", "teacher_vanilla_1")):
        assert r["loss"] == pytest.approx(r["ce"]) and r["distill"] is None


@pytest.mark.slow
def test_cbdlib_evaluate_gives_the_numbers_the_run_stored(finished_run, capsys):
    from cbdlib.__main__ import main
    from cbdlib.evaluate import evaluate_checkpoint

    run = finished_run.out
    keys = ("all", "many", "medium", "few", "head", "mid", "tail", "per_class")
    capsys.readouterr()
    # The command in process (its refusal of hostile files runs it in a subprocess:
    # tests/reliability/test_safe_loading.py).
    assert main(["evaluate", "--checkpoint", str(checkpoint_path(run, 1, "cbd_ens")), "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "cbd_ens" and printed["seed"] == 1
    _assert_same_numbers(printed, _evaluation(run, "cbd_ens"), keys)
    for method in ("teacher_aug_1", "lws", "tau_norm", "ncm"):  # each kind of head
        got = evaluate_checkpoint(checkpoint_path(run, 1, method), device="cpu")
        _assert_same_numbers(got, _evaluation(run, method), keys, method)


def _assert_same_numbers(got, stored, keys, where=""):
    for key in keys:
        a, b = (got[key], stored[key]) if key == "per_class" else ([got[key]], [stored[key]])
        assert len(a) == len(b), (where, key)
        for x, y in zip(a, b):
            assert (x is None and y is None) or x == pytest.approx(y, abs=1e-12), (where, key, got[key], stored[key])
