"""Seeds derived from labels, and generators seeded with them: every model, epoch and
augmentation draws from its own stream, so a run resumed from a checkpoint continues exactly
as an uninterrupted one would, and no code touches the global random state."""
from __future__ import annotations

import zlib

import torch


def derive_seed(*parts) -> int:
    """A stable 31-bit seed from any labels (model name, training seed, epoch)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on ``device`` (CUDA) or on the CPU (every other device)."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(seed)
    return gen
