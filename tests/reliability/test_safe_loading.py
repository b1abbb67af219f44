"""Reliability: safe loading (docs/reliability.md, "Safe loading").

A checkpoint whose pickle runs code is refused and runs nothing, in process and through
``python -m cbdlib evaluate``; an AST scan finds no unsafe load in the package.
"""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from reliability_helpers import ROOT, assert_one_line_error, run_cli

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib.checkpoint import load_model


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
