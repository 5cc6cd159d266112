"""Networks of the model registry as sequences of blocks, for local (chunk-wise) training.

``split_blocks(model)`` returns named blocks whose composition is exactly ``model.forward``
(the same operations in the same order, so the composed output is bit-identical). The last
block ends with the network's own classifier. Block boundaries follow the architecture's
natural units, as in the paper's experiments (Laskin et al. 2020, Sec. 4: ResNet blocks):

============  ===========================================================================
model         blocks
============  ===========================================================================
lenet5        ``conv1`` (conv-relu-pool), ``conv2`` (conv-relu-pool-flatten), ``fc1``,
              ``fc2+fc3`` (4 blocks)
lenet_300_100 ``fc1`` (flatten-fc-relu), ``fc2``, ``fc3`` (3 blocks)
resnet*       ``stem+layers.0`` (conv-bn-relu and the first residual block), ``layers.<i>``,
              ``layers.<last>+fc`` (last residual block, global pooling, classifier)
wrn*          ``conv1+blocks.0``, ``blocks.<i>``, ``blocks.<last>+fc`` (incl. final BN-ReLU)
vgg16         one block per conv-bn-relu (pooling attached to the conv before it), the last
              with global pooling and the classifier
============  ===========================================================================

The blocks hold references to the model's own modules: training a block trains the model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.models.resnet_cifar import CifarResNet
from sparse_core.models.small import LeNet5, LeNet300100
from sparse_core.models.vgg import VGG
from sparse_core.models.wrn import WideResNet


class Block(nn.Module):
    """A named piece of a network: ``fn(modules, x)`` over the referenced submodules."""

    def __init__(self, name: str, modules: dict[str, nn.Module], fn: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name = name
        self.parts = nn.ModuleDict(modules)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.parts, x)


def _lenet5(m: LeNet5) -> list[Block]:
    return [
        Block("conv1", {"conv1": m.conv1}, lambda p, x: F.max_pool2d(F.relu(p.conv1(x)), 2)),
        Block("conv2", {"conv2": m.conv2}, lambda p, x: torch.flatten(F.max_pool2d(F.relu(p.conv2(x)), 2), 1)),
        Block("fc1", {"fc1": m.fc1}, lambda p, x: F.relu(p.fc1(x))),
        Block("fc2+fc3", {"fc2": m.fc2, "fc3": m.fc3}, lambda p, x: p.fc3(F.relu(p.fc2(x)))),
    ]


def _lenet300(m: LeNet300100) -> list[Block]:
    return [
        Block("fc1", {"fc1": m.fc1}, lambda p, x: F.relu(p.fc1(torch.flatten(x, 1)))),
        Block("fc2", {"fc2": m.fc2}, lambda p, x: F.relu(p.fc2(x))),
        Block("fc3", {"fc3": m.fc3}, lambda p, x: p.fc3(x)),
    ]


def _pool_fc(fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(m: CifarResNet) -> list[Block]:
    layers = list(m.layers)
    blocks = [Block("stem+layers.0", {"conv1": m.conv1, "bn1": m.bn1, "block": layers[0]},
                    lambda p, x: p.block(F.relu(p.bn1(p.conv1(x)))))]  # fmt: skip
    blocks += [Block(f"layers.{i}", {"block": b}, lambda p, x: p.block(x)) for i, b in enumerate(layers[1:-1], 1)]
    blocks.append(Block(f"layers.{len(layers) - 1}+fc", {"block": layers[-1], "fc": m.fc}, lambda p, x: _pool_fc(p.fc, p.block(x))))
    return blocks


def _wrn(m: WideResNet) -> list[Block]:
    layers = list(m.blocks)
    blocks = [Block("conv1+blocks.0", {"conv1": m.conv1, "block": layers[0]}, lambda p, x: p.block(p.conv1(x)))]
    blocks += [Block(f"blocks.{i}", {"block": b}, lambda p, x: p.block(x)) for i, b in enumerate(layers[1:-1], 1)]
    blocks.append(Block(f"blocks.{len(layers) - 1}+fc", {"block": layers[-1], "bn": m.bn, "fc": m.fc},
                        lambda p, x: _pool_fc(p.fc, F.relu(p.bn(p.block(x))))))  # fmt: skip
    return blocks


def _vgg(m: VGG) -> list[Block]:
    groups: list[list[nn.Module]] = []
    for layer in m.features:
        if isinstance(layer, nn.Conv2d):
            groups.append([layer])
        else:
            groups[-1].append(layer)
    blocks = [
        Block(f"features.{i}", {str(j): mod for j, mod in enumerate(g)}, lambda p, x: _seq(p, x))
        for i, g in enumerate(groups[:-1])
    ]
    last = {str(j): mod for j, mod in enumerate(groups[-1])} | {"fc": m.classifier}
    blocks.append(Block(f"features.{len(groups) - 1}+classifier", last,
                        lambda p, x: _pool_fc(p.fc, _seq(p, x, skip="fc"))))  # fmt: skip
    return blocks


def _seq(parts: nn.ModuleDict, x: torch.Tensor, skip: str = "") -> torch.Tensor:
    for name, mod in parts.items():
        if name != skip:
            x = mod(x)
    return x


_SPLITTERS: dict[type, Callable[[nn.Module], list[Block]]] = {
    LeNet5: _lenet5, LeNet300100: _lenet300, CifarResNet: _resnet, WideResNet: _wrn, VGG: _vgg,
}  # fmt: skip


def split_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in forward order (module docstring).

    Raises:
        ValueError: the model's class has no block decomposition.
    """
    for cls, fn in _SPLITTERS.items():
        if isinstance(model, cls):
            return fn(model)
    known = ", ".join(c.__name__ for c in _SPLITTERS)
    raise ValueError(f"{type(model).__name__} has no block decomposition for local training; supported: {known}")
