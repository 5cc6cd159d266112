"""MEST: memory-economic sparse training with elastic mutation (``mest``).

Yuan et al. 2021, "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the
Edge" (NeurIPS), the MEST+EM ("Elastic Mutation") scheme of its framework section; reference
code boone891214/MEST (``prune_utils/retrain.py`` ``update_mask``, ``prune_utils/utils_pr.py``
``weight_pruning`` / ``weight_growing``, ``scripts/resnet32/EM/``), from which the details below
were checked (the paper's text was not at hand offline: no section or equation numbers).

A SET variant (:class:`~sparse_core.methods.dst.SET`; the network is sparse from the start, ERK
layer densities, ``train.dst``) that changes two things:

- **Drop criterion** (:meth:`MEST.drop_scores`): the active weights of lowest importance
  ``|w| + λ·|∂L/∂w|`` are dropped, so a small weight with a large gradient survives (the
  reference's ``weight_pruning``: ``imp = |w| + sp_lmd · |grad|``). ``∂L/∂w`` is the gradient of
  the last minibatch before the update (at active positions; only active positions can be
  dropped). λ is ``train.mest.lam``.
- **Decaying mutation ratio** (:meth:`MEST.drop_fraction`): piecewise constant, stepping down at
  fixed fractions of training, then 0 (no more mutation). The reference's 90%-sparsity EM script
  prunes each layer to 92%, then 91% sparsity and grows back to 90% (``LOWER_BOUND
  "0.92-0.91-0.9"``, ``UPPER_BOUND "0.9-0.9-0.9"``), stepping down at epochs 90 and 120 of 160
  (``MASK_UPDATE_DECAY_EPOCH "90-120"``); its 95% script uses 96%, 95.5%, 95%. In both, the
  mutation is 20%, then 10% of each layer's *active* weights, then none. So
  ``train.mest.mutation_fractions`` are fractions of the active weights (default ``[0.2, 0.1]``),
  ``train.mest.decay_fractions`` the fractions of training where the next one takes over
  (default ``[0.5625]`` = 90/160), and updates stop at ``train.dst.stop_fraction`` (the
  profile default 0.75 = 120/160, where the reference's ratio becomes 0).

Growth is random among the positions inactive after the drop (the just-dropped ones included),
as the reference's ``weight_growing`` (``np.random.choice`` over the zeros): SET's
:meth:`~sparse_core.methods.dst.SET.grow_scores`. Regrown connections start at 0
(``--sp-update-init-method zero``).

Differences from the paper and its code, and why:

- λ: the reference's ``--sp-lmd`` defaults to 0 and none of its scripts sets it; moreover its
  mask update runs at the start of an epoch, after the previous step's ``optimizer.zero_grad()``,
  so the gradient term is zero there in any case and its drop is by ``|w|`` alone. Here the
  gradient is the last minibatch's, as the paper's criterion asks. We did not have the paper's
  value of λ at hand; ``lam: 1.0`` is our default (set ``train.mest.lam``).
- ΔT is ``train.dst.update_period`` (iterations); the reference mutates every 5 epochs
  (``SP_MASK_UPDATE_FREQ``). ``train.dst.drop_fraction``, ``drop_schedule`` and
  ``drop_fraction_floor`` are not read (the mutation schedule replaces them).
- The initial mask is SET's random ERK mask (``train.dst.distribution``); the reference starts
  from a magnitude-pruned random init with the same sparsity in every listed layer (its config
  file; uniform, ``train.dst.distribution: uniform`` is the closest).
- A connection dropped and regrown in place keeps its value unless
  ``train.dst.reinit_when_same`` (the reference zeroes every dropped weight before growing, as
  ``reinit_when_same: true``); shared with ``set``/``rigl``.
- Only MEST+EM is built; the soft-memory-bound variant (MEST+EM&S: grow first to a denser bound,
  then prune back) and the data-efficiency extension are not.
"""

from __future__ import annotations

import pydantic
import torch
from pydantic import ConfigDict, Field
from torch import nn

from sparse_core.config import DSTSection, PruningSection
from sparse_core.methods.base import MethodContext
from sparse_core.methods.dst import SET
from sparse_core.methods.registry import register_method


@register_method(name="mest", family="dst", sparsity="dst", start="init", sweep=True, params_key="mest",
                 paper="Yuan et al. 2021, \"MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the Edge\" "
                       "(NeurIPS), MEST+EM (Elastic Mutation)",
                 summary="as `set` (random ERK mask, random growth, regrown connections start at 0), but every ΔT steps drop "
                         "the active weights of lowest `|w| + λ|g|` (`train.mest.lam`), with a mutation fraction that steps down "
                         "(`train.mest.mutation_fractions` 20% then 10% of the active weights, switching at "
                         "`train.mest.decay_fractions`) and stops at `train.dst.stop_fraction`")
class MEST(SET):
    """SET with MEST's importance drop ``|w| + λ|g|`` and decaying mutation fraction (module docstring)."""

    name = "mest"

    class Options(pydantic.BaseModel):
        """``train.mest``: MEST's own keys (defaults: the reference's EM scripts)."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        #: λ of the drop importance ``|w| + λ|g|`` (0: magnitude only, as SET).
        lam: float = Field(1.0, ge=0.0)
        #: Mutation fraction of each layer's active weights in each phase (then 0 after ``dst.stop_fraction``).
        mutation_fractions: list[float] = Field(default_factory=lambda: [0.2, 0.1], min_length=1)
        #: Fractions of training (increasing, in (0, 1)) where the next mutation fraction takes over.
        decay_fractions: list[float] = Field(default_factory=lambda: [0.5625])

        @pydantic.model_validator(mode="after")
        def _phases(self) -> "MEST.Options":
            if len(self.mutation_fractions) != len(self.decay_fractions) + 1:
                raise ValueError(f"mutation_fractions ({self.mutation_fractions}) needs exactly one more entry than "
                                 f"decay_fractions ({self.decay_fractions})")  # fmt: skip
            if any(not 0.0 <= f <= 1.0 for f in self.mutation_fractions):
                raise ValueError(f"mutation_fractions must lie in [0, 1], got {self.mutation_fractions}")
            bounds = [0.0, *self.decay_fractions, 1.0]
            if any(a >= b for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"decay_fractions must increase strictly inside (0, 1), got {self.decay_fractions}")
            return self

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "MEST":
        return cls(ctx.model, ctx.total_steps, ctx.pruning, ctx.dst, ctx.seed, cls.options(ctx))

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection, dst: DSTSection, seed: int = 0,
                 options: "MEST.Options | None" = None):  # fmt: skip
        super().__init__(model, total_steps, pruning, dst, seed)
        self.opts = options if options is not None else self.Options()

    def drop_fraction(self, step: int) -> float:
        """Mutation fraction ``p`` of the update after step ``step``: the entry of
        ``mutation_fractions`` of the phase that ``step / T`` falls in (boundaries
        ``decay_fractions``; a boundary belongs to the later phase)."""
        t = step / max(self.total_steps, 1)
        phase = sum(t >= f for f in self.opts.decay_fractions)
        return self.opts.mutation_fractions[phase]

    def drop_scores(self) -> dict[str, torch.Tensor]:
        """Importance ``|w| + λ·|g|`` of every position (lower drops first), each weight's shape;
        ``g`` is ``.grad`` at the update: the last minibatch's gradient at the active positions
        (zero where a weight has no gradient)."""
        lam = self.opts.lam
        return {n: p.detach().abs() + lam * p.grad.detach().abs() if p.grad is not None else p.detach().abs()
                for n, p in self.masks.params.items()}  # fmt: skip
