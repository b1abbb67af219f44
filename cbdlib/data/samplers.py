"""Sampling strategies for long-tailed training (Kang et al., ICLR 2020, "Decoupling").

The three strategies the training recipes use (``Job.sampling``):

* ``instance``        every image equally likely (class ``j`` drawn with probability
                      ``n_j / N``); done as a random permutation per epoch, so each image
                      appears exactly once.
* ``class_balanced``  every (non-empty) class equally likely, then an image uniformly
                      within it: ``N`` draws an epoch, with replacement.
* ``class_aware``     Kang et al.'s ``ClassAwareSampler`` for classifier re-training (cRT,
                      LWS): classes are visited in shuffled rounds (each round a random
                      permutation of the non-empty classes) and each visit takes
                      :data:`CLASS_AWARE_SAMPLES_PER_CLASS` consecutive images of its class,
                      walking through the class in reshuffled passes. An epoch is ``N``
                      images, as Kang et al.'s training loop runs it: their sampler could
                      yield (largest class count x classes) indices, but their loop stops
                      each epoch after ``int(N / batch_size)`` steps.

:func:`epoch_length` gives the length of an epoch of any strategy (``N`` for all of them).

Two forms share one core: :class:`IndexSampler` returns a whole epoch of indices as one
int64 tensor (on the training device, for on-device batching), and
:class:`StrategySampler` wraps it as a ``torch.utils.data.Sampler`` for ``DataLoader``.

Distributed training splits ONE stream per epoch: every rank draws the same global
``epoch_indices(epoch)`` (same seed, same epoch) and keeps ``indices[rank::world]``,
truncated to ``N // world`` so all ranks take the same number of steps
(:func:`shard_indices`, :class:`DistributedStrategySampler`). The shares are disjoint
positions of the global stream, and with a global batch ``B`` divisible by ``world`` the
``s``-th local batch of ``B // world`` indices of rank ``r`` is exactly
``global_batch_s[r::world]``: the ranks together see the global batches of a
one-process run.

An epoch's indices depend only on ``(generator_seed, epoch, strategy, labels)`` and the
device type (CPU and CUDA generators produce different streams), never on how many
epochs were drawn before, so a resumed run sees the same epochs as an uninterrupted one.
(Kang et al.'s class and image cycles carry over from one epoch to the next; here each
``class_aware`` epoch starts fresh rounds and passes, which keeps resume exact.)
"""
from __future__ import annotations

from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import CBDError

STRATEGIES = ("instance", "class_balanced", "class_aware")
# Consecutive images taken from a class at each visit (``num_samples_cls`` in Kang et al.'s configs).
CLASS_AWARE_SAMPLES_PER_CLASS = 4

LabelsLike = Union[torch.Tensor, np.ndarray, Sequence[int]]

__all__ = ["CLASS_AWARE_SAMPLES_PER_CLASS", "STRATEGIES", "IndexSampler", "StrategySampler",
           "DistributedStrategySampler", "epoch_length", "shard_indices"]


def _normalise_strategy(strategy: str) -> str:
    """Return the canonical strategy name or raise CBDError."""
    if not isinstance(strategy, str):
        raise CBDError(f"sampling strategy must be a string, got {type(strategy).__name__}")
    name = strategy.strip().lower().replace("-", "_")
    if name not in STRATEGIES:
        raise CBDError(f"unknown sampling strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return name


def epoch_length(strategy: str, class_counts: Sequence[int]) -> int:
    """Images per epoch: ``N``, the training-set size, whatever the strategy (``class_aware``
    included: Kang et al.'s loop stops an epoch after ``int(N / batch_size)`` steps)."""
    _normalise_strategy(strategy)  # an unknown strategy is refused here too
    return sum(int(c) for c in class_counts)


def _labels_to_tensor(labels: LabelsLike) -> torch.Tensor:
    """Validate labels (1-D, non-empty, non-negative integers) and return an int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    else:
        try:
            arr = np.asarray(labels)
        except Exception as exc:  # ragged lists and the like
            raise CBDError(f"labels cannot be read as an array: {exc}") from None
        if arr.dtype == object:
            raise CBDError("labels must be an array of integers")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    # bool is technically integral but almost certainly a mistake here
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise CBDError(f"labels must have an integer dtype, got {t.dtype}")
    if t.dim() != 1:
        raise CBDError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise CBDError("labels are empty: cannot sample from an empty training set")
    t = t.to(torch.int64)
    if int(t.min()) < 0:
        raise CBDError(f"labels must be non-negative, found {int(t.min())}")
    return t


def _epoch_seed(generator_seed: int, epoch: int) -> int:
    """Mix (seed, epoch) into one 63-bit seed; SeedSequence avoids collisions like (0, 1) vs (1, 0)."""
    ss = np.random.SeedSequence([int(generator_seed) % (1 << 64), int(epoch)])
    lo, hi = (int(x) for x in ss.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


class IndexSampler:
    """Whole-epoch index generator for one sampling strategy.

    Args:
        labels: class label of every training image (1-D integers, torch or numpy).
        strategy: one of :data:`STRATEGIES`.
        num_classes: number of classes (default ``max(labels) + 1``); classes without
            images get probability 0.
        generator_seed: base seed; each epoch's generator is seeded from (seed, epoch).
        device: where the indices are produced and returned. On CUDA the draws happen
            on the GPU with a CUDA generator; on any other device they are drawn on the
            CPU and moved.
    """

    def __init__(
        self,
        labels: LabelsLike,
        strategy: str = "instance",
        *,
        num_classes: int | None = None,
        generator_seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.strategy = _normalise_strategy(strategy)
        labels_t = _labels_to_tensor(labels)
        max_label = int(labels_t.max())
        if num_classes is None:
            num_classes = max_label + 1
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise CBDError(f"num_classes must be an integer, got {num_classes!r}")
        num_classes = int(num_classes)
        if num_classes <= max_label:
            raise CBDError(f"num_classes={num_classes} but labels go up to {max_label}")
        if isinstance(generator_seed, bool) or not isinstance(generator_seed, (int, np.integer)):
            raise CBDError(f"generator_seed must be an integer, got {generator_seed!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise CBDError(f"invalid device {device!r}: {exc}") from None

        self.num_classes = num_classes
        self.generator_seed = int(generator_seed)
        self._n = int(labels_t.numel())

        counts = torch.bincount(labels_t, minlength=num_classes)
        # Images sorted by class: class c occupies order[start[c] : start[c] + count[c]].
        order = torch.argsort(labels_t, stable=True)
        start = torch.cumsum(counts, 0) - counts

        # Draws happen here: the CUDA device itself, otherwise the CPU.
        self._draw_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self._order = order.to(self._draw_device)
        self._start = start.to(self._draw_device)
        self._count = counts.to(self._draw_device)
        self._classes = torch.nonzero(counts).flatten().to(self._draw_device)  # the non-empty classes
        self._epoch_length = epoch_length(self.strategy, counts.tolist())

        # The class distribution of every epoch (float64, on the CPU): instance draws follow the
        # class counts; class_balanced and class_aware visit every non-empty class equally.
        weights = counts if self.strategy == "instance" else (counts > 0)
        self._class_probabilities = weights.to(torch.float64) / weights.sum()

    def __len__(self) -> int:
        """Number of indices per epoch (see :func:`epoch_length`)."""
        return self._epoch_length

    def __repr__(self) -> str:
        return (f"IndexSampler(strategy={self.strategy!r}, N={self._n}, num_classes={self.num_classes}, "
                f"generator_seed={self.generator_seed}, device={str(self.device)!r})")

    @staticmethod
    def _check_epoch(epoch: int) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise CBDError(f"epoch must be a non-negative integer, got {epoch!r}")
        return int(epoch)

    def class_probabilities(self) -> torch.Tensor:
        """Target class distribution ``p_j``, the same every epoch (float64 CPU tensor of length
        num_classes)."""
        return self._class_probabilities.clone()

    def _generator(self, epoch: int) -> torch.Generator:
        """A fresh generator for this epoch, on the draw device (so resume needs no saved state)."""
        g = torch.Generator(device=self._draw_device)
        g.manual_seed(_epoch_seed(self.generator_seed, epoch))
        return g

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The ``len(self)`` dataset indices of ``epoch`` (int64 tensor on ``device``)."""
        epoch = self._check_epoch(epoch)
        g = self._generator(epoch)
        dev = self._draw_device
        if self.strategy == "instance":
            idx = torch.randperm(self._n, generator=g, device=dev)
        elif self.strategy == "class_aware":
            idx = self._class_aware_indices(g)
        else:
            p = self._class_probabilities.to(dev)
            cls = torch.multinomial(p, self._n, replacement=True, generator=g)
            cnt = self._count[cls]
            # float64 so that u * count stays exact enough for classes of any realistic size
            u = torch.rand(self._n, generator=g, device=dev, dtype=torch.float64)
            off = (u * cnt.to(torch.float64)).to(torch.int64)
            # guard the u*count == count rounding edge; clamp_min keeps an impossible empty-class draw in range
            off = torch.minimum(off, (cnt - 1).clamp_min(0))
            idx = self._order[self._start[cls] + off]
        if idx.device != self.device:
            idx = idx.to(self.device)
        return idx

    def _class_aware_indices(self, g: torch.Generator) -> torch.Tensor:
        """One ``class_aware`` epoch, drawn with a few whole-tensor operations (no loop over classes)."""
        dev, k = self._draw_device, CLASS_AWARE_SAMPLES_PER_CLASS
        length = self._epoch_length
        visits = -(-length // k)
        # The class of every visit: shuffled rounds, each a permutation of the non-empty classes.
        rounds = -(-visits // len(self._classes))
        shuffled = torch.rand(rounds, len(self._classes), generator=g, device=dev).argsort(dim=1)
        visit_class = self._classes[shuffled].flatten()[:visits]
        # Which visit of its class each visit is (0, 1, 2, ...), in epoch order.
        visits_per_class = torch.bincount(visit_class, minlength=self.num_classes)
        by_class = torch.argsort(visit_class, stable=True)
        first_visit = torch.cumsum(visits_per_class, 0) - visits_per_class
        ordinal = torch.empty_like(visit_class)
        ordinal[by_class] = torch.arange(visits, device=dev) - first_visit[visit_class[by_class]]
        # Each class's stream of images: enough whole passes over the class for its k x visits
        # images, every pass in its own random order.
        count = self._count
        passes = torch.where(count > 0, -(-(k * visits_per_class) // count.clamp_min(1)), 0)
        stream_len = passes * count
        stream_start = torch.cumsum(stream_len, 0) - stream_len
        slot_class = torch.repeat_interleave(torch.arange(self.num_classes, device=dev), stream_len)
        position = torch.arange(len(slot_class), device=dev) - stream_start[slot_class]
        image = position % count[slot_class]  # the image's rank within its class
        pass_start = stream_start[slot_class] + position - image
        # Sorting by pass, then by a random key, shuffles every pass and keeps passes in order.
        key = pass_start.to(torch.float64) + torch.rand(len(slot_class), generator=g, device=dev, dtype=torch.float64)
        stream = self._order[self._start[slot_class] + image][torch.argsort(key, stable=True)]
        # Visit t of class c takes images k*t .. k*t + k - 1 of c's stream.
        taken = stream_start[visit_class, None] + k * ordinal[:, None] + torch.arange(k, device=dev)
        return stream[taken.flatten()[:length]]


class StrategySampler(Sampler[int]):
    """``torch.utils.data.Sampler`` over :class:`IndexSampler`, for use with ``DataLoader``.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); iterating
    yields python ints of ``epoch_indices(epoch)``. Indices are produced on the CPU
    unless ``device`` says otherwise.
    """

    def __init__(
        self,
        labels: LabelsLike,
        strategy: str = "instance",
        *,
        num_classes: int | None = None,
        generator_seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.index_sampler = IndexSampler(
            labels, strategy, num_classes=num_classes, generator_seed=generator_seed, device=device,
        )
        self.epoch = 0

    @property
    def strategy(self) -> str:
        return self.index_sampler.strategy

    def set_epoch(self, epoch: int) -> None:
        """Select which epoch the next iteration yields."""
        self.epoch = IndexSampler._check_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        # One bulk transfer + tolist is far cheaper than per-element .item()
        return iter(self.index_sampler.epoch_indices(self.epoch).cpu().tolist())

    def __len__(self) -> int:
        return len(self.index_sampler)


def _check_rank(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CBDError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise CBDError(f"rank must be an integer in [0, {world_size}), got {rank!r}")


def shard_indices(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of one epoch's global ``indices``: every ``world_size``-th
    position from ``rank``, truncated to ``len(indices) // world_size`` for equal shares."""
    _check_rank(rank, world_size)
    if world_size == 1:
        return indices
    per_rank = len(indices) // world_size
    return indices[rank::world_size][:per_rank]


class DistributedStrategySampler(StrategySampler):
    """A :class:`StrategySampler` that yields one rank's share of each epoch's global stream.

    Every rank must be built with the same labels, strategy and ``generator_seed``; then
    the ranks' shares of an epoch are disjoint and together are ``world_size * (N //
    world_size)`` draws of one instance or class-balanced stream, reseeded per epoch
    (call :meth:`set_epoch`). ``rank`` / ``world_size`` default to the process group's
    (rank 0 of 1 without one).
    """

    def __init__(
        self,
        labels: LabelsLike,
        strategy: str = "instance",
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_classes: int | None = None,
        generator_seed: int = 0,
    ) -> None:
        super().__init__(labels, strategy, num_classes=num_classes, generator_seed=generator_seed, device="cpu")
        grouped = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if grouped else 0
        if world_size is None:
            world_size = dist.get_world_size() if grouped else 1
        _check_rank(rank, world_size)
        self.rank = rank
        self.world_size = world_size

    def local_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices of ``epoch`` (default: the current one), int64 on the CPU."""
        epoch = self.epoch if epoch is None else IndexSampler._check_epoch(epoch)
        return shard_indices(self.index_sampler.epoch_indices(epoch), self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_indices().tolist())

    def __len__(self) -> int:
        return len(self.index_sampler) // self.world_size

