"""On-disk cache of decoded image arrays, keyed by a checksum of their source.

Decoding 60,000 JPEGs takes seconds; reading the same pixels back from an
uncompressed ``.npz`` takes a fraction of one. A cache entry is named after a
sha256 over its key parts (dataset name, source checksum, image size, ...) plus
``CACHE_FORMAT_VERSION``, so a changed source, setting or format simply misses.

Location: ``$CBD_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbdlib``, else
``~/.cache/cbdlib``. Entries are written atomically (temporary file in the same
folder, fsync, ``os.replace``), so a crash never leaves a half-written entry
under the final name; an unreadable entry is logged, ignored and rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)

# Bump when the meaning or layout of stored arrays changes: old entries then miss.
CACHE_FORMAT_VERSION = 1

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The folder holding cache entries (not created here)."""
    explicit = os.environ.get("CBD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cbdlib"


def source_checksum(path: str | os.PathLike) -> str:
    """sha256 identifying a data source: a file's bytes, or a folder tree's listing.

    A folder is summarised by its sorted (relative path, size, mtime_ns) triples
    rather than its bytes: hashing a whole image tree would cost as much as
    decoding it, and any edit changes size or modification time.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
        return digest.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    entries = []
    for current, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(current, name)
            rel = Path(os.path.relpath(full, path)).as_posix()
            try:
                st = os.stat(full)
            except OSError:  # dangling link: its name still identifies the tree
                entries.append((rel, -1, -1))
                continue
            entries.append((rel, st.st_size, st.st_mtime_ns))
    for rel, size, mtime in sorted(entries):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """Hex sha256 of the key parts and the cache format version."""
    payload = {"cache_format_version": CACHE_FORMAT_VERSION, **dict(key_parts)}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(key_parts: Mapping[str, Any]) -> Path:
    """Where the entry for ``key_parts`` lives; the dataset name prefixes it for humans."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key_parts.get("dataset", "arrays"))) or "arrays"
    return cache_dir() / f"{label}-{cache_key(key_parts)[:32]}.npz"


def cached_arrays(
    key_parts: Mapping[str, Any],
    build: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``key_parts``, building and storing them on a miss.

    ``build`` must return plain (non-object) numpy arrays; strings belong in a
    unicode array so that loading never needs pickle. A cache that cannot be
    written (read-only folder, full disk) only costs a warning.
    """
    path = cache_path(key_parts)
    arrays = _read_entry(path)
    if arrays is not None:
        log.info("loaded cached arrays from %s", path)
        return arrays
    built = {name: np.asarray(value) for name, value in build().items()}
    for name, value in built.items():
        if value.dtype.hasobject:
            # Such an entry could never be read back with allow_pickle=False.
            raise TypeError(f"cached array {name!r} has object dtype; store strings as a unicode array")
    try:
        _write_atomic(path, built)
        log.info("cached arrays in %s", path)
    except OSError as exc:
        log.warning("could not write cache file %s (%s); continuing without it", path, exc)
    return built


def _read_entry(path: Path) -> dict[str, np.ndarray] | None:
    """The entry's arrays, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        # Our own handle: np.load leaks the one it opens when the zip is broken.
        # Reading every member in full makes zipfile verify each CRC.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as entry:
            arrays = {name: entry[name] for name in entry.files}
        if not arrays:
            raise ValueError("no arrays in file")
        return arrays
    except Exception as exc:  # any failure means "not a usable entry": rebuild it
        log.warning("ignoring corrupt cache file %s (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None


def _write_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a cache entry is ordinary data, readable like any output.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            # Uncompressed: loading then costs a read, not a decompression.
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
