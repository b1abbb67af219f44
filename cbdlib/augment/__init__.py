"""Batched, on-device image augmentation for CIFAR-sized training sets.

Training images live on the device as one uint8 tensor of shape ``(N, H, W, 3)``. Each
step gathers a batch and :class:`BatchAugmenter` turns it into normalised float
``(B, 3, H, W)`` with a handful of batched tensor ops. Every random decision (crop
offset, flip, jitter factors and order, grayscale) is drawn *per image* from an explicit
``torch.Generator``, so each model has its own stream and a resumed run replays it.

Two recipes, as in the CBD paper (Iscen et al., BMVC 2021):

* :func:`vanilla_config` - zero-padded random crop + horizontal flip (the standard
  CIFAR recipe), e.g. for the "vanilla" teachers.
* :func:`aug_config` - vanilla plus SimCLR colour distortion of strength 1
  (``ColorJitter(0.8, 0.8, 0.8, 0.2)`` with p = 0.8, then ``RandomGrayscale(p=0.2)``);
  used by the "aug" teachers.

Layout is channels-last (``B, H, W, C``) until :func:`normalize_nchw`, because that is
how the cached data is stored and makes per-pixel colour maths a reduction over the
last dim. The colour helpers (:func:`adjust_brightness`, :func:`adjust_contrast`,
:func:`adjust_saturation`, :func:`adjust_hue`) take one factor per image and follow
``torchvision.transforms.v2.functional`` on float images, including its clamping.

Hot-path functions use no ``.item()``, no data-dependent Python branches (branches
depend only on static config values and shapes) and build no tensor from Python data
(on CUDA that is a blocking host-to-device copy). Dynamo cannot trace calls that take an
explicit ``torch.Generator`` (each is a graph break), so :class:`BatchAugmenter` draws a
batch's uniforms in one call (:meth:`BatchAugmenter.draw`) and the rest is one pure
function, :func:`augment_batch`, which the training loop compiles for the colour-jitter
recipe wherever it compiles the model.
"""
from .batch import BatchAugmenter, augment_batch
from .ops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    hsv_to_rgb,
    normalize_nchw,
    random_crop,
    random_flip,
    random_grayscale,
    rgb_to_grayscale,
    rgb_to_hsv,
    to_float,
)
from .recipes import AugmentConfig, aug_config, vanilla_config

__all__ = [
    "AugmentConfig", "vanilla_config", "aug_config", "random_crop", "random_flip", "color_jitter", "random_grayscale",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_grayscale", "rgb_to_hsv",
    "hsv_to_rgb", "to_float", "normalize_nchw", "BatchAugmenter", "augment_batch",
]
