"""CIFAR-10 / CIFAR-100 from a pickle folder, an ImageFolder tree or an archive of either; without
a path from ``$CBD_CIFAR10`` / ``$CBD_CIFAR100`` or a torchvision download into ``data/``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ...config import project_root
from ...errors import CBDError, one_line
from .. import cache
from .cifar_pickles import CIFAR_SIZE, CIFAR_SPECS, CifarSpec, cifar_arrays
from .common import ImageSet, existing_path, unpack_arrays
from .folder import load_tree_source

log = logging.getLogger("cbdlib.data.sources")


def default_data_dir() -> Path:
    """``<project root>/data``: where torchvision downloads go (project root holds ``cbdlib``)."""
    return project_root() / "data"


def download_cifar(dataset: str, root: str | os.PathLike) -> Path:
    """Download a CIFAR release with torchvision into ``root``; return its pickle folder.

    Any failure (typically: no network) propagates as torchvision raises it.
    """
    from torchvision import datasets  # heavy import, only needed here

    spec = CIFAR_SPECS[dataset]
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    cls(root=str(root), train=True, download=True)
    return Path(root) / spec.folder


def load_cifar(spec: CifarSpec, data) -> tuple[ImageSet, ImageSet]:
    if data is None:
        env = os.environ.get(spec.env, "").strip()
        if env:
            path = Path(env).expanduser()
            if not path.exists():
                raise CBDError(f"{spec.env} points to {path}, which does not exist")
        else:
            path = _default_cifar(spec)
    else:
        path = existing_path(data)
    if path.is_dir():
        pickles = _pickle_folder(path, spec)
        if pickles is not None:
            key = {"dataset": spec.name, "kind": "pickle", "checksum": cache.source_checksum(pickles)}
            arrays = cache.cached_arrays(key, lambda: _cifar_from_pickle_folder(spec, pickles))
            return unpack_arrays(arrays)
    return load_tree_source(path, spec.name, CIFAR_SIZE, strict_for=spec.title, cifar=spec)


def _default_cifar(spec: CifarSpec) -> Path:
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
            f"({type(exc).__name__}: {one_line(exc)}); set {spec.env} to a copy "
            f"(pickle folder, ImageFolder tree or its .tar.gz) or pass --data / the data parameter"
        ) from exc


def _pickle_folder(path: Path, spec: CifarSpec) -> Optional[Path]:
    """The folder of torchvision's pickles at or directly under ``path``, if any."""
    if path.name == spec.folder or ((path / spec.meta_file).is_file() and (path / spec.train_files[0]).is_file()):
        return path
    if (path / spec.folder).is_dir():
        return path / spec.folder
    return None


def _cifar_from_pickle_folder(spec: CifarSpec, folder: Path) -> dict[str, np.ndarray]:
    def read(name: str) -> Optional[bytes]:
        file = folder / name
        return file.read_bytes() if file.is_file() else None

    return cifar_arrays(spec, read, lambda name: str(folder / name))
