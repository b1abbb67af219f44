"""Reliability: crash and resume (docs/reliability.md, "Crash and resume").

Real SIGKILLs of ``python -m cbdlib.train`` and ``python -m cbdlib run`` resume to the numbers of
an uninterrupted run; a second process on a busy run folder is refused; a history line torn by a
kill and the temp files of a killed save are dealt with.

Subprocess tests pin OMP_NUM_THREADS=1: CPU results are bit-identical between runs
only at the same thread count.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    HANG_S,
    TINY,
    cli_env,
    history_rows,
    save_toy_checkpoint,
    state_dicts_equal,
    temp_files,
    write_params,
)

from cbdlib import checkpoint as ckpt
from cbdlib import io as cio
from cbdlib.runs import checkpoint_path, read_history

# digits-LT, a tiny ResNet, one teacher: the whole pipeline (11 methods) in seconds on a CPU.
CRASH_PARAMS = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=6, decoupled_epochs=2,
                    batch_size=32, lr=0.05, warmup_epochs=1, seeds=[1], teachers=["vanilla:1"], device="cpu",
                    smoke=False, tsne_samples=50)


JOB_MARK = "CBD_RELIABILITY_JOB"


def _job_processes(mark: str) -> list[int]:
    """Processes whose environment carries ``JOB_MARK=mark``: the command and every child it started."""
    needle = f"{JOB_MARK}={mark}".encode()
    found = []
    if not Path("/proc/self/environ").exists():  # not Linux: the process group kill must do
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _kill_job(mark: str) -> None:
    """SIGKILL every process of the job at once, as a preemption or the machine going down would.

    Killing the process group is not enough for ``cbdlib run``: jupyter_client starts the
    kernel in a session of its own, and it trains on (~1 s measured) after its parent dies.
    """
    for _ in range(50):
        pids = _job_processes(mark)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"processes of job {mark} survive SIGKILL: {_job_processes(mark)}")


def _kill_when(cmd: list[str], cwd: Path, env: dict, log: Path, ready, timeout: float = HANG_S) -> str:
    """Start ``cmd``, SIGKILL it and all its children as soon as ``ready()`` holds; returns its output."""
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, JOB_MARK: mark}, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no kill point within {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _kill_job(mark)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def _compare_runs(straight: Path, resumed: Path) -> None:
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert set(a["methods"]) == set(b["methods"]) and len(a["methods"]) >= 11
    for name in a["methods"]:
        assert a["methods"][name] == b["methods"][name], name  # exact: same floats, per class too
    names = sorted(p.name for p in (straight / "checkpoints" / "seed_1").glob("*.pt") if ".prev" not in p.name)
    assert "cbd_ens.pt" in names and "teacher_vanilla_1.pt" in names
    for name in names:
        x = ckpt.load_checkpoint(straight / "checkpoints" / "seed_1" / name)
        y = ckpt.load_checkpoint(resumed / "checkpoints" / "seed_1" / name)
        assert y["meta"]["complete"], name
        assert state_dicts_equal(x["model"], y["model"]), f"{name}: weights differ after kill and resume"
    assert temp_files(resumed / "checkpoints") == []  # temps of a writer killed mid-save are cleared


def _train_command(params: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cbdlib.train", "--params", str(params), "--out", str(out), "--stage", "all"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run both kill tests compare against."""
    tmp = tmp_path_factory.mktemp("straight")
    params = write_params(tmp / "crash.yaml", CRASH_PARAMS)
    proc = subprocess.run(_train_command(params, tmp / "run"), cwd=tmp, env=cli_env(tmp), capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_same_results(tmp_path, straight_run):
    """``python -m cbdlib.train ... --stage all``: SIGKILL mid-teacher, then mid-student, rerun; same numbers."""
    params = write_params(tmp_path / "crash.yaml", CRASH_PARAMS)
    env = cli_env(tmp_path)
    out = tmp_path / "killed"
    command = _train_command(params, out)
    teacher_ckpt = checkpoint_path(out, 1, "teacher_vanilla_1")
    # Kill 1: the teacher has a checkpoint (epoch 1 of 6 done) and is still training.
    _kill_when(command, tmp_path, env, tmp_path / "kill1.log",
               lambda: teacher_ckpt.exists() and any(r["model"] == "teacher_vanilla_1" for r in history_rows(out)))
    partial = ckpt.load_checkpoint(teacher_ckpt, fallback=True)
    assert not partial["meta"]["complete"], "the kill came too late to interrupt the teacher"
    # Kill 2: the rerun resumes the teacher, finishes stage 1 and the baselines, and dies inside stage 2.
    second = _kill_when(command, tmp_path, env, tmp_path / "kill2.log",
                        lambda: any(r["model"] == "cbd" for r in history_rows(out)))
    assert "teacher_vanilla_1 (seed 1): resuming from the checkpoint of epoch" in second, second[-3000:]
    # The third run finishes; it resumes the student and only loads the finished teacher.
    final = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    (tmp_path / "final.log").write_text(final.stderr)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming" in final.stderr, final.stderr[-3000:]
    assert "teacher_vanilla_1 (seed 1): already trained" in final.stderr
    _compare_runs(straight_run, out)
    # Every (model, epoch) is in the history; a line torn by the kill is skipped by the reader.
    epochs = {(r["model"], r["epoch"]) for r in read_history(out)}
    assert ("cbd_ens", CRASH_PARAMS["epochs"]) in epochs and ("teacher_vanilla_1", 1) in epochs


@pytest.mark.slow
def test_sigkilled_pipeline_resumes_to_the_same_results(tmp_path, straight_run):
    """``python -m cbdlib run``: SIGKILL (process group) while notebook 02 trains the teacher, rerun.

    The notebooks run the same stages as ``cbdlib.train``, so the numbers must equal the straight run's.
    """
    params = write_params(tmp_path / "crash.yaml", {**CRASH_PARAMS, "run_name": "crash"})
    env = cli_env(tmp_path)
    command = [sys.executable, "-m", "cbdlib", "run", "--params", str(params), "--no-progress"]
    out = tmp_path / "results" / "crash"
    _kill_when(command, tmp_path, env, tmp_path / "kill.log",
               lambda: any(r["model"] == "teacher_vanilla_1" for r in history_rows(out)))
    partial = ckpt.load_checkpoint(checkpoint_path(out, 1, "teacher_vanilla_1"), fallback=True)
    assert not partial["meta"]["complete"], "the kill came too late to interrupt the teacher"
    final = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert final.returncode == 0, final.stderr[-3000:]
    notebook = json.loads((out / "02_teacher_training.ipynb").read_text())
    shown = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "teacher_vanilla_1 (seed 1): resuming from the checkpoint of epoch" in shown, shown[-3000:]
    _compare_runs(straight_run, out)


@pytest.mark.slow
def test_a_second_process_on_a_busy_run_folder_is_refused(tmp_path):
    params = write_params(tmp_path / "p.yaml", {**TINY, "epochs": 200, "methods": ["teacher_vanilla_1"]})
    out = tmp_path / "run"
    env = cli_env(tmp_path)
    command = _train_command(params, out)
    marks = [f"{os.getpid()}-busy-{i}-{time.monotonic_ns()}" for i in range(2)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []
    try:
        with open(logs[0], "w") as handle:
            procs.append(subprocess.Popen(command, cwd=tmp_path, env={**env, JOB_MARK: marks[0]}, stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + HANG_S
        while not checkpoint_path(out, 1, "teacher_vanilla_1").exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-2000:]
            time.sleep(0.02)
        with open(logs[1], "w") as handle:
            procs.append(subprocess.Popen(command, cwd=tmp_path, env={**env, JOB_MARK: marks[1]}, stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        # The second must stop at once; training (or resuming) beside the first is the fault.
        deadline = time.monotonic() + HANG_S
        while procs[1].poll() is None and "epoch" not in logs[1].read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert procs[0].poll() is None, "the first run ended: the test proved nothing"
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[1].wait(timeout=2)
        second = logs[1].read_text()
        assert procs[1].poll() == 2, f"the second run is training beside the first:\n{second[-2000:]}"
        assert "error:" in second and "in use" in second, second[-2000:]
    finally:
        for mark in marks:
            _kill_job(mark)
        for proc in procs:
            proc.wait()


def test_a_line_torn_by_a_kill_does_not_swallow_the_next_one(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text('{"model": "ce", "seed": 1, "epoch": 1}\n{"model": "ce", "ep')  # killed mid-append
    cio.append_line(history, json.dumps({"model": "ce", "seed": 1, "epoch": 2}))
    assert [r["epoch"] for r in read_history(tmp_path)] == [1, 2]


def test_temp_files_of_a_killed_save_are_cleared(two_checkpoints):
    stale = two_checkpoints.parent / f".{two_checkpoints.name}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = two_checkpoints.parent / ".other.pt.abc.tmp"
    other.write_bytes(b"another writer's")
    save_toy_checkpoint(two_checkpoints, 2)
    assert not stale.exists() and other.exists()
