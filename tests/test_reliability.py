"""Reliability and safety: real kills, failed writes, damaged and hostile checkpoints,
numerical faults and bad input. docs/reliability.md lists each fault, the test that
injects it and the message seen.

Subprocess tests pin OMP_NUM_THREADS=1: CPU results are bit-identical between runs
only at the same thread count.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cbdlib
from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib import io as cio
from cbdlib.config import make_params, resolve
from cbdlib.data import load_long_tail
from cbdlib.engine import Experiment, hooks, load_model
from cbdlib.runs import checkpoint_path, read_history
from conftest import copy_run, run_settings

ROOT = Path(cbdlib.__file__).resolve().parent.parent
# Subprocesses and waits are bounded only to stop a hung process, never to require speed: a busy
# 2-core machine may be many times slower than a quiet one.
HANG_S = 900

# digits-LT, a tiny ResNet, one teacher: the whole pipeline (11 methods) in seconds on a CPU.
CRASH_PARAMS = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=6, decoupled_epochs=2,
                    batch_size=32, lr=0.05, warmup_epochs=1, seeds=[1], teachers=["vanilla:1"], device="cpu",
                    smoke=False, tsne_samples=50)
TINY = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=3, decoupled_epochs=1, batch_size=32,
            lr=0.05, warmup_epochs=1, teachers=["vanilla:1"], seeds=[1], device="cpu", smoke=False, tsne_samples=50)


def tiny_settings(**changes):
    return resolve(make_params({**TINY, **changes}))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as the subprocesses get: on a loaded 2-core machine two spinning threads run 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CBD_SMOKE", raising=False)


def cli_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("CBD_SMOKE", None)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", CBD_CACHE_DIR=str(tmp_path / "cache"),
               CBD_RESULTS_DIR=str(tmp_path / "results"), PYTHONUNBUFFERED="1")
    return env


def run_cli(tmp_path: Path, *args, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, an ``error:`` line as the last line of stderr, no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def write_params(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tmp"))


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# =========================================================================== 1. a real kill


def _history_rows(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # torn by a kill
    return rows


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
               lambda: teacher_ckpt.exists() and any(r["model"] == "teacher_vanilla_1" for r in _history_rows(out)))
    partial = ckpt.load_checkpoint(teacher_ckpt, fallback=True)
    assert not partial["meta"]["complete"], "the kill came too late to interrupt the teacher"
    # Kill 2: the rerun resumes the teacher, finishes stage 1 and the baselines, and dies inside stage 2.
    second = _kill_when(command, tmp_path, env, tmp_path / "kill2.log",
                        lambda: any(r["model"] == "cbd" for r in _history_rows(out)))
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
               lambda: any(r["model"] == "teacher_vanilla_1" for r in _history_rows(out)))
    partial = ckpt.load_checkpoint(checkpoint_path(out, 1, "teacher_vanilla_1"), fallback=True)
    assert not partial["meta"]["complete"], "the kill came too late to interrupt the teacher"
    final = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert final.returncode == 0, final.stderr[-3000:]
    notebook = json.loads((out / "02_teacher_training.ipynb").read_text())
    shown = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "teacher_vanilla_1 (seed 1): resuming from the checkpoint of epoch" in shown, shown[-3000:]
    _compare_runs(straight_run, out)


# =========================================================================== 2. atomic writes


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDiskFile:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, _data):
        _disk_full()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
        return False


@pytest.fixture(params=["fsync", "write"])
def disk_full(request, monkeypatch):
    """Make every atomic write fail with ENOSPC: at fsync, or at the write itself."""
    if request.param == "fsync":
        monkeypatch.setattr(os, "fsync", _disk_full)
    else:
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDiskFile(real_fdopen(*a, **k)))
    return request.param


@pytest.mark.parametrize("writer", ["write_text", "write_json", "write_bytes"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, disk_full, writer):
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    target.write_text('{"old": true}\n')
    new = {"write_text": "new", "write_json": {"new": 1}, "write_bytes": b"new"}[writer]
    with pytest.raises(CBDError, match="No space left on device") as err:
        getattr(cio, writer)(target, new)
    assert str(err.value) == f"could not write {target}: No space left on device"
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_failed_append_is_one_clear_error(tmp_path, monkeypatch):
    history = tmp_path / "history.jsonl"
    history.write_text('{"epoch": 1}\n')
    real_open = open

    def full_open(path, mode="r", *a, **k):
        handle = real_open(path, mode, *a, **k)
        return _FullDiskFile(handle) if "a" in mode else handle

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(CBDError, match=r"^could not append to .*history.jsonl: No space left on device$"):
        cio.append_line(history, '{"epoch": 2}')
    monkeypatch.undo()
    assert history.read_text() == '{"epoch": 1}\n'


def test_a_line_torn_by_a_kill_does_not_swallow_the_next_one(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text('{"model": "ce", "epoch": 1}\n{"model": "ce", "ep')  # killed mid-append
    cio.append_line(history, json.dumps({"model": "ce", "epoch": 2}))
    assert [r["epoch"] for r in read_history(tmp_path)] == [1, 2]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    fresh = tmp_path / "fresh.json"
    cio.write_json(fresh, {"a": 1})
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    cio.write_text(kept, "y")
    assert kept.stat().st_mode & 0o777 == 0o640


# --- checkpoints ---------------------------------------------------------------------------


def _save(path: Path, epoch: int, value: float = 0.0) -> dict:
    model = {"weight": torch.full((4, 3), value + epoch), "bias": torch.arange(4.0)}
    ckpt.save_checkpoint(path, spec={"arch": "toy"}, meta={"epoch": epoch, "complete": False}, model=model,
                         optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]})
    return model


@pytest.fixture
def two_checkpoints(tmp_path):
    """``toy.pt`` (epoch 1) and its ``toy.prev.pt`` (epoch 0), both good."""
    path = tmp_path / "ckpt" / "toy.pt"
    _save(path, 0)
    _save(path, 1)
    assert ckpt.previous_path(path).exists()
    return path


def _member_data_offset(path: Path, member: str) -> tuple[int, int]:
    """(offset, size) of a stored zip member's bytes inside the file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip_tensor_bytes(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        member = next(n for n in archive.namelist() if "/data/" in n and archive.getinfo(n).file_size >= 16)
    offset, _ = _member_data_offset(path, member)
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resave_altered(path: Path) -> None:
    """Change one weight and save again with plain torch.save, keeping the old checksum."""
    content = torch.load(path, weights_only=True)
    content["model"]["weight"][0, 0] += 1.0
    torch.save(content, path)


CHECKSUM_FAILS = r"checkpoint .*toy.pt fails its checksum \(altered or damaged\)"
DAMAGE = {
    "truncated": (_truncate, r"cannot load checkpoint .*toy.pt: PytorchStreamReader failed reading zip archive: "
                             r"failed finding central directory \(the file is truncated or is not a torch "
                             r"checkpoint\)$"),
    "emptied": (lambda p: p.write_bytes(b""), r"cannot load checkpoint .*toy.pt: the file is empty$"),
    "replaced by text": (lambda p: p.write_text("hello"), r"cannot load checkpoint .*toy.pt: not a readable torch "
                                                          r"checkpoint \(.*\)$"),
    "flipped bytes in tensor data": (_flip_tensor_bytes, CHECKSUM_FAILS),
    "weight altered, re-saved": (_resave_altered, CHECKSUM_FAILS),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_and_fallback_gives_the_previous(two_checkpoints, damage, caplog):
    path = two_checkpoints
    corrupt, message = DAMAGE[damage]
    corrupt(path)
    with pytest.raises(CBDError, match=message) as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="cbdlib.checkpoint"):
        state = ckpt.load_checkpoint(path, fallback=True)
    assert state["meta"]["epoch"] == 0 and torch.equal(state["model"]["weight"], torch.zeros(4, 3))
    assert "falling back to the previous checkpoint toy.prev.pt" in caplog.text


def test_both_checkpoints_damaged_names_both(two_checkpoints):
    _truncate(two_checkpoints)
    _resave_altered(ckpt.previous_path(two_checkpoints))
    with pytest.raises(CBDError, match=r"PytorchStreamReader.*; the previous checkpoint is unusable too: .*"
                                       r"toy.prev.pt fails its checksum"):
        ckpt.load_checkpoint(two_checkpoints, fallback=True)


def test_a_damaged_newest_is_not_rotated_over_the_good_previous(two_checkpoints):
    _flip_tensor_bytes(two_checkpoints)
    _save(two_checkpoints, 2)
    assert ckpt.load_checkpoint(two_checkpoints)["meta"]["epoch"] == 2
    assert ckpt.load_checkpoint(ckpt.previous_path(two_checkpoints))["meta"]["epoch"] == 0  # still the good one


def test_a_failed_checkpoint_save_keeps_both_files(two_checkpoints, disk_full):
    path, prev = two_checkpoints, ckpt.previous_path(two_checkpoints)
    before = path.read_bytes(), prev.read_bytes()
    with pytest.raises(CBDError, match=r"^could not write .*toy.pt: No space left on device$"):
        _save(path, 2)
    assert (path.read_bytes(), prev.read_bytes()) == before
    assert temp_files(path.parent) == []


def test_temp_files_of_a_killed_save_are_cleared(two_checkpoints):
    stale = two_checkpoints.parent / f".{two_checkpoints.name}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = two_checkpoints.parent / ".other.pt.abc.tmp"
    other.write_bytes(b"another writer's")
    _save(two_checkpoints, 2)
    assert not stale.exists() and other.exists()


def _crash_after(steps: int):
    """A step hook that raises KeyboardInterrupt (a kill) at the given training step of the process."""
    calls = {"n": 0}

    def crashing(step, loss):
        calls["n"] += 1
        if calls["n"] == steps:
            raise KeyboardInterrupt

    return hooks.on_step(crashing)


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, digits,
                                                                                  caplog):
    settings = tiny_settings(methods=["ce"])
    Experiment(settings, tmp_path / "straight", data=digits, quiet=True).run("one_stage")
    steps_per_epoch = len(digits.train_labels) // 32
    with pytest.raises(KeyboardInterrupt), _crash_after(2 * steps_per_epoch + 1):  # killed in the third epoch
        Experiment(settings, tmp_path / "damaged", data=digits, quiet=True).run("one_stage")
    path = checkpoint_path(tmp_path / "damaged", 1, "ce")
    assert ckpt.load_checkpoint(path)["meta"]["epoch"] == 1
    _flip_tensor_bytes(path)
    with caplog.at_level(logging.INFO):
        Experiment(settings, tmp_path / "damaged", data=digits, quiet=True).run("one_stage")
    assert "fails its checksum (altered or damaged); falling back to the previous checkpoint ce.prev.pt" in caplog.text
    assert "ce (seed 1): resuming from the checkpoint of epoch 1/3" in caplog.text
    # Epoch 2 was trained again from .prev.pt; its history line is kept once.
    assert [r["epoch"] for r in _history_rows(tmp_path / "damaged")] == [1, 2, 3]
    a = load_model(checkpoint_path(tmp_path / "straight", 1, "ce")).state_dict()
    b = load_model(path).state_dict()
    assert state_dicts_equal(a, b)


def test_disk_full_during_training_stops_cleanly_and_the_rerun_resumes(tmp_path, digits, monkeypatch):
    settings = tiny_settings(methods=["ce"])
    Experiment(settings, tmp_path / "straight", data=digits, quiet=True).run("one_stage")
    full = {"on": False}
    real_fsync = os.fsync

    def fsync(fd):
        if full["on"]:
            _disk_full()
        return real_fsync(fd)

    def step(step, loss):
        full["on"] = step.epoch >= 1  # the disk fills up during epoch 2

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "full"
    with pytest.raises(CBDError, match="No space left on device") as err, hooks.on_step(step):
        Experiment(settings, out, data=digits, quiet=True).run("one_stage")
    assert str(err.value) == f"could not write {checkpoint_path(out, 1, 'ce')}: No space left on device"
    monkeypatch.undo()
    assert ckpt.load_checkpoint(checkpoint_path(out, 1, "ce"))["meta"]["epoch"] == 0  # epoch 1 kept
    assert temp_files(out) == []
    assert not (out / "metrics.json").exists()
    Experiment(settings, out, data=digits, quiet=True).run("one_stage")
    a = load_model(checkpoint_path(tmp_path / "straight", 1, "ce")).state_dict()
    assert state_dicts_equal(a, load_model(checkpoint_path(out, 1, "ce")).state_dict())


# =========================================================================== 3. safe loading


class _Hostile:
    """Unpickling this calls ``open(target, "w")``: a file appears if pickled code runs."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class _HostileTouch(_Hostile):
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _hostile_checkpoint(path: Path, target: Path, how: str) -> Path:
    content = {"format": ckpt.FORMAT, "spec": {"arch": "resnet_tiny"}, "meta": _Hostile(target),
               "model": {"w": torch.zeros(2)}, "optimizer": None, "sha256": "0" * 64}
    if how == "torch.save":
        torch.save(content, path)
    elif how == "torch.save, Path.touch":
        content["meta"] = _HostileTouch(target)
        torch.save(content, path)
    else:  # a raw pickle, the pre-zip torch format
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return path


HOSTILE_KINDS = ["torch.save", "torch.save, Path.touch", "pickle protocol 2"]


@pytest.mark.parametrize("how", HOSTILE_KINDS)
def test_a_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, how):
    # The file really is hostile: an unsafe load creates its target.
    probe = tmp_path / "probe-created"
    probe_file = _hostile_checkpoint(tmp_path / "probe.pt", probe, how)
    if how.startswith("pickle"):
        pickle.loads(probe_file.read_bytes())
    else:
        torch.load(probe_file, weights_only=False)
    assert probe.exists()

    target = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path / "evil.pt", target, how)
    for fallback in (False, True):
        with pytest.raises(CBDError, match=r"cannot load checkpoint .*evil.pt: refused to unpickle it: it would "
                                           r"import [\w.]+ when unpickled") as err:
            ckpt.load_checkpoint(path, fallback=fallback)
        assert "\n" not in str(err.value)
    with pytest.raises(CBDError, match="refused to unpickle"):
        load_model(path)
    assert not target.exists()


def test_evaluate_refuses_a_hostile_checkpoint(tmp_path):
    target = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path / "evil.pt", target, "torch.save")
    proc = run_cli(tmp_path, "-m", "cbdlib", "evaluate", "--checkpoint", str(path), "--device", "cpu")
    assert_one_line_error(proc, f"cannot load checkpoint {path}: refused to unpickle it: it would import")
    assert not target.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_every_load_in_the_package_is_safe():
    """torch.load only with weights_only=True; no pickle.load(s); no np.load(allow_pickle=True)."""
    problems, torch_loads = [], 0
    for source in sorted((ROOT / "cbdlib").rglob("*.py")):
        tree = ast.parse(source.read_text(), filename=str(source))
        where = source.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "torch.serialization"):
                if any(alias.name in ("load", "loads") for alias in node.names):
                    problems.append(f"{where}:{node.lineno}: from {node.module} import load hides the call")
        for node, name in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "serialization.load"):
                torch_loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno}: {name} without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load"):
                problems.append(f"{where}:{node.lineno}: {name} runs pickled code")
            elif name in ("np.load", "numpy.load"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}:{node.lineno}: {name} with allow_pickle")
    assert torch_loads >= 1  # the scan does see cbdlib.checkpoint's load
    assert problems == []


# =========================================================================== 4. numerical faults


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


# =========================================================================== 5. bad input


def _image_tree(root: Path, per_class: int = 12, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 3)):
        for label, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    return root


FOLDER_RUN = dict(TINY, dataset="folder", imbalance_ratio=2, val_per_class=1, image_size=8, methods=["ce"])


def test_a_corrupt_jpeg_stops_the_command_before_any_result(tmp_path):
    tree = _image_tree(tmp_path / "bad")
    broken = tree / "train" / "bee" / "broken.jpg"
    broken.write_bytes(os.urandom(300))
    params = write_params(tmp_path / "p.yaml", {**FOLDER_RUN, "data": str(tree)})
    out = tmp_path / "run"
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(out))
    assert_one_line_error(proc, f"cannot read image {broken}")
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()
    assert temp_files(tmp_path) == []


def test_after_a_failed_start_the_corrected_run_is_accepted(tmp_path):
    bad = _image_tree(tmp_path / "bad")
    (bad / "train" / "bee" / "broken.jpg").write_bytes(os.urandom(300))
    good = _image_tree(tmp_path / "good")
    out = tmp_path / "run"
    with pytest.raises(CBDError, match="cannot read image"):
        Experiment(resolve(make_params({**FOLDER_RUN, "data": str(bad)})), out, quiet=True)
    Experiment(resolve(make_params({**FOLDER_RUN, "data": str(good)})), out, quiet=True)


def test_a_label_far_out_of_range_in_a_train_split_file_is_named_briefly(tmp_path):
    root = tmp_path / "lt"
    lines = []
    for label in (0, 1):
        for i in range(6):
            rel = f"img/{label}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (label * 90, i * 20, 0)).save(root / rel)
            lines.append(f"{rel} {label}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 9999"  # a typo: one label far beyond the others
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match=r"train\.txt.*line 4") as err:
        load_long_tail("splitfile", str(root), imbalance_ratio=1, val_per_class=1, image_size=8)
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message[:400]
    assert "train.txt" in message and "line 4" in message


def test_split_file_and_cifar_images_of_other_modes_are_converted(tmp_path):
    """Grayscale, RGBA and odd sizes in a split file become RGB at image_size; a 32x32 grayscale
    CIFAR image becomes RGB (CIFAR refuses only other sizes: tests/test_sources.py)."""
    from cbdlib.data.sources import load_source

    root = tmp_path / "lt"
    (root / "img").mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(root / "img" / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(root / "img" / "rgba.png")
    Image.new("RGB", (13, 5), (190, 20, 20)).save(root / "img" / "odd.png")
    Image.new("P", (8, 8), 3).save(root / "img" / "palette.png")
    (root / "train.txt").write_text("img/gray.png 0\nimg/rgba.png 1\nimg/odd.png 1\n")
    (root / "test.txt").write_text("img/palette.png 0\nimg/odd.png 1\n")  # the test split names both classes
    train, test = load_source("splitfile", root, image_size=6)
    assert train.images.shape == (3, 6, 6, 3) and test.images.shape == (2, 6, 6, 3)
    assert np.all(train.images[0] == 77) and np.all(train.images[1] == [10, 20, 30])
    assert np.all(train.images[2] == [190, 20, 20])

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in ("train", "test"):
        for i, name in enumerate(names):
            (tmp_path / "c" / split / name).mkdir(parents=True)
            Image.new("L" if name == "cat" else "RGB", (32, 32), 100 if name == "cat" else (i, i, i)).save(
                tmp_path / "c" / split / name / "0.png")
    train, _ = load_source("cifar10", tmp_path / "c")
    assert train.images.shape == (10, 32, 32, 3) and np.all(train.images[names.index("cat")] == 100)


def test_a_teacher_with_another_class_count_is_refused(tmp_path, teacher_run, digits):
    out = copy_run(teacher_run, tmp_path)
    path = checkpoint_path(out, 1, "teacher_vanilla_1")
    state = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, spec=state["spec"], meta={**state["meta"], "num_classes": 12}, model=state["model"])
    exp = Experiment(run_settings(methods=["cbd"]), out, data=digits, quiet=True)
    with pytest.raises(CBDError, match=r"^checkpoint teacher_vanilla_1.pt was trained with num_classes=12, "
                                       r"but this run has num_classes=10$"):
        exp.run("students")


def test_weights_of_another_shape_are_one_clear_error(tmp_path, digits):
    settings = tiny_settings(epochs=1, methods=["ce"])
    Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    path = checkpoint_path(tmp_path, 1, "ce")
    state = ckpt.load_checkpoint(path)
    weights = dict(state["model"])
    key = next(k for k in weights if k.startswith("classifier") and k.endswith("weight"))
    weights[key] = torch.zeros(12, weights[key].shape[1])  # a 12-class head under a 10-class spec
    ckpt.save_checkpoint(path, spec=state["spec"], meta=state["meta"], model=weights)
    with pytest.raises(CBDError, match=rf"does not match the model: size mismatch for {key}") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_a_parameter_of_the_wrong_type_is_one_line(tmp_path):
    params = write_params(tmp_path / "p.yaml", TINY)
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(tmp_path / "run"),
                   "-p", "epochs=ten")
    assert_one_line_error(proc, "parameter 'epochs' must be an integer, got 'ten' (str)")
    assert not (tmp_path / "run").exists()


def test_an_exponent_without_a_dot_is_a_float():
    from cbdlib.config import load_params, parse_override

    assert load_params(None, dict([parse_override("lr=1e-3")])).lr == 1e-3


def test_an_output_folder_under_a_file_is_one_line(tmp_path):
    """Tests run as root, where chmod does not stop writes: a path under a regular file cannot be created."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    params = write_params(tmp_path / "p.yaml", TINY)
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(blocker / "run"))
    assert_one_line_error(proc, f"cannot create the run folder {blocker / 'run'}: Not a directory")
    assert blocker.read_text() == "not a folder"


def test_a_folder_without_write_permission_is_refused(tmp_path, digits, monkeypatch):
    """os.access is patched to say 'not writable' (root ignores chmod)."""
    real_access = os.access
    out = tmp_path / "run"
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out and mode & os.W_OK
                        else real_access(p, mode, *a, **k))
    with pytest.raises(CBDError, match=rf"^the run folder {out} is not writable$"):
        Experiment(tiny_settings(methods=["ce"]), out, data=digits, quiet=True)
    assert list(out.iterdir()) == []
