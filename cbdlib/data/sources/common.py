"""What every source shares: the decoded image set, the cacheable array form, path and member names."""
from __future__ import annotations

import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np

from ...errors import CBDError

log = logging.getLogger("cbdlib.data.sources")


IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
)

# An image source is raw bytes (archive member) or a file path (folder tree).
ImageSource = Union[bytes, str]


@dataclass
class ImageSet:
    """Decoded images with their labels.

    ``images`` is uint8 (N, H, W, 3) RGB, ``labels`` int64 (N,) indexing ``class_names``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def pack_arrays(train_images, train_labels, test_images, test_labels, class_names) -> dict[str, np.ndarray]:
    """The cacheable form of a (train, test) pair: arrays only, names as unicode."""
    return {
        "train_images": train_images,
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": test_images,
        "test_labels": np.asarray(test_labels, dtype=np.int64),
        "class_names": np.array([str(n) for n in class_names], dtype=np.str_),
    }


def unpack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[ImageSet, ImageSet]:
    names = [str(n) for n in arrays["class_names"]]
    return (
        ImageSet(arrays["train_images"], arrays["train_labels"].astype(np.int64, copy=False), list(names)),
        ImageSet(arrays["test_images"], arrays["test_labels"].astype(np.int64, copy=False), list(names)),
    )


def existing_path(data) -> Path:
    path = Path(os.fspath(data)).expanduser()
    if "\0" in str(path):
        raise CBDError(f"data path {str(path)!r} holds a NUL character")
    if not path.exists():
        raise CBDError(f"data path {path} does not exist")
    if not (path.is_file() or path.is_dir()):  # a device, a named pipe, a socket: reading it may never end
        raise CBDError(f"data path {path} is a {special_kind(path)}, not a file or folder of images")
    return path


def special_kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    mode = path.stat().st_mode
    for test, word in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return word
    return "special file"


def clean_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS
