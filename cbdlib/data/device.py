"""Small images resident on the training device, and their batches.

:class:`DeviceData` holds the long-tailed training and validation images as uint8 tensors on
the device and yields each epoch's batches: indices from the job's sampler, augmented on the
device by ``BatchAugmenter`` with random numbers from a generator seeded by (model seed,
epoch). Large images take the other path, ``data.streaming.StreamData``; both offer
``batches(job, ...)`` and ``predict(...)`` to the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..augment import BatchAugmenter, aug_config, vanilla_config
from ..devices import exact_float32, use_channels_last
from ..errors import CBDError
from ..seeding import derive_seed, make_generator
from .samplers import IndexSampler, shard_indices


@dataclass
class DeviceData:
    """Training and validation images as uint8 tensors on the device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    class_counts: torch.Tensor

    @classmethod
    def from_long_tail(cls, data, device: torch.device) -> "DeviceData":
        counts = torch.tensor(data.class_counts, dtype=torch.float32, device=device)
        return cls(
            train_images=torch.from_numpy(np.ascontiguousarray(data.train_images)).to(device),
            train_labels=torch.from_numpy(data.train_labels).to(device),
            val_images=torch.from_numpy(np.ascontiguousarray(data.val_images)).to(device),
            val_labels=torch.from_numpy(data.val_labels).to(device),
            mean=data.mean,
            std=data.std,
            num_classes=data.num_classes,
            class_counts=counts,
        )

    def batches(self, job, batch_size: int, steps: int, device: torch.device, rank: int = 0, world: int = 1,
                compile_fn=None):
        """A function ``epoch -> iterator`` of this rank's share of each global batch of
        ``batch_size`` images: (normalised images, labels), ``steps`` batches per epoch.
        ``compile_fn`` compiles the colour-jitter augmentation (see ``BatchAugmenter``)."""
        size = self.train_images.shape[1]
        augmenter = BatchAugmenter(aug_config(size) if job.augment == "aug" else vanilla_config(size),
                                   self.mean, self.std, channels_last=use_channels_last(device), compile_fn=compile_fn)
        sampler = IndexSampler(self.train_labels, job.sampling, num_classes=self.num_classes,
                               generator_seed=job.seed, device=device)
        local = batch_size // world

        def epoch_batches(epoch: int):
            indices = shard_indices(sampler.epoch_indices(epoch), rank, world)
            generator = make_generator(device, derive_seed(job.seed, "augment", epoch))
            for step in range(steps):
                batch = indices[step * local:(step + 1) * local]
                # Every rank draws the global batch's random numbers and keeps its rows, so an
                # image is augmented as it would be in one process.
                u = augmenter.draw(batch_size, generator, device)[rank::world]
                yield augmenter.apply(self.train_images[batch], u), self.train_labels[batch]

        return epoch_batches

    def predict(self, model, split: str, device: torch.device, rank: int = 0, world: int = 1):
        """(features, logits, labels) of the validation split (or this rank's ``rank::world`` share)."""
        if split != "val":
            raise CBDError(f"DeviceData holds the training and validation images only, not {split!r}")
        images, labels = self.val_images[rank::world], self.val_labels[rank::world]
        if len(labels) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), labels.cpu().numpy()
        features, logits = predict(model, images, self.mean, self.std, device)
        return features, logits, labels.cpu().numpy()


@torch.no_grad()
def predict(model, images: torch.Tensor | np.ndarray, mean, std, device: torch.device,
            batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of uint8 images, in eval mode, without augmentation, in float32
    (whatever precision trained the model, so that a saved model always scores the same)."""
    model.eval()
    normalise = BatchAugmenter(None, mean, std, channels_last=use_channels_last(device))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    feats, logits = [], []
    with exact_float32():  # no TF32 convolutions on GPUs either
        for start in range(0, len(images), batch_size):
            x = normalise(images[start:start + batch_size].to(device), None)
            f, z = model(x)
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()
