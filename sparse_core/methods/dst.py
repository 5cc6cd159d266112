"""Dynamic sparse training: ``set`` (Mocanu et al. 2018) and ``rigl`` (Evci et al. 2020).

The network is sparse from the first step: masks are drawn at random with the layer-wise
densities of :func:`~sparse_core.sparsity.distributions.layer_densities` (ERK by default),
inactive weights are zero after every optimizer step, and every ``ΔT`` iterations each
layer's topology is updated (RigL, Algorithm 1; FreeTickets, Sec. 3):

1. drop the ``k = ⌈p_t · n_active⌉`` active weights of smallest magnitude;
2. grow ``k`` weights among the positions inactive after the drop (the ``k`` just dropped
   included), chosen uniformly at random (``set``) or by the largest magnitude of the dense
   gradient of the current minibatch (``rigl``; the gradient at inactive positions is exact
   because their weights are 0);
3. connections that were inactive before the update start at 0 (optionally with their momentum
   reset). A connection dropped and regrown at the same position keeps its value, as in RigL's
   reference (google-research/rigl, ``SparseRigLOptimizer._get_update_op`` with
   ``reinit_when_same=False``), unless ``dst.reinit_when_same`` is true (the FreeTickets /
   sparselearning code, whose ``truncate_weights`` zeroes every dropped weight before growing).

So each layer's active count never changes. A layer whose density is 1 (ERK caps small layers
there) takes no part in updates: in the reference its dropped weights could only be regrown in
place, where they keep their values, so it comes out of every update unchanged; skipping it
gives exactly that, whatever ``reinit_when_same`` says. Differences from the references: ``k``
is rounded up (sparselearning's ``magnitude_death``; RigL truncates ``n_ones · p``), random
growth draws exactly ``k`` positions (sparselearning draws each with probability ``k / n_free``),
and an update follows the optimizer step of its iteration (drop by ``|w|`` after the step, grow
by the same minibatch's dense gradient), the order of sparselearning / FreeTickets and of RigL's
``SparseSETOptimizer``, where RigL's Algorithm 1 and ``SparseRigLOptimizer`` take the update
instead of that iteration's step: this project's ensembles follow the FreeTickets code
(``benchmarks/parity.py`` measures the order against the ``rigl-torch`` package). The drop fraction follows a cosine decay
``p_t = p_min + (p_0 − p_min) · (1 + cos(π t / T_stop)) / 2`` (RigL, Eq. 1) or stays constant,
and updates stop after ``stop_fraction`` of training. The exploration rate ("in-time
over-parameterization", Liu et al. 2021) is the fraction of prunable weights ever active.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_core.config import DSTSection, PruningSection
from sparse_core.flops import TrainingCost, fixed_mask_flops, gradient_growth_flops
from sparse_core.methods.base import Explores, MaskedMethod, MethodContext
from sparse_core.methods.registry import declare_method, register_method
from sparse_core.sparsity.distributions import active_counts, layer_densities, random_masks


def cosine_drop_fraction(step: int, t_end: float, p0: float, floor: float) -> float:
    """RigL's cosine decay (Evci et al. 2020, Eq. 1): ``floor + (p0 − floor) · (1 + cos(π t / T)) / 2``
    with ``t = min(step, T)``, ``T = t_end`` steps."""
    return floor + (p0 - floor) * 0.5 * (1 + math.cos(math.pi * min(step / t_end, 1.0)))


@register_method(name="set", family="dst", sparsity="dst", start="init", sweep=True,
                 paper="Mocanu et al. 2018, \"Scalable training of artificial neural networks with adaptive sparse "
                       "connectivity inspired by network science\" (Nature Communications)",
                 summary="dynamic sparse training from a random ERK mask: every ΔT steps drop the `⌈p·n⌉` smallest active weights "
                         "per layer (`drop_scores`), regrow as many at random (`grow_scores`); connections inactive before the "
                         "update start at 0, a connection dropped and regrown in place keeps its value (RigL's "
                         "`reinit_when_same: false`; `train.dst.reinit_when_same: true` zeroes it as the FreeTickets code does); "
                         "layers at ERK density 1 take no part; `p` cosine-decays; updates stop at `train.dst.stop_fraction`")
class SET(Explores, MaskedMethod):
    """Sparse Evolutionary Training: magnitude drop, random grow."""

    name = "set"

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "SET":
        return cls(ctx.model, ctx.total_steps, ctx.pruning, ctx.dst, ctx.seed)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """``3 f_S``: random growth needs no dense gradient (RigL, App. H)."""
        return fixed_mask_flops(cost.dense_flops, cost.densities)

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection, dst: DSTSection, seed: int = 0):
        super().__init__(model, total_steps, pruning)
        self.dst = dst
        # Seeded separately from torch's global generator so data order and init stay untouched.
        self.generator = torch.Generator().manual_seed(10_007 * seed + 17)
        shapes = {n: tuple(p.shape) for n, p in self.masks.params.items()}
        numel = {n: p.numel() for n, p in self.masks.params.items()}
        density = 1.0 - dst.sparsity
        counts = active_counts(numel, layer_densities(shapes, density, dst.distribution), density)
        for n, m in random_masks(shapes, counts, self.generator, dst.bernoulli_init).items():
            self.masks.masks[n] = m.to(self.masks.params[n].device)
            self.masks.target_density[n] = counts[n] / numel[n]
        self.masks.apply_()
        self.ever_active = {n: m.clone() for n, m in self.masks.masks.items()}
        self._grow_scores: dict[str, torch.Tensor] | None = None

    # ----- schedule -------------------------------------------------------------------------
    def update_due(self, step: int) -> bool:
        """Whether a topology update follows optimizer step number ``step`` (1-based)."""
        return step % self.dst.update_period == 0 and step <= self.dst.stop_fraction * self.total_steps

    def drop_fraction(self, step: int) -> float:
        d = self.dst
        if d.drop_schedule == "constant":
            return d.drop_fraction
        return cosine_drop_fraction(step, max(d.stop_fraction * self.total_steps, 1.0), d.drop_fraction, d.drop_fraction_floor)

    def planned_update(self, step: int) -> tuple[float, str] | None:
        """``(drop fraction, kind)`` of the topology update after step ``step``, or None."""
        return (self.drop_fraction(step), "dst") if self.update_due(step) else None

    # ----- hooks ----------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.planned_update(step + 1) is not None:
            self._grow_scores = self.grow_scores()  # before masking: rigl needs the dense gradient
        self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        self.masks.apply_()
        plan = self.planned_update(step)
        if plan is not None:
            self.update_topology(step, plan[0], kind=plan[1])
        self._grow_scores = None

    def grow_scores(self) -> dict[str, torch.Tensor]:
        """Scores of candidate positions (higher grows first): uniform noise for SET.

        Called in ``before_step`` of a step that a topology update follows, before the gradient
        is masked (so ``.grad`` is the dense gradient of the minibatch), and kept for the update.
        A variant (e.g. a growth criterion) overrides this hook alone.
        """
        return {n: torch.rand(p.shape, generator=self.generator).to(p.device) for n, p in self.masks.params.items()}

    def drop_scores(self) -> dict[str, torch.Tensor]:
        """Scores of active positions (lower drops first), shape of each weight: ``|w|`` (SET,
        RigL: magnitude pruning of the active weights).

        Called at the update itself, after the optimizer step (``.grad`` there holds the
        gradient of the last minibatch at the active positions; inactive positions are never
        dropped, whatever their score). A variant overrides this hook alone: MEST (Yuan et al.
        2021) drops by ``|w| + λ|g|``.
        """
        return {n: p.detach().abs() for n, p in self.masks.params.items()}

    # ----- the update -----------------------------------------------------------------------
    @torch.no_grad()
    def update_topology(
        self, step: int, fraction: float, scores: dict[str, torch.Tensor] | None = None, kind: str = "dst"
    ) -> int:
        """Drop the ``⌈fraction · n_active⌉`` active weights of lowest :meth:`drop_scores` per layer
        (smallest magnitude) and grow as many at the positions inactive after the drop with the
        highest :meth:`grow_scores` (``scores`` if given); returns the number regrown.

        Layers at density 1 are skipped (see the module docstring). The event logged in
        ``events`` (``mask_updates.parquet``) holds, besides step, kind, drop fraction, regrown
        count, sparsity and exploration rate, ``moved_fraction``: the fraction of the active
        positions (of layers below density 1) that are inactive after the update, and
        ``moved_fraction/<layer>`` per layer. A dropped position regrown in place has not moved.

        With random growth the moved fraction of a layer of ``n`` positions, ``a`` of them active,
        has the expectation ``k (n − a) / (a (n − a + k))``: the ``k`` regrown positions are a
        uniform draw without replacement from the ``n − a + k`` free ones, so each of the ``k``
        dropped positions is re-picked with probability ``k / (n − a + k)`` (hypergeometric).
        For ``a = 0.2 n`` and ``p = 0.8`` that is 0.667, not 0.8.
        """
        scores = scores if scores is not None else (self._grow_scores or self.grow_scores())
        drop_scores = self.drop_scores()
        regrown, moved_total, active_total = 0, 0, 0
        moved_per_layer: dict[str, float] = {}
        for n, p in self.masks.params.items():
            mask = self.masks.masks[n].flatten()
            n_active = int(mask.sum())
            k = min(math.ceil(fraction * n_active), n_active)
            if k == 0 or n_active == mask.numel():
                continue  # nothing to drop, or a dense layer: unchanged, as in the reference
            w = p.detach().flatten()
            drop = torch.topk(drop_scores[n].flatten().masked_fill(~mask, float("inf")), k, largest=False).indices
            new = mask.clone()
            new[drop] = False
            grow = torch.topk(scores[n].flatten().masked_fill(new, float("-inf")), k).indices
            new[grow] = True
            # Which regrown connections restart at zero: those inactive before the update, or,
            # with reinit_when_same, also those dropped and regrown in place.
            reinit = grow if self.dst.reinit_when_same else grow[~mask[grow]]
            w[reinit] = 0.0  # w is a view of p
            if self.dst.reset_momentum and self.optimizer is not None:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.view(-1)[reinit] = 0.0
            moved = int((mask & ~new).sum())
            moved_per_layer[n] = moved / n_active
            moved_total, active_total = moved_total + moved, active_total + n_active
            self.masks.masks[n] = new.view_as(p)
            self.ever_active[n] |= self.masks.masks[n]
            regrown += k
        self.masks.apply_()
        self.events.append(
            {
                "step": int(step),
                "kind": kind,
                "drop_fraction": float(fraction),
                "regrown": regrown,
                "sparsity": self.masks.sparsity(),
                "exploration_rate": self.exploration_rate(),
                "moved_fraction": moved_total / active_total if active_total else 0.0,
                **{f"moved_fraction/{n}": v for n, v in moved_per_layer.items()},
            }
        )
        return regrown



@register_method(name="rigl", family="dst", sparsity="dst", start="init", sweep=True,
                 paper="Evci et al. 2020, \"Rigging the Lottery: Making All Tickets Winners\" (ICML)",
                 summary="as `set`, but regrow where the dense gradient of the minibatch is largest in magnitude")
class RigL(SET):
    """Rigging the Lottery: magnitude drop, grow where the dense gradient magnitude is largest."""

    name = "rigl"

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """Gradient growth: one dense weight gradient every ΔT steps (RigL, App. H)."""
        return gradient_growth_flops(cost.dense_flops, cost.densities, cost.update_period)

    def grow_scores(self) -> dict[str, torch.Tensor]:
        # Called before the gradient is masked: .grad is the dense gradient of this minibatch.
        return {n: p.grad.detach().abs().clone() for n, p in self.masks.params.items()}


declare_method(name="dst_ensemble", family="ensemble", sparsity="dst", start="init", ensemble="members",
               paper="Liu et al. 2022, \"Deep Ensembling with No Overhead for either Training or Testing: The All-Round "
                     "Blessings of Dynamic Sparsity\" (FreeTickets, ICLR), Sec. 4.1",
               summary="`train.dst_ensemble.members` independent `train.dst_ensemble.method` (`rigl`) runs; member i of the "
                       "ensemble of seed k has seed `SeedSequence([k, i])` (31 bits), so no two members of any ensemble seed "
                       "share a seed (`runs/s<k>/dst_ensemble/member_<i>/`)")
