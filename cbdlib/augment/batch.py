"""The batch augmenter of the training loop: random numbers drawn once per batch, then pure ops."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import CBDError
from .ops import (
    check_bhwc,
    crop_from_uniform,
    flip_from_uniform,
    grayscale_from_uniform,
    jitter_from_uniform,
    normalize_nchw,
    to_float,
    uniform,
)
from .recipes import AugmentConfig, FloatSeq


class BatchAugmenter:
    """Callable turning a uint8 (B,H,W,3) batch into normalised float (B,3,H,W).

    Pipeline: random crop and flip on uint8 (cheapest dtype), convert to float in
    [0, 1], then (if ``cfg.color_jitter``) colour jitter and random grayscale, then
    per-channel normalisation. ``cfg=None`` is the eval transform: only conversion and
    normalisation. The generator decides every random choice; ``None`` falls back to
    the global RNG of the images' device.

    All randomness of a batch is drawn at once (:meth:`draw`) and the rest is a pure
    function of the images and those uniforms (:meth:`apply`, through :func:`augment_batch`).
    ``compile_fn`` (e.g. the engine's ``compile_for_training``) compiles that function for a
    recipe with colour jitter, whose eager ops cost as much as a ResNet-8 training step on a
    CPU (docs/performance.md); crop and flip alone are cheap and stay eager.
    """

    NUM_UNIFORMS = 13  # crop (2) + flip (1) + jitter (1 + 4 + 4) + grayscale (1)

    def __init__(self, cfg: AugmentConfig | None, mean: FloatSeq, std: FloatSeq, *, channels_last: bool = False,
                 compile_fn: Callable | None = None):
        if cfg is not None and not isinstance(cfg, AugmentConfig):
            raise CBDError(f"cfg must be an AugmentConfig or None, got {type(cfg).__name__}")
        self.cfg = cfg
        self.channels_last = bool(channels_last)
        self._mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).clone()
        self._std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).clone()
        if self._mean.numel() not in (1, 3) or self._std.numel() not in (1, 3):
            raise CBDError("mean and std must have 1 or 3 values each")
        if not bool(torch.all(self._std > 0)):
            raise CBDError(f"std must be positive, got {self._std.tolist()}")
        # Device copies made once, so steps do not re-upload the statistics.
        self._stats_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled = compile_fn is not None and cfg is not None and cfg.color_jitter
        self._transform = compiled_augment_batch(compile_fn) if self.compiled else augment_batch

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats_cache:
            self._stats_cache[device] = (self._mean.to(device), self._std.to(device))
        return self._stats_cache[device]

    def __repr__(self) -> str:
        return f"BatchAugmenter(cfg={self.cfg!r}, mean={self._mean.tolist()}, std={self._std.tolist()})"

    def draw(self, batch_size: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
        """All of one batch's random numbers: uniforms of shape (B, NUM_UNIFORMS) on ``device``.

        Columns: [crop row, crop col, flip, jitter apply, 4 jitter factors, 4 order keys,
        grayscale]. The layout is the same whatever the config, so a generator advances
        by the same amount per batch for every recipe (eval draws nothing).
        """
        like = torch.empty(0, device=device)
        return uniform((batch_size, self.NUM_UNIFORMS), generator, like)

    def apply(self, images_uint8: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """The deterministic part: augment with uniforms ``u`` from :meth:`draw` and normalise.

        Free of generators, so ``torch.compile`` can trace it as one graph (dynamo cannot
        trace calls that take an explicit ``torch.Generator``).
        """
        check_bhwc(images_uint8, channels=3)
        if images_uint8.dtype != torch.uint8:
            raise CBDError(f"BatchAugmenter expects uint8 images, got {images_uint8.dtype}")
        if self.cfg is not None and (u is None or u.dim() != 2 or u.shape[1] != self.NUM_UNIFORMS
                                     or u.shape[0] != images_uint8.shape[0]):
            raise CBDError(f"apply needs uniforms of shape ({images_uint8.shape[0]}, {self.NUM_UNIFORMS}) from draw()")
        mean, std = self._stats(images_uint8.device)
        return self._transform(images_uint8, u, self.cfg, mean, std, self.channels_last)

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Augment (if a config was given) and normalise one uint8 (B, H, W, 3) batch.

        Draws every random number of the batch in one call on ``generator`` (see
        :meth:`draw`), then runs :meth:`apply`; with ``generator=None`` the global RNG of
        the images' device is used.
        """
        check_bhwc(images_uint8, channels=3)
        u = None if self.cfg is None else self.draw(images_uint8.shape[0], generator, images_uint8.device)
        return self.apply(images_uint8, u)


def augment_batch(x: torch.Tensor, u: torch.Tensor | None, cfg: AugmentConfig | None, mean: torch.Tensor,
                  std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Crop and flip on uint8, to float, colour jitter and grayscale (if ``cfg.color_jitter``),
    normalise: the pure part of :meth:`BatchAugmenter.apply`, one graph for ``torch.compile``
    (branches on the static config only)."""
    if cfg is not None:
        if cfg.crop_padding > 0:
            x = crop_from_uniform(x, cfg.crop_padding, u[:, 0:2])
        if cfg.flip:
            x = flip_from_uniform(x, u[:, 2], 0.5)
    xf = to_float(x)
    if cfg is not None and cfg.color_jitter:
        xf = jitter_from_uniform(xf, u[:, 3:12], cfg)
        if cfg.grayscale_p > 0:
            xf = grayscale_from_uniform(xf, u[:, 12], cfg.grayscale_p)
    return normalize_nchw(xf, mean, std, channels_last=channels_last)


# One compiled augment_batch per compile function, shared by every augmenter of the process:
# dynamo keys its cache on the config's values, so recipes recompile, new augmenters do not.
_compiled: dict[Callable, Callable] = {}


def compiled_augment_batch(compile_fn: Callable) -> Callable:
    if compile_fn not in _compiled:
        _compiled[compile_fn] = compile_fn(augment_batch)
    return _compiled[compile_fn]
