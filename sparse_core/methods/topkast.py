"""Top-KAST: Top-K Always Sparse Training (``topkast``).

Jayakumar, Pascanu, Rae, Osindero & Elsen 2020, "Top-KAST: Top-K Always Sparse Training"
(NeurIPS), the method section (sparse forward pass, sparse backward pass, exploration
regularisation; the equation numbers (1)-(3) below are ours: the paper's text was not at hand
offline, and the formulation was checked against its quotation in L. Weng, "Large Transformer
Model Inference Optimization", 2023, section "Top-KAST"). The dense parameters ``θ`` are kept;
at step ``t``, in every layer:

- **Sparse forward** (1): ``α_i = θ_i`` if ``i ∈ A^t``, else 0, where ``A^t`` holds the
  ``D`` fraction of the layer's weights of largest ``|θ|`` (``D = 1 −`` ``train.dst.sparsity``).
- **Sparse backward** (2): the gradient ``∇_α L(α)`` is applied to the weights of the larger
  set ``B^t ⊇ A^t`` of the ``D + M`` fraction of largest ``|θ|``; weights outside ``B^t`` do not
  change. So the weights of ``B \\ A`` are trained without taking part in the forward pass, and
  can enter ``A`` when they outgrow its smallest members.
- **Exploration regularisation** (3): an L2 penalty on ``θ`` whose coefficient is scaled
  by ``1/D`` on ``B \\ A``: with scale ``c`` = ``train.topkast.penalty``, the gradient
  ``c · θ_i`` is added for ``i ∈ A`` and ``c · θ_i / D`` for ``i ∈ B \\ A`` (that of
  ``(c/2) · (Σ_A θ² + Σ_{B∖A} θ² / D)``), so a weight needs a lasting gradient to stay in ``B``
  and the sets keep changing ("rich get richer" is damped).
- The sets are recomputed from ``|θ|`` every ``train.topkast.update_period`` steps (1: every
  step, as (1)-(2) define them from ``θ^t``).

Implementation: a swap-and-restore, as ``dpf``'s (:class:`~sparse_core.methods.gradual.DPF`).
``before_forward`` stashes ``θ`` and writes ``α = m_A ⊙ θ`` into the parameters, so forward and
backward run at ``α`` and ``.grad`` holds ``∂L/∂α`` for every position (the weights of
``B \\ A`` are 0 in ``α`` but their gradient is exact); ``before_step`` restores ``θ``, masks the
gradient to ``B`` and adds the penalty's gradient; after the optimizer step the weights outside
``B`` are put back to their values before the step, so neither the optimizer's weight decay nor
its momentum moves them ((2): ``Δθ_i = 0`` outside ``B``). Between steps the parameters hold
``θ``; evaluation and export see ``α`` (:meth:`TopKAST.eval_weights`). The masks
(``self.masks``) are ``A``; ``self.backward_masks`` are ``B``. Memory: one extra copy of the
prunable weights.

Per-layer sizes: ``|A_l| = n_l`` from ``train.dst.distribution`` at density ``D``
(:mod:`sparse_core.sparsity.distributions`; ``uniform`` is the paper's "top-K of each layer"),
``|B_l| = min(N_l, n_l + round(M · N_l))``, so with a uniform distribution every layer has
backward density ``D + M``. ``B`` is the first ``|B_l|`` of one descending sort of ``|θ|``, and
``A`` its first ``|A_l|``, so ``B ⊇ A`` holds also at ties.

Differences from the paper, and why:

- The penalty: the quoted formulation writes the per-weight penalty as ``|θ_i|`` on ``A`` and
  ``|θ_i| / D`` on ``B∖A`` and calls it an L2 regularisation; we implement the L2 reading (the
  squares, a gradient proportional to ``θ``), with the same ``1/D`` scaling.
- ``M`` (``train.topkast.extra_density``, default 0.1) and the penalty scale
  (``train.topkast.penalty``, default 1e-4) are our defaults; the paper reports several
  forward/backward sparsity pairs. ``D`` in the penalty is each layer's own forward density (the
  paper's ``D``, which is the same in every layer under its uniform distribution).
- The optimizer's weight decay (``train.optim.weight_decay``) still acts on every weight it
  updates (``B`` and the non-prunable parameters), on top of the penalty; set it to 0 for the
  paper's regulariser alone.
- ``train.dst.distribution: erk`` (the profile default) sizes ``A`` per layer by ERK instead of
  the paper's uniform top-K; ``dst.drop_fraction``, ``update_period``, ``stop_fraction``,
  ``drop_schedule`` do not apply (the sets follow ``|θ|``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pydantic
import torch
from pydantic import ConfigDict, Field
from torch import nn

from sparse_core.config import DSTSection, PruningSection
from sparse_core.flops import TrainingCost
from sparse_core.methods.base import Explores, MaskedMethod, MethodContext, SwapAndRestore
from sparse_core.methods.registry import register_method
from sparse_core.sparsity.distributions import active_counts, layer_densities


@register_method(name="topkast", family="dst", sparsity="dst", start="init", sweep=True, params_key="topkast",
                 paper="Jayakumar et al. 2020, \"Top-KAST: Top-K Always Sparse Training\" (NeurIPS)",
                 summary="forward with the top-`D` weights of each layer by `|θ|` (set A, `D = 1 − train.dst.sparsity`), "
                         "gradient applied to the larger top-`(D+M)` set B ⊇ A (`train.topkast.extra_density`), weights "
                         "outside B unchanged; L2 exploration penalty `c·θ` on A, `c·θ/D` on B∖A (`train.topkast.penalty`); "
                         "A and B recomputed from `|θ|` every `train.topkast.update_period` steps (1)")
class TopKAST(Explores, SwapAndRestore, MaskedMethod):
    """Top-K Always Sparse Training via swap-and-restore (see the module docstring).

    Attributes:
        masks: ``A`` (the forward set), a :class:`~sparse_core.sparsity.MaskSet`.
        backward_masks: ``{name: bool mask}`` of ``B ⊇ A``.
        counts_forward, counts_backward: ``{name: |A_l|}``, ``{name: |B_l|}`` (fixed for the run).
        ever_active: positions that have been in ``A`` at some point (exploration rate).
    """

    name = "topkast"

    class Options(pydantic.BaseModel):
        """``train.topkast``: Top-KAST's own keys."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        #: ``M``: the backward set holds ``D + M`` of each layer's weights (capped at all of them).
        extra_density: float = Field(0.1, ge=0.0, le=1.0)
        #: ``c``: scale of the exploration penalty (L2 on A, L2 / D on B∖A).
        penalty: float = Field(1e-4, ge=0.0)
        #: Steps between recomputations of A and B from ``|θ|`` (1: every step).
        update_period: int = Field(1, gt=0)

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "TopKAST":
        return cls(ctx.model, ctx.total_steps, ctx.pruning, ctx.dst, cls.options(ctx))

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """``2 f_A + f_B`` per example (RigL's convention, Evci et al. 2020, App. H: a forward
        ``f``, a backward ``2f``): the forward and the activation gradients run at ``α`` (the
        layer's forward density ``d_l``, measured from the exported weights), the weight gradient
        is needed on ``B`` only (density ``min(1, d_l + M)``, ``M`` from ``cost.train``'s
        ``topkast`` section). The top-k sorts are not counted (not a multiply-accumulate)."""
        extra = (cost.train.model_extra or {}).get("topkast") if cost.train is not None else None
        m = cls.Options.model_validate(extra or {}).extra_density
        f_a = sum(f * cost.densities.get(n, 1.0) for n, f in cost.dense_flops.items())
        f_b = sum(f * min(1.0, cost.densities.get(n, 1.0) + m) for n, f in cost.dense_flops.items())
        return float(2 * f_a + f_b)

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection, dst: DSTSection,
                 options: "TopKAST.Options | None" = None):  # fmt: skip
        super().__init__(model, total_steps, pruning)
        self.dst = dst
        self.opts = options if options is not None else self.Options()
        shapes = {n: tuple(p.shape) for n, p in self.masks.params.items()}
        numel = {n: p.numel() for n, p in self.masks.params.items()}
        density = 1.0 - dst.sparsity
        self.counts_forward = active_counts(numel, layer_densities(shapes, density, dst.distribution), density)
        self.counts_backward = {n: min(numel[n], c + round(self.opts.extra_density * numel[n])) for n, c in self.counts_forward.items()}
        for n in self.masks.params:
            self.masks.target_density[n] = self.counts_forward[n] / numel[n]
        self.backward_masks: dict[str, torch.Tensor] = {}
        self.init_swap()
        self._stashed = False  # whether _dense holds θ from before the current optimizer step
        self.recompute_sets()
        self.ever_active = {n: m.clone() for n, m in self.masks.masks.items()}

    # ----- the sets -------------------------------------------------------------------------
    @torch.no_grad()
    def recompute_sets(self) -> float:
        """Set ``A`` and ``B`` from the current ``|θ|`` (one descending sort per layer); returns
        the fraction of ``A``'s positions that changed (0-1)."""
        changed = total = 0
        for n, p in self.masks.params.items():
            k_a, k_b = self.counts_forward[n], self.counts_backward[n]
            order = torch.topk(p.detach().abs().flatten(), k_b, sorted=True).indices
            a = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            a[order[:k_a]] = True
            b = torch.zeros_like(a)
            b[order] = True
            a = a.view_as(p)
            changed += int((a & ~self.masks.masks[n]).sum()) if n in self.backward_masks else 0
            total += k_a
            self.masks.masks[n] = a
            self.backward_masks[n] = b.view_as(p)
        return changed / total if total else 0.0

    def backward_density(self) -> float:
        """Fraction of prunable weights in ``B`` (0-1)."""
        return sum(int(m.sum()) for m in self.backward_masks.values()) / self.masks.numel()

    # ----- swap and restore -----------------------------------------------------------------
    # ----- hooks ----------------------------------------------------------------------------
    def before_forward(self, step: int) -> None:
        self.swap_in_masked()
        self._stashed = True

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if self._swapped:
            self.restore_dense()  # .grad keeps ∂L/∂α for every position
        else:  # no forward through the hooks this step: θ is in place; stash it for after_step
            for n, p in self.masks.params.items():
                self._dense[n].copy_(p)
        self._stashed = True
        c = self.opts.penalty
        for n, p in self.masks.params.items():
            if p.grad is None:
                continue
            a, b = self.masks.masks[n], self.backward_masks[n]
            p.grad.mul_(b)
            if c > 0:
                d = max(self.counts_forward[n], 1) / p.numel()  # the layer's D (an empty A: 1/N, not 0)
                scale = torch.where(a, c, c / d).to(p.dtype) * b  # c on A, c / D on B \ A, 0 outside B
                p.grad.add_(p.detach() * scale)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self._stashed:  # (2): Δθ = 0 outside B (no weight decay, no momentum there)
            for n, p in self.masks.params.items():
                p.copy_(torch.where(self.backward_masks[n], p, self._dense[n]))
            self._stashed = False
        if step % self.opts.update_period == 0:
            moved = self.recompute_sets()
            for n, m in self.masks.masks.items():
                self.ever_active[n] |= m
            self.events.append({"step": int(step), "kind": "topk", "sparsity": self.masks.sparsity(),
                                "backward_density": self.backward_density(), "moved_fraction": moved,
                                "exploration_rate": self.exploration_rate()})  # fmt: skip

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Evaluate and export ``α = m_A ⊙ θ``; ``θ`` comes back afterwards."""
        was_swapped = self._swapped
        self.swap_in_masked()
        try:
            yield
        finally:
            if not was_swapped:
                self.restore_dense()

    # ----- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["backward_masks"] = {n: m.cpu().clone() for n, m in self.backward_masks.items()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.backward_masks = {n: m.to(self.masks.params[n].device) for n, m in sd["backward_masks"].items()}
