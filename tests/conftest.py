"""Fixtures shared by the test files, each built once per session.

* ``digits``: digits-LT (imbalance ratio 10, lt_seed 0, 10 validation images per class).
* ``teacher_run``: a run folder whose four teachers (``shared_runs.RUN``, 12 epochs) are trained.
* ``finished_run``: the same run with every method trained and evaluated, plus the weights
  each CBD student started from.
* ``smoke_run``: ``python -m cbdlib run`` (notebooks 01 -> 04 through papermill) on the smoke
  profile into the session's results folder, as ``run_name: default``; the notebooks that
  nbval then runs find it finished and resume it instead of training again.
* ``cifar10_cache``: one decoded-image cache for the tests that read the real CIFAR-10.

The runs are read-only to the tests: a test that changes a run works on ``copy_run(run, tmp_path)``.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from shared_runs import copy_run, run_settings

from cbdlib.data import load_long_tail

ROOT = Path(__file__).resolve().parent.parent
# ``precision: auto`` would time fp32 against bf16 on a CPU with bf16 instructions; the suite's numbers
# must not depend on the load of the moment, so it runs float32 (subprocesses inherit this).
# tests/test_precision.py measures, with injected and with real timings.
os.environ["CBD_PRECISION_MEASURE"] = "0"

@pytest.fixture(scope="session")
def digits():
    return load_long_tail("digits", imbalance_ratio=10, lt_seed=0, val_per_class=10)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, digits) -> Path:
    from cbdlib.engine import Experiment

    out = tmp_path_factory.mktemp("shared") / "teacher_run"
    Experiment(run_settings(), out, data=digits, quiet=True).run("teachers")
    return out


@dataclass
class FinishedRun:
    out: Path
    metrics: dict
    settings: object
    student_starts: dict  # student name -> (ModelSpec, state dict it started training from)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, teacher_run, digits) -> FinishedRun:
    """Every method of ``RUN`` (the teachers come from ``teacher_run``)."""
    from cbdlib.engine import Experiment, hooks

    out = copy_run(teacher_run, tmp_path_factory.mktemp("shared"))
    starts = {}

    def record_start(job, model):
        if job.loss == "cbd":
            starts[job.name] = (job.spec, copy.deepcopy(model.state_dict()))

    settings = run_settings()
    with hooks.on_start(record_start):
        metrics = Experiment(settings, out, data=digits, quiet=True).run("all")
    return FinishedRun(out, metrics, settings, starts)


@pytest.fixture(scope="session")
def smoke_run() -> Path:
    """``python -m cbdlib run`` with the default parameters on the smoke profile (CBD_SMOKE=1)."""
    results = Path(os.environ["CBD_RESULTS_DIR"])  # the session's own folder (see the root conftest.py)
    before = set(results.iterdir())
    env = {**os.environ, "CBD_SMOKE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "cbdlib", "run", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stderr.strip().splitlines() or [""])[-1] + "\n" + done.stderr[-3000:]
    run = results / "default"
    assert done.stdout.strip().endswith(str(run / "summary.md")), done.stdout[-2000:]
    # Everything the run wrote is inside its folder, besides its line in the results index.
    assert set(results.iterdir()) - before <= {run, results / "index.csv", results / ".index.csv.lock"}
    return run


@pytest.fixture(scope="session")
def cifar10_cache(tmp_path_factory) -> Path:
    """A decoded-image cache shared by the tests of the real CIFAR-10 (decoded once per session)."""
    if not os.environ.get("CBD_CIFAR10"):
        pytest.skip("CBD_CIFAR10 not set: point it at CIFAR-10 (e.g. the offline cifar10-jpg.tar.gz)")
    return tmp_path_factory.mktemp("cifar10-cache")
