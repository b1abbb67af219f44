"""Reliability: failed writes (disk full) and atomic files (docs/reliability.md,
"Failed writes (disk full) and atomic files").

``OSError(ENOSPC)`` at fsync or at the write itself: a one-line error, the old file kept and no
temp file left, for plain files, the history, checkpoints and a training run; atomic files get
ordinary permissions.
"""
from __future__ import annotations

import errno
import os

import pytest
from reliability_helpers import (
    save_toy_checkpoint,
    state_dicts_equal,
    temp_files,
    tiny_settings,
)

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib import io as cio
from cbdlib.checkpoint import load_model
from cbdlib.engine import Experiment, hooks
from cbdlib.runs import checkpoint_path


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


def test_a_failed_checkpoint_save_keeps_both_files(two_checkpoints, disk_full):
    path, prev = two_checkpoints, ckpt.previous_path(two_checkpoints)
    before = path.read_bytes(), prev.read_bytes()
    with pytest.raises(CBDError, match=r"^could not write .*toy.pt: No space left on device$"):
        save_toy_checkpoint(path, 2)
    assert (path.read_bytes(), prev.read_bytes()) == before
    assert temp_files(path.parent) == []


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
