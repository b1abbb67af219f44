"""ResNet for 32x32 inputs (He et al. 2016, section 4.2), as in the CIFAR-LT literature.

ResNet-32: 3 stages x 5 basic blocks with 16/32/64 channels; the identity shortcut
zero-pads channels when the stage widens ("option A", the LDAM-DRW code's choice).
``groups`` > 1 stacks that many independent networks along the channel axis (grouped
convolutions; see ``grouped.py``); with the default 1 it is the plain network.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad each group's new channels."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        self.groups, self.in_channels = groups, in_channels
        self.extra = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        b, _, h, w = x.shape
        x = F.pad(x.reshape(b, self.groups, self.in_channels, h, w), (0, 0, 0, 0, self.extra, self.extra))
        return x.reshape(b, -1, h, w)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int = 1):
        super().__init__()
        k = groups
        self.conv1 = nn.Conv2d(k * in_channels, k * out_channels, 3, stride, 1, groups=k, bias=False)
        self.bn1 = nn.BatchNorm2d(k * out_channels)
        self.conv2 = nn.Conv2d(k * out_channels, k * out_channels, 3, 1, 1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm2d(k * out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, groups)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Backbone returning the globally pooled feature (B, widths[-1]); (B, groups, widths[-1]) when grouped."""

    def __init__(self, blocks_per_stage: int, widths=(16, 32, 64), groups: int = 1):
        super().__init__()
        k = self.groups = groups
        self.conv = nn.Conv2d(3 * k, k * widths[0], 3, 1, 1, groups=k, bias=False)
        self.bn = nn.BatchNorm2d(k * widths[0])
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, groups))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pooled if self.groups == 1 else pooled.view(x.shape[0], self.groups, self.feature_dim)
