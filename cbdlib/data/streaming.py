"""The streaming data path for large-image datasets: decode while training.

ImageNet-LT, Places-LT and iNaturalist-2018 do not fit in memory as arrays, so they keep
the classic pipeline: a ``torch.utils.data.Dataset`` over (path, label) lists that
decodes each image with Pillow, torchvision transforms in ``DataLoader`` workers
(``num_workers``), pinned host memory and asynchronous copies to the GPU. The small
in-memory datasets (digits, CIFAR) keep the on-device path of ``cbdlib.engine.loop``.

Transforms (sizes follow ``image_size``, keeping ImageNet's 224 / 256 ratio):

* train "vanilla": ``RandomResizedCrop(image_size, scale=(0.05, 1))`` + horizontal flip;
* train "aug": vanilla + ``ColorJitter(0.8, 0.8, 0.8, 0.2)`` with p = 0.8 +
  ``RandomGrayscale(0.2)`` (SimCLR colour distortion of strength 1, as the CBD teachers);
* eval: ``Resize(round(image_size * 256 / 224))`` + ``CenterCrop(image_size)``.

Reproducibility: the sampler yields ``(index, seed)`` pairs and each image's random
transform runs under its own seed, derived from the model's seed, the epoch and the
image's position in the global batch stream. The augmentation an image gets therefore
does not depend on ``num_workers``, on the number of processes, or on whether the run
was resumed.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..devices import exact_float32
from ..errors import CBDError
from ..seeding import derive_seed
from .large import ImageList, LargeLongTail
from .samplers import DistributedStrategySampler

__all__ = ["ImageFileDataset", "SeededSampler", "StreamData", "train_transform", "eval_transform",
           "eval_resize", "make_train_loader", "make_eval_loader", "predict_loader"]

CROP_SCALE = (0.05, 1.0)       # RandomResizedCrop's area range, as in the official CBD input pipeline
EVAL_RESIZE_RATIO = 256 / 224  # resize 256, centre crop 224 at ImageNet scale


def eval_resize(image_size: int) -> int:
    """The side images are resized to before the centre crop: 256 for 224, 37 for 32."""
    return int(round(image_size * EVAL_RESIZE_RATIO))


def train_transform(image_size: int, mean, std, augment: str = "vanilla"):
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(image_size, scale=CROP_SCALE), T.RandomHorizontalFlip()]
    if augment == "aug":
        steps += [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]
    elif augment != "vanilla":
        raise CBDError(f"unknown augmentation {augment!r}; expected 'vanilla' or 'aug'")
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(image_size: int, mean, std):
    from torchvision import transforms as T

    return T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


def open_rgb(path: str) -> Image.Image:
    """An image file as RGB; a missing or unreadable file is a ``CBDError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise CBDError(f"image {path} does not exist") from None
    except Exception as exc:  # Pillow reports bad data with OSError, SyntaxError, ValueError, ...
        raise CBDError(f"cannot read image {path} ({' '.join(str(exc).split())[:200]})") from None


class ImageFileDataset(Dataset):
    """Decoded, transformed images of an :class:`ImageList`: item -> (float CHW tensor, label).

    An item is an index, or an ``(index, seed)`` pair: the transform's random choices
    are then drawn under ``seed`` (the global RNG is restored afterwards).
    """

    def __init__(self, images: ImageList, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = open_rgb(self.images.paths[index])
        if seed is None:
            x = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
        return x, int(self.images.labels[index])


class SeededSampler(Sampler):
    """This rank's ``(index, seed)`` pairs of one epoch, over a :class:`DistributedStrategySampler`.

    The seed of an image is ``base * 2**32 + p``, ``p`` its position in the epoch's global
    stream (local position ``k`` of rank ``r`` of ``w`` is ``p = k * w + r``). Only
    ``num_samples`` pairs are yielded (whole local batches), so workers decode nothing
    that is not trained on.
    """

    def __init__(self, sampler: DistributedStrategySampler, num_samples: Optional[int] = None):
        super().__init__()
        self.sampler = sampler
        self.num_samples = len(sampler) if num_samples is None else min(num_samples, len(sampler))
        self.base_seed = 0

    def set_epoch(self, epoch: int, base_seed: int) -> None:
        self.sampler.set_epoch(epoch)
        self.base_seed = int(base_seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self.sampler.rank, self.sampler.world_size
        indices = self.sampler.local_indices()[: self.num_samples].tolist()
        base = self.base_seed << 32
        return iter([(index, base + k * world + rank) for k, index in enumerate(indices)])

    def __len__(self) -> int:
        return self.num_samples


def _loader_options(num_workers: int, pin_memory: bool, persistent: bool) -> dict:
    options = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        # Persistent workers survive between epochs instead of being started again each time.
        options.update(persistent_workers=persistent, prefetch_factor=4)
    return options


def make_train_loader(images: ImageList, transform, sampler: SeededSampler, local_batch_size: int, *,
                      num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(ImageFileDataset(images, transform), batch_size=local_batch_size, sampler=sampler,
                      drop_last=True, **_loader_options(num_workers, pin_memory, persistent=True))


def make_eval_loader(images: ImageList, transform, batch_size: int, *, num_workers: int = 0,
                     pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    return DataLoader(ImageFileDataset(images, transform), batch_size=batch_size, shuffle=False,
                      **_loader_options(num_workers, pin_memory, persistent))


def iterate(loader: DataLoader) -> Iterator:
    """Iterate ``loader``; a ``CBDError`` raised in a worker comes back as its one-line message.

    (``DataLoader`` re-raises a worker's exception with the worker's whole traceback as
    its message; the last line is the original ``CBDError`` text, naming the image.)
    """
    try:
        yield from loader
    except CBDError as error:
        text = str(error)
        if not text.startswith("Caught CBDError"):
            raise
        last = text.strip().splitlines()[-1]
        raise CBDError(last.split("CBDError: ", 1)[-1]) from None


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A pinned host batch to the device without blocking, channels-last (faster convolutions
    on CUDA and on CPUs, docs/performance.md)."""
    return x.to(device, non_blocking=device.type == "cuda").contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_loader(model, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of every batch of ``loader``, in eval mode and float32 (as
    ``data.device.predict``: a saved model scores the same whatever precision trained it)."""
    model.eval()
    feats, logits = [], []
    with exact_float32():  # no TF32 convolutions on GPUs either
        for x, _ in iterate(loader):
            f, z = model(to_device(x, device))
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
    if not logits:  # an empty share of a split
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


class StreamData:
    """What the training loop needs of a large dataset: labels, class counts and loaders.

    The counterpart of ``cbdlib.data.device.DeviceData`` (images resident on the device):
    the same attributes and the same two methods, :meth:`batches` and :meth:`predict`.
    """

    def __init__(self, data: LargeLongTail, device: torch.device, *, num_workers: int = 0, eval_batch_size: int = 256):
        self.data = data
        self.device = device
        self.num_workers = int(num_workers)
        self.eval_batch_size = int(eval_batch_size)
        self.pin_memory = device.type == "cuda"
        self.train_labels = torch.from_numpy(data.train_labels)
        self.val_labels = torch.from_numpy(data.val_labels)
        self.mean, self.std = data.mean, data.std
        self.num_classes = data.num_classes
        self.class_counts = torch.tensor(data.class_counts, dtype=torch.float32, device=device)
        self.image_size = data.image_size
        self._val_loaders: dict[tuple[int, int], DataLoader] = {}

    def batches(self, job, batch_size: int, steps: int, device: torch.device, rank: int = 0, world: int = 1,
                compile_fn=None):
        """A function ``epoch -> iterator`` of this rank's share of each global batch
        (normalised images on ``device``, labels), ``steps`` batches per epoch. ``compile_fn`` is
        not used: the DataLoader workers augment here."""
        local = batch_size // world
        sampler = SeededSampler(
            DistributedStrategySampler(self.train_labels, job.sampling, rank=rank, world_size=world,
                                       num_classes=self.num_classes, generator_seed=job.seed),
            num_samples=steps * local,
        )
        transform = train_transform(self.image_size, self.mean, self.std, job.augment)
        loader = make_train_loader(self.data.train, transform, sampler, local, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory)

        def epoch_batches(epoch: int):
            sampler.set_epoch(epoch, derive_seed(job.seed, "augment", epoch))
            for x, labels in iterate(loader):
                yield to_device(x, device), labels.to(device, non_blocking=True)

        return epoch_batches

    def loader(self, split: str, rank: int = 0, world: int = 1) -> DataLoader:
        """Eval-transform loader over ``split`` (train | val | test), or this rank's ``rank::world`` share.

        The validation loader is evaluated every epoch: it is made once and keeps its workers.
        """
        if split == "val" and (rank, world) in self._val_loaders:
            return self._val_loaders[(rank, world)]
        images = {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]
        if world > 1:
            images = images.subset(np.arange(rank, len(images), world))
        loader = make_eval_loader(images, eval_transform(self.image_size, self.mean, self.std), self.eval_batch_size,
                                  num_workers=self.num_workers, pin_memory=self.pin_memory, persistent=split == "val")
        if split == "val":
            self._val_loaders[(rank, world)] = loader
        return loader

    def predict(self, model, split: str, device: torch.device, rank: int = 0, world: int = 1):
        """(features, logits, labels) of ``split`` (or this rank's share of it), numpy arrays."""
        loader = self.loader(split, rank, world)
        features, logits = predict_loader(model, loader, device)
        return features, logits, loader.dataset.images.labels
