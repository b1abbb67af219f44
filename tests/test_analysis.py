"""The analyses of notebook 04 on hand-built cases: probes, calibration, teacher agreement, and
their place in metrics.json (``probes``, ``ece``, ``teacher_agreement``, never under ``methods``)."""
import copy
import json

import numpy as np
import pytest

from cbdlib.analysis import (
    ECE_BINS,
    add_analyses,
    calibration_record,
    ensemble_gain,
    expected_calibration_error,
    linear_probe_logits,
    ncm_probe_logits,
    pairwise_agreement,
    probe_record,
    reliability_bins,
    student_cosine,
)
from cbdlib.analysis.reading import analysis_reading_lines
from cbdlib.errors import CBDError
from cbdlib.metrics import ACCURACY_KEYS, validate_metrics

SPLITS = {"many": [0], "medium": [1], "few": [2], "head": [0], "mid": [1], "tail": [2]}


def separable(n_per_class=(40, 8, 1), dim=6, seed=0):
    """Long-tailed features, each class around its own axis (well apart): perfectly separable."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    features = 0.05 * rng.normal(size=(len(labels), dim))
    features[np.arange(len(labels)), labels] += 1.0
    return features.astype(np.float32), labels


def test_a_linear_probe_on_perfectly_separable_features_scores_one_even_for_a_single_image_class():
    train, train_labels = separable()
    test, test_labels = separable((10, 10, 10), seed=1)
    record = probe_record(train, train_labels, test, test_labels, SPLITS, 3, seed=0)
    for kind in ("linear", "ncm"):
        assert record[kind]["all"] == 1.0
        assert record[kind]["tail"] == 1.0 and record[kind]["per_class"] == [1.0, 1.0, 1.0]


def test_probes_score_chance_on_features_that_carry_no_label():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(600, 8)), rng.normal(size=(3000, 8))
    train_labels, test_labels = rng.integers(0, 3, 600), rng.integers(0, 3, 3000)
    for logits in (linear_probe_logits(train, train_labels, test, 3), ncm_probe_logits(train, train_labels, test, 3)):
        assert abs((logits.argmax(1) == test_labels).mean() - 1 / 3) < 0.05


def test_the_linear_probe_samples_classes_evenly_so_the_tail_is_not_drowned():
    # Overlapping classes, 50 : 1 imbalance. With instance sampling the boundary moves into the
    # tail; with class-balanced sampling the tail's test images are found about as often as the head's.
    rng = np.random.default_rng(0)
    train_labels = np.array([0] * 500 + [1] * 10)
    train = rng.normal(size=(510, 2)) + np.where(train_labels[:, None] == 1, [1.0, 0.0], [-1.0, 0.0])
    test_labels = np.array([0] * 2000 + [1] * 2000)
    test = rng.normal(size=(4000, 2)) + np.where(test_labels[:, None] == 1, [1.0, 0.0], [-1.0, 0.0])
    predictions = linear_probe_logits(train, train_labels, test, 2).argmax(1)
    tail_recall = (predictions[test_labels == 1] == 1).mean()
    head_recall = (predictions[test_labels == 0] == 0).mean()
    assert tail_recall > 0.7 and abs(tail_recall - head_recall) < 0.15


def test_a_perfectly_calibrated_predictor_has_zero_ece():
    # In each bin, the share of correct predictions equals the confidence: 0.9 -> 9 of 10 right, 0.5 -> 1 of 2.
    confidence = np.array([0.9] * 10 + [0.5] * 2)
    correct = np.array([1] * 9 + [0] + [1, 0])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_by_hand():
    # Bin (0.8667, 0.9333]: 4 predictions at 0.9, 2 right -> |0.5 - 0.9| = 0.4, weight 4/6;
    # bin (0.2667, 0.3333]: 2 predictions at 0.3, both right -> |1.0 - 0.3| = 0.7, weight 2/6.
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    correct = np.array([1, 1, 0, 0, 1, 1])
    assert expected_calibration_error(confidence, correct) == pytest.approx(4 / 6 * 0.4 + 2 / 6 * 0.7)
    bins = reliability_bins(confidence, correct)
    assert len(bins["count"]) == ECE_BINS == 15 and sum(bins["count"]) == 6
    assert bins["count"][13] == 4 and bins["accuracy"][13] == 0.5 and bins["count"][4] == 2
    assert bins["accuracy"][0] is None  # an empty bin has no accuracy


def test_the_bins_are_right_closed_and_a_confidence_of_one_falls_in_the_last():
    bins = reliability_bins(np.array([1.0, 1 / 15, 0.0]), np.array([1, 1, 1]))
    assert bins["count"][14] == 1 and bins["count"][0] == 2


def test_calibration_record_from_logits_reads_the_top_label_and_splits_by_true_class():
    # Two classes, logits that give confidence 0.5 (ties count as class 0) or ~1.0.
    logits = np.array([[0.0, 0.0], [0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    labels = np.array([0, 1, 0, 1])
    splits = {"many": [0], "medium": [1], "few": [], "head": [0], "mid": [], "tail": [1]}
    record = calibration_record(logits, labels, splits)["ece"]
    # class 0: confidences 0.5 (right) and ~1 (right) -> (|1 - 0.5| + ~0) / 2 = 0.25
    assert record["many"] == pytest.approx(0.25, abs=1e-6)
    # class 1: 0.5 (wrong: the tie goes to 0) and ~1 (right) -> (|0 - 0.5| + ~0) / 2 = 0.25
    assert record["tail"] == pytest.approx(0.25, abs=1e-6)
    assert record["few"] is None and record["mid"] is None
    assert record["all"] == pytest.approx(abs(0.5 - 0.5) * 2 / 4, abs=1e-6)  # the 0.5 bin: 1 of 2 right


def test_a_student_that_equals_its_teachers_target_has_cosine_one_and_an_orthogonal_one_zero():
    rng = np.random.default_rng(0)
    teachers = [rng.normal(size=(6, 4)), rng.normal(size=(6, 4))]
    target = np.concatenate([t / np.linalg.norm(t, axis=1, keepdims=True) for t in teachers], axis=1)
    labels = np.array([0, 0, 1, 1, 2, 2])
    same = student_cosine(3 * target, teachers, labels, SPLITS, 3)
    assert same["all"] == pytest.approx(1.0) and same["per_class"] == pytest.approx([1.0, 1.0, 1.0])
    orthogonal = student_cosine(np.stack([np.linalg.svd(t[None])[2][-1] for t in target]), teachers, labels, SPLITS, 3)
    assert orthogonal["all"] == pytest.approx(0.0, abs=1e-6)


def test_pairwise_agreement_and_ensemble_gain_by_hand():
    labels = np.array([0, 0, 1, 1])
    predictions = {"teacher_vanilla_1": np.array([0, 0, 1, 1]), "teacher_vanilla_2": np.array([0, 1, 1, 0]),
                   "teacher_aug_1": np.array([0, 0, 1, 0])}
    splits = {"many": [0], "medium": [1], "few": [], "head": [0], "mid": [1], "tail": []}
    record = pairwise_agreement(predictions, labels, splits, 2)
    # pairs: v1&v2 agree on images 0, 2; v1&aug on 0, 1, 2; v2&aug on 0, 2, 3 -> per image 1, 1/3, 1, 1/3
    assert record["all"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 3) / 4)
    assert record["per_class"] == pytest.approx([2 / 3, 2 / 3]) and record["tail"] is None
    assert record["pairs"]["teacher_aug_1 & teacher_vanilla_1"] == 0.75
    assert pairwise_agreement({"teacher_vanilla_1": labels}, labels, splits, 2) is None
    accuracy = {key: 0.5 for key in ACCURACY_KEYS}
    evaluations = {"teacher_vanilla_1": {**accuracy, "all": 0.6, "tail": 0.2},
                   "teacher_aug_1": {**accuracy, "all": 0.55}, "teacher_ensemble": {**accuracy, "all": 0.7}}
    gain = ensemble_gain(evaluations, ["teacher_vanilla_1", "teacher_aug_1"])
    assert gain["best_member"] == "teacher_vanilla_1"
    assert gain["all"] == pytest.approx(0.1) and gain["tail"] == pytest.approx(0.3)


def _metrics_with_analyses():
    split = {key: 0.5 for key in ACCURACY_KEYS}
    metrics = {"dataset": "digits", "imbalance_ratio": 10, "class_counts": [5, 3, 1],
               "splits": SPLITS, "seeds": [1, 2], "device": "cpu", "torch": "x", "git_commit": "x",
               "methods": {m: {**split, "per_class": [0.5] * 3} for m in ("ce", "cbd_ens")},
               "std": {m: {**split, "per_class": [0.0] * 3} for m in ("ce", "cbd_ens")}}
    evaluations = {m: {s: {**split, "ece": {**split, "all": 0.1 * s}} for s in (1, 2)} for m in ("ce", "cbd_ens")}
    analyses = {m: {s: {"seed": s, "linear": {**split, "all": 0.6 + 0.1 * s}, "ncm": split} for s in (1, 2, 3)}
                for m in ("ce", "cbd_ens", "teacher_vanilla_1")}
    return add_analyses(metrics, evaluations, analyses)


def test_analyses_are_merged_over_the_run_s_seeds_and_validated():
    metrics = _metrics_with_analyses()
    validate_metrics(metrics)
    assert set(metrics["probes"]) == {"ce", "cbd_ens", "teacher_vanilla_1"}
    assert set(metrics["probes"]["ce"]) == {"linear", "ncm"}          # the contract's shape
    assert metrics["probes"]["ce"]["linear"]["all"] == pytest.approx(0.75)  # seeds 1, 2 only (seed 3 not in the run)
    assert metrics["probes_std"]["ce"]["linear"]["all"] == pytest.approx(0.05)
    assert metrics["ece"]["ce"]["all"] == pytest.approx(0.15) and "ece" not in metrics["methods"]["ce"]
    assert metrics["probe_settings"]["epochs"] > 0 and "class-balanced" in metrics["probe_settings"]["sampling"]
    assert "15 equal-width bins" in metrics["ece_definition"]
    lines = analysis_reading_lines(metrics)
    assert any("under the same linear probe" in line for line in lines)


def test_metrics_json_refuses_an_ece_or_probe_out_of_range_or_of_an_unknown_method():
    for path, value in ((("probes", "ce", "linear", "all"), 1.5), (("ece", "ce", "tail"), -0.1),
                        (("ece", "no_such_method"), {key: 0.1 for key in ACCURACY_KEYS})):
        metrics = copy.deepcopy(_metrics_with_analyses())
        node = metrics
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(CBDError, match="metrics.json"):
            validate_metrics(metrics)


def test_the_smoke_run_holds_probes_and_ece_for_every_model(smoke_run):
    from cbdlib.analysis import has_own_backbone

    metrics = json.loads((smoke_run / "metrics.json").read_text())
    validate_metrics(metrics)
    methods = metrics["methods"]
    backbones = [m for m in methods if has_own_backbone(m)]
    assert {"ce", "cbd_ens", "teacher_vanilla_1"} <= set(backbones)
    assert set(metrics["probes"]) == set(backbones)      # decoupled methods share ce's backbone: no probe of their own
    assert set(metrics["ece"]) == set(methods)           # every method with predictions
    for name in backbones:
        for kind in ("linear", "ncm"):
            record = metrics["probes"][name][kind]
            assert set(ACCURACY_KEYS) <= set(record) and 0 <= record["all"] <= 1
    for name in methods:
        assert 0 <= metrics["ece"][name]["all"] <= 1
        for split, classes in metrics["splits"].items():
            assert (metrics["ece"][name][split] is None) == (not classes) or metrics["ece"][name][split] is None
    agreement = metrics["teacher_agreement"]
    assert set(agreement["student_cosine"]) == {"cbd", "cbd_ens"}
    assert -1 <= agreement["student_cosine"]["cbd_ens"]["all"] <= 1
    assert 0 <= agreement["pairwise_agreement"]["all"] <= 1 and len(agreement["pairwise_agreement"]["pairs"]) == 6
    assert agreement["ensemble_gain"]["best_member"]
    summary = (smoke_run / "summary.md").read_text()
    assert "## Reading" in summary and "In short" in summary and "under the same linear probe" in summary
