"""The one training loop.

``fit`` = for each epoch: ``train_one_epoch`` (hooks of the method around every step),
``evaluate`` on the validation split, one history row, one atomic checkpoint. A killed run
restarted with ``resume`` continues from the last checkpoint and ends with the same weights as
an uninterrupted run, because every epoch's data order and augmentation are seeded by
``(seed, epoch)`` and the checkpoint carries model, optimizer, method state and RNG state.

Data-parallel runs pass ``parallel`` (a :class:`~sparse_core.distributed.DataParallel`): the loop
is the same, and the few places where ranks differ (sharding the global batch, verifying masks,
summing metrics, who writes the checkpoint) are its hooks; the default
:class:`~sparse_core.distributed.SingleProcess` makes them identities and no-ops.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparse_core import interrupt
from sparse_core.checkpoint import CHECKPOINT_VERSION, CheckpointStore
from sparse_core.config import OptimSection
from sparse_core.data.loader import BatchTransform, Split, iterate_batches
from sparse_core.distributed import SINGLE_PROCESS, SingleProcess
from sparse_core.methods import Method
from sparse_core.precision import FP32, Precision

__all__ = ["CHECKPOINT_VERSION", "NonFiniteError", "fit", "train_one_epoch", "training_step", "evaluate", "predict"]


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; the message names epoch, step and method."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def lr_at(step: int, steps_per_epoch: int, epochs: int, cfg: OptimSection) -> float:
    """Learning rate before iteration ``step`` (0-based) of a phase of ``epochs`` epochs.

    ``cosine``: ``lr · (1 + cos(π t / T)) / 2`` per iteration (Loshchilov & Hutter 2017, no
    restarts); ``multistep``: ``lr · γ^k`` with ``k`` the milestones (epochs) already passed;
    ``constant``: ``lr``.
    """
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps_per_epoch * epochs, 1)))
    if cfg.schedule == "multistep":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.SGD:
    """SGD with momentum, optional Nesterov, weight decay on every parameter (one parameter
    group per chunk when the model provides ``param_groups()``, as a per-chunk LocalNet does)."""
    groups = model.param_groups() if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def training_step(
    model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, step: int,
    loss_weight: float | None = None, precision: Precision = FP32, scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step with the method's hooks around it; ``step`` = steps completed before it.

    A model with ``local_losses`` (:class:`sparse_core.local.LocalNet`) is trained on the sum of
    its window losses; the returned loss is then the network's own (last window's) loss.
    ``loss_weight`` multiplies the objective before ``backward`` (DDP: the rank's share of the
    global batch, see :mod:`sparse_core.distributed`); the returned loss is unweighted.

    ``precision`` (:mod:`sparse_core.precision`) sets the forward pass's autocast and the input
    layout. With an enabled ``scaler`` (fp16) the objective is loss-scaled, the gradients are
    unscaled before the finite check and the method's hooks, and a step whose gradients
    overflowed is skipped by the scaler (the method's hooks still run, on zeroed gradients,
    so DPF's dense weights come back and the step count stays aligned with the schedule).

    Returns:
        ``(loss, logits)``: scalar mean cross-entropy (nats) and logits (B, num_classes).
    """
    method.before_forward(step)
    x = precision.inputs(x)
    with precision.autocast():
        if hasattr(model, "local_losses"):
            losses, logits = model.local_losses(x, y)
            loss, objective = losses[-1], torch.stack(losses).sum()
        else:
            logits = model(x)
            loss = objective = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    weighted = objective if loss_weight is None else objective * loss_weight
    scaled = scaler is not None and scaler.is_enabled()
    (scaler.scale(weighted) if scaled else weighted).backward()
    if scaled:
        scaler.unscale_(optimizer)
    # Before the weights move, so the last good state stays good. (An empty DDP slice has a
    # NaN mean loss by definition; only its zero-weighted gradient counts.)
    _check_finite(objective if len(y) else torch.zeros(()), model, scaler if scaled else None)
    method.before_step(step)
    if scaled:
        scaler.step(optimizer)  # skipped when unscale_ found an inf/NaN gradient
        scaler.update()
    else:
        optimizer.step()
    method.after_step(step + 1)
    return loss, logits


def _check_finite(objective: torch.Tensor, model: nn.Module, scaler: torch.amp.GradScaler | None = None) -> None:
    """Raise :class:`NonFiniteError` when the objective or the gradient norm is not finite
    (one device sync per step, which the loss's ``.item()`` pays anyway).

    Under fp16 loss scaling (an enabled ``scaler``) a non-finite gradient is the scale's
    overflow, not divergence, while the scale is above 1: the gradients are zeroed for the
    method's hooks and the scaler skips the step and lowers the scale. At a scale of 1 or less
    scaling cannot have caused it, and the error is raised as in fp32. The loss itself is
    computed in float32 by autocast and must always be finite.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    finite = torch.stack([torch.isfinite(objective.detach()).all(), torch.isfinite(norm)])
    if not bool(finite.all()):
        what = "loss" if not bool(finite[0]) else "gradient"
        if what == "gradient" and scaler is not None and scaler.get_scale() > 1.0:
            for g in grads:
                g.nan_to_num_(0.0, 0.0, 0.0)
            return
        scale = f", loss scale {scaler.get_scale():g}" if scaler is not None else ""
        raise NonFiniteError(f"non-finite {what} (loss {float(objective.detach()):.4g}, gradient norm {float(norm):.4g}{scale})")


def train_one_epoch(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    split: Split,
    transform: BatchTransform,
    cfg: OptimSection,
    *,
    epoch: int,
    epochs: int,
    step: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    parallel: SingleProcess = SINGLE_PROCESS,
    lr_scale: float = 1.0,
    precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
    stop_note: str = "nothing (no checkpoint)",
) -> tuple[dict[str, float], int]:
    """One pass over ``split``; returns ``({"loss", "accuracy", "images"}, step)``, summed over
    ranks under DDP (``parallel``). ``precision`` and ``scaler``: see :func:`training_step`.

    Raises:
        sparse_core.interrupt.Stopped: a stop was requested (SIGTERM, Ctrl-C); raised after the
            current step, its message ends with ``stop_note`` (what was kept).
    """
    model.train()
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(
        total=len(split), desc=f"{method.name} epoch {epoch + 1}/{epochs}", unit="img", disable=not progress, leave=False, mininterval=1.0
    )
    for x, y in iterate_batches(split, cfg.batch_size, transform, train=True, seed=seed, epoch=epoch, device=device):
        lr = method.learning_rate(step, lr_at(step, steps_per_epoch, epochs, cfg), cfg.lr) * lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, weight = parallel.shard(x, y)  # DDP: this rank's slice of the global batch
        try:
            loss, logits = training_step(model, method, optimizer, x, y, step, weight, precision, scaler)
        except NonFiniteError as err:
            raise NonFiniteError(f"{err} at epoch {epoch + 1}, step {step + 1} of method {method.name}") from None
        step += 1
        parallel.after_step(method, step)  # DDP: masks verified across ranks every ΔT steps
        if interrupt.stop_requested():  # SIGTERM / Ctrl-C: stop here, keep the last epoch's checkpoint
            bar.close()
            interrupt.check(f"{method.name} epoch {epoch + 1}/{epochs}, step {step}", stop_note)
        # .item() syncs with the device once per step; acceptable for the readability it buys.
        loss_sum += loss.item() * len(y) if len(y) else 0.0  # an empty DDP slice has a NaN mean
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", lr=f"{lr:.4g}")
    bar.close()
    loss_sum, correct, seen = parallel.sum_over_ranks(loss_sum, correct, seen)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}, step


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, transform: BatchTransform, batch_size: int, device: torch.device, precision: Precision = FP32,
) -> torch.Tensor:
    """Logits (N, num_classes), float32, of the model in eval mode, in split order, computed in
    ``precision`` (autocast and input layout, :mod:`sparse_core.precision`)."""
    model.eval()
    outs = []
    for x, _ in iterate_batches(split, batch_size, transform, train=False, device=device):
        with precision.autocast():
            outs.append(model(precision.inputs(x)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(
    model: nn.Module, split: Split, transform: BatchTransform, batch_size: int, device: torch.device, precision: Precision = FP32,
) -> dict[str, float]:
    """``{"loss": mean NLL (nats), "accuracy": fraction}`` on ``split``."""
    logits = predict(model, split, transform, batch_size, device, precision)
    return {
        "loss": float(F.cross_entropy(logits, split.labels)),
        "accuracy": float((logits.argmax(1) == split.labels).float().mean()),
    }


@dataclass
class FitResult:
    history: pd.DataFrame
    resumed_from_epoch: int


def fit(
    model: nn.Module,
    method: Method,
    train: Split,
    val: Split,
    transform: BatchTransform,
    cfg: OptimSection,
    *,
    epochs: int,
    run_dir: str | Path,
    seed: int,
    device: torch.device,
    fingerprint: str,
    resume: bool = True,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    parallel: SingleProcess = SINGLE_PROCESS,
    nonfinite_retries: int = 0,
    nonfinite_lr_factor: float = 0.5,
    precision: Precision = FP32,
    eval_batch_size: int = 1000,
    live: tuple[str | Path, str] | None = None,
) -> FitResult:
    """Train ``model`` with ``method`` for ``epochs`` epochs, checkpointing every epoch to
    ``run_dir/last.pt`` (the previous one kept as ``prev.pt``; see :mod:`sparse_core.checkpoint`).

    Args:
        fingerprint: identifies the configuration; a checkpoint with another fingerprint is
            ignored (training starts over) so stale state never leaks into a changed run.
        resume: continue from the newest usable checkpoint (``last.pt``, else ``prev.pt``).
        stop_after_epoch: stop after this many epochs (used to simulate a killed run).
        parallel: a :class:`~sparse_core.distributed.DataParallel` rank of a DDP run: ``model``
            is trained through its DDP wrapper while the method, validation and the checkpoint
            (rank 0 writes it) use ``model`` itself; every rank resumes from the same checkpoint.
        nonfinite_retries: after a non-finite loss or gradient, restart this many times from the
            last good checkpoint (or the initial state) with the learning rate multiplied by
            ``nonfinite_lr_factor`` each time; the scale is stored in the checkpoints.
        precision: autocast dtype and input layout of training and validation
            (:mod:`sparse_core.precision`); fp16's loss scale is stored in the checkpoints. It
            belongs in ``fingerprint``: a checkpoint of another precision must not be resumed.
        eval_batch_size: batch size of the per-epoch validation (``evaluate.batch_size``);
            it changes memory use, and validation metrics only in the last bits (summation order).
        live: ``(dvclive folder, metric prefix)``: every history row is also logged there as it
            is kept, the series rebuilt from the checkpoint's rows on every (re)start
            (:mod:`sparse_core.live`); None: no live logging. Rank 0 only under DDP.

    Returns:
        The per-epoch history (also stored in the checkpoint) and the epoch resumed from.

    Raises:
        NonFiniteError: non-finite loss or gradient and no retry left; names epoch, step and
            method; the checkpoints of the last good epoch are kept.
    """
    store = CheckpointStore(run_dir)
    train, val = train.resident(device), val.resident(device)  # GPU: copied once when they fit
    optimizer = make_optimizer(model, cfg)
    method.bind_optimizer(optimizer)
    scaler = precision.grad_scaler()
    initial = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                             "scaler": scaler.state_dict()})  # fmt: skip

    def restore() -> None:
        model.load_state_dict(initial["model"])
        optimizer.load_state_dict(initial["optimizer"])
        method.load_state_dict(copy.deepcopy(initial["method"]))
        if scaler.is_enabled():
            scaler.load_state_dict(initial["scaler"])

    retries, lr_scale = 0, None  # None: the checkpoint's scale (1 for a fresh run)
    while True:
        ckpt = store.load(fingerprint, lambda c: _apply_checkpoint(c, model, optimizer, method, scaler), restore) if resume else None
        state = {"epoch": 0, "step": 0, "history": [], "lr_scale": 1.0}
        if ckpt is not None:
            state = {"epoch": ckpt["epoch"], "step": ckpt["step"], "history": list(ckpt["history"]),
                     "lr_scale": ckpt.get("lr_scale", 1.0)}  # fmt: skip
        if lr_scale is not None:
            state["lr_scale"] = lr_scale
        logger = None
        if live is not None and parallel.is_main:
            from sparse_core.live import LiveHistory

            logger = LiveHistory(live[0], state["history"], live[1])
        try:
            with interrupt.training():
                history = _train_epochs(model, method, optimizer, train, val, transform, cfg, epochs, seed, device,
                                        fingerprint, progress, stop_after_epoch, parallel, store, state, precision, scaler,
                                        eval_batch_size, logger.log if logger else None)  # fmt: skip
            if logger is not None:
                logger.close()
            return FitResult(pd.DataFrame(history), ckpt["epoch"] if ckpt else 0)
        except NonFiniteError as err:
            kept = f"the last good checkpoint {store.last} is kept" if store.last.is_file() else "no checkpoint had been written"
            if retries >= nonfinite_retries:
                raise NonFiniteError(f"{err}; {kept}") from None
            retries += 1
            lr_scale = state["lr_scale"] * nonfinite_lr_factor
            tqdm.write(f"[{method.name}] {err}; retry {retries}/{nonfinite_retries} from the last good state "
                       f"with the learning rate x{lr_scale:g}")  # fmt: skip
            restore()
            resume = True


def _apply_checkpoint(
    ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, scaler: torch.amp.GradScaler,
) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    method.load_state_dict(ckpt["method"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _train_epochs(
    model, method, optimizer, train, val, transform, cfg, epochs, seed, device, fingerprint, progress,
    stop_after_epoch, parallel, store: CheckpointStore, state: dict[str, Any], precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None, eval_batch_size: int = 1000, on_row: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The epochs of :func:`fit` from ``state`` (``epoch``, ``step``, ``history``, ``lr_scale``)."""
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    step, history, lr_scale = state["step"], state["history"], state["lr_scale"]
    trained = parallel.wrap(model)  # DDP wrapper; the method's hooks act on model's own parameters
    for epoch in range(state["epoch"], epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        t0 = time.perf_counter()
        kept = (f"{store.last} (after epoch {epoch}); the next run resumes from it" if store.last.is_file()
                else "nothing: no epoch of this run had finished")  # fmt: skip
        stats, step = train_one_epoch(
            trained, method, optimizer, train, transform, cfg, epoch=epoch, epochs=epochs, step=step, seed=seed,
            device=device, progress=progress, parallel=parallel, lr_scale=lr_scale, precision=precision, scaler=scaler,
            stop_note=kept,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        parallel.end_epoch(model, method, step)  # DDP: rank 0's BN statistics everywhere; masks verified
        with method.eval_weights():
            val_stats = evaluate(model, val, transform, eval_batch_size, device, precision)
            method.on_epoch_end(epoch, val_stats)
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "lr": lr_at(step - 1, steps_per_epoch, epochs, cfg) * lr_scale,
                "train_loss": stats["loss"],
                "train_accuracy": stats["accuracy"],
                "val_loss": val_stats["loss"],
                "val_accuracy": val_stats["accuracy"],
                "sparsity": method.masks.sparsity() if method.masks else 0.0,
                "seconds": seconds,
                "images_per_s": stats["images"] / seconds,
            }
        )
        if progress:
            tqdm.write(
                f"[{method.name}] epoch {epoch + 1}/{epochs} train_loss {stats['loss']:.4f} "
                f"val_acc {val_stats['accuracy']:.4f} sparsity {history[-1]['sparsity']:.4f} "
                f"{history[-1]['images_per_s']:.0f} img/s"
            )
        if parallel.is_main:
            store.save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"step": step, "steps_per_epoch": steps_per_epoch, "epochs": epochs},
                    "method": method.state_dict(),
                    "rng": _rng_state(),
                    "history": history,
                    "lr_scale": lr_scale,
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
                }
            )
        if on_row is not None:  # after the checkpoint: live rows never run ahead of what a resume keeps
            on_row(history[-1])
        parallel.barrier()  # DDP: the checkpoint is complete before any rank moves on
    return history


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
