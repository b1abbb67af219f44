"""ImageNet-LT / Places-LT style split files: ``relative/path.jpg label`` per line."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ...errors import CBDError, one_line
from .. import cache
from . import decode
from .common import ImageSet, pack_arrays, unpack_arrays

log = logging.getLogger("cbdlib.data.sources")


def load_splitfile(folder: Path, image_size: int) -> tuple[ImageSet, ImageSet]:
    if not folder.is_dir():
        raise CBDError(f"splitfile data {folder} must be a folder holding *train*.txt and *test*.txt")
    train_file = _find_split_file(folder, "train")
    if train_file is None:
        raise CBDError(f"no *train*.txt split file in {folder}")
    test_file = _find_split_file(folder, "test")
    if test_file is None:
        test_file = _find_split_file(folder, "val")
        if test_file is None:
            raise CBDError(f"no *test*.txt (or *val*.txt) split file in {folder}")
        log.warning("no *test*.txt in %s: using %s as the test split", folder, test_file.name)

    key = {
        "dataset": "splitfile",
        "kind": "tree",
        "checksum": cache.source_checksum(folder),
        "image_size": image_size,
        "train_file": train_file.name,
        "test_file": test_file.name,
    }

    def build() -> dict[str, np.ndarray]:
        train = parse_split_lines(train_file)
        test = parse_split_lines(test_file)
        for file, rows in ((train_file, train), (test_file, test)):
            if not rows:
                raise CBDError(f"split file {file} lists no images")
        num_classes = max(label for _, _, label in train) + 1
        present = {label for _, _, label in train}
        if len(present) < num_classes:
            # A gap in the labels is most often one mistyped label far above the rest.
            lineno = max(train, key=lambda row: row[2])[0]
            missing = num_classes - len(present)
            raise CBDError(
                f"{train_file}, line {lineno}: label {num_classes - 1} leaves {missing} of {num_classes} classes "
                f"without a training image (labels must run 0..C-1); is that line mistyped?"
            )
        for lineno, _, label in test:
            if label >= num_classes:
                raise CBDError(
                    f"{test_file}, line {lineno}: label {label} is out of range "
                    f"(train split {train_file.name} has {num_classes} classes)"
                )
        # The test split lists every class: a train label above its largest is one past the last class
        # (a typo such as 10 in a 10-class list), not an extra class with a handful of images.
        last = max(label for _, _, label in test)
        beyond = [(lineno, label) for lineno, _, label in train if label > last]
        if beyond:
            lineno, label = beyond[0]
            more = f" ({len(beyond)} such lines)" if len(beyond) > 1 else ""
            raise CBDError(
                f"{train_file}, line {lineno}: label {label} has no image in the test split {test_file.name}, "
                f"whose labels run 0..{last}{more}; labels must run 0..C-1: is that line mistyped?"
            )
        items = [(path, path) for path in _resolve_images(folder, train_file, train)]
        items += [(path, path) for path in _resolve_images(folder, test_file, test)]
        log.info("decoding %d images listed in %s and %s", len(items), train_file, test_file)
        images = decode.decode_images(items, image_size)
        n = len(train)
        return pack_arrays(
            images[:n], np.array([lab for _, _, lab in train], dtype=np.int64),
            images[n:], np.array([lab for _, _, lab in test], dtype=np.int64),
            [str(i) for i in range(num_classes)],
        )

    return unpack_arrays(cache.cached_arrays(key, build))


def _find_split_file(folder: Path, word: str) -> Optional[Path]:
    """The single ``*<word>*.txt`` in ``folder`` (or, failing that, one level below)."""
    for pattern in ("*.txt", "*/*.txt"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and word in p.name.lower())
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(folder)) for p in found)
            raise CBDError(f"several *{word}*.txt split files in {folder} ({names}); keep one")
        if found:
            return found[0]
    return None


def parse_split_lines(path: Path) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) per non-blank line of a split file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CBDError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CBDError(f"cannot read split file {path} ({one_line(exc)})") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise CBDError(f"{path}, line {lineno}: expected 'relative/path label', got {line.strip()!r}")
        rel, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            raise CBDError(f"{path}, line {lineno}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise CBDError(f"{path}, line {lineno}: label {label} is negative")
        rows.append((lineno, rel, label))
    return rows


def _resolve_images(folder: Path, split_file: Path, rows) -> list[str]:
    """Absolute image paths: relative to the data folder, else to the split file's folder."""
    bases = [folder] if split_file.parent == folder else [folder, split_file.parent]
    paths = []
    for lineno, rel, _ in rows:
        for base in bases:
            candidate = base / rel
            if candidate.is_file():
                paths.append(str(candidate))
                break
        else:
            looked = " or ".join(str(b) for b in bases)
            raise CBDError(f"image {rel} not found under {looked} ({split_file}, line {lineno})")
    return paths
