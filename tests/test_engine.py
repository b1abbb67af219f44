"""The training engine on real digits-LT data: stages, sampling, frozen teachers, resume, checkpoints."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from shared_runs import RUN, copy_run, run_settings

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib.checkpoint import load_model
from cbdlib.config import all_method_names
from cbdlib.data.device import predict
from cbdlib.engine import Experiment, hooks
from cbdlib.metrics import validate_metrics
from cbdlib.runs import checkpoint_path


@pytest.mark.slow
def test_every_method_is_trained_evaluated_and_above_chance(finished_run):
    out, metrics = finished_run.out, finished_run.metrics
    validate_metrics(metrics)
    assert set(metrics["methods"]) == set(all_method_names(RUN["teachers"]))
    chance = 1 / 10
    for name, record in metrics["methods"].items():
        assert record["all"] > chance + 0.1, (name, record["all"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["methods"]["cbd_ens"]["all"] == metrics["methods"]["cbd_ens"]["all"]
    assert metrics["std"]["cbd_ens"]["all"] == 0.0  # one seed
    assert (out / "per_class.csv").read_text().count("\n") == 1 + 10 * len(metrics["methods"])


@pytest.mark.slow
def test_history_holds_ce_and_distillation_terms(finished_run):
    out = finished_run.out
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["model"] == "cbd_ens"]
    assert len(student) == RUN["epochs"]
    assert all(r["distill"] is not None and r["ce"] > 0 for r in student)
    assert all(r["distill"] is None for r in rows if r["model"] == "ce")


@pytest.mark.slow
def test_saved_models_reload_and_give_the_same_accuracy(finished_run, digits):
    out, metrics = finished_run.out, finished_run.metrics
    for method in ("cbd_ens", "tau_norm", "ncm", "lws"):
        model = load_model(checkpoint_path(out, 1, method))
        _, logits = predict(model, digits.test_images, digits.mean, digits.std, torch.device("cpu"))
        assert (logits.argmax(1) == digits.test_labels).mean() == pytest.approx(metrics["methods"][method]["all"])


def test_stage2_batches_are_class_balanced_and_stage1_batches_follow_the_data(tmp_path, digits):
    seen = []
    settings = run_settings(epochs=6, teachers=["vanilla:1"], methods=["teacher_vanilla_1", "cbd"])
    with hooks.on_step(lambda step, loss: seen.append((step.job.name, step.labels.tolist()))):
        Experiment(settings, tmp_path, data=digits, quiet=True).run("all")
    counts = np.array(digits.class_counts, float)

    def frequencies(name):
        c = Counter(label for n, labels in seen if n == name for label in labels)
        total = sum(c.values())
        return np.array([c[k] / total for k in range(10)]), total

    teacher_freq, n = frequencies("teacher_vanilla_1")
    assert np.abs(teacher_freq - counts / counts.sum()).max() < 0.02  # instance sampling: the data's shares
    student_freq, n = frequencies("cbd")
    sigma = np.sqrt(0.1 * 0.9 / n)
    assert np.abs(student_freq - 0.1).max() < 5 * sigma  # class-balanced: every class 1/10
    assert student_freq.min() > 2 * teacher_freq.min()


def test_teachers_stay_bit_identical_during_distillation(tmp_path, digits):
    settings = run_settings(epochs=2, teachers=["vanilla:1", "aug:1"], methods=["cbd_ens"])
    exp = Experiment(settings, tmp_path, data=digits, quiet=True)
    exp.run("teachers")
    before = {n: {k: v.clone() for k, v in exp.load_trained(n, 1).state_dict().items()} for n in exp.teacher_names()}
    used = []

    def spy(step, loss):
        used.extend(step.teachers)
        assert all(not t.training for t in step.teachers)

    with hooks.on_step(spy):
        exp.run("students")
    assert used, "the student saw no teacher"
    for teacher, name in zip(used[:2], exp.teacher_names()):
        after = teacher.state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after)  # BN statistics included
        assert all(p.grad is None for p in teacher.parameters())


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, digits):
    settings = run_settings(epochs=4, teachers=["vanilla:1"], methods=["teacher_vanilla_1"])
    Experiment(settings, tmp_path / "straight", data=digits, quiet=True).run("teachers")

    def crash_in_epoch_three(step, loss):
        if step.epoch == 2 and step.step == 2:
            raise KeyboardInterrupt  # stands for a kill mid-epoch

    with pytest.raises(KeyboardInterrupt), hooks.on_step(crash_in_epoch_three):
        Experiment(settings, tmp_path / "resumed", data=digits, quiet=True).run("teachers")
    partial = ckpt.load_checkpoint(checkpoint_path(tmp_path / "resumed", 1, "teacher_vanilla_1"))
    assert partial["meta"]["epoch"] == 1 and not partial["meta"]["complete"]
    Experiment(settings, tmp_path / "resumed", data=digits, quiet=True).run("teachers")
    a = load_model(checkpoint_path(tmp_path / "straight", 1, "teacher_vanilla_1")).state_dict()
    b = load_model(checkpoint_path(tmp_path / "resumed", 1, "teacher_vanilla_1")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_from_another_dataset_is_refused(tmp_path, teacher_run, digits):
    out = copy_run(teacher_run, tmp_path)
    path = checkpoint_path(out, 1, "teacher_vanilla_1")
    state = ckpt.load_checkpoint(path)
    state["meta"]["num_classes"] = 100
    state["meta"]["dataset"] = "cifar100"
    path.unlink()
    ckpt.save_checkpoint(path, spec=state["spec"], meta=state["meta"], model=state["model"])
    exp = Experiment(run_settings(methods=["cbd"]), out, data=digits, quiet=True)
    with pytest.raises(CBDError, match=r"trained with dataset='cifar100', but this run has dataset='digits'"):
        exp.run("students")


def test_a_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path, teacher_run):
    path = tmp_path / "teacher_vanilla_1.pt"
    path.write_bytes(checkpoint_path(teacher_run, 1, "teacher_vanilla_1").read_bytes()[:2000])  # truncated
    with pytest.raises(CBDError, match="cannot load checkpoint"):
        load_model(path)


def test_different_parameters_are_refused_unless_overwrite(tmp_path, digits):
    Experiment(run_settings(epochs=1, methods=["ce"]), tmp_path, data=digits, quiet=True).run("one_stage")
    with pytest.raises(CBDError, match="different parameters.*epochs: 1 -> 2"):
        Experiment(run_settings(epochs=2, methods=["ce"]), tmp_path, data=digits, quiet=True)
    exp = Experiment(run_settings(epochs=2, methods=["ce"], overwrite=True), tmp_path, data=digits, quiet=True)
    assert not (tmp_path / "metrics.json").exists()  # the old run's outputs are gone
    exp.run("one_stage")


def test_student_before_teachers_names_the_missing_stage(tmp_path, digits):
    exp = Experiment(run_settings(epochs=1, methods=["cbd"]), tmp_path, data=digits, quiet=True)
    with pytest.raises(CBDError, match="has not been trained.*run its stage first"):
        exp.run("students")


def test_non_finite_loss_stops_with_stage_step_and_model(tmp_path, digits):
    settings = run_settings(epochs=2, methods=["ce"], lr=1e30)
    with pytest.raises(CBDError, match=r"non-finite loss in stage one_stage, model ce \(seed 1\), epoch 1"):
        Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
