"""Live progress of a long run: the plan's cost weights, the follower of history.jsonl, the
per-model lines, and the engine's plan of a real run."""
import io
import json
import os

import pytest

from cbdlib import progress
from cbdlib.config import make_params, resolve
from cbdlib.engine import Experiment
from cbdlib.pipeline.follow import RunFollower
from cbdlib.progress import FORWARD_COST, PlannedModel, read_plan, step_cost, write_plan


def test_step_costs_weigh_frozen_backbones_and_teacher_forwards():
    assert step_cost() == 1.0
    assert step_cost(train_backbone=False) == FORWARD_COST
    assert step_cost(teachers=4) == pytest.approx(1.0 + 4 * FORWARD_COST)


def _history_line(model, seed, stage, epoch, time_s=2.0):
    return json.dumps({"model": model, "seed": seed, "stage": stage, "epoch": epoch, "time_s": time_s}) + "\n"


@pytest.fixture
def planned_run(tmp_path):
    plan = [PlannedModel("teacher_vanilla_1", 1, "teachers", 4, 10, 1.0),
            PlannedModel("cbd_ens", 1, "students", 2, 10, step_cost(teachers=4))]
    write_plan(tmp_path, plan)
    return tmp_path, plan


def test_the_follower_counts_epochs_by_their_cost_and_prints_one_line_per_finished_model(planned_run):
    run_dir, plan = planned_run
    out = io.StringIO()
    follower = RunFollower(run_dir, "lines", stream=out)
    follower.poll()
    total = 4 * 10 * 1.0 + 2 * 10 * (1 + 4 * FORWARD_COST)
    assert follower.total_units() == pytest.approx(total)
    assert follower.done_units() == 0
    history = run_dir / "history.jsonl"
    with open(history, "a") as f:
        for epoch in range(1, 5):
            f.write(_history_line("teacher_vanilla_1", 1, "teachers", epoch))
        f.write(_history_line("cbd_ens", 1, "students", 1, time_s=5.0))
    follower.poll()
    assert follower.done_units() == pytest.approx(40 + 10 * (1 + 4 * FORWARD_COST))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("teacher_vanilla_1 seed 1 done: 4 epochs, 8.0 s (2.0 s/epoch); run ")
    follower.poll()  # nothing new: nothing printed again
    assert len(out.getvalue().splitlines()) == 1


def test_a_torn_last_line_waits_for_the_rest_of_it(planned_run):
    run_dir, _ = planned_run
    line = _history_line("teacher_vanilla_1", 1, "teachers", 1)
    history = run_dir / "history.jsonl"
    history.write_text(line[:20])
    follower = RunFollower(run_dir, "lines", stream=io.StringIO())
    follower.poll()
    assert follower.done_units() == 0
    with open(history, "a") as f:
        f.write(line[20:])
    follower.poll()
    assert follower.done_units() == 10


def test_a_rewritten_plan_is_read_again(planned_run):
    run_dir, plan = planned_run
    follower = RunFollower(run_dir, "lines", stream=io.StringIO())
    follower.poll()
    assert follower.total_units() == pytest.approx(4 * 10 + 2 * 10 * (1 + 4 * FORWARD_COST))
    write_plan(run_dir, plan[:1])  # a rerun that trains fewer models (overwrite, or other methods)
    stamp = (run_dir / "plan.json").stat().st_mtime_ns + 10**9
    os.utime(run_dir / "plan.json", ns=(stamp, stamp))
    follower.poll()
    assert follower.total_units() == pytest.approx(4 * 10)


def test_models_finished_before_a_resume_are_not_reported_again(planned_run):
    run_dir, _ = planned_run
    (run_dir / "history.jsonl").write_text("".join(_history_line("teacher_vanilla_1", 1, "teachers", e)
                                                   for e in range(1, 5)))
    out = io.StringIO()
    follower = RunFollower(run_dir, "lines", stream=out)
    follower.poll()
    assert follower.done_units() == 40
    assert out.getvalue() == ""
    assert follower.eta_seconds() is None  # nothing measured in this invocation yet


def test_the_bar_mode_draws_one_bar_with_the_current_model(planned_run):
    run_dir, _ = planned_run
    (run_dir / "history.jsonl").write_text(_history_line("teacher_vanilla_1", 1, "teachers", 1, 3.5))
    out = io.StringIO()
    follower = RunFollower(run_dir, "bar", stream=out)
    follower.poll()
    follower.stop()
    text = out.getvalue()
    assert "teacher_vanilla_1 seed 1 epoch 1/4 (3.5 s/epoch)" in text


def test_the_engine_writes_a_plan_of_every_model_with_its_steps(tmp_path, digits):
    settings = resolve(make_params(dict(dataset="digits", arch="resnet_tiny", epochs=3, decoupled_epochs=2,
                                        batch_size=32, seeds=[1, 2], device="cpu", smoke=False,
                                        teachers=["vanilla:1", "aug:1"])))
    Experiment(settings, tmp_path, data=digits, quiet=True)
    plan = read_plan(tmp_path)
    names = {(p.model, p.seed) for p in plan}
    for seed in (1, 2):
        for model in ("teacher_vanilla_1", "teacher_aug_1", "ce", "ce_cb", "balanced_softmax", "crt", "lws",
                      "cbd", "cbd_ens"):
            assert (model, seed) in names
    by_name = {p.model: p for p in plan if p.seed == 1}
    n = len(digits.train_labels)
    assert by_name["ce"].steps_per_epoch == n // 32
    assert by_name["cbd_ens"].cost_per_step == pytest.approx(1 + 2 * FORWARD_COST)
    assert by_name["cbd"].cost_per_step == pytest.approx(1 + FORWARD_COST)
    assert by_name["crt"].cost_per_step == pytest.approx(FORWARD_COST)
    assert by_name["crt"].epochs == 2
    assert by_name["lws"].epochs == settings.lws_epochs
    # Kang et al.'s class-aware epoch: N draws (their loop stops after int(N / batch) steps).
    assert by_name["crt"].steps_per_epoch == n // 32


def test_kernels_started_by_the_command_print_lines_not_bars(monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "parent")
    assert progress.kernel_mode() == "lines"
