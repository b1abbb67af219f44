"""torchvision's pickled CIFAR batches: what differs between CIFAR-10 and -100, and a reader
that rebuilds only arrays (a hostile pickle cannot run code)."""
from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ...errors import CBDError, one_line
from .common import pack_arrays

log = logging.getLogger("cbdlib.data.sources")


@dataclass(frozen=True)
class CifarSpec:
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


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "cifar10", "CIFAR-10", "CBD_CIFAR10", "cifar-10-batches-py", 10,
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names",
    ),
    "cifar100": CifarSpec(
        "cifar100", "CIFAR-100", "CBD_CIFAR100", "cifar-100-python", 100,
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    ),
}

CIFAR_SIZE = 32


def cifar_arrays(
    spec: CifarSpec,
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
    return pack_arrays(train_images, train_labels, test_images, test_labels, names)


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
        raise CBDError(f"{where}: not a readable CIFAR pickle ({one_line(exc)})") from exc
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
