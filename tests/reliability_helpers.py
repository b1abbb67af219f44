"""What the reliability tests (``tests/reliability/``, one file per section of docs/reliability.md)
and the fault tests of the other files share: the tiny digits run, the command-line helpers, toy
checkpoints, a test's private folders, a fake run folder. The reliability fixtures are in
``tests/reliability/conftest.py``; no test file imports from another.

Subprocess tests pin OMP_NUM_THREADS=1: CPU results are bit-identical between runs
only at the same thread count.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import cbdlib
from cbdlib import checkpoint as ckpt
from cbdlib import runs
from cbdlib.config import make_params, resolve
from cbdlib.data.stats import class_splits
from cbdlib.engine import hooks
from cbdlib.metrics import split_accuracy

ROOT = Path(cbdlib.__file__).resolve().parent.parent
# Subprocesses and waits are bounded only to stop a hung process, never to require speed: a busy
# 2-core machine may be many times slower than a quiet one.
HANG_S = 900


TINY = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=3, decoupled_epochs=1, batch_size=32,
            lr=0.05, warmup_epochs=1, teachers=["vanilla:1"], seeds=[1], device="cpu", smoke=False, tsne_samples=50)


def tiny_settings(**changes):
    return resolve(make_params({**TINY, **changes}))


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


def history_rows(out: Path) -> list[dict]:
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


def save_toy_checkpoint(path: Path, epoch: int, value: float = 0.0) -> dict:
    model = {"weight": torch.full((4, 3), value + epoch), "bias": torch.arange(4.0)}
    ckpt.save_checkpoint(path, spec={"arch": "toy"}, meta={"epoch": epoch, "complete": False}, model=model,
                         optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]})
    return model


def crash_after(steps: int):
    """A step hook that raises KeyboardInterrupt (a kill) at the given training step of the process."""
    calls = {"n": 0}

    def crashing(step, loss):
        calls["n"] += 1
        if calls["n"] == steps:
            raise KeyboardInterrupt

    return hooks.on_step(crashing)


def image_tree(root: Path, per_class: int = 12, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 3)):
        for label, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    return root


def error_line(stderr: str) -> str:
    """The one ``error:`` line a command printed last, with no traceback before it."""
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), stderr
    return line


def private_folders(tmp_path: Path, monkeypatch) -> None:
    """A test's own cache and results folders, ``CBD_SMOKE`` unset, and ``cbdlib``'s log seen by caplog
    (``workbook.configure_logging``, a notebook's setup run in process, stops its propagation)."""
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("CBD_SMOKE", raising=False)
    monkeypatch.setattr(logging.getLogger("cbdlib"), "propagate", True)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: "nothing changed" is ``snapshot(f) == before``.

    The lock file is left out: taking the lock writes the taker's pid into it.
    """
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_main(main, argv, capsys) -> tuple[int, str]:
    """An entry point in process: (exit status, stderr)."""
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


FAKE_RUN_COUNTS = [40, 20, 10]


def fake_run(root: Path, name: str, seeds: list, evaluated: list, methods: list) -> Path:
    """A run folder whose params ask for ``methods`` and whose evaluations hold only ``evaluated``."""
    run = root / name
    splits = class_splits(FAKE_RUN_COUNTS)
    evaluations = {}
    for method in evaluated:
        for seed in seeds:
            per_class = [0.9 - 0.2 * i + 0.01 * seed for i in range(3)]
            record = {"all": float(np.mean(per_class)), "per_class": per_class, "method": method, "seed": seed}
            record.update({k: split_accuracy(per_class, c) for k, c in splits.items()})
            runs.save_evaluation(run, seed, method, record)
            evaluations.setdefault(method, {})[seed] = record
    params = dataclasses.asdict(make_params({"run_name": name, "seeds": seeds, "methods": methods}))
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = runs.build_metrics(evaluations, dataset="digits", imbalance_ratio=10.0, class_counts=FAKE_RUN_COUNTS,
                                 splits=splits, seeds=seeds, prov={"device": "cpu", "torch": "2", "git_commit": "x"})
    runs.write_metrics(run, metrics, ["a", "b", "c"])
    return run
