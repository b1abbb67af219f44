"""Image sources: a dataset name and a path in, decoded uint8 arrays out.

``load_source(dataset, data)`` returns ``(train_pool, test)`` as two ``ImageSet``s.
Known datasets:

* ``digits``    scikit-learn's bundled 8x8 digits, split 70/30 (stratified, seeded).
* ``cifar10`` / ``cifar100``  torchvision's pickled batches (the folder or its
  parent), an ImageFolder tree ``train/<class>/*`` + ``test/<class>/*``, or a
  tar / tar.gz of either. Without a path: ``$CBD_CIFAR10`` / ``$CBD_CIFAR100``,
  then a torchvision download into ``<project root>/data``. Images must be 32x32.
* ``folder``    any ImageFolder tree (or its tar / tar.gz), resized to ``image_size``.
* ``splitfile`` ImageNet-LT / Places-LT style: ``*train*.txt`` and ``*test*.txt``
  (else ``*val*.txt``) listing ``relative/path.jpg label`` per line.

Every image ends up RGB via Pillow's ``convert("RGB")``: grayscale is replicated
to three channels, palette images are expanded, and an alpha channel is dropped
as it is (the stored colour values are kept; nothing is composited onto a
background). Images are read from archives in memory, never extracted to disk;
decoded arrays are cached (see ``cbdlib.data.cache``), except for digits.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import pickle
import posixpath
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import CBDError
from . import cache

log = logging.getLogger(__name__)

KNOWN_DATASETS = ("digits", "cifar10", "cifar100", "folder", "splitfile")

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


@dataclass(frozen=True)
class _CifarSpec:
    """What differs between CIFAR-10 and CIFAR-100 in torchvision's pickled release."""

    name: str
    title: str
    env: str
    folder: str
    num_classes: int
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str

    @property
    def files(self) -> frozenset[str]:
        return frozenset(self.train_files + self.test_files + (self.meta_file,))


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar10", "CIFAR-10", "CBD_CIFAR10", "cifar-10-batches-py", 10,
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names",
    ),
    "cifar100": _CifarSpec(
        "cifar100", "CIFAR-100", "CBD_CIFAR100", "cifar-100-python", 100,
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    ),
}

CIFAR_SIZE = 32


# --------------------------------------------------------------------------- public API


def load_source(
    dataset: str,
    data: str | os.PathLike | None,
    *,
    split_seed: int = 0,
    image_size: int = 32,
) -> tuple[ImageSet, ImageSet]:
    """Return ``(train_pool, test)`` for a dataset name.

    ``data`` is the dataset's path (see the module docstring for what each
    dataset accepts); digits is built in and refuses one. ``split_seed`` only matters for digits,
    whose train/test split is drawn here. ``image_size`` is the side that folder
    and splitfile images are resized to; CIFAR is always 32x32 and digits 8x8.
    Raises ``CBDError`` for any problem with the name, the path or its contents.
    """
    if dataset not in KNOWN_DATASETS:
        raise CBDError(f"unknown dataset {dataset!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    if dataset == "digits":
        if data is not None:
            raise CBDError(f"dataset digits is built in and takes no data path, got {str(data)!r}; leave data unset")
        return _load_digits(split_seed)
    if dataset in _CIFAR:
        return _load_cifar(_CIFAR[dataset], data)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CBDError(f"image_size must be a positive integer, got {image_size!r}")
    if data is None:
        raise CBDError(f"dataset {dataset!r} needs a data path: pass --data / the data parameter")
    path = _existing(data)
    if dataset == "folder":
        return _load_tree_source(path, dataset, image_size, strict_for=None, cifar=None)
    return _load_splitfile(path, image_size)


def parse_split_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read an ImageNet-LT style split file: one ``relative/path label`` pair per line.

    Blank lines are skipped. A line without exactly two fields, or whose label is
    not a non-negative integer, raises ``CBDError`` naming the file and line.
    """
    return [(rel, label) for _, rel, label in _parse_split_lines(Path(path))]


def default_data_dir() -> Path:
    """``<project root>/data``: where torchvision downloads go (project root holds ``cbdlib``)."""
    return Path(__file__).resolve().parents[2] / "data"


def download_cifar(dataset: str, root: str | os.PathLike) -> Path:
    """Download a CIFAR release with torchvision into ``root``; return its pickle folder.

    Any failure (typically: no network) propagates as torchvision raises it.
    """
    from torchvision import datasets  # heavy import, only needed here

    spec = _CIFAR[dataset]
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    cls(root=str(root), train=True, download=True)
    return Path(root) / spec.folder


def decode_images(
    items: Sequence[tuple[str, ImageSource]],
    image_size: int,
    strict_for: Optional[str] = None,
) -> np.ndarray:
    """Decode ``(display name, bytes or path)`` pairs into a uint8 (N, S, S, 3) array.

    Images are converted to RGB; a wrong-sized image is resized (bilinear), or,
    when ``strict_for`` names a dataset, refused with a ``CBDError``. Large
    batches are split over worker processes: for 32x32 images Python overhead,
    not pixel work, dominates, and threads measured slower than one process.
    """
    n = len(items)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    workers = _worker_count()
    # Daemonic processes (e.g. DataLoader workers) may not start a pool of their own.
    if n >= _PARALLEL_MIN_IMAGES and workers > 1 and not multiprocessing.current_process().daemon:
        try:
            _decode_parallel(items, image_size, strict_for, out, workers)
            return out
        except (BrokenProcessPool, OSError) as exc:
            # Sandboxes without working process pools still get their images, just slower.
            log.warning("parallel decoding failed (%s); decoding in this process", exc)
    _decode_chunk(items, image_size, strict_for, out)
    return out


# --------------------------------------------------------------------------- digits


def _load_digits(split_seed: int) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=split_seed
    )
    names = [str(i) for i in range(10)]
    return (
        ImageSet(images[train_idx], labels[train_idx], list(names)),
        ImageSet(images[test_idx], labels[test_idx], list(names)),
    )


# --------------------------------------------------------------------------- CIFAR


def _load_cifar(spec: _CifarSpec, data) -> tuple[ImageSet, ImageSet]:
    if data is None:
        env = os.environ.get(spec.env, "").strip()
        if env:
            path = Path(env).expanduser()
            if not path.exists():
                raise CBDError(f"{spec.env} points to {path}, which does not exist")
        else:
            path = _default_cifar(spec)
    else:
        path = _existing(data)
    if path.is_dir():
        pickles = _pickle_folder(path, spec)
        if pickles is not None:
            key = {"dataset": spec.name, "kind": "pickle", "checksum": cache.source_checksum(pickles)}
            arrays = cache.cached_arrays(key, lambda: _cifar_from_pickle_folder(spec, pickles))
            return _unpack(arrays)
    return _load_tree_source(path, spec.name, CIFAR_SIZE, strict_for=spec.title, cifar=spec)


def _default_cifar(spec: _CifarSpec) -> Path:
    """A previous torchvision download under ``data/``, else a fresh one."""
    root = default_data_dir()
    if (root / spec.folder).is_dir():
        return root / spec.folder
    log.info("%s not set and no %s under %s: trying a torchvision download", spec.env, spec.folder, root)
    try:
        return download_cifar(spec.name, root)
    except Exception as exc:  # no network, no write access, ...: all mean "data absent"
        raise CBDError(
            f"{spec.title} data is absent and could not be downloaded into {root} "
            f"({type(exc).__name__}: {_one_line(exc)}); set {spec.env} to a copy "
            f"(pickle folder, ImageFolder tree or its .tar.gz) or pass --data / the data parameter"
        ) from exc


def _pickle_folder(path: Path, spec: _CifarSpec) -> Optional[Path]:
    """The folder of torchvision's pickles at or directly under ``path``, if any."""
    if path.name == spec.folder or ((path / spec.meta_file).is_file() and (path / spec.train_files[0]).is_file()):
        return path
    if (path / spec.folder).is_dir():
        return path / spec.folder
    return None


def _cifar_from_pickle_folder(spec: _CifarSpec, folder: Path) -> dict[str, np.ndarray]:
    def read(name: str) -> Optional[bytes]:
        file = folder / name
        return file.read_bytes() if file.is_file() else None

    return _cifar_arrays(spec, read, lambda name: str(folder / name))


def _cifar_arrays(
    spec: _CifarSpec,
    read: Callable[[str], Optional[bytes]],
    where: Callable[[str], str],
) -> dict[str, np.ndarray]:
    """Arrays from torchvision's pickled batches, fetched by file name through ``read``."""

    def load(name: str) -> dict:
        blob = read(name)
        if blob is None:
            raise CBDError(f"{where(name)} is missing")
        return _unpickle(blob, where(name))

    def batches(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            batch = load(name)
            pixels = np.asarray(_field(batch, "data", where(name)))
            targets = np.asarray(_field(batch, spec.label_key, where(name)), dtype=np.int64)
            if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * CIFAR_SIZE**2 \
                    or targets.shape != (pixels.shape[0],):
                raise CBDError(
                    f"{where(name)}: expected uint8 data of shape (N, 3072) and N labels, "
                    f"got {pixels.dtype} {pixels.shape} and {targets.shape[0]} labels"
                )
            if targets.size and (targets.min() < 0 or targets.max() >= spec.num_classes):
                raise CBDError(f"{where(name)}: labels outside 0..{spec.num_classes - 1}")
            # Rows are stored channel-major (1024 R, 1024 G, 1024 B values): make them HWC.
            images.append(pixels.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1))
            labels.append(targets)
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    names = [_text(n) for n in _field(load(spec.meta_file), spec.names_key, where(spec.meta_file))]
    if len(names) != spec.num_classes:
        raise CBDError(
            f"{where(spec.meta_file)}: {spec.title} needs {spec.num_classes} class names, found {len(names)}"
        )
    train_images, train_labels = batches(spec.train_files)
    test_images, test_labels = batches(spec.test_files)
    return _pack(train_images, train_labels, test_images, test_labels, names)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: CIFAR batches need nothing else,
    and refusing other globals keeps a hostile "dataset" from running code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 spells bytes in protocol 2
    }

    def find_class(self, module: str, name: str):
        # Pickles from numpy 1.x (and Python 2) name numpy.core, numpy 2 numpy._core.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        # latin1 is how Python 2 byte strings (the original CIFAR pickles) decode losslessly.
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as exc:
        raise CBDError(f"{where}: not a readable CIFAR pickle ({_one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise CBDError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _field(batch: dict, key: str, where: str):
    """A batch entry under its str key (Python 2 pickles) or bytes key (Python 3 ones)."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise CBDError(f"{where}: no {key!r} entry")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- ImageFolder trees


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


def _load_tree_source(
    path: Path,
    dataset: str,
    image_size: int,
    strict_for: Optional[str],
    cifar: Optional[_CifarSpec],
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
                return _cifar_arrays(cifar, pickles.get, lambda name: f"{path} (member {cifar.folder}/{name})")
        else:
            listing = _scan_folder(path)
        return _tree_arrays(listing, str(path), image_size, strict_for, cifar)

    return _unpack(cache.cached_arrays(key, build))


def _scan_folder(root: Path) -> _Listing:
    images: dict[str, ImageSource] = {}
    others: set[str] = set()
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel_dir = Path(os.path.relpath(current, root)).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        dirs.update(posixpath.join(rel_dir, d) for d in dirnames)
        for name in filenames:
            if _hidden(name):
                continue
            rel = posixpath.join(rel_dir, name)
            if _is_image(name):
                images[rel] = os.path.join(current, name)
            else:
                others.add(rel)
    return _Listing(images, others, dirs, lambda rel: str(root / rel))


def _read_archive(path: Path, cifar: Optional[_CifarSpec]) -> tuple[_Listing, dict[str, bytes]]:
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
                name = _clean_member(member.name)
                if not name or any(_hidden(part) for part in name.split("/")):
                    continue
                if member.isdir():
                    dirs.add(name)
                elif not member.isfile():
                    continue
                elif _is_image(name):
                    images[name] = archive.extractfile(member).read()
                elif cifar is not None and _is_cifar_pickle(name, cifar):
                    pickles[posixpath.basename(name)] = archive.extractfile(member).read()
                else:
                    others.add(name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CBDError(f"{path} is not a readable tar archive ({_one_line(exc)})") from exc
    if not (images or others or dirs or pickles):
        raise CBDError(f"archive {path} is empty")
    return _Listing(images, others, dirs, lambda rel: f"{path} (member {rel})"), pickles


def _is_cifar_pickle(name: str, spec: _CifarSpec) -> bool:
    parent, base = posixpath.split(name)
    return posixpath.basename(parent) == spec.folder and base in spec.files


def _tree_arrays(
    listing: _Listing,
    where: str,
    image_size: int,
    strict_for: Optional[str],
    cifar: Optional[_CifarSpec],
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
    log.info("decoding %d images from %s", len(items), where)
    images = decode_images(items, image_size, strict_for)
    label_array = np.asarray(labels, dtype=np.int64)
    n_train = counts[0]
    return _pack(images[:n_train], label_array[:n_train], images[n_train:], label_array[n_train:], class_names)


def _tree_root(all_dirs: set[str], where: str, cifar: Optional[_CifarSpec]) -> str:
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


# --------------------------------------------------------------------------- split files


def _load_splitfile(folder: Path, image_size: int) -> tuple[ImageSet, ImageSet]:
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
        train = _parse_split_lines(train_file)
        test = _parse_split_lines(test_file)
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
        images = decode_images(items, image_size)
        n = len(train)
        return _pack(
            images[:n], np.array([lab for _, _, lab in train], dtype=np.int64),
            images[n:], np.array([lab for _, _, lab in test], dtype=np.int64),
            [str(i) for i in range(num_classes)],
        )

    return _unpack(cache.cached_arrays(key, build))


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


def _parse_split_lines(path: Path) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) per non-blank line of a split file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CBDError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CBDError(f"cannot read split file {path} ({_one_line(exc)})") from exc
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


# --------------------------------------------------------------------------- decoding

_PARALLEL_MIN_IMAGES = 4096


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _decode_parallel(items, image_size, strict_for, out: np.ndarray, workers: int) -> None:
    # A few chunks per worker keeps both busy without paying per-image IPC.
    chunk = max(256, -(-len(items) // (workers * 4)))
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        futures = [
            (start, pool.submit(_decode_chunk, items[start:start + chunk], image_size, strict_for))
            for start in range(0, len(items), chunk)
        ]
        for start, future in futures:
            block = future.result()
            out[start:start + len(block)] = block
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(items, image_size: int, strict_for: Optional[str], out: Optional[np.ndarray] = None) -> np.ndarray:
    """Decode a list of images (runs in worker processes, so it is module-level)."""
    if out is None:
        out = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    for i, (name, source) in enumerate(items):
        out[i] = _decode_one(name, source, image_size, strict_for)
    return out


def _decode_one(name: str, source: ImageSource, size: int, strict_for: Optional[str]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            rgb = img.convert("RGB")  # see the module docstring for what this does to L / RGBA / P
    except Exception as exc:  # Pillow signals bad data with OSError, SyntaxError, ValueError, ...
        raise CBDError(f"cannot read image {name} ({_one_line(exc)})") from None
    if rgb.size != (size, size):
        if strict_for:
            raise CBDError(f"image {name} is {rgb.size[0]}x{rgb.size[1]}; {strict_for} images must be {size}x{size}")
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------- helpers


def _pack(train_images, train_labels, test_images, test_labels, class_names) -> dict[str, np.ndarray]:
    """The cacheable form of a (train, test) pair: arrays only, names as unicode."""
    return {
        "train_images": train_images,
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": test_images,
        "test_labels": np.asarray(test_labels, dtype=np.int64),
        "class_names": np.array([str(n) for n in class_names], dtype=np.str_),
    }


def _unpack(arrays: Mapping[str, np.ndarray]) -> tuple[ImageSet, ImageSet]:
    names = [str(n) for n in arrays["class_names"]]
    return (
        ImageSet(arrays["train_images"], arrays["train_labels"].astype(np.int64, copy=False), list(names)),
        ImageSet(arrays["test_images"], arrays["test_labels"].astype(np.int64, copy=False), list(names)),
    )


def _existing(data) -> Path:
    path = Path(os.fspath(data)).expanduser()
    if not path.exists():
        raise CBDError(f"data path {path} does not exist")
    return path


def _clean_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, short enough for a CBDError message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
