"""Small networks for 28x28 single-channel data (MNIST, Fashion-MNIST).

- ``lenet5``: LeCun et al. 1998 layout (conv 6@5x5 - pool - conv 16@5x5 - pool - 120 - 84 -
  classes) with ReLU and max-pooling; the first convolution pads by 2 so 28x28 inputs give
  the original 32x32 geometry. 61,706 parameters for 10 classes.
- ``lenet_300_100``: the fully connected LeNet-300-100 used by Han et al. 2015 and DPF.
- ``resnet8``: a CIFAR-style ResNet-8 (He et al. 2016, n=1), 75,290 parameters for 1 channel, 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.models.builders import register_model
from sparse_core.models.resnet_cifar import CifarResNet


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        size = ((image_size // 2) - 4) // 2
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet300100(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@register_model("lenet5")
def lenet5(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size)


@register_model("lenet_300_100")
def lenet_300_100(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return LeNet300100(in_channels, num_classes, image_size)


@register_model("resnet8")
def resnet8(*, in_channels: int, num_classes: int, image_size: int, width: int = 16) -> nn.Module:
    return CifarResNet(8, in_channels, num_classes, width)
