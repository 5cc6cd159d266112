"""CIFAR-style ResNets (He et al. 2016, "Deep Residual Learning", Sec. 4.2).

Depth ``6n + 2``: a 3x3 stem with 16 filters, three stages of ``n`` basic blocks with 16, 32
and 64 filters (stride 2 at the start of stages 2 and 3), global average pooling and a linear
classifier. Shortcuts that change shape use option A of the paper (strided identity, zero
padded channels), which adds no parameters: ResNet-20 has 0.27M parameters as in Table 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.models.builders import register_model


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channel dimension."""

    def __init__(self, planes_in: int, planes_out: int):
        super().__init__()
        self.pad = planes_out - planes_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, planes_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or planes_in != planes:
            self.shortcut = _PadShortcut(planes_in, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Input (B, C, H, W) -> logits (B, num_classes). Works for any H, W >= 8."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, planes_in = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                layers.append(BasicBlock(planes_in, planes, stride=2 if (i > 0 and j == 0) else 1))
                planes_in = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(planes_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(depth: int):
    def build(*, in_channels: int, num_classes: int, image_size: int, width: int = 16) -> nn.Module:
        return CifarResNet(depth, in_channels, num_classes, width)

    return build


for _depth in (20, 32, 56):
    register_model(f"resnet{_depth}")(_resnet(_depth))
