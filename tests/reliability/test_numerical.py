"""Reliability: numerical faults (docs/reliability.md, "Numerical faults").

A NaN loss in epoch two stops the run and keeps epoch one's checkpoint; a diverging run is one
line from the command.
"""
from __future__ import annotations

import logging

import pytest
import torch
from reliability_helpers import (
    TINY,
    assert_one_line_error,
    run_cli,
    tiny_settings,
    write_params,
)

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib.engine import Experiment, hooks
from cbdlib.runs import checkpoint_path


def test_a_nan_loss_in_epoch_two_stops_and_keeps_epoch_one(tmp_path, digits, caplog):
    steps_per_epoch = len(digits.train_labels) // 32
    def nan_from_epoch_two(step, loss):
        return loss * float("nan") if step.epoch >= 1 else None

    settings = tiny_settings(methods=["ce"])
    expected = r"non-finite loss in stage one_stage, model ce \(seed 1\), epoch 2"
    with pytest.raises(CBDError, match=expected) as err, hooks.on_step(nan_from_epoch_two):
        Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    step = min(50, steps_per_epoch)  # the loss is read every 50 steps and at the end of an epoch
    assert str(err.value) == (f"non-finite loss in stage one_stage, model ce (seed 1), epoch 2, by step {step}; "
                              f"the checkpoint of the previous epoch is kept")
    state = ckpt.load_checkpoint(checkpoint_path(tmp_path, 1, "ce"))
    assert state["meta"]["epoch"] == 0 and not state["meta"]["complete"]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "evaluations" / "seed_1" / "ce.json").exists()
    with caplog.at_level(logging.INFO):
        metrics = Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    assert "ce (seed 1): resuming from the checkpoint of epoch 1/3" in caplog.text
    assert 0.0 <= metrics["methods"]["ce"]["all"] <= 1.0


def test_a_diverging_run_is_one_line_from_the_command(tmp_path):
    params = write_params(tmp_path / "p.yaml", {**TINY, "methods": ["ce"]})
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(tmp_path / "run"),
                   "--stage", "baselines", "-p", "lr=1.0e+30")
    assert_one_line_error(proc, "non-finite loss in stage one_stage, model ce (seed 1), epoch 1, by step",
                          "no epoch had finished, so no checkpoint was written")
    assert not (tmp_path / "run" / "metrics.json").exists()
