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
import torch.nn.functional as F

from .resnet_cifar import CifarResNet

if TYPE_CHECKING:
    from . import Network


class GroupedPadShortcut(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int):
        super().__init__()
        self.groups, self.in_channels = groups, in_channels
        self.extra = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x[:, :, ::2, ::2].reshape(b, self.groups, self.in_channels, (h + 1) // 2, (w + 1) // 2)
        x = F.pad(x, (0, 0, 0, 0, self.extra, self.extra))
        return x.reshape(b, -1, x.shape[-2], x.shape[-1])


class GroupedBasicBlock(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        k = groups
        self.conv1 = nn.Conv2d(k * in_channels, k * out_channels, 3, stride, 1, groups=k, bias=False)
        self.bn1 = nn.BatchNorm2d(k * out_channels)
        self.conv2 = nn.Conv2d(k * out_channels, k * out_channels, 3, 1, 1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm2d(k * out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = GroupedPadShortcut(k, in_channels, out_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GroupedCifarResNet(nn.Module):
    """K ``CifarResNet`` backbones in one; ``forward`` maps (B, 3K, H, W) to (B, K, C)."""

    def __init__(self, groups: int, blocks_per_stage: int, widths=(16, 32, 64)):
        super().__init__()
        k = self.groups = groups
        self.conv = nn.Conv2d(3 * k, k * widths[0], 3, 1, 1, groups=k, bias=False)
        self.bn = nn.BatchNorm2d(k * widths[0])
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(GroupedBasicBlock(k, in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pooled.view(x.shape[0], self.groups, self.feature_dim)

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
        if grouped and len(teachers) > 1 and archs == {CifarResNet} and len(dims) == 1 and all(t.projection is None for t in teachers):
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
