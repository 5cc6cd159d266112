"""The training-hook protocol every method implements, and the methods that share it.

The engine calls, for each minibatch (``step`` = iterations completed before this one)::

    method.before_forward(step)     # e.g. DPF swaps in m ⊙ w
    loss.backward()
    method.before_step(step)        # e.g. mask gradients, or DPF restores the dense w
    optimizer.step()
    method.after_step(step + 1)     # e.g. re-apply the mask, update it on schedule

plus ``on_train_end()`` once, and ``eval_weights()`` around every evaluation and export.
A method owns a :class:`~sparse_core.sparsity.MaskSet` (``None`` for ``dense``) and a list
of ``events`` (one dict per mask update) that the engine writes to ``mask_updates.parquet``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from sparse_core.config import DSTSection, EDSTSection, PruningSection
from sparse_core.sparsity import MaskSet, filter_masks, magnitude_masks, prunable_parameters


class Method:
    """Dense training: every hook is a no-op. Subclasses override what they need."""

    name = "dense"

    def __init__(self, model: nn.Module, total_steps: int):
        self.model = model
        self.total_steps = total_steps
        self.masks: MaskSet | None = None
        self.events: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the method the optimizer (e.g. to reset momentum at regrown weights)."""
        self.optimizer = optimizer

    def before_forward(self, step: int) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def on_train_end(self) -> None:
        pass

    def learning_rate(self, step: int, scheduled: float, base: float) -> float:
        """Learning rate for iteration ``step``; ``scheduled`` comes from the optim section."""
        return scheduled

    def on_epoch_end(self, epoch: int, val: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based), inside ``eval_weights()``, with validation metrics."""

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Context in which the model's parameters are the ones to evaluate and export."""
        yield

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict() if self.masks else {}, "events": list(self.events)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.masks is not None:
            self.masks.load_state_dict(sd["masks"])
        self.events = list(sd["events"])


class MaskedMethod(Method):
    """Training under a mask with masked gradients: ``retrain`` (fine-tuning a frozen mask).

    Inactive weights get zero gradient and are re-zeroed after every optimizer step (momentum
    and weight decay could otherwise move them), so ``m ⊙ w == w`` at all times.
    """

    name = "retrain"

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        super().__init__(model, total_steps)
        self.pruning = pruning
        keep_last = pruning.keep_last_dense or pruning.granularity == "structured"
        self.masks = MaskSet(prunable_parameters(model, pruning.keep_first_dense, keep_last))

    def before_step(self, step: int) -> None:
        self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        self.masks.apply_()

    # ----- mask estimation shared by gmp, dpf and oneshot ---------------------------------
    @torch.no_grad()
    def update_masks(self, step: int, sparsity: float, weights: dict[str, torch.Tensor]) -> None:
        """Re-estimate the masks from ``|weights|`` at ``sparsity`` and log the event.

        Logged per update: step, target and realised sparsity, the fraction of prunable
        weights whose mask flipped, and the pruning error ``‖w − m⊙w‖² / ‖w‖²`` (Lin et al.
        2020, Sec. 4) of the weights the new mask was computed from.
        """
        if self.pruning.granularity == "structured":
            new = filter_masks(weights, sparsity)
        else:
            new = magnitude_masks(weights, sparsity, self.pruning.scope)
        flips = sum(int((new[n] != self.masks.masks[n]).sum()) for n in new)
        w2 = sum(float(w.pow(2).sum()) for w in weights.values())
        kept2 = sum(float((w * new[n]).pow(2).sum()) for n, w in weights.items())
        # A global threshold decides each layer's share; record that allotment as its target.
        global_ = self.pruning.granularity == "unstructured" and self.pruning.scope == "global"
        for n, m in new.items():
            self.masks.masks[n] = m
            self.masks.target_density[n] = float(m.float().mean()) if global_ else 1.0 - sparsity
        self.events.append(
            {
                "step": int(step),
                "target_sparsity": float(sparsity),
                "sparsity": self.masks.sparsity(),
                "flip_fraction": flips / self.masks.numel(),
                "pruning_error": (w2 - kept2) / w2 if w2 > 0 else 0.0,
            }
        )


def create_method(
    name: str,
    model: nn.Module,
    total_steps: int,
    pruning: PruningSection,
    dst: DSTSection | None = None,
    seed: int = 0,
    edst: EDSTSection | None = None,
    epochs: int = 1,
) -> Method:
    """Build a method by its params name (``dense``, ``oneshot``, ``gmp``, ``dpf``, ``set``,
    ``rigl``, ``edst_ensemble``, ``retrain``).

    Raises:
        KeyError: unknown name.
    """
    from sparse_core.methods.dst import SET, RigL
    from sparse_core.methods.edst import EDST
    from sparse_core.methods.gradual import DPF, GMP, OneShot

    dst = dst or DSTSection()
    if name == "dense":
        return Method(model, total_steps)
    if name in ("set", "rigl"):
        return {"set": SET, "rigl": RigL}[name](model, total_steps, pruning, dst, seed)
    if name == "edst_ensemble":
        return EDST(model, total_steps, pruning, dst, edst or EDSTSection(), epochs, seed)
    table: dict[str, Any] = {"retrain": MaskedMethod, "gmp": GMP, "dpf": DPF, "oneshot": OneShot}
    if name not in table:
        raise KeyError(f"unknown method {name!r}; known: dense, set, rigl, edst_ensemble, {', '.join(table)}")
    return table[name](model, total_steps, pruning)
