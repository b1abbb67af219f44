"""Decoding image files into uint8 RGB arrays, over worker processes for large batches."""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ...errors import CBDError, one_line
from .common import ImageSource

log = logging.getLogger("cbdlib.data.sources")


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
    workers = worker_count()
    # Daemonic processes (e.g. DataLoader workers) may not start a pool of their own.
    if n >= PARALLEL_MIN_IMAGES and workers > 1 and not multiprocessing.current_process().daemon:
        try:
            _decode_parallel(items, image_size, strict_for, out, workers)
            return out
        except (BrokenProcessPool, OSError) as exc:
            # Sandboxes without working process pools still get their images, just slower.
            log.warning("parallel decoding failed (%s); decoding in this process", exc)
    _decode_chunk(items, image_size, strict_for, out)
    return out


PARALLEL_MIN_IMAGES = 4096


def worker_count() -> int:
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
        raise CBDError(f"cannot read image {name} ({one_line(exc)})") from None
    if rgb.size != (size, size):
        if strict_for:
            raise CBDError(f"image {name} is {rgb.size[0]}x{rgb.size[1]}; {strict_for} images must be {size}x{size}")
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
