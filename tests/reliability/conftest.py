"""Fixtures of the reliability tests (one file per section of docs/reliability.md)."""
import pytest
from reliability_helpers import save_toy_checkpoint

from cbdlib import checkpoint as ckpt


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache and runs at full size unless it asks for smoke."""
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CBD_SMOKE", raising=False)


@pytest.fixture
def two_checkpoints(tmp_path):
    """``toy.pt`` (epoch 1) and its ``toy.prev.pt`` (epoch 0), both good."""
    path = tmp_path / "ckpt" / "toy.pt"
    save_toy_checkpoint(path, 0)
    save_toy_checkpoint(path, 1)
    assert ckpt.previous_path(path).exists()
    return path
