"""The settings of the session's shared runs (fixtures in tests/conftest.py) and how a test
gets a private copy of one."""
import shutil
from pathlib import Path

from cbdlib.config import make_params, resolve

# digits-LT, ResNet-tiny, four teachers, one seed: every method learns well above chance.
RUN = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=12, decoupled_epochs=3, batch_size=32,
           lr=0.05, teachers=["vanilla:1", "vanilla:2", "aug:1", "aug:2"], seeds=[1], device="cpu", smoke=False,
           tsne_samples=100, warmup_epochs=1)


def run_settings(**changes):
    """The settings of the shared runs; ``methods`` (and other resumable keys) may change."""
    return resolve(make_params({**RUN, **changes}))


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of a shared run folder, for a test that changes it."""
    target = tmp_path / f"copy_of_{run.name}"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    return target
