"""A network trained with local losses: blocks, windows and auxiliary heads.

:class:`LocalNet` wraps a registry model. ``forward`` is the plain network (inference, heads
unused); :meth:`LocalNet.local_losses` runs the exact single-process simulation of a local
variant (Laskin et al. 2020): each window's input is the detached output of the block before
it, every window that starts at a block already computed by an earlier window recomputes that
block (with batch-norm running statistics frozen for the recomputation, so they are updated
once per step as in backprop), and the sum of the window losses is what is differentiated.

Auxiliary heads (training only; excluded from the exported model and from inference FLOPs):

- ``linear``: global average pooling (4-D features) + a linear classifier;
- ``mlp``: as in DGL (Belilovsky et al. 2020): 3×3 conv + BN + ReLU, 2×2 adaptive average
  pooling, then an MLP with one hidden layer of ``head_hidden`` units (2-D features: the MLP).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.local.blocks import Block, split_blocks
from sparse_core.local.windows import Window, make_windows, owners


def make_head(kind: str, feature_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Auxiliary head for features of shape ``feature_shape`` (without batch).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in ("linear", "mlp"):
        raise ValueError(f"unknown auxiliary head {kind!r}; allowed: ['linear', 'mlp']")
    if len(feature_shape) == 3:
        c = feature_shape[0]
        if kind == "linear":
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        return nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )  # fmt: skip
    f = feature_shape[0]
    if kind == "linear":
        return nn.Linear(f, num_classes)
    return nn.Sequential(nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers normalise with batch statistics but leave running statistics as they are."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class LocalNet(nn.Module):
    """``net`` split into blocks and trained by windowed local losses.

    Args:
        net: a registry model (see :func:`sparse_core.local.blocks.split_blocks`).
        variant, chunks, split_points: see :func:`sparse_core.local.windows.make_windows`.
        input_shape: ``(C, H, W)`` of one example (to size the heads).
        head, head_hidden: auxiliary head kind and MLP width.

    Attributes:
        blocks: the blocks (plain list: their parameters are registered once, under ``net``).
        windows: the windows; ``heads[str(i)]`` is window ``i``'s head (none for the window
            ending at the last block, which uses the network's classifier).
    """

    def __init__(self, net: nn.Module, variant: str, input_shape: tuple[int, int, int], num_classes: int,
                 chunks: int = 2, split_points: list[int | str] | None = None, head: str = "linear",
                 head_hidden: int = 128, per_chunk_optimizer: bool = False):  # fmt: skip
        super().__init__()
        self.net = net
        self.per_chunk_optimizer = per_chunk_optimizer
        self.blocks: list[Block] = split_blocks(net)
        self.variant = variant
        self.windows: list[Window] = make_windows(len(self.blocks), variant, chunks, split_points, [b.name for b in self.blocks])
        self.owner = owners(self.windows, len(self.blocks))
        shapes = self._feature_shapes(input_shape)
        last = len(self.blocks) - 1
        self.heads = nn.ModuleDict(
            {str(i): make_head(head, shapes[w.end], num_classes, head_hidden) for i, w in enumerate(self.windows) if w.end != last}
        )

    @torch.no_grad()
    def _feature_shapes(self, input_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
        was = self.net.training
        self.net.eval()
        x = torch.zeros(2, *input_shape, device=next(self.net.parameters()).device)
        shapes = []
        for b in self.blocks:
            x = b(x)
            shapes.append(tuple(x.shape[1:]))
        self.net.train(was)
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def window_loss(self, i: int, inputs: torch.Tensor, y: torch.Tensor, recompute_first: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Loss of window ``i`` from its (already detached) input: ``(loss, output of its
        last block or logits, outputs of each block in the window)``."""
        w = self.windows[i]
        h, outs = inputs, []
        for b in range(w.start, w.end + 1):
            if b == w.start and recompute_first:
                with frozen_bn_stats(self.blocks[b]):
                    h = self.blocks[b](h)
            else:
                h = self.blocks[b](h)
            outs.append(h)
        head = self.heads[str(i)] if str(i) in self.heads else None
        logits = head(h) if head is not None else h
        return F.cross_entropy(logits, y), logits, outs

    def local_losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The exact simulation of one step's forward: ``(loss of every window, network logits)``.

        Differentiate ``sum(losses)``: each parameter then gets the sum of the gradients of the
        losses whose windows contain it, and nothing crosses a window's input edge.
        """
        outputs: dict[int, torch.Tensor] = {}
        losses, logits = [], None
        for i, w in enumerate(self.windows):
            inputs = x if w.start == 0 else outputs[w.start - 1].detach()
            loss, out, outs = self.window_loss(i, inputs, y, recompute_first=w.start in outputs)
            for b, h in zip(range(w.start, w.end + 1), outs):
                outputs.setdefault(b, h)
            losses.append(loss)
            if w.end == len(self.blocks) - 1:
                logits = out
        assert logits is not None
        return losses, logits

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups: one group, or one per chunk (the blocks a window owns
        and its head) when ``per_chunk_optimizer``."""
        if not self.per_chunk_optimizer:
            return [{"params": list(self.parameters())}]
        groups = []
        for i in range(len(self.windows)):
            ps = [p for b, blk in enumerate(self.blocks) if self.owner[b] == i for p in blk.parameters()]
            ps += list(self.heads[str(i)].parameters()) if str(i) in self.heads else []
            groups.append({"params": ps})
        return [g for g in groups if g["params"]]

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's own weights and buffers, without the auxiliary heads."""
        return self.net.state_dict()


def build_local(model: str, model_kwargs: dict, input_shape: tuple[int, int, int], num_classes: int, variant: str,
                chunks: int = 2, split_points: list[int | str] | None = None, head: str = "linear",
                head_hidden: int = 128, seed: int = 0, init_state: dict[str, torch.Tensor] | None = None,
                per_chunk_optimizer: bool = False) -> LocalNet:  # fmt: skip
    """A registry model wrapped in :class:`LocalNet`, initialised from ``seed`` (network first,
    then heads): the same weights in every process that calls it with the same arguments.
    Module-level so ``functools.partial(build_local, ...)`` pickles for spawned processes.
    ``init_state``: network weights to start from (e.g. the dense warmup)."""
    from sparse_core.models import create_model

    torch.manual_seed(seed)
    c, h, _ = input_shape
    net = create_model(model, in_channels=c, num_classes=num_classes, image_size=h, **model_kwargs)
    if init_state is not None:
        net.load_state_dict(init_state)
    return LocalNet(net, variant, input_shape, num_classes, chunks, split_points, head, head_hidden, per_chunk_optimizer)
