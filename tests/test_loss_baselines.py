"""The CIFAR-LT loss baselines as their authors' code runs them, checked against hand-computed
numbers: LDAM's margins and scaled logits, DRW's weights before and after the switch epoch,
post-hoc logit adjustment (tau chosen on validation only), and Cao et al.'s long-tailed subset."""
import json
import math

import numpy as np
import pytest
import torch

from cbdlib.checkpoint import load_model
from cbdlib.config import make_params, resolve
from cbdlib.data.longtail import class_permutations, split_pool
from cbdlib.engine import Experiment
from cbdlib.engine.job import Job
from cbdlib.engine.losses import class_terms, drw_start, drw_weights, job_loss, ldam_margins
from cbdlib.engine.stages import TAU_GRID, closest_best
from cbdlib.metrics import balanced_accuracy
from cbdlib.models import ModelSpec
from cbdlib.runs import checkpoint_path, evaluation_path

COUNTS = [100.0, 10.0, 1.0]


def cross_entropy(row, label, weights=None):
    """-log softmax(row)[label], by hand."""
    return math.log(sum(math.exp(v) for v in row)) - row[label]


# --------------------------------------------------------------------------- LDAM


def test_ldam_margins_are_n_to_the_minus_quarter_scaled_so_the_largest_is_a_half():
    margins = ldam_margins(torch.tensor(COUNTS)).tolist()
    # 100 ** -0.25 = 0.316228, 10 ** -0.25 = 0.562341, 1 ** -0.25 = 1 (the largest, scaled to 0.5)
    assert margins == pytest.approx([0.5 * 0.316228, 0.5 * 0.562341, 0.5], rel=1e-5)


def test_the_ldam_loss_lowers_only_the_true_cosine_by_its_margin_then_scales_by_thirty():
    cosines = [[0.2, 0.1, -0.3], [0.9, -0.2, 0.4]]
    labels = [2, 0]
    job = Job(name="ldam_drw", train_seed=1, spec=ModelSpec("resnet_tiny", 3, "cosine", cosine_scale=30.0),
              loss="ldam")
    logits = 30.0 * torch.tensor(cosines)  # what the ldam_drw head (s = 30) outputs
    loss, ce, distill = job_loss(job, None, logits, torch.tensor(labels), class_terms(torch.tensor(COUNTS)))
    margins = [0.5 * 0.316228, 0.5 * 0.562341, 0.5]
    # sample 1, class 2 (margin 0.5): 30 x [0.2, 0.1, -0.8]; sample 2, class 0 (0.158114): 30 x [0.741886, -0.2, 0.4]
    rows = [[30 * c - (30 * margins[y] if j == y else 0.0) for j, c in enumerate(row)]
            for row, y in zip(cosines, labels)]
    assert rows[0] == pytest.approx([6.0, 3.0, -24.0]) and rows[1][0] == pytest.approx(22.25658, rel=1e-5)
    expected = (cross_entropy(rows[0], 2) + cross_entropy(rows[1], 0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5) and ce.item() == loss.item() and distill.item() == 0


# --------------------------------------------------------------------------- DRW


def test_drw_weights_are_cui_et_als_effective_numbers_summing_to_the_class_count():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in COUNTS]   # 0.0100498, 0.1000450, 1.0
    expected = [3 * w / sum(raw) for w in raw]
    weights = drw_weights(torch.tensor(COUNTS)).tolist()
    assert weights == pytest.approx(expected, rel=1e-5)
    assert sum(weights) == pytest.approx(3.0) and weights[2] == pytest.approx(3 / 1.1100948, rel=1e-5)


def test_drw_starts_at_eighty_percent_of_the_epochs():
    assert drw_start(200) == 160 and drw_start(28) == 22 and drw_start(2) == 1


def test_drw_cross_entropy_is_plain_before_the_switch_epoch_and_weighted_from_it():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]])
    labels = torch.tensor([0, 2])
    job = Job(name="ce_drw", train_seed=1, spec=ModelSpec("resnet_tiny", 3, "linear"), loss="ce",
              reweight_from_epoch=5)
    terms = class_terms(torch.tensor(COUNTS))
    per_sample = [cross_entropy([2.0, -1.0, 0.5], 0), cross_entropy([0.0, 1.5, -0.5], 2)]
    before = job_loss(job, None, logits, labels, terms, epoch=4)[0].item()
    assert before == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    w = drw_weights(torch.tensor(COUNTS)).tolist()
    # PyTorch's (and LDAM-DRW's) weighted mean: sum w_y * loss / sum w_y
    after = job_loss(job, None, logits, labels, terms, epoch=5)[0].item()
    assert after == pytest.approx((w[0] * per_sample[0] + w[2] * per_sample[1]) / (w[0] + w[2]), rel=1e-6)
    assert after != pytest.approx(before)


def test_a_job_without_drw_records_the_same_identity_as_before_the_key_existed():
    job = Job(name="ce", train_seed=1, spec=ModelSpec("resnet_tiny", 3, "linear"))
    assert "reweight_from_epoch" not in job.identity()  # older checkpoints still resume
    drw = Job(name="ce_drw", train_seed=1, spec=ModelSpec("resnet_tiny", 3, "linear"), reweight_from_epoch=1)
    assert drw.identity()["reweight_from_epoch"] == 1


# --------------------------------------------------------------------------- one run of every new method


@pytest.fixture(scope="module")
def loss_baselines_run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("loss_baselines")
    settings = resolve(make_params(dict(
        dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=5, batch_size=32, lr=0.05, warmup_epochs=1,
        seeds=[1], device="cpu", smoke=False, methods=["ce", "ce_drw", "ldam_drw", "logit_adjust"])))
    metrics = Experiment(settings, out, data=digits, quiet=True).run("baselines")
    return out, metrics


def test_the_drw_models_train_with_the_deferred_switch_and_ldam_uses_a_thirty_scaled_cosine_head(
        loss_baselines_run):
    out, metrics = loss_baselines_run
    assert {"ce", "ce_drw", "ldam_drw", "logit_adjust"} <= set(metrics["methods"])
    ldam = load_model(checkpoint_path(out, 1, "ldam_drw"))
    assert ldam.classifier.__class__.__name__ == "CosineClassifier" and float(ldam.classifier.scale) == 30.0
    state = torch.load(checkpoint_path(out, 1, "ce_drw"), weights_only=True)
    assert state["meta"]["job"]["reweight_from_epoch"] == 4 == drw_start(5)
    assert state["meta"]["job"]["loss"] == "ce" and state["spec"]["classifier"] == "linear"


def test_logit_adjustment_with_tau_zero_is_ce_and_its_tau_is_chosen_on_validation_only(loss_baselines_run, digits):
    out, _ = loss_baselines_run
    record = json.loads(evaluation_path(out, 1, "logit_adjust").read_text())
    ce = load_model(checkpoint_path(out, 1, "ce"))
    adjusted = load_model(checkpoint_path(out, 1, "logit_adjust"))
    prior = np.log(np.asarray(digits.class_counts, dtype=np.float64) / sum(digits.class_counts))
    # The adjusted model is ce with tau * log(prior) off its bias: the same weights otherwise.
    tau = record["tau"]
    assert torch.equal(adjusted.classifier.weight, ce.classifier.weight)
    assert np.allclose(adjusted.classifier.bias.detach().numpy(), ce.classifier.bias.detach().numpy() - tau * prior,
                       atol=1e-6)
    # The curve is the balanced validation accuracy of ce's logits minus tau * log prior, by tau.
    from cbdlib.data.device import predict

    _, val_logits = predict(ce, digits.val_images, digits.mean, digits.std, torch.device("cpu"))
    curve = [balanced_accuracy(val_logits.astype(np.float64) - t * prior, digits.val_labels) for t in TAU_GRID]
    assert record["tau_grid"] == list(TAU_GRID) and record["tau_val_curve"] == pytest.approx(curve, abs=1e-9)
    assert tau == TAU_GRID[closest_best(curve, TAU_GRID, prefer=1.0)]
    # The saved model predicts with ce's logits minus tau * log prior (at tau = 0: ce's own predictions).
    _, ce_test = predict(ce, digits.test_images, digits.mean, digits.std, torch.device("cpu"))
    _, adjusted_test = predict(adjusted, digits.test_images, digits.mean, digits.std, torch.device("cpu"))
    assert np.allclose(adjusted_test, ce_test - tau * prior, atol=1e-5)
    assert tau > 0 and not np.array_equal(adjusted_test.argmax(1), ce_test.argmax(1))  # here it moves predictions


def test_logit_adjustment_ties_go_to_the_tau_closest_to_one():
    grid = TAU_GRID
    assert closest_best([0.5] * len(grid), grid, prefer=1.0) == grid.index(1.0)
    scores = [0.5] * len(grid)
    scores[3] = scores[15] = 0.7  # 0.3 and 1.5 tie: 1.5 is closer to 1
    assert grid[closest_best(scores, grid, prefer=1.0)] == 1.5
    scores[7] = 0.7              # 0.7 is as close as 1.3 would be, and closer than 1.5
    assert grid[closest_best(scores, grid, prefer=1.0)] == 0.7


# --------------------------------------------------------------------------- Cao et al.'s subset


def test_the_cao_subset_shuffles_each_class_in_label_order_with_one_legacy_generator():
    targets = np.array([0, 1, 0, 2, 1, 0, 2, 0, 1, 2, 0, 2])
    # The recipe, written out as LDAM-DRW's imbalance_cifar.py runs it (global legacy generator):
    state = np.random.get_state()
    np.random.seed(3)
    expected = []
    for c in range(3):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected.append(idx)
    np.random.seed(12345)
    before = np.random.rand()
    np.random.set_state(state)
    # Hand-derived with seed 3: class 0 holds [0, 2, 5, 7, 10], class 1 [1, 4, 8], class 2 [3, 6, 9, 11].
    assert sorted(expected[0].tolist()) == [0, 2, 5, 7, 10]
    np.random.seed(12345)
    orders = class_permutations(targets, 3, 3, "cao")
    assert np.random.rand() == before  # NumPy's global generator is left alone
    assert [o.tolist() for o in orders] == [e.tolist() for e in expected]
    # The subset keeps the first n_c of each class's shuffled indices; validation takes the last ones.
    train, val, _ = split_pool(targets, 3, imbalance_ratio=3, profile="exp", lt_seed=3, val_per_class=1,
                               reserve_first=False, lt_subset="cao")
    counts = [3, 1, 1]  # n_max = 3 (the smallest pool), IR 3: 3, int(3 / sqrt 3) = 1, 1
    assert train.tolist() == [i for c in range(3) for i in expected[c][:counts[c]].tolist()]
    assert val.tolist() == [int(expected[c][-1]) for c in range(3)]
    assert [o.tolist() for o in class_permutations(targets, 3, 3, "shuffled")] != [e.tolist() for e in expected]


def test_lt_subset_defaults_to_cao_for_cifar_and_shuffled_elsewhere_and_is_stated():
    assert resolve(make_params({"dataset": "cifar10"})).lt_subset == "cao"
    assert resolve(make_params({"dataset": "cifar100"})).params.lt_subset == "cao"  # params.yaml states it
    assert resolve(make_params({"dataset": "digits"})).lt_subset == "shuffled"
    assert resolve(make_params({"dataset": "cifar10", "lt_subset": "shuffled"})).lt_subset == "shuffled"
    from cbdlib import CBDError

    with pytest.raises(CBDError, match="lt_subset must be one of cao, shuffled"):
        make_params({"lt_subset": "random"})
