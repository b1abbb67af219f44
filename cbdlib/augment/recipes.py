"""The two augmentation recipes of the CBD paper, as static configs: vanilla and aug."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch

from ..errors import CBDError

# Luma weights of ITU-R 601-2 as torchvision's code applies them (it uses 0.2989 for red,
# not the textbook 0.299); matching it keeps our ops numerically equal to torchvision's.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

FloatSeq = Union[Sequence[float], torch.Tensor]


@dataclass(frozen=True)
class AugmentConfig:
    """Static description of one training augmentation recipe.

    ``grayscale_p`` belongs to the SimCLR colour distortion and is only used when
    ``color_jitter`` is True (so the vanilla recipe never converts to grayscale).
    A jitter strength of 0 disables that op (like torchvision, which then skips it).
    """

    crop_padding: int = 4          # zero-padded random crop back to the input size (0 = off)
    flip: bool = True              # horizontal flip with p = 0.5
    color_jitter: bool = False     # the "aug" teachers: SimCLR colour distortion, strength 1
    jitter_p: float = 0.8          # ColorJitter(0.8, 0.8, 0.8, 0.2) applied with this probability
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2       # RandomGrayscale(p=0.2), applied after the jitter

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise CBDError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}")
        for name in ("jitter_p", "grayscale_p"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise CBDError(f"{name} must be a probability in [0, 1], got {v!r}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not float(v) >= 0.0:
                raise CBDError(f"{name} jitter strength must be >= 0, got {v!r}")
        if not 0.0 <= float(self.hue) <= 0.5:
            raise CBDError(f"hue jitter strength must be in [0, 0.5], got {self.hue!r}")


def vanilla_config(image_size: int) -> AugmentConfig:
    """Random crop with ``max(1, image_size // 8)`` zero padding plus horizontal flip.

    Gives the usual padding 4 for 32 px CIFAR and 1 for 8x8 digits.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CBDError(f"image_size must be a positive integer, got {image_size!r}")
    return AugmentConfig(crop_padding=max(1, image_size // 8), flip=True, color_jitter=False)


def aug_config(image_size: int) -> AugmentConfig:
    """The vanilla recipe plus SimCLR colour distortion (jitter p=0.8, grayscale p=0.2)."""
    return replace(vanilla_config(image_size), color_jitter=True)
