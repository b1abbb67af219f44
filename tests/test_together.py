"""Models trained together (grouped convolutions) match the same models trained one at a time."""
import dataclasses
import json

import pytest
import torch

from cbdlib.data.device import DeviceData
from cbdlib.engine import Job, hooks, loop
from cbdlib.engine.together import can_train_together, fit_together
from cbdlib.models import ModelSpec
from cbdlib.models.grouped import GroupedCifarResNet, TeacherFeatures
from cbdlib.models.resnet_cifar import CifarResNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(digits):
    return DeviceData.from_long_tail(digits, CPU)


def _jobs(epochs=2):
    # A gentle lr: at 0.05 a perturbation of 1e-7 in the weights alone grows to 0.5% in one epoch
    # (cosine heads amplify float noise), which would hide a real difference.
    common = dict(train_seed=1, epochs=epochs, batch_size=32, lr=0.01, warmup_epochs=1)
    cosine = ModelSpec("resnet_tiny", 10, "cosine")
    linear = ModelSpec("resnet_tiny", 10, "linear")
    return [Job(name="teacher_vanilla_1", spec=cosine, augment="vanilla", **common),
            Job(name="teacher_aug_1", spec=cosine, augment="aug", **common),
            Job(name="ce_cb", spec=linear, sampling="class_balanced", **common),
            Job(name="balanced_softmax", spec=linear, loss="balanced_softmax", **common)]


def _history(path):
    return {(r["model"], r["epoch"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_grouped_forward_equals_separate_forwards():
    torch.manual_seed(0)
    nets = [CifarResNet(1, (8, 16, 32)) for _ in range(3)]
    grouped = GroupedCifarResNet.from_models(nets)
    xs = [torch.randn(4, 3, 12, 12) for _ in nets]
    out = grouped(torch.cat(xs, 1))
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[:, k], net(xs[k]), atol=1e-5, rtol=1e-5)
        for key, value in grouped.unpack(k).items():  # train-mode BN statistics, per model
            torch.testing.assert_close(value, net.state_dict()[key])


def test_training_together_matches_training_alone_in_every_weight_and_buffer(tmp_path, data):
    # One epoch: after more, the aug recipe amplifies float noise (grouped and separate convolutions
    # sum in other orders) beyond what a tight tolerance allows.
    jobs = _jobs(epochs=1)
    assert can_train_together(jobs)
    meta = {"dataset": "digits"}
    alone = []
    for job in jobs:
        model = loop.init_model(job.spec, job.seed)
        loop.fit(job, model, data, device=CPU, checkpoint_path=tmp_path / "alone" / f"{job.name}.pt",
                 history_path=tmp_path / "alone.jsonl", meta=meta, stage="teachers", quiet=True)
        alone.append(model)
    models = [loop.init_model(j.spec, j.seed) for j in jobs]
    paths = [tmp_path / "together" / f"{j.name}.pt" for j in jobs]
    fit_together(jobs, models, data, device=CPU, checkpoint_paths=paths,
                 history_path=tmp_path / "together.jsonl", metas=[meta] * 4, stage="teachers", quiet=True)
    a, b = _history(tmp_path / "alone.jsonl"), _history(tmp_path / "together.jsonl")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key]["loss"] == pytest.approx(a[key]["loss"], rel=1e-4, abs=1e-5), key
        assert b[key]["steps"] == a[key]["steps"] == len(data.train_labels) // 32, key
    for job, m_alone, m_together in zip(jobs, alone, models):
        start = loop.init_model(job.spec, job.seed).state_dict()
        sa, st = m_alone.state_dict(), m_together.state_dict()
        assert sa.keys() == st.keys()
        for key in sa:  # every parameter and buffer, BatchNorm statistics and counters included
            torch.testing.assert_close(st[key], sa[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{job.name} {key}: {m}")
            if sa[key].is_floating_point() and not key.endswith("scale"):
                # it trained: the comparison means something
                assert not torch.equal(sa[key], start[key]), (job.name, key)


def test_distilling_students_are_not_grouped():
    """The grouped step runs no teachers: a CBD student trains alone (``loop.fit``)."""
    jobs = _jobs()[:2]
    assert can_train_together(jobs)
    student = dataclasses.replace(jobs[1], name="cbd", loss="cbd", teachers=["teacher_vanilla_1"])
    assert not can_train_together([jobs[0], student])


def test_resume_together_equals_uninterrupted(tmp_path, data):
    jobs = _jobs()[:2]
    meta = {"dataset": "digits"}

    def run(folder, **kw):
        models = [loop.init_model(j.spec, j.seed) for j in jobs]
        fit_together(jobs, models, data, device=CPU, checkpoint_paths=[folder / f"{j.name}.pt" for j in jobs],
                     history_path=None, metas=[meta] * 2, stage="teachers", quiet=True)
        return models

    straight = run(tmp_path / "a")

    def crash_in_epoch_two(step, loss):  # the first epoch's checkpoints remain
        if step.epoch == 1 and step.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), hooks.on_step(crash_in_epoch_two):
        run(tmp_path / "b")
    resumed = run(tmp_path / "b")
    for m1, m2 in zip(straight, resumed):
        for key, value in m1.state_dict().items():
            torch.testing.assert_close(m2.state_dict()[key], value, atol=1e-6, rtol=1e-6)


def test_teacher_features_in_one_grouped_forward():
    torch.manual_seed(1)
    teachers = [loop.init_model(ModelSpec("resnet_tiny", 10, "cosine"), s).eval() for s in range(3)]
    batched = TeacherFeatures(teachers)
    assert batched.grouped is not None
    x = torch.randn(5, 3, 8, 8)
    for got, teacher in zip(batched(x), teachers):
        torch.testing.assert_close(got, teacher(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_experiment_trains_stage_one_together_with_the_same_results(tmp_path, precision):
    """The stage integration: per-model checkpoints, evaluations and history as when trained alone,
    in either precision (bf16 is what ``auto`` picks on a CPU with AMX, as CI's may have)."""
    from cbdlib.config import make_params, resolve
    from cbdlib.engine import Experiment

    settings = resolve(make_params(dict(dataset="digits", arch="resnet_tiny", epochs=1, batch_size=32, lr=0.01,
                                        precision=precision,
                                        teachers=["vanilla:1", "aug:1"], seeds=[1, 2], device="cpu", smoke=False,
                                        methods=["teacher_vanilla_1", "teacher_aug_1", "teacher_ensemble", "ce"])))
    results = {}
    for mode in (False, True):
        exp = Experiment(settings, tmp_path / str(mode), quiet=True)
        exp.together = mode
        results[mode] = exp.run("all")
        rows = [json.loads(line) for line in (tmp_path / str(mode) / "history.jsonl").read_text().splitlines()]
        assert all(("trained_with" in r) == mode for r in rows)
    alone, together = results[False]["methods"], results[True]["methods"]
    assert alone.keys() == together.keys() == {"teacher_vanilla_1", "teacher_aug_1", "teacher_ensemble", "ce"}
    for name in alone:
        assert together[name]["seeds"] == [1, 2]
        assert abs(together[name]["all"] - alone[name]["all"]) <= 0.03, name  # float noise only


def test_a_group_stopped_at_mixed_epochs_resumes_each_model_from_its_own_checkpoint(tmp_path, data):
    """A damaged newest checkpoint sends one model back to its .prev.pt (an epoch behind the others,
    as a kill between the models' checkpoint writes would): it finishes alone, the others together,
    and every model ends where an uninterrupted group does."""
    jobs = _jobs(epochs=3)[:3]
    meta = {"dataset": "digits"}

    def run(folder):
        models = [loop.init_model(j.spec, j.seed) for j in jobs]
        fit_together(jobs, models, data, device=CPU, checkpoint_paths=[folder / f"{j.name}.pt" for j in jobs],
                     history_path=folder / "history.jsonl", metas=[meta] * 3, stage="teachers", quiet=True)
        return models

    straight = run(tmp_path / "a")

    def crash_in_epoch_three(step, loss):  # the checkpoints of epoch 2 remain, and epoch 1's as .prev.pt
        if step.epoch == 2 and step.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), hooks.on_step(crash_in_epoch_three):
        run(tmp_path / "b")
    (tmp_path / "b" / f"{jobs[0].name}.pt").write_bytes(b"damaged")
    seen, started = [], []
    with hooks.on_step(lambda step, loss: seen.append((step.job.name, step.epoch))), \
            hooks.on_start(lambda job, model: started.append(job.name)):
        resumed = run(tmp_path / "b")
    # the first model replays epochs 2 and 3, the others only epoch 3; each model starts once
    assert {e for name, e in seen if name == jobs[0].name} == {1, 2}
    assert sorted(started) == sorted(j.name for j in jobs)
    assert {e for name, e in seen if name != jobs[0].name} == {2}
    for job, m1, m2 in zip(jobs, straight, resumed):
        for key, value in m1.state_dict().items():
            torch.testing.assert_close(m2.state_dict()[key], value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{job.name} {key}: {m}")
    history = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    # each epoch once (the replayed epoch 2 keeps its first line); epoch 3 of the first model trained alone
    assert sorted((r["model"], r["epoch"], r.get("trained_with")) for r in history) == sorted(
        [(j.name, e, 3) for j in jobs for e in (1, 2)] + [(jobs[0].name, 3, None)]
        + [(j.name, 3, 2) for j in jobs[1:]])
