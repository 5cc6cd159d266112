"""The paper's analyses, small (Laskin et al. 2020, Sec. 5): batch-size sweep with
steps-to-target-loss and the compute/time Pareto frontier, per-layer cosine similarity of
local and backprop gradients, and capacity on randomly relabelled data.

All functions train with the exact single-process simulation (:class:`LocalNet`), seeded, so
every point is reproducible on its own and can run as an independent task.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparse_core.data import BatchTransform, Split, iterate_batches
from sparse_core.local.accounting import step_accounting
from sparse_core.local.model import LocalNet

#: Model construction draws from torch's global generator: builds are serialised so that
#: concurrent sweep tasks get the same initial weights as sequential ones.
BUILD_LOCK = threading.Lock()


def build_seeded(build: Callable[[], LocalNet], seed: int) -> LocalNet:
    with BUILD_LOCK:
        torch.manual_seed(seed)
        return build()


def _sgd(local: LocalNet, lr: float, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum)


def local_step(local: LocalNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One simulated step; returns the network loss (nats) and the network logits."""
    losses, logits = local.local_losses(x, y)
    opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()
    opt.step()
    return losses[-1].item(), logits


def gradient_cosine(local: LocalNet, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per conv/linear weight: cosine similarity of the local gradient (sum of window losses)
    and the true backprop gradient of the network loss, on one batch.

    Returns:
        Columns ``layer``, ``block``, ``window`` (owner), ``cosine`` (NaN for a zero gradient).
    """
    local = copy.deepcopy(local)
    weights = {n: p for n, p in local.net.named_parameters() if p.dim() > 1}
    block_of = {id(p): b for b, blk in enumerate(local.blocks) for p in blk.parameters()}
    local.zero_grad(set_to_none=True)
    F.cross_entropy(local.net(x), y).backward()
    true = {n: p.grad.detach().clone() for n, p in weights.items()}
    local.zero_grad(set_to_none=True)
    torch.stack(local.local_losses(x, y)[0]).sum().backward()
    rows = []
    for n, p in weights.items():
        g, t = p.grad.flatten(), true[n].flatten()
        denom = float(g.norm() * t.norm())
        b = block_of[id(p)]
        rows.append({"layer": n, "block": b, "window": local.owner[b], "cosine": float(g @ t) / denom if denom > 0 else float("nan")})
    return pd.DataFrame(rows)


def steps_to_target(
    build: Callable[[], LocalNet], train: Split, transform: BatchTransform, batch_size: int, lr: float,
    target_loss: float, max_steps: int, seed: int, ema: float = 0.9,
) -> dict[str, float | int | None]:  # fmt: skip
    """Train until the exponential moving average (factor ``ema``) of the network's training
    loss reaches ``target_loss``.

    Returns:
        ``{"steps" (None if not reached), "final_loss", "examples", "training_flops",
        "critical_path"}`` with FLOPs totals ``steps × batch × per-example FLOPs`` (per-example
        values from :func:`step_accounting`; ``max_steps`` when the target is not reached).
    """
    local = build_seeded(build, seed)
    local.train()
    opt = _sgd(local, lr)
    avg, step, reached, epoch = None, 0, None, 0
    while step < max_steps and reached is None:
        for x, y in iterate_batches(train, batch_size, transform, train=True, seed=seed, epoch=epoch):
            loss, _ = local_step(local, opt, x, y)
            avg = loss if avg is None else ema * avg + (1 - ema) * loss
            step += 1
            if avg <= target_loss:
                reached = step
                break
            if step >= max_steps:
                break
        epoch += 1
    acc = step_accounting(local, tuple(train.images.shape[1:]))
    n = (reached or max_steps) * batch_size
    return {"steps": reached, "final_loss": float(avg), "examples": n,
            "training_flops": n * acc["training"], "critical_path": n * acc["critical_path"]}  # fmt: skip


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Boolean mask of the rows not dominated in (``x``, ``y``), both lower-is-better."""
    pts = df[[x, y]].to_numpy(dtype=float)
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts <= p, axis=1) & np.any(pts < p, axis=1))
        keep.append(not dominated and np.all(np.isfinite(p)))
    return pd.Series(keep, index=df.index)


def random_label_accuracy(
    build: Callable[[], LocalNet], train: Split, transform: BatchTransform, batch_size: int, lr: float,
    epochs: int, seed: int,
) -> float:  # fmt: skip
    """Training accuracy (network output, eval mode) after ``epochs`` epochs on ``train`` with
    labels replaced by seeded uniformly random ones: how much a variant can memorise."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, int(train.labels.max()) + 1, (len(train),), generator=g)
    noisy = Split(train.images, labels)
    local = build_seeded(build, seed)
    local.train()
    opt = _sgd(local, lr)
    for epoch in range(epochs):
        for x, y in iterate_batches(noisy, batch_size, transform, train=True, seed=seed, epoch=epoch):
            local_step(local, opt, x, y)
    local.eval()
    correct = 0
    with torch.no_grad():
        for x, y in iterate_batches(noisy, 1000, transform, train=False):
            correct += int((local(x).argmax(1) == y).sum())
    return correct / len(noisy)
