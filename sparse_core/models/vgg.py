"""VGG-16 for small images (Simonyan & Zisserman 2015, configuration D) with batch norm.

The CIFAR variant used across the pruning literature (e.g. Liu et al. 2019 "Rethinking the
value of network pruning"): 13 conv layers with BN and ReLU, max-pooling after each of the
five groups, then global average pooling and one linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_core.models.builders import register_model

_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                # Pool only while the feature map can still be halved (28x28 inputs stop at 1x1).
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("vgg16")
def vgg16(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return VGG(_CFG_D, in_channels, num_classes, image_size)
