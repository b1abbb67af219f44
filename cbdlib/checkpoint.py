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
from pathlib import Path

import torch

from .errors import CBDError
from .io import write_bytes

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


def save_checkpoint(path: str | os.PathLike, *, spec: dict, meta: dict, model: dict, optimizer: dict | None = None) -> None:
    """Write atomically; the file being replaced becomes ``<name>.prev.pt``."""
    path = Path(path)
    content = {"format": FORMAT, "spec": spec, "meta": meta, "model": model, "optimizer": optimizer}
    content["sha256"] = content_sha256(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    if path.exists():
        os.replace(path, previous_path(path))
    write_bytes(path, buffer.getvalue())


def _read(path: Path) -> dict:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CBDError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # unpickling refused, truncated zip, not a torch file ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            reason = "it holds pickled code or objects that are not plain weights (refused, nothing was run)"
        raise CBDError(f"cannot load checkpoint {path}: {reason[:200]}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CBDError(f"{path} is not a cbdlib checkpoint")
    stored = content.pop("sha256", None)
    if stored != content_sha256(content):
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
            return _read(prev)
        raise


def check_compatible(meta: dict, expected: dict, what: str) -> None:
    """Refuse a checkpoint made on another dataset, class count or input shape, naming the mismatch."""
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and want is not None and have != want:
            raise CBDError(f"{what} was trained with {key}={have!r}, but this run has {key}={want!r}")


def load_state_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    """Strict key matching: a missing or unexpected weight is an error, never silently dropped."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CBDError(
            f"{what} does not match the model: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
