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

import os
from pathlib import Path

from ...errors import CBDError
from .cifar import default_data_dir, download_cifar, load_cifar
from .cifar_pickles import CIFAR_SIZE, CIFAR_SPECS
from .common import IMAGE_EXTENSIONS, ImageSet, ImageSource, existing_path
from .decode import decode_images
from .digits import load_digits
from .folder import load_tree_source
from .splitfile import load_splitfile, parse_split_lines

KNOWN_DATASETS = ("digits", "cifar10", "cifar100", "folder", "splitfile")


def load_source(
    dataset: str,
    data: str | os.PathLike | None,
    *,
    split_seed: int = 0,
    image_size: int | None = 32,
) -> tuple[ImageSet, ImageSet]:
    """Return ``(train_pool, test)`` for a dataset name.

    ``data`` is the dataset's path (see the module docstring for what each
    dataset accepts); digits is built in and refuses one. ``split_seed`` only matters for digits,
    whose train/test split is drawn here. ``image_size`` is the side that folder
    and splitfile images are resized to (None, folder trees only: their own size, the same for
    every image); CIFAR is always 32x32 and digits 8x8.
    Raises ``CBDError`` for any problem with the name, the path or its contents.
    """
    if dataset not in KNOWN_DATASETS:
        raise CBDError(f"unknown dataset {dataset!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    if dataset == "digits":
        if data is not None:
            raise CBDError(f"dataset digits is built in and takes no data path, got {str(data)!r}; leave data unset")
        return load_digits(split_seed)
    if dataset in CIFAR_SPECS:
        return load_cifar(CIFAR_SPECS[dataset], data)
    if image_size is None and dataset != "folder":
        raise CBDError(f"image_size: null (keep the images' own size) is for folder trees; give {dataset} a size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise CBDError(f"image_size must be a positive integer or null, got {image_size!r}")
    if data is None:
        raise CBDError(f"dataset {dataset!r} needs a data path: pass --data / the data parameter")
    path = existing_path(data)
    if dataset == "folder":
        return load_tree_source(path, dataset, image_size, strict_for=None, cifar=None)
    return load_splitfile(path, image_size)


def parse_split_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read an ImageNet-LT style split file: one ``relative/path label`` pair per line.

    Blank lines are skipped. A line without exactly two fields, or whose label is
    not a non-negative integer, raises ``CBDError`` naming the file and line.
    """
    return [(rel, label) for _, rel, label in parse_split_lines(Path(path))]


__all__ = ["CIFAR_SIZE", "IMAGE_EXTENSIONS", "KNOWN_DATASETS", "ImageSet", "ImageSource", "decode_images",
           "default_data_dir", "download_cifar", "load_source", "parse_split_file"]
