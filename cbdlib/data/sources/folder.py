"""ImageFolder trees ``train/<class>/*`` + ``test/<class>/*``, as folders or tar archives (which
may also hold CIFAR pickles)."""
from __future__ import annotations

import io
import logging
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ...errors import CBDError, one_line
from .. import cache
from . import decode
from .cifar_pickles import CifarSpec, cifar_arrays
from .common import (
    ImageSet,
    ImageSource,
    clean_member,
    is_hidden,
    is_image,
    pack_arrays,
    special_kind,
    unpack_arrays,
)

log = logging.getLogger("cbdlib.data.sources")


@dataclass
class _Listing:
    """Relative POSIX paths found in a folder tree or an archive."""

    images: dict[str, ImageSource]  # image path -> bytes or file path
    other_files: set[str]
    dirs: set[str]
    describe: Callable[[str], str]  # relative path -> name for messages

    def all_dirs(self) -> set[str]:
        """Folders named explicitly plus every parent of a file (tars may omit folder entries)."""
        found = set(self.dirs)
        closed: set[str] = set()  # folders whose ancestors are all in ``found``
        for rel in [*self.dirs, *self.images, *self.other_files]:
            parent = posixpath.dirname(rel)
            while parent and parent not in closed:
                found.add(parent)
                closed.add(parent)
                parent = posixpath.dirname(parent)
        return found


def load_tree_source(
    path: Path,
    dataset: str,
    image_size: int,
    strict_for: Optional[str],
    cifar: Optional[CifarSpec],
) -> tuple[ImageSet, ImageSet]:
    """An ImageFolder tree, as a folder or a tar archive (which may also hold CIFAR pickles)."""
    kind = "archive" if path.is_file() else "tree"
    key = {
        "dataset": dataset,
        "kind": kind,
        "checksum": cache.source_checksum(path),
        "image_size": image_size,
    }

    def build() -> dict[str, np.ndarray]:
        if kind == "archive":
            listing, pickles = _read_archive(path, cifar)
            if cifar is not None and pickles:
                return cifar_arrays(cifar, pickles.get, lambda name: f"{path} (member {cifar.folder}/{name})")
        else:
            listing = _scan_folder(path)
        return _tree_arrays(listing, str(path), image_size, strict_for, cifar)

    return unpack_arrays(cache.cached_arrays(key, build))


def _scan_folder(root: Path) -> _Listing:
    images: dict[str, ImageSource] = {}
    others: set[str] = set()
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel_dir = Path(os.path.relpath(current, root)).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        dirs.update(posixpath.join(rel_dir, d) for d in dirnames)
        for name in filenames:
            if is_hidden(name):
                continue
            rel = posixpath.join(rel_dir, name)
            if is_image(name):
                images[rel] = _regular_file(os.path.join(current, name))
            else:
                others.add(rel)
    return _Listing(images, others, dirs, lambda rel: str(root / rel))


def _regular_file(path: str) -> str:
    """``path`` when it is a regular file (or a link to one); a named pipe, device or socket with an
    image's name is refused: reading it would wait for ever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path  # a dangling link: decoding names it
    if not stat.S_ISREG(mode):
        raise CBDError(f"{path} is a {special_kind(Path(path))}, not an image file; remove it from the tree")
    return path


def _read_archive(path: Path, cifar: Optional[CifarSpec]) -> tuple[_Listing, dict[str, bytes]]:
    """Read image members (and CIFAR pickles, if ``cifar``) of a tar archive in one pass."""
    if path.stat().st_size == 0:
        raise CBDError(f"archive {path} is empty")
    images: dict[str, ImageSource] = {}
    others: set[str] = set()
    dirs: set[str] = set()
    pickles: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = clean_member(member.name)
                if not name or any(is_hidden(part) for part in name.split("/")):
                    continue
                if member.isdir():
                    dirs.add(name)
                elif not member.isfile():
                    continue
                elif is_image(name):
                    images[name] = archive.extractfile(member).read()
                elif cifar is not None and is_cifar_pickle(name, cifar):
                    pickles[posixpath.basename(name)] = archive.extractfile(member).read()
                else:
                    others.add(name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CBDError(f"{path} is not a readable tar archive ({one_line(exc)})") from exc
    if not (images or others or dirs or pickles):
        raise CBDError(f"archive {path} is empty")
    return _Listing(images, others, dirs, lambda rel: f"{path} (member {rel})"), pickles


def is_cifar_pickle(name: str, spec: CifarSpec) -> bool:
    parent, base = posixpath.split(name)
    return posixpath.basename(parent) == spec.folder and base in spec.files


def _tree_arrays(
    listing: _Listing,
    where: str,
    image_size: int,
    strict_for: Optional[str],
    cifar: Optional[CifarSpec],
) -> dict[str, np.ndarray]:
    all_dirs = listing.all_dirs()
    prefix = _tree_root(all_dirs, where, cifar)
    train = _class_folders(listing, all_dirs, prefix + "train")
    test = _class_folders(listing, all_dirs, prefix + "test")
    class_names = sorted(train)
    if not class_names:
        raise CBDError(f"{listing.describe(prefix + 'train')} has no class folders")
    if cifar is not None and len(class_names) != cifar.num_classes:
        raise CBDError(
            f"{where}: {cifar.title} needs {cifar.num_classes} class folders in train/, found {len(class_names)}"
        )
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise CBDError(f"{listing.describe(prefix + 'test/' + unknown[0])} is a class folder missing from train/")
    if not test:
        raise CBDError(f"{listing.describe(prefix + 'test')} has no class folders")
    _refuse_classes_without_test(train, test, listing, prefix)

    items: list[tuple[str, ImageSource]] = []
    labels: list[int] = []
    counts = []
    for split in (train, test):
        start = len(items)
        for label, name in enumerate(class_names):
            for rel in split.get(name, ()):
                items.append((listing.describe(rel), listing.images[rel]))
                labels.append(label)
        counts.append(len(items) - start)
    if image_size is None:
        image_size = native_size(items, where)
    log.info("decoding %d images from %s", len(items), where)
    images = decode.decode_images(items, image_size, strict_for)
    label_array = np.asarray(labels, dtype=np.int64)
    n_train = counts[0]
    return pack_arrays(images[:n_train], label_array[:n_train], images[n_train:], label_array[n_train:], class_names)


def native_size(items: list[tuple[str, ImageSource]], where: str) -> int:
    """The one square side of every image (``image_size: null``); mixed or non-square sizes are refused,
    naming two images, since resizing them would be a choice the user did not make."""
    from PIL import Image

    first = None
    for name, source in items:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                size = img.size  # read from the header, nothing decoded
        except Exception as exc:  # Pillow signals bad data with OSError, SyntaxError, ValueError, ...
            raise CBDError(f"cannot read image {name} ({one_line(exc)})") from None
        if first is None:
            first = (name, size)
        if size != first[1] or size[0] != size[1]:
            raise CBDError(f"{where}: images of different or non-square sizes ({first[0]} is {first[1][0]}x"
                           f"{first[1][1]}, {name} is {size[0]}x{size[1]}) and image_size is null; set image_size "
                           f"to resize them all")
    return first[1][0]


def _refuse_classes_without_test(train: dict, test: dict, listing: _Listing, prefix: str) -> None:
    """A class with training images but no test folder would have no accuracy: its splits and the
    summary's per-split means would be undefined."""
    untested = sorted(set(train) - set(test))
    if untested:
        more = f" (and {len(untested) - 1} more)" if len(untested) > 1 else ""
        raise CBDError(f"class {untested[0]!r}{more} has training images but no folder in "
                       f"{listing.describe(prefix + 'test')}; every class needs test images")


def _tree_root(all_dirs: set[str], where: str, cifar: Optional[CifarSpec]) -> str:
    """'' when train/ and test/ sit at the top, '<folder>/' when under one top folder."""
    if "train" in all_dirs and "test" in all_dirs:
        return ""
    tops = sorted(
        d for d in all_dirs
        if "/" not in d and f"{d}/train" in all_dirs and f"{d}/test" in all_dirs
    )
    if len(tops) == 1:
        return tops[0] + "/"
    if len(tops) > 1:
        raise CBDError(f"{where}: several folders hold train/ and test/ ({', '.join(tops)}); point at one of them")
    expected = "train/<class>/<image> and test/<class>/<image> (at the top or inside one folder)"
    if cifar is not None:
        expected = f"torchvision's {cifar.folder} folder, or " + expected
    raise CBDError(f"{where}: expected {expected}")


def _class_folders(listing: _Listing, all_dirs: set[str], split_dir: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths for one split; an empty class folder is an error."""
    classes: dict[str, list[str]] = {
        posixpath.basename(d): [] for d in all_dirs if posixpath.dirname(d) == split_dir
    }
    lead = split_dir + "/"
    for rel in listing.images:
        if not rel.startswith(lead):
            continue
        parts = rel[len(lead):].split("/")
        if len(parts) == 1:
            raise CBDError(f"image {listing.describe(rel)} is not inside a class folder")
        classes[parts[0]].append(rel)
    for name in sorted(classes):
        if not classes[name]:
            raise CBDError(f"class folder {listing.describe(split_dir + '/' + name)} has no images")
        classes[name].sort()
    return classes
