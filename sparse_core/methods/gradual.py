"""Magnitude pruning during or after training: ``gmp``, ``dpf`` and ``oneshot``.

``gmp`` and ``dpf`` share the schedule (cubic, Zhu & Gupta 2017) and the update period; they
differ only in where the gradient is applied:

- ``gmp`` (Zhu & Gupta 2017): the gradient is masked and pruned weights are held at zero, so
  a pruned weight has no way back (its magnitude stays 0).
- ``dpf`` (Lin et al. 2020, "Dynamic Model Pruning with Feedback", Eq. 2): the stochastic
  gradient is evaluated at the pruned model ``m ⊙ w`` and applied to the dense weights::

      w_{t+1} = w_t − γ_t · g(m_t ⊙ w_t)

  so pruned weights keep moving (the "feedback" corrects the pruning error) and come back
  when their magnitude overtakes a kept one at the next mask update.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from sparse_core.config import SCHEDULE_KEYS_HINT, ConfigError, PruningSection
from sparse_core.flops import TrainingCost, gradual_training_flops_per_example
from sparse_core.methods.base import MaskedMethod, SwapAndRestore
from sparse_core.methods.registry import register_method
from sparse_core.sparsity import cubic_sparsity
from sparse_core.sparsity.schedules import gradual_schedule_problem, pruning_end_step


@register_method(name="gmp", family="gradual", sparsity="pruning", sweep=True, pruning_schedule=True,
                 paper="Zhu & Gupta 2017, \"To prune, or not to prune: exploring the efficacy of pruning for model compression\"",
                 summary="same schedule and period as `dpf`, gradient masked, pruned weights held at 0")
class GMP(MaskedMethod):
    """Gradual magnitude pruning: masked gradients, mask from ``|m ⊙ w|`` every ``ΔT`` steps."""

    name = "gmp"
    #: Whether the weight gradient is needed at pruned positions (DPF's feedback), for the FLOPs.
    feedback = False

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """The gradual rule over the run's mask-update log
        (:func:`~sparse_core.flops.gradual_training_flops_per_example`)."""
        return gradual_training_flops_per_example(
            cost.dense_flops, cost.densities, [e["step"] for e in cost.events], [e["sparsity"] for e in cost.events],
            cost.total_steps, feedback=cls.feedback,
        )  # fmt: skip

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        problem = gradual_schedule_problem(total_steps, pruning.start_fraction, pruning.end_fraction, pruning.update_period)
        if problem:
            raise ConfigError(f"train.pruning: {problem}; {SCHEDULE_KEYS_HINT}")
        super().__init__(model, total_steps, pruning)
        #: Step at which the schedule reaches the target: an update step with training after it.
        self.end_step = pruning_end_step(total_steps, pruning.end_fraction, pruning.update_period)

    def target_sparsity(self, step: int) -> float:
        p = self.pruning
        end = self.end_step / self.total_steps
        return cubic_sparsity(step, self.total_steps, p.initial_sparsity, p.sparsity, p.start_fraction, end)

    def _update_due(self, step: int) -> bool:
        p = self.pruning
        return step % p.update_period == 0 and step <= p.update_end_fraction * self.total_steps

    def _weights_for_mask(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.masks.params.items()}

    #: Whether pruned weights are held at zero (no feedback).
    zero_pruned = True

    def after_step(self, step: int) -> None:
        if self.zero_pruned:
            # m ⊙ w before scoring: momentum gathered before a weight was pruned still moves it in
            # the optimizer step, and scored on the raw weights it could re-enter the mask; Zhu &
            # Gupta's pruning (and torch.ao.pruning's WeightNormSparsifier) score the masked
            # weights, so a pruned weight has no way back.
            self.masks.apply_()
        if self._update_due(step):
            self.update_masks(step, self.target_sparsity(step), self._weights_for_mask())
        if self.zero_pruned:
            self.masks.apply_()

    def on_train_end(self) -> None:
        # The schedule reaches the target at self.end_step, a real update with training after it
        # (checked in __init__); a mask is never rebuilt after the last step.
        if not self.events or self.events[-1]["target_sparsity"] != self.pruning.sparsity:
            last = self.events[-1]["target_sparsity"] if self.events else None
            raise RuntimeError(
                f"{self.name}: the last mask update targeted sparsity {last}, not {self.pruning.sparsity} "
                f"(schedule end step {self.end_step} of {self.total_steps}, {len(self.events)} mask updates)"
            )


@register_method(name="dpf", family="gradual", sparsity="pruning", sweep=True, pruning_schedule=True,
                 paper="Lin et al. 2020, \"Dynamic Model Pruning with Feedback\" (ICLR)",
                 summary="forward/backward at `m ⊙ w`, gradient applied to the dense `w` (swap-and-restore), mask re-estimated from "
                         "`|w|` every 16 iterations, cubic schedule 0 → target ending at 75% of training (Lin et al. 2020, Eq. 2; "
                         "Zhu & Gupta 2017, Eq. 1)")
class DPF(SwapAndRestore, GMP):
    """Dynamic pruning with feedback via swap-and-restore.

    Before the forward pass the dense weights are stashed and ``m ⊙ w`` is written into the
    parameters, so forward and backward run at the pruned model; before the optimizer step the
    dense values are restored while ``.grad`` keeps ``∂L/∂(m ⊙ w)`` for *every* coordinate.
    SGD then applies that gradient, momentum and weight decay to the dense ``w``. (Computing
    ``w * m`` inside autograd instead would zero the gradient of pruned coordinates and
    silently turn DPF into GMP.) Memory: one extra copy of the prunable weights.
    """

    name = "dpf"
    feedback = True
    zero_pruned = False  # the mask is re-estimated from the dense |w|; nothing is zeroed

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        super().__init__(model, total_steps, pruning)
        self.init_swap()

    def before_forward(self, step: int) -> None:
        self.swap_in_masked()

    def before_step(self, step: int) -> None:
        self.restore_dense()  # .grad is untouched: it was computed at m ⊙ w

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Evaluate and export ``m ⊙ w``; the dense weights come back afterwards."""
        self.swap_in_masked()
        try:
            yield
        finally:
            self.restore_dense()


@register_method(name="oneshot", family="gradual", sparsity="pruning", sweep=True,
                 paper="Han et al. 2015, \"Learning both Weights and Connections for Efficient Neural Networks\" (NeurIPS)",
                 summary="dense training, then magnitude pruning to the target in one step at the end")
class OneShot(MaskedMethod):
    """Dense training, then magnitude pruning to the target in one step at the end.

    The dense phase is the same computation as the ``dense`` run (same start and seed), so
    the result is the trained dense model pruned once (Han et al. 2015, without fine-tuning;
    the ``retrain`` stage adds the fine-tuning).
    """

    name = "oneshot"
    training_flops_per_example = GMP.training_flops_per_example  # dense until its one update

    def before_step(self, step: int) -> None:
        pass  # dense phase: all masks are ones

    def after_step(self, step: int) -> None:
        pass

    def on_train_end(self) -> None:
        weights = {n: p.detach() for n, p in self.masks.params.items()}
        self.update_masks(self.total_steps, self.pruning.sparsity, weights)
        self.masks.apply_()
