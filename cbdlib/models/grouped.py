"""Several 32x32 ResNets as one module: grouped convolutions, one kernel launch per layer.

K models of the same architecture are stacked along the channel axis: every convolution
becomes ``groups=K``, every BatchNorm has ``K * C`` channels (so each model keeps its own
batch statistics and running averages), and model k reads its own images from input
channels ``3k .. 3k+2``. The state dict has the same keys as one ``CifarResNet`` with
each tensor the concatenation of the K models' tensors along dim 0, so packing and
unpacking are ``torch.cat`` and ``chunk``. One module, so DDP can wrap it as it is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .resnet_cifar import CifarResNet

if TYPE_CHECKING:
    from . import Network


class GroupedCifarResNet(CifarResNet):
    """K ``CifarResNet`` backbones in one; ``forward`` maps (B, 3K, H, W) to (B, K, C)."""

    def __init__(self, groups: int, blocks_per_stage: int, widths=(16, 32, 64)):
        super().__init__(blocks_per_stage, widths, groups)

    @classmethod
    def from_models(cls, backbones: list[CifarResNet]) -> "GroupedCifarResNet":
        """Pack K backbones of one architecture (weights, BN statistics) into a grouped one."""
        first = backbones[0]
        blocks = len(first.stages[0])
        widths = tuple(stage[0].conv2.out_channels for stage in first.stages)
        grouped = cls(len(backbones), blocks, widths)
        grouped.load_state_dict(pack_state_dicts([b.state_dict() for b in backbones]))
        return grouped.to(next(first.parameters()).device)

    def unpack(self, index: int) -> dict:
        """Model ``index``'s backbone state dict (keys as in ``CifarResNet``)."""
        return unpack_state_dict(self.state_dict(), self.groups, index)


def pack_state_dicts(states: list[dict]) -> dict:
    packed = {}
    for key, value in states[0].items():
        if value.dim() == 0:  # num_batches_tracked: the same count for every model
            packed[key] = value.clone()
        else:
            packed[key] = torch.cat([s[key] for s in states], dim=0)
    return packed


def unpack_state_dict(state: dict, groups: int, index: int) -> dict:
    return {key: (value.clone() if value.dim() == 0 else value.chunk(groups, dim=0)[index].clone())
            for key, value in state.items()}


class TeacherFeatures(nn.Module):
    """The frozen teachers' pooled features for one batch, in one grouped forward when possible."""

    def __init__(self, teachers: list[Network], grouped: bool = True):
        super().__init__()
        self.count = len(teachers)
        archs = {type(t.backbone) for t in teachers}
        dims = {t.backbone_dim for t in teachers}
        self.grouped = None
        plain = all(t.projection is None for t in teachers)
        if grouped and len(teachers) > 1 and archs == {CifarResNet} and len(dims) == 1 and plain:
            try:
                self.grouped = GroupedCifarResNet.from_models([t.backbone for t in teachers]).eval()
                self.grouped.requires_grad_(False)
            except RuntimeError:  # different depths: fall back to one forward per teacher
                self.grouped = None
        self.teachers = nn.ModuleList(teachers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.grouped is not None:
            features = self.grouped(x.repeat(1, self.count, 1, 1))
            return [features[:, k] for k in range(self.count)]
        return [t(x)[0] for t in self.teachers]

    @torch.no_grad()
    def logits(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.classifier(f) for t, f in zip(self.teachers, features)]
