"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A reader never sees half a file: either the old content or the new one. A write that
fails (disk full, folder not writable, ...) leaves the old file as it was, removes its
temp file and raises a one-line ``CBDError``. A process killed mid-write can leave a
``.<name>.<random>.tmp`` beside the target; ``remove_stale_temps`` clears those.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CBDError


def _default_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0o666 less the umask (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _default_mode()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete temp files a killed writer of ``path`` left behind; returns how many.

    Only call this where one process writes ``path`` (a run folder's own checkpoints).
    """
    path = Path(path)
    removed = 0
    if not path.parent.is_dir():
        return 0
    for stale in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (power loss); best effort, some file systems refuse it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, backup: str | os.PathLike | None = None) -> Iterator:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    With ``backup``, an existing ``path`` is renamed to ``backup`` only once the new
    content is safely on disk, so a failed write never costs the old file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CBDError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        try:
            file_mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            file_mode = _NEW_FILE_MODE
        os.chmod(tmp, file_mode)
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CBDError(f"could not write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike, data: bytes, *, backup: str | os.PathLike | None = None) -> None:
    with atomic_open(path, "wb", backup=backup) as handle:
        handle.write(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (history logs); a torn last line is skipped by the readers.

    A line torn by a kill is closed first, so it never swallows the line appended next.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b", opener=open_no_follow) as handle:
            end = handle.seek(0, os.SEEK_END)
            if end > 0:
                handle.seek(end - 1)
                if handle.read(1) != b"\n":
                    data = b"\n" + data
            handle.write(data)
    except OSError as exc:
        raise CBDError(f"could not append to {path}: {exc.strerror or exc}") from None


def open_no_follow(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (a linked history or lock file would
    make a run write into whatever file the link points at); returns the descriptor."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, _NEW_FILE_MODE)
    except OSError:
        if os.path.islink(path):
            raise CBDError(f"{path} is a symbolic link; a run writes only its own files, never through a link "
                           f"(remove the link)") from None
        raise


def refuse_links(folder: str | os.PathLike, names=None) -> None:
    """Refuse a folder holding symbolic links (any, or only among ``names``) where its own files belong.

    The folder itself may be a link (a run kept on another disk); what is inside may not.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    if names is not None:
        found = [folder / name for name in names if (folder / name).is_symlink()]
    else:
        found = [Path(root) / name for root, dirs, files in os.walk(folder) for name in dirs + files
                 if (Path(root) / name).is_symlink()]
    if found:
        raise CBDError(f"{found[0]} is a symbolic link; a run folder must hold its own files, not links to "
                       f"others (remove it)")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``.<name>.lock`` beside ``path`` while the block rewrites it (two runs
    finishing together must not lose a line of a shared file); no lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a", opener=open_no_follow) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
