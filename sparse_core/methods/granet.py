"""GraNet: gradual magnitude pruning with zero-cost neuroregeneration (``granet``).

Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy, Wang & Mocanu 2021, "Sparse Training
via Boosting Pruning Plasticity with Neuroregeneration" (NeurIPS), the method section
"Gradual Pruning with Zero-Cost Neuroregeneration"; reference code VITA-Group/GraNet,
``CIFAR/sparselearning/core.py`` (``Masking.step``, ``pruning``, ``truncate_weights``), from
which every detail below was checked (the paper's text was not at hand offline: the section is
cited by its title, not its number).

Every ``ΔT`` iterations from ``t0`` on (both from ``train.pruning``; see "Differences" for ΔT):

1. **Gradual pruning** (while the schedule runs, ``t0 <= t <= t1``): global magnitude pruning of
   the active weights to the cubic target of Zhu & Gupta (2017), Eq. 1::

       s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (t1 − t0))³

   with ``s_f`` = ``train.pruning.sparsity``, ``t0``/``t1`` from ``train.pruning``'s
   ``start_fraction``/``end_fraction`` (``t1`` snapped to the update grid, as for ``gmp``), and
   ``s_i`` = ``train.granet.initial_sparsity`` (below).
2. **Zero-cost neuroregeneration**, right after, in every layer: drop the
   ``k = ⌈r_t · n_active⌉`` active weights of smallest magnitude and regrow ``k`` connections
   among the positions inactive after the drop (the just-dropped ones included) where the
   magnitude of the dense gradient of the current minibatch is largest. The layer's active count
   is unchanged, so the sparsity after the update is exactly the schedule's ``s_t``. Connections
   that were inactive before the update start at 0 (so do their momentum buffers); a connection
   dropped and regrown in place keeps its value (the reference zeroes nothing between its drop
   and its growth). The regeneration fraction decays with a cosine over the whole run::

       r_t = r_min + (r_0 − r_min) · (1 + cos(π t / T)) / 2

   (the reference's ``CosineDecay(prune_rate, T_max = total iterations, eta_min = 0.005)``,
   stepped once per iteration), ``r_0`` = ``regeneration_fraction`` (0.5, ``--prune-rate``),
   ``r_min`` = ``regeneration_floor`` (0.005). Regeneration goes on after ``t1`` until
   ``train.pruning.update_end_fraction`` (1.0: to the end of training, as in the reference,
   whose ``truncate_weights`` runs at every update); pruning stops at ``t1``.

"Zero-cost": the regeneration adds no weights and, apart from the dense gradient at an update
step (the same as RigL's growth), no computation.

**Which of the paper's two settings this is.** Both start from scratch (a random init), so the
method declares ``start="init"``. ``train.granet.initial_sparsity`` chooses:

- ``0.5`` (default): the paper's *sparse-to-sparse* setting (``s_i = 0.5``, its headline
  result): training starts from a random ERK mask of density ``1 − s_i`` (the reference's
  ``--sparse-init ERK --init-density 0.5``; :mod:`sparse_core.sparsity.distributions`), seeded
  by the run's seed;
- ``0``: the *dense-to-sparse* setting (``s_i = 0``), starting dense.

``train.pruning.initial_sparsity`` (``gmp``/``dpf``'s ``s_i``) is not read: GraNet's default
differs from theirs, and one profile runs them side by side.

Differences from the paper and its code, and why:

- ΔT is ``train.granet.update_period`` when set, else ``train.pruning.update_period`` (16,
  DPF's period). The paper and its scripts use ΔT = 1000 iterations on CIFAR (4000 on
  ImageNet) and end pruning at epoch 80 of 160 (``end_fraction`` 0.5); with a drop fraction
  starting at 0.5, a short ΔT replaces many connections very often, so set
  ``train.granet.update_period`` (the pruning schedule is then checked with it).
- Exact top-k selections (ties never drop or keep more than ``k``); the reference thresholds
  (``> threshold``), which can drop a few more at ties.
- ``train.pruning.scope: layerwise`` prunes every layer to ``s_t`` (close to the reference's
  ``GraNet_uniform``, without its rule that keeps the last layer at density 0.2);
  ``granularity: structured`` is refused (regeneration is unstructured).
- No update follows the last iteration (the reference regrows there too when ΔT divides the
  run's length; those connections would be exported at 0, dropped weights lost untrained).
- Weights that are pruned are zeroed in place and their gradient masked, as in every masked
  method of sparseflow; the reference also zeroes the momentum of every inactive weight at every
  step. The momentum buffer matters only when a connection comes back, so it is zeroed then.
"""

from __future__ import annotations

import math

import pydantic
import torch
from pydantic import ConfigDict, Field
from torch import nn

from sparse_core.config import ConfigError, PruningSection
from sparse_core.flops import TrainingCost, gradual_training_flops_per_example
from sparse_core.methods.base import Explores, MethodContext
from sparse_core.methods.dst import cosine_drop_fraction
from sparse_core.methods.gradual import GMP
from sparse_core.methods.registry import register_method
from sparse_core.sparsity import cubic_sparsity
from sparse_core.sparsity.distributions import active_counts, layer_densities, random_masks


@register_method(name="granet", family="gradual", sparsity="pruning", start="init", sweep=True, pruning_schedule=True,
                 params_key="granet",
                 paper="Liu et al. 2021, \"Sparse Training via Boosting Pruning Plasticity with Neuroregeneration\" (GraNet, "
                       "NeurIPS), \"Gradual Pruning with Zero-Cost Neuroregeneration\"",
                 summary="from a random ERK mask at `train.granet.initial_sparsity` (0.5; 0 = dense start), every ΔT steps: "
                         "global magnitude pruning to the cubic schedule of `train.pruning`, then zero-cost neuroregeneration: "
                         "in each layer drop the `⌈r·n⌉` smallest active weights and regrow as many where the dense gradient is "
                         "largest (new connections start at 0), so sparsity follows the schedule exactly; `r` cosine-decays "
                         "0.5 → 0.005 over the run; regeneration continues after pruning ends")
class GraNet(Explores, GMP):
    """Gradual magnitude pruning with zero-cost neuroregeneration (see the module docstring).

    Attributes:
        opts: the validated ``train.granet`` section.
        ever_active: ``{name: bool mask}`` of positions active at some point (exploration rate).
    """

    name = "granet"

    class Options(pydantic.BaseModel):
        """``train.granet``: GraNet's own keys (defaults: the reference's CIFAR settings)."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        #: ``s_i``: sparsity of the random ERK mask the run starts from (0: dense start).
        initial_sparsity: float = Field(0.5, ge=0.0, lt=1.0)
        #: ``r_0``: fraction of each layer's active weights dropped and regrown at the first update.
        regeneration_fraction: float = Field(0.5, ge=0.0, le=1.0)
        #: ``r_min``: floor of the cosine decay of the regeneration fraction.
        regeneration_floor: float = Field(0.005, ge=0.0, le=1.0)
        #: ΔT in iterations for pruning and regeneration; None: ``train.pruning.update_period``.
        update_period: int | None = Field(None, gt=0)

        @pydantic.model_validator(mode="after")
        def _floor_below_start(self) -> "GraNet.Options":
            if self.regeneration_floor > self.regeneration_fraction:
                raise ValueError(f"regeneration_floor ({self.regeneration_floor}) must not exceed regeneration_fraction "
                                 f"({self.regeneration_fraction})")  # fmt: skip
            return self

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "GraNet":
        return cls(ctx.model, ctx.total_steps, ctx.pruning, cls.options(ctx), ctx.seed)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """The gradual rule over the run's mask-update log (``3 f(t)`` per step, RigL's convention,
        :func:`~sparse_core.flops.gradual_training_flops_per_example`), plus at every regeneration
        step the dense weight gradient the growth criterion needs, ``f_D − f(t)`` (as RigL's
        gradient growth, Evci et al. 2020, App. H). ``f(t)`` is interpolated linearly in sparsity
        between the dense and the final model, as the gradual rule does; the sparsity before the
        first logged update is that of the initial mask (an event at step 0 when ``s_i > 0``)."""
        events = cost.events
        steps = [e["step"] for e in events]
        sparsities = [e["sparsity"] for e in events]
        base = gradual_training_flops_per_example(cost.dense_flops, cost.densities, steps, sparsities, cost.total_steps)
        f_d = float(sum(cost.dense_flops.values()))
        f_s = float(sum(f * cost.densities.get(n, 1.0) for n, f in cost.dense_flops.items()))
        s_final = sparsities[-1] if sparsities else 0.0
        extra = 0.0
        for e in events:
            if e.get("regrown") is not None and not (isinstance(e["regrown"], float) and math.isnan(e["regrown"])):
                f_t = f_d - (e["sparsity"] / s_final) * (f_d - f_s) if s_final > 0 else f_d
                extra += f_d - f_t
        return base + extra / max(cost.total_steps, 1)

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection, options: "GraNet.Options | None" = None,
                 seed: int = 0):  # fmt: skip
        opts = options if options is not None else self.Options()
        if pruning.granularity == "structured":
            raise ConfigError("method 'granet': train.pruning.granularity = 'structured' is not supported (neuroregeneration "
                              "drops and regrows single connections); use 'unstructured'")  # fmt: skip
        if opts.initial_sparsity > pruning.sparsity:
            raise ConfigError(f"method 'granet': train.granet.initial_sparsity ({opts.initial_sparsity}) exceeds the target "
                              f"train.pruning.sparsity ({pruning.sparsity}); the schedule only prunes")  # fmt: skip
        if opts.update_period is not None:
            pruning = pruning.model_copy(update={"update_period": opts.update_period})
        super().__init__(model, total_steps, pruning)  # checks the schedule with the period in force
        self.opts = opts
        # Seeded apart from torch's global generator (data order and init stay untouched), as SET.
        self.generator = torch.Generator().manual_seed(10_007 * seed + 17)
        if opts.initial_sparsity > 0:
            shapes = {n: tuple(p.shape) for n, p in self.masks.params.items()}
            numel = {n: p.numel() for n, p in self.masks.params.items()}
            density = 1.0 - opts.initial_sparsity
            counts = active_counts(numel, layer_densities(shapes, density, "erk"), density)
            for n, m in random_masks(shapes, counts, self.generator).items():
                self.masks.masks[n] = m.to(self.masks.params[n].device)
                self.masks.target_density[n] = counts[n] / numel[n]
            self.masks.apply_()
            # The level the run starts at, for the FLOPs rule (before it, nothing: step 0).
            self.events.append({"step": 0, "target_sparsity": opts.initial_sparsity, "sparsity": self.masks.sparsity()})
        self.ever_active = {n: m.clone() for n, m in self.masks.masks.items()}
        self._grads: dict[str, torch.Tensor] | None = None

    # ----- schedule -------------------------------------------------------------------------
    def target_sparsity(self, step: int) -> float:
        """``s_t`` of the cubic schedule from ``train.granet.initial_sparsity`` to the target."""
        p = self.pruning
        return cubic_sparsity(step, self.total_steps, self.opts.initial_sparsity, p.sparsity, p.start_fraction,
                              self.end_step / self.total_steps)  # fmt: skip

    def _update_due(self, step: int) -> bool:
        """Whether an update follows optimizer step ``step`` (1-based): every ΔT steps from ``t0``
        to ``update_end_fraction · T``, but not after the last step (connections regrown there
        would be exported at 0, never trained)."""
        p = self.pruning
        T = self.total_steps
        return step % p.update_period == 0 and p.start_fraction * T <= step <= p.update_end_fraction * T and step < T

    def regeneration_fraction(self, step: int) -> float:
        """``r_t``: cosine decay from ``regeneration_fraction`` to ``regeneration_floor`` over the run."""
        return cosine_drop_fraction(step, max(self.total_steps, 1), self.opts.regeneration_fraction, self.opts.regeneration_floor)

    # ----- hooks ----------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self._update_due(step + 1):
            # The dense gradient of this minibatch (before masking): the growth criterion.
            self._grads = {n: p.grad.detach().abs().clone() if p.grad is not None else torch.zeros_like(p)
                           for n, p in self.masks.params.items()}  # fmt: skip
        self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        self.masks.apply_()
        if self._update_due(step):
            target = self.target_sparsity(step)
            if step <= self.end_step:
                self.update_masks(step, target, {n: p.detach() for n, p in self.masks.params.items()})
                self.masks.apply_()
            else:  # pruning is over; regeneration goes on
                self.events.append({"step": int(step), "target_sparsity": float(target), "sparsity": self.masks.sparsity()})
            grads = self._grads if self._grads is not None else {n: torch.zeros_like(p) for n, p in self.masks.params.items()}
            self.regenerate(step, self.regeneration_fraction(step), grads)
        self._grads = None

    # ----- neuroregeneration ----------------------------------------------------------------
    @torch.no_grad()
    def regenerate(self, step: int, fraction: float, grad_scores: dict[str, torch.Tensor]) -> int:
        """Drop ``⌈fraction · n_active⌉`` active weights of smallest ``|w|`` per layer and regrow
        as many at the inactive positions of largest ``grad_scores`` (``|g|``, each weight's shape);
        returns the number regrown and adds ``regrown``, ``regrown_new`` (connections inactive
        before the update), ``regeneration_fraction`` and ``exploration_rate`` to the last event.

        Layers with every position active are skipped (their dropped weights could only come back
        in place, unchanged).
        """
        regrown = fresh_total = 0
        for n, p in self.masks.params.items():
            mask = self.masks.masks[n].flatten()
            n_active = int(mask.sum())
            k = min(math.ceil(fraction * n_active), n_active)
            if k == 0 or n_active == mask.numel():
                continue
            w = p.detach().view(-1)
            drop = torch.topk(w.abs().masked_fill(~mask, float("inf")), k, largest=False).indices
            new = mask.clone()
            new[drop] = False
            grow = torch.topk(grad_scores[n].flatten().masked_fill(new, float("-inf")), k).indices
            new[grow] = True
            fresh = grow[~mask[grow]]  # inactive before the update: start at 0, momentum too
            w[fresh] = 0.0
            if self.optimizer is not None:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.view(-1)[fresh] = 0.0
            self.masks.masks[n] = new.view_as(p)
            self.ever_active[n] |= self.masks.masks[n]
            regrown += k
            fresh_total += int(fresh.numel())
        self.masks.apply_()
        self.events[-1].update({"regrown": regrown, "regrown_new": fresh_total, "regeneration_fraction": float(fraction),
                                "exploration_rate": self.exploration_rate()})  # fmt: skip
        return regrown
