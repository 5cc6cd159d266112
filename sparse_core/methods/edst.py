"""EDST Ensemble: several sparse tickets from one dynamic sparse training run.

Liu et al. 2022, "Deep Ensembling with No Overhead for either Training or Testing: The
All-Round Blessings of Dynamic Sparsity" (FreeTickets), Sec. 4.2 and Algorithm 1:

- exploration phase, ``t_ex`` epochs: ordinary DST (drop/grow every ΔT) at the constant base
  learning rate, so the topology explores widely;
- ``M`` refinement phases of equal length: each phase has its own learning-rate schedule
  (multipliers of the base rate over equal sub-segments) and ordinary DST updates continue;
- before phases ``2..M`` a *global exploration* drops a fraction ``q`` of each layer's active
  weights by magnitude and regrows as many (random or gradient), moving the model to a new
  basin while keeping the per-layer counts;
- ticket ``m`` is the best-validation checkpoint of phase ``m``.

In the pipeline the run trains ``train.edst.budget × train.epochs`` epochs (1.8×: the FreeTickets
README trains EDST for 450 epochs where one sparse run trains 250), a share
``train.edst.exploration_share`` (1/3: 150 of 450) of them exploring
(:func:`~sparse_core.config.edst_plan`).

The ordinary updates follow the FreeTickets README's EDST command (VITA-Group/FreeTickets,
``main_EDST.py`` + ``sparselearning/core.py``), not RigL's single-run schedule: gradient growth
(``edst.grow``; ``random`` reproduces the repository's removed CIFAR-10 script), a constant drop fraction ``edst.drop_fraction`` (0.5) and updates every ΔT steps through every
phase (``edst.phase_stop_fraction`` = 1; a smaller value stops them within each phase, the
exploration phase included). ``dst.stop_fraction`` and ``dst.drop_schedule`` do not apply.
Every update, global explorations included, logs the fraction of active positions that moved
(:meth:`~sparse_core.methods.dst.SET.update_topology`): with random growth and ``q = 0.8`` at
density 0.2 about 0.67 of a layer's active positions move, the rest are re-picked in place.
Differences from the script: the best ticket of phase 1 is the best of phase 1 alone (the
script keeps comparing with the exploration phase's best accuracy until phase 2), and layers
at density 1 are left out of every update (see :mod:`sparse_core.methods.dst`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_core.config import DSTSection, EDSTSection, PruningSection, edst_plan
from sparse_core.flops import TrainingCost
from sparse_core.methods.base import MethodContext
from sparse_core.methods.dst import SET, RigL, cosine_drop_fraction
from sparse_core.methods.registry import register_method


@register_method(name="edst_ensemble", family="ensemble", sparsity="dst", start="init", ensemble="tickets",
                 paper="Liu et al. 2022, \"Deep Ensembling with No Overhead for either Training or Testing: The All-Round "
                       "Blessings of Dynamic Sparsity\" (FreeTickets, ICLR), Sec. 4.2, Algorithm 1",
                 summary="one run of `train.edst.budget` × `train.epochs` epochs (1.8×, the FreeTickets README): exploration "
                         "for `train.edst.exploration_share` of it (1/3) at constant lr, then M refinement phases (lr "
                         "×0.1 then ×0.01), a global exploration (`q` of each layer's active weights dropped and regrown) before "
                         "phases 2..M; ticket m = best-validation checkpoint of phase m (`runs/s<k>/edst_ensemble/tickets/`). "
                         "Topology updates as in the FreeTickets README's EDST command: gradient growth, constant drop fraction 0.5, every "
                         "ΔT steps through every phase (`train.edst.grow`, `drop_fraction`, `drop_schedule`, "
                         "`phase_stop_fraction`); `mask_updates.parquet` logs per update the fraction of active positions that "
                         "moved, per layer")
class EDST(RigL):
    """One run, ``edst.tickets`` tickets (see module docstring).

    Attributes:
        tickets: per phase ``None`` or ``{"epoch", "val_accuracy", "state", "masks"}`` with a
            CPU copy of the model's state dict and masks at the phase's best validation accuracy.
    """

    name = "edst_ensemble"

    def __init__(
        self, model: nn.Module, total_steps: int, pruning: PruningSection, dst: DSTSection, edst: EDSTSection,
        epochs: int, seed: int = 0,
    ):  # fmt: skip
        super().__init__(model, total_steps, pruning, dst, seed)
        self.edst = edst
        self.steps_per_epoch = total_steps // epochs
        plan = edst_plan(edst, epochs)
        #: Whole epochs of the exploration phase and of each refinement phase (:func:`edst_plan`).
        self.exploration_epochs, self.phase_epochs = plan.exploration_epochs, plan.phase_epochs
        self.tickets: list[dict[str, Any] | None] = [None] * edst.tickets

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "EDST":
        return cls(ctx.model, ctx.total_steps, ctx.pruning, ctx.dst, ctx.edst, ctx.epochs, ctx.seed)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """SET's rule with random growth (``edst.grow: random``), RigL's with gradient growth."""
        grow = cost.train.edst.grow if cost.train is not None else "gradient"
        return (RigL if grow == "gradient" else SET).training_flops_per_example(cost)

    # ----- phases ---------------------------------------------------------------------------
    def phase_of_epoch(self, epoch: int) -> int:
        """-1 during exploration, else the refinement phase (0-based) of 0-based ``epoch``."""
        if epoch < self.exploration_epochs:
            return -1
        return min((epoch - self.exploration_epochs) // self.phase_epochs, self.edst.tickets - 1)

    def phase_start_step(self, phase: int) -> int:
        return (self.exploration_epochs + phase * self.phase_epochs) * self.steps_per_epoch

    def _global_exploration_due(self, step: int) -> bool:
        return any(step == self.phase_start_step(m) for m in range(1, self.edst.tickets))

    def learning_rate(self, step: int, scheduled: float, base: float) -> float:
        phase = self.phase_of_epoch(step // self.steps_per_epoch)
        if phase < 0:
            return base
        pos = (step - self.phase_start_step(phase)) / (self.phase_epochs * self.steps_per_epoch)
        mults = self.edst.refine_lr_multipliers
        return base * mults[min(int(pos * len(mults)), len(mults) - 1)]

    # ----- hooks ----------------------------------------------------------------------------
    def grow_scores(self) -> dict[str, torch.Tensor]:
        return RigL.grow_scores(self) if self.edst.grow == "gradient" else SET.grow_scores(self)

    def phase_bounds(self, step: int) -> tuple[int, int]:
        """``(first step, number of steps)`` of the phase (exploration or refinement) in which
        optimizer step number ``step`` (1-based) runs."""
        phase = self.phase_of_epoch((step - 1) // self.steps_per_epoch)
        if phase < 0:
            return 0, self.exploration_epochs * self.steps_per_epoch
        return self.phase_start_step(phase), self.phase_epochs * self.steps_per_epoch

    def update_due(self, step: int) -> bool:
        """Ordinary update after step ``step`` (1-based): every ΔT steps, in the first
        ``edst.phase_stop_fraction`` of each phase."""
        if step % self.dst.update_period or step < 1:
            return False
        start, length = self.phase_bounds(step)
        return step - start <= self.edst.phase_stop_fraction * length

    def drop_fraction(self, step: int) -> float:
        e = self.edst
        if e.drop_schedule == "constant":
            return e.drop_fraction
        floor = min(self.dst.drop_fraction_floor, e.drop_fraction)
        return cosine_drop_fraction(step, max(self.total_steps, 1), e.drop_fraction, floor)

    def planned_update(self, step: int) -> tuple[float, str] | None:
        if self._global_exploration_due(step):
            return self.edst.exploration_rate, "global_exploration"
        return (self.drop_fraction(step), "dst") if self.update_due(step) else None

    def on_epoch_end(self, epoch: int, val: dict[str, float]) -> None:
        phase = self.phase_of_epoch(epoch)
        if phase < 0:
            return
        best = self.tickets[phase]
        if best is None or val["accuracy"] > best["val_accuracy"]:
            self.tickets[phase] = {
                "epoch": epoch + 1,
                "val_accuracy": float(val["accuracy"]),
                "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "masks": {k: m.cpu().clone() for k, m in self.masks.masks.items()},
            }

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["tickets"] = list(self.tickets)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.tickets = list(sd["tickets"])
