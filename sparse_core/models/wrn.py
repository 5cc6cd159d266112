"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual Networks", Table 1).

Pre-activation basic blocks (BN-ReLU-conv), ``n = (d - 4) / 6`` blocks per stage, widths
``16k, 32k, 64k``, 1x1 convolution shortcuts where the shape changes, optional dropout
between the two convolutions. WRN-28-10 is FreeTickets' CIFAR model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.models.builders import register_model


class WideBlock(nn.Module):
    def __init__(self, planes_in: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes_in)
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or planes_in != planes:
            self.shortcut = nn.Conv2d(planes_in, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """Input (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, depth: int, widen: int, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, planes_in = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(planes_in, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                planes_in = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(planes_in)
        self.fc = nn.Linear(planes_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("wrn")
def wrn(*, in_channels: int, num_classes: int, image_size: int, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> nn.Module:
    """``model: {name: wrn, kwargs: {depth: 28, widen: 10}}`` is WRN-28-10."""
    return WideResNet(depth, widen, in_channels, num_classes, dropout)


@register_model("wrn28_10")
def wrn28_10(*, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, in_channels, num_classes, dropout)
