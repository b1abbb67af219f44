"""Reliability: damaged checkpoints (docs/reliability.md, "Damaged checkpoints").

Truncated, emptied, replaced, bit-flipped and re-saved checkpoints are refused in one line and
``fallback=True`` gives the previous one; both damaged names both; a damaged newest is not
rotated over a good ``.prev.pt``; training resumes from ``.prev.pt``.
"""
from __future__ import annotations

import logging
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    crash_after,
    history_rows,
    save_toy_checkpoint,
    state_dicts_equal,
    tiny_settings,
)

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib.checkpoint import load_model
from cbdlib.engine import Experiment
from cbdlib.runs import checkpoint_path


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
    save_toy_checkpoint(two_checkpoints, 2)
    assert ckpt.load_checkpoint(two_checkpoints)["meta"]["epoch"] == 2
    assert ckpt.load_checkpoint(ckpt.previous_path(two_checkpoints))["meta"]["epoch"] == 0  # still the good one


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, digits,
                                                                                  caplog):
    settings = tiny_settings(methods=["ce"])
    Experiment(settings, tmp_path / "straight", data=digits, quiet=True).run("one_stage")
    steps_per_epoch = len(digits.train_labels) // 32
    with pytest.raises(KeyboardInterrupt), crash_after(2 * steps_per_epoch + 1):  # killed in the third epoch
        Experiment(settings, tmp_path / "damaged", data=digits, quiet=True).run("one_stage")
    path = checkpoint_path(tmp_path / "damaged", 1, "ce")
    assert ckpt.load_checkpoint(path)["meta"]["epoch"] == 1
    _flip_tensor_bytes(path)
    with caplog.at_level(logging.INFO):
        Experiment(settings, tmp_path / "damaged", data=digits, quiet=True).run("one_stage")
    assert "fails its checksum (altered or damaged); falling back to the previous checkpoint ce.prev.pt" in caplog.text
    assert "ce (seed 1): resuming from the checkpoint of epoch 1/3" in caplog.text
    # Epoch 2 was trained again from .prev.pt; its history line is kept once.
    assert [r["epoch"] for r in history_rows(tmp_path / "damaged")] == [1, 2, 3]
    a = load_model(checkpoint_path(tmp_path / "straight", 1, "ce")).state_dict()
    b = load_model(path).state_dict()
    assert state_dicts_equal(a, b)
