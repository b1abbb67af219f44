"""Checkpoints: state dict + the spec that built the model, a checksum, atomic and safe to load.

Files are ordinary ``torch.save`` archives holding only tensors and plain data, so
``torch.load(weights_only=True)`` reads them and never runs pickled code. A SHA-256 over
the content is stored inside and checked on load; the previous checkpoint is kept as
``<name>.prev.pt`` so a damaged newest file falls back to the last good one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import CBDError
from .io import remove_stale_temps, write_bytes

log = logging.getLogger(__name__)
FORMAT = "cbdlib-checkpoint-1"


def _digest(obj, h) -> None:
    """Feed a nested structure of dicts, lists, tensors and scalars into a hash, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def content_sha256(content: dict) -> str:
    h = hashlib.sha256()
    _digest(content, h)
    return h.hexdigest()


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _signature(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# Checkpoints this process wrote, as (inode, size, mtime): unchanged since, they need no re-check.
_WRITTEN: dict[str, tuple] = {}


def _intact(path: Path) -> bool:
    """Whether ``path`` is a loadable, checksum-valid checkpoint (cheap for files written here)."""
    signature = _signature(path)
    if signature is None:
        return False
    if _WRITTEN.get(str(path)) == signature:
        return True
    try:
        _read(path)
    except CBDError:
        return False
    return True


def save_checkpoint(path: str | os.PathLike, *, spec: dict, meta: dict, model: dict,
                    optimizer: dict | None = None) -> None:
    """Write atomically; the good file being replaced becomes ``<name>.prev.pt``.

    The new content reaches the disk before anything is renamed, so a failed write
    (disk full) leaves both the current file and ``.prev.pt`` as they were. A current
    file that is damaged is not rotated over a good ``.prev.pt``: it is just replaced.
    """
    path = Path(path)
    content = {"format": FORMAT, "spec": spec, "meta": meta, "model": model, "optimizer": optimizer}
    content["sha256"] = content_sha256(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    remove_stale_temps(path)  # left by a writer killed mid-save
    backup = None
    if path.exists():
        if _intact(path):
            backup = previous_path(path)
        else:
            log.warning("%s is damaged; keeping %s as the last good checkpoint", path.name, previous_path(path).name)
    write_bytes(path, buffer.getvalue(), backup=backup)
    _WRITTEN[str(path)] = _signature(path)


def _reason(exc: Exception) -> str:
    """One line saying why ``torch.load`` refused a file."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it would import {found.group(1)} when unpickled" if found else "it holds pickled objects"
        return f"refused to unpickle it: {what}, which plain weights never need (nothing was run)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if "PytorchStreamReader" in first or "zip archive" in first:
        # torch's own sentence goes on about miniz internals; the first clause says it all.
        return first.split(". ")[0][:150] + " (the file is truncated or is not a torch checkpoint)"
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"not a readable torch checkpoint ({detail[:150]})"


def _read(path: Path) -> dict:
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise CBDError(f"cannot load checkpoint {path}: the file is empty")
        content = torch.load(path, map_location="cpu", weights_only=True)
    except CBDError:
        raise
    except FileNotFoundError:
        raise CBDError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CBDError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as exc:  # unpickling refused, truncated zip, not a torch file ...
        raise CBDError(f"cannot load checkpoint {path}: {_reason(exc)}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CBDError(f"{path} is not a cbdlib checkpoint")
    stored = content.pop("sha256", None)
    try:
        actual = content_sha256(content)
    except Exception:  # a structure no cbdlib checkpoint has
        actual = None
    if stored is None or stored != actual:
        raise CBDError(f"checkpoint {path} fails its checksum (altered or damaged)")
    return content


def load_checkpoint(path: str | os.PathLike, *, fallback: bool = False) -> dict:
    """Read and verify a checkpoint; with ``fallback`` a damaged file yields ``<name>.prev.pt``."""
    path = Path(path)
    try:
        return _read(path)
    except CBDError as error:
        prev = previous_path(path)
        if fallback and prev.exists():
            log.warning("%s; falling back to the previous checkpoint %s", error, prev.name)
            try:
                return _read(prev)
            except CBDError as prev_error:
                raise CBDError(f"{error}; the previous checkpoint is unusable too: {prev_error}") from None
        raise


def check_compatible(meta: dict, expected: dict, what: str) -> None:
    """Refuse a checkpoint made on another dataset, class count or input shape, naming the mismatch."""
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and want is not None and have != want:
            raise CBDError(f"{what} was trained with {key}={have!r}, but this run has {key}={want!r}")


def load_state_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    """Strict key matching: a missing or unexpected weight is an error, never silently dropped."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a weight of another shape (e.g. another class count)
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip())
        raise CBDError(f"{what} does not match the model: {detail[:300] or 'weight shapes differ'}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CBDError(
            f"{what} does not match the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def load_model(path: str | Path, expected: dict | None = None, device: torch.device | str = "cpu"):
    """Rebuild a model from its checkpoint (spec + strict weights), refusing a data mismatch."""
    from .models import ModelSpec, build_model  # torchvision and the models load only when a model is

    state = load_checkpoint(path, fallback=True)
    if expected:
        check_compatible(state["meta"], expected, f"checkpoint {Path(path).name}")
    if not state["meta"].get("complete", False):
        raise CBDError(f"checkpoint {path} is from an unfinished run (epoch {state['meta'].get('epoch', 0) + 1}); "
                       f"finish its stage first")
    model = build_model(ModelSpec(**state["spec"]))
    load_state_strict(model, state["model"], f"checkpoint {path}")
    model.to(device).eval()
    model.meta = state["meta"]
    return model
