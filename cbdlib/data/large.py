"""The large long-tailed benchmarks: ImageNet-LT, Places-LT and iNaturalist-2018.

These are lists of image files, not arrays: :func:`load_large` reads the official
annotation files into :class:`ImageList`s of (path, label) and checks that every
listed image exists; the images are decoded while training, by the streaming path
(:mod:`cbdlib.data.streaming`). Layouts (see ``data/README.md`` for where to get them):

Without a ``data`` path each looks in ``<project root>/data/<dataset name>/`` (a folder
or a link there).

* ``imagenet_lt``  ``data`` is the ImageNet root (holding ``train/`` and ``val/``) and
  holds ``ImageNet_LT_train.txt``, ``ImageNet_LT_val.txt`` and ``ImageNet_LT_test.txt``
  (or they sit in ``data/ImageNet_LT/``). Lines are ``relative/path.JPEG label``.
* ``places_lt``    the same with ``Places_LT_{train,val,test}.txt`` under the Places-365
  root (or ``data/Places_LT/``).
* ``inat2018``     ``data`` holds ``train2018.json`` and ``val2018.json`` (COCO-like:
  ``images`` [{id, file_name}], ``annotations`` [{image_id, category_id}],
  ``categories`` [{id, ...}]) and the images under the ``file_name`` paths.

Which split plays which role:

* ImageNet-LT / Places-LT: train, the official ``val`` split (balanced: 20 images per
  class) as the validation set on which tau-normalisation's tau is chosen, and the
  official ``test`` split for the reported numbers.
* iNaturalist-2018 has no separate test set: its official val set (24,426 images, 3 per
  class) is the test set, as in the paper and the literature. The validation set for
  tau is held out from train: ``min(val_per_class, n_c // 2)`` images of each class
  ``c`` (drawn with ``lt_seed``; every class keeps at least half its images), removed
  from training. Accuracies on it are averaged per class, so classes with fewer
  held-out images still weigh the same when tau is chosen.

The splits are long-tailed already: only ``imbalance_ratio: 1`` (use the split as it
is) is accepted. Smoke runs cap every split at a few images per class.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CBDError
from .longtail import cap_per_class, class_permutations
from .sources import default_data_dir, parse_split_file
from .stats import class_counts, class_splits, describe

log = logging.getLogger(__name__)

LARGE_DATASETS = ("imagenet_lt", "places_lt", "inat2018")

# File stems of the split-file benchmarks.
SPLIT_FILE_PREFIX = {"imagenet_lt": "ImageNet_LT", "places_lt": "Places_LT"}
INAT_FILES = ("train2018.json", "val2018.json")

# Photographs, not CIFAR: the usual ImageNet statistics normalise every model.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ImageList:
    """Image files with their labels: ``paths[i]`` (absolute) has label ``labels[i]``."""

    paths: list
    labels: np.ndarray
    source: str = ""    # the annotation file that listed them (for messages)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> "ImageList":
        return ImageList([self.paths[i] for i in keep], self.labels[keep], self.source)


@dataclass
class LargeLongTail:
    """A large benchmark as file lists: training, validation and test images.

    Reads like :class:`cbdlib.data.LongTailData` wherever labels and statistics are
    concerned (``train_labels``, ``class_counts``, ``splits``, ``stats()``), but holds
    paths instead of decoded images; ``image_size`` is the side the streaming path crops.
    """

    name: str
    class_names: list
    train: ImageList
    val: ImageList
    test: ImageList
    image_size: int
    mean: tuple = IMAGENET_MEAN_STD[0]
    std: tuple = IMAGENET_MEAN_STD[1]
    notes: dict = field(default_factory=dict)

    streaming = True  # the engine's switch: decode while training, through a DataLoader

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels

    @property
    def class_counts(self) -> list[int]:
        return class_counts(self.train.labels, self.num_classes)

    @property
    def splits(self) -> dict:
        return class_splits(self.class_counts)

    @property
    def image_shape(self) -> tuple:
        return (self.image_size, self.image_size, 3)

    def stats(self) -> dict:
        return describe(self.class_counts)


def load_large(
    dataset: str,
    data: str | os.PathLike | None,
    *,
    imbalance_ratio: float = 1.0,
    lt_seed: int = 0,
    val_per_class: int = 10,
    image_size: int = 224,
    max_train_per_class: Optional[int] = None,
    max_test_per_class: Optional[int] = None,
    check_files: bool = True,
) -> LargeLongTail:
    """Read one of :data:`LARGE_DATASETS` from its annotation files under ``data``.

    ``check_files`` stats every listed image once, so a missing file stops the run
    before training (a ``CBDError`` naming it) rather than hours into it.
    """
    if dataset not in LARGE_DATASETS:
        raise CBDError(f"unknown large dataset {dataset!r}; known: {', '.join(LARGE_DATASETS)}")
    if imbalance_ratio not in (1, None):  # None: the natural counts, the same thing here
        raise CBDError(f"{dataset} is long-tailed already: use imbalance_ratio: 1 (the split as it is), "
                       f"got {imbalance_ratio}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CBDError(f"image_size must be a positive integer, got {image_size!r}")
    root = default_data_dir() / dataset if data is None else Path(os.fspath(data)).expanduser()
    if not root.is_dir():
        where = f"data path {root}" if data is not None else f"no data path given and {root}"
        raise CBDError(f"{where} is not a folder: pass the {dataset} image root with --data / -p data=PATH, "
                       f"or link it there (see data/README.md for the layout)")

    if dataset == "inat2018":
        train, test, class_names = _load_inat(root)
        train, val, notes = _hold_out_validation(train, len(class_names), val_per_class, lt_seed)
    else:
        train, val, test, class_names = _load_split_files(root, SPLIT_FILE_PREFIX[dataset])
        notes = {"validation": f"the official {SPLIT_FILE_PREFIX[dataset]}_val split"}

    num_classes = len(class_names)
    missing = [c for c, n in enumerate(class_counts(train.labels, num_classes)) if n == 0]
    if missing:
        raise CBDError(f"{dataset}: class(es) {missing[:10]} have no training images")
    if max_train_per_class is not None:
        train = train.subset(cap_per_class(train.labels, num_classes, max_train_per_class, seed=lt_seed))
        val = val.subset(cap_per_class(val.labels, num_classes, max_train_per_class, seed=lt_seed))
    if max_test_per_class is not None:
        test = test.subset(cap_per_class(test.labels, num_classes, max_test_per_class, seed=lt_seed))
    if check_files:
        for images in (train, val, test):
            check_images_exist(images)
    log.info("%s: %d training, %d validation and %d test images in %d classes",
             dataset, len(train), len(val), len(test), num_classes)
    return LargeLongTail(name=dataset, class_names=class_names, train=train, val=val, test=test,
                         image_size=image_size, notes=notes)


# --------------------------------------------------------------------------- split files


def find_split_file(root: Path, prefix: str, split: str) -> Path:
    """``<prefix>_<split>.txt`` in ``root`` or ``root/<prefix>/``."""
    name = f"{prefix}_{split}.txt"
    for candidate in (root / name, root / prefix / name):
        if candidate.is_file():
            return candidate
    raise CBDError(f"split file {name} not found in {root} or {root / prefix}")


def read_split_list(root: Path, split_file: Path) -> ImageList:
    """An ImageList from a split file; paths are relative to ``root`` (a leading '/' is ignored)."""
    rows = parse_split_file(split_file)  # CBDError naming file and line for a malformed line
    if not rows:
        raise CBDError(f"split file {split_file} lists no images")
    paths = [str(root / rel.lstrip("/")) for rel, _ in rows]
    return ImageList(paths, np.array([label for _, label in rows], dtype=np.int64), str(split_file))


def _load_split_files(root: Path, prefix: str) -> tuple[ImageList, ImageList, ImageList, list]:
    files = {split: find_split_file(root, prefix, split) for split in ("train", "val", "test")}
    lists = {split: read_split_list(root, path) for split, path in files.items()}
    num_classes = int(lists["train"].labels.max()) + 1
    for split in ("val", "test"):
        labels = lists[split].labels
        if int(labels.max()) >= num_classes:
            entry = int(np.flatnonzero(labels >= num_classes)[0]) + 1
            raise CBDError(f"{files[split]}: label {int(labels.max())} is out of range (the train split "
                           f"{files['train'].name} has {num_classes} classes; first such entry: image {entry})")
    # The test split lists every class: a train label above its largest is a typo, not one more class.
    last = int(lists["test"].labels.max())
    if num_classes - 1 > last:
        entry = int(np.flatnonzero(lists["train"].labels > last)[0])
        raise CBDError(f"{files['train']}: label {int(lists['train'].labels[entry])} (image {entry + 1}) has no image "
                       f"in the test split {files['test'].name}, whose labels run 0..{last}; labels must run 0..C-1")
    return lists["train"], lists["val"], lists["test"], [str(c) for c in range(num_classes)]


# --------------------------------------------------------------------------- iNaturalist


def read_coco_json(path: Path, categories: Optional[dict] = None) -> tuple[ImageList, dict]:
    """Images and labels of an iNaturalist-style json file.

    ``categories`` maps category id -> label; when None it is built from this file's
    ``categories`` (sorted ids -> 0..C-1). Any missing or malformed entry raises a
    ``CBDError`` naming the file and the json key (e.g. ``annotations[7].category_id``).
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CBDError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CBDError(f"{path}: not valid json (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CBDError(f"cannot read annotation file {path} ({exc})") from None
    if not isinstance(content, dict):
        raise CBDError(f"{path}: expected a json object with images, annotations and categories")

    def entries(key: str) -> list:
        value = content.get(key)
        if not isinstance(value, list):
            raise CBDError(f"{path}: key {key!r} must be a list, found {type(value).__name__}")
        return value

    def get(entry, key: str, index: int, field: str, kind):
        if not isinstance(entry, dict) or field not in entry:
            raise CBDError(f"{path}: {key}[{index}] lacks {field!r}")
        value = entry[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CBDError(f"{path}: {key}[{index}].{field} must be {kind.__name__}, got {value!r}")
        return value

    if categories is None:
        ids = sorted({get(c, "categories", i, "id", int) for i, c in enumerate(entries("categories"))})
        if not ids:
            raise CBDError(f"{path}: 'categories' is empty")
        categories = {cid: label for label, cid in enumerate(ids)}
    files: dict[int, str] = {}
    for i, image in enumerate(entries("images")):
        image_id = get(image, "images", i, "id", int)
        if image_id in files:
            raise CBDError(f"{path}: images[{i}].id {image_id} repeats an earlier image id")
        files[image_id] = get(image, "images", i, "file_name", str)
    labels: dict[int, int] = {}
    for i, note in enumerate(entries("annotations")):
        image_id = get(note, "annotations", i, "image_id", int)
        category = get(note, "annotations", i, "category_id", int)
        if image_id not in files:
            raise CBDError(f"{path}: annotations[{i}].image_id {image_id} names no image in 'images'")
        if category not in categories:
            raise CBDError(f"{path}: annotations[{i}].category_id {category} is not a known category")
        if image_id in labels:
            raise CBDError(f"{path}: annotations[{i}] is a second annotation of image {image_id}")
        labels[image_id] = categories[category]
    unlabelled = [image_id for image_id in files if image_id not in labels]
    if unlabelled:
        raise CBDError(f"{path}: {len(unlabelled)} image(s) have no annotation (first: image id {unlabelled[0]})")
    if not files:
        raise CBDError(f"{path}: 'images' is empty")
    root = path.parent
    order = list(files)
    return (ImageList([str(root / files[i].lstrip("/")) for i in order],
                      np.array([labels[i] for i in order], dtype=np.int64), str(path)), categories)


def _load_inat(root: Path) -> tuple[ImageList, ImageList, list]:
    train_file, val_file = (root / name for name in INAT_FILES)
    for file in (train_file, val_file):
        if not file.is_file():
            raise CBDError(f"annotation file {file.name} not found in {root}")
    train, categories = read_coco_json(train_file)
    test, _ = read_coco_json(val_file, categories)  # the official val set is the test set
    return train, test, [str(cid) for cid in categories]


def _hold_out_validation(train: ImageList, num_classes: int, val_per_class: int, lt_seed: int):
    """Move ``min(val_per_class, n_c // 2)`` images of each class from ``train`` to a validation set."""
    if val_per_class < 1:
        raise CBDError(f"val_per_class must be >= 1 (tau is chosen on held-out training images), got {val_per_class}")
    val_idx = []
    for perm in class_permutations(train.labels, num_classes, lt_seed):
        val_idx.append(perm[len(perm) - min(val_per_class, len(perm) // 2):])
    val_idx = np.sort(np.concatenate(val_idx)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(train)), val_idx)
    notes = {"validation": f"held out from train2018: min({val_per_class}, n_c // 2) images per class",
             "val_held_out_images": int(len(val_idx))}
    return train.subset(train_idx), train.subset(val_idx), notes


# --------------------------------------------------------------------------- checks


def check_images_exist(images: ImageList) -> None:
    """A ``CBDError`` naming the first listed image that is not a file (and how many are missing)."""
    missing = [path for path in images.paths if not os.path.isfile(path)]
    if missing:
        raise CBDError(f"image {missing[0]} (listed in {images.source or 'the annotations'}) does not exist; "
                       f"{len(missing)} of {len(images)} listed images are missing")
