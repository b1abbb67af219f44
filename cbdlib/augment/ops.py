"""Batched image ops, one random decision per image, each equal to torchvision's on float images:
crop, flip, colour jitter, grayscale, conversion and normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CBDError
from .recipes import LUMA_WEIGHTS, AugmentConfig, FloatSeq

# --------------------------------------------------------------------------- helpers


def check_bhwc(x: torch.Tensor, name: str = "images", channels: int | None = None) -> None:
    """Raise CBDError unless x is a 4-D (B, H, W, C) tensor (static shape check only)."""
    if not isinstance(x, torch.Tensor):
        raise CBDError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise CBDError(f"{name} must have shape (B, H, W, C), got {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        raise CBDError(f"{name} must have {channels} channels in the last dim, got shape {tuple(x.shape)}")


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``like``'s device.

    A CPU generator cannot fill a CUDA tensor (and vice versa), so draw where the
    generator lives and move; without a generator use the global RNG of ``like``'s device.
    """
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device)
    return u.to(like.device)


def per_image(factor: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar or (B,) factor into a (B, 1, 1, 1) tensor broadcastable over x."""
    f = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    if f.dim() == 0:
        f = f.expand(x.shape[0])
    if f.dim() != 1 or f.shape[0] != x.shape[0]:
        raise CBDError(f"expected a scalar or one factor per image ({x.shape[0]}), got shape {tuple(f.shape)}")
    return f.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- geometry


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and crop a random window of the original size.

    ``x`` is (B, H, W, C), uint8 or float. Offsets are drawn per image, uniform in
    ``[0, 2 * padding]`` for each axis; the crop is one advanced-indexing gather.
    ``padding == 0`` returns ``x`` itself.
    """
    check_bhwc(x)
    if padding < 0:
        raise CBDError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    return crop_from_uniform(x, padding, uniform((x.shape[0], 2), generator, x))


def crop_from_uniform(x: torch.Tensor, padding: int, u: torch.Tensor) -> torch.Tensor:
    """Random crop given uniforms ``u`` of shape (B, 2): (row offset, column offset)."""
    b, h, w, _ = x.shape
    padded = F.pad(x, (0, 0, padding, padding, padding, padding))  # pads W then H; C untouched
    # Offsets from uniform draws (not randint) so the whole pipeline can share one draw.
    span = 2 * padding + 1
    off = (u * span).long().clamp_(max=span - 1)  # clamp guards the u -> 1 rounding edge
    rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded[bidx, rows.unsqueeze(2), cols.unsqueeze(1)]


def random_flip(x: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Mirror each (B, H, W, C) image left-right independently with probability ``p``."""
    check_bhwc(x)
    return flip_from_uniform(x, uniform((x.shape[0],), generator, x), p)


def flip_from_uniform(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """Flip the images whose uniform in ``u`` (B,) is below ``p``."""
    return torch.where((u < p).view(-1, 1, 1, 1), x.flip(2), x)


# --------------------------------------------------------------------------- colour ops


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of a float (..., 3) RGB tensor, shape (..., 1)."""
    r, g, b = x.unbind(-1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(-1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale each float (B, H, W, 3) image in [0, 1] by its factor, then clamp."""
    return (x * per_image(factor, x)).clamp(0.0, 1.0)


def blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``f * x + (1 - f) * other`` clamped to [0, 1] (torchvision's blend for floats)."""
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its grayscale version (one scalar per image)."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, mean, per_image(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its own grayscale version (factor 0 gives grayscale)."""
    return blend(x, rgb_to_grayscale(x), per_image(factor, x))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1], shape (..., 3), to HSV with every component in [0, 1].

    Follows the usual (and ``colorsys``) convention: hue from the max channel, ties
    resolved in the order red, green, blue; hue and saturation are 0 for grey pixels.
    Denominators are replaced where they would be zero so no NaN is ever produced.
    """
    r, g, b = x.unbind(-1)
    minc, maxc = torch.aminmax(x, dim=-1)
    delta = maxc - minc
    grey = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    d = torch.where(grey, torch.ones_like(delta), delta)
    h_r = torch.remainder((g - b) / d, 6.0)
    h_g = (b - r) / d + 2.0
    h_b = (r - g) / d + 4.0
    h = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h = torch.where(grey, torch.zeros_like(h), h) / 6.0
    # remainder can return exactly 6.0 - eps rounding to 1.0; wrap to keep h in [0, 1)
    h = torch.remainder(h, 1.0)
    return torch.stack((h, s, maxc), dim=-1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` for (..., 3) tensors, without branching on sextants.

    Uses the closed form ``c_n = v - v*s*clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6`` and ``n = 5, 3, 1`` for R, G, B. The offsets stay Python
    numbers: a tensor of them built per call would be a blocking host-to-device copy on CUDA.
    """
    h, s, v = hsv.unbind(-1)
    h6, vs = 6.0 * h, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=-1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate each image's hue by its shift (fraction of a turn, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[..., 0] + per_image(shift, x).squeeze(-1), 1.0)
    out = hsv_to_rgb(torch.stack((h, hsv[..., 1], hsv[..., 2]), dim=-1))
    return out.clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, generator: torch.Generator | None, cfg: AugmentConfig) -> torch.Tensor:
    """Per-image random colour jitter of float (B, H, W, 3) images in [0, 1].

    Each image, with probability ``cfg.jitter_p``, gets brightness, contrast, saturation
    and hue adjustments in its own random order (as torchvision's ColorJitter permutes
    them on every call). Factors are uniform in ``[max(0, 1 - s), 1 + s]`` for strength
    ``s``; the hue shift is uniform in ``[-hue, hue]``. Ops with strength 0 are skipped
    (decided from the static config, not the data). The order is realised without a loop
    over images: argsort of uniform keys gives a per-image permutation, and at each of
    the positions every enabled op is computed and the image's op is selected with
    ``torch.where``.
    """
    check_bhwc(x, channels=3)
    # One draw for everything keeps the stream layout fixed: [apply, 4 factors, 4 order keys].
    return jitter_from_uniform(x, uniform((x.shape[0], 9), generator, x), cfg)


def jitter_from_uniform(x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Colour jitter given uniforms ``u`` (B, 9): [apply, 4 factors, 4 order keys]."""
    u = u.to(x.dtype)
    apply = u[:, 0] < cfg.jitter_p
    fu = u[:, 1:5]
    keys = u[:, 5:9]

    def factor_range(strength: float, col: int) -> torch.Tensor:
        lo = max(0.0, 1.0 - strength)
        hi = 1.0 + strength
        return lo + (hi - lo) * fu[:, col]

    ops = []
    if cfg.brightness > 0:
        ops.append((adjust_brightness, factor_range(cfg.brightness, 0)))
    if cfg.contrast > 0:
        ops.append((adjust_contrast, factor_range(cfg.contrast, 1)))
    if cfg.saturation > 0:
        ops.append((adjust_saturation, factor_range(cfg.saturation, 2)))
    if cfg.hue > 0:
        ops.append((adjust_hue, (2.0 * fu[:, 3] - 1.0) * cfg.hue))
    if not ops or cfg.jitter_p <= 0:
        return x

    # order[i, pos] = index into ``ops`` of the op image i applies at position pos; the
    # keys are i.i.d., so ranking the first len(ops) of them is a uniform permutation.
    order = torch.argsort(keys[:, : len(ops)], dim=1)  # (B, n_ops)

    out = x
    for pos in range(len(ops)):
        chosen = order[:, pos].view(-1, 1, 1, 1)
        step = out
        for k, (fn, factor) in enumerate(ops):
            step = torch.where(chosen == k, fn(out, factor), step)
        out = step
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def random_grayscale(x: torch.Tensor, generator: torch.Generator | None, p: float) -> torch.Tensor:
    """Convert each (B, H, W, 3) image to 3-channel grayscale with probability ``p``.

    Float images get the exact luma; uint8 images are truncated back to uint8 like
    torchvision's ``rgb_to_grayscale`` with ``preserve_dtype``.
    """
    check_bhwc(x, channels=3)
    return grayscale_from_uniform(x, uniform((x.shape[0],), generator, x), p)


def grayscale_from_uniform(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """Grayscale the images whose uniform in ``u`` (B,) is below ``p``."""
    conv = u < p
    src = x if x.is_floating_point() else x.float()
    gray = rgb_to_grayscale(src).to(x.dtype).expand_as(x)
    return torch.where(conv.view(-1, 1, 1, 1), gray, x)


# --------------------------------------------------------------------------- conversion


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) in [0, 255] to float32 in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise CBDError(f"to_float expects a uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.to(torch.float32).div_(255.0)


def stat_tensor(values: FloatSeq, like: torch.Tensor, name: str) -> torch.Tensor:
    """Mean/std as a (C,) tensor with ``like``'s dtype and device."""
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() not in (1, like.shape[-1]):
        raise CBDError(f"{name} must have 1 or {like.shape[-1]} values, got {t.numel()}")
    return t


def normalize_nchw(x: torch.Tensor, mean: FloatSeq, std: FloatSeq, channels_last: bool = False) -> torch.Tensor:
    """Normalise float (B, H, W, C) per channel and return (B, C, H, W).

    The result is contiguous in the default layout, or in ``torch.channels_last``
    memory format when ``channels_last`` is True (then no copy is needed after the
    permute, since BHWC data already is channels-last NCHW).
    """
    check_bhwc(x)
    if not x.is_floating_point():
        raise CBDError(f"normalize_nchw expects a float tensor, got {x.dtype}")
    m = stat_tensor(mean, x, "mean")
    s = stat_tensor(std, x, "std")
    out = ((x - m) / s).permute(0, 3, 1, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)
