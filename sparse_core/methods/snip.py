"""SNIP: single-shot network pruning at initialisation by connection sensitivity (``snip``).

Lee, Ajanthan & Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity" (ICLR), Sec. 4. Every connection ``j`` gets an indicator ``c_j`` (Eq. 3); the
effect of removing it on the loss is approximated by the derivative at ``c = 1`` (Eq. 4-5)::

    g_j(w; D) = ∂L(c ⊙ w; D) / ∂c_j |_{c=1} = (∂L/∂w_j) · w_j

and its connection sensitivity is ``s_j = |g_j| / Σ_k |g_k|`` (Eq. 6), computed once, at the
initial weights, on one minibatch ``D`` of training data. The ``κ`` connections of largest
``s_j`` over the whole network are kept (global top-κ, Eq. 6's ``s̃_κ`` threshold), and the
pruned network is then trained as usual under that fixed mask. The normalisation by
``Σ_k |g_k|`` does not change the ranking, so the scores used are ``|g ⊙ w|``.

How it runs in sparseflow's hooks (:mod:`sparse_core.methods.base`): the minibatch ``D`` is
**the first training batch** of the run (after the run's augmentation, in the model's train
mode, as the engine draws it). Its gradient at the initial weights exists in
``before_step(0)``, before any optimizer step: the mask is computed there, the gradient is
masked and training goes on (``before_step`` masks gradients, ``after_step`` re-zeroes the
pruned weights, as for every fixed-mask method). Sparsity ``S`` (``train.pruning.sparsity``)
keeps exactly ``N − round(S·N)`` connections (:func:`~sparse_core.sparsity.criteria.n_keep`,
exact top-k: ties never prune more or fewer).

Differences from the paper, and why:

- The scoring pass *is* the first training step. In the paper a separate forward/backward
  pass scores the connections, and training then starts from the pruned network; here the
  first optimizer step applies the gradient of the dense initial network restricted to the
  kept connections (the pruned network's own gradient would differ at that one step). This
  saves one pass and needs no access to the data loader from inside a method (the engine and
  :func:`sparse_core.api.sparsify` hand the method gradients, not batches).
- ``train.pruning.scope: layerwise`` keeps the top ``1 − S`` of each layer instead of the
  paper's global top-κ (global is the default, as in the paper).
- If every gradient of a step is zero (a step skipped by fp16 loss scaling, whose gradients
  the engine zeroes before the hooks, and which leaves the weights at their initial values),
  scoring waits for the next minibatch, still at the initial weights.
- ``keep_first_dense`` / ``keep_last_dense`` (``train.pruning``) remove the first conv / last
  linear from the prunable set; the paper prunes every conv and linear weight (our default).

The paper computes the scores at a variance-scaling initialisation (so that they do not
depend on the architecture's scale); sparseflow scores at the model's own seeded
initialisation (PyTorch's defaults for the registry's models), the start of every ``init`` method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_core.config import ConfigError, PruningSection
from sparse_core.flops import TrainingCost, fixed_mask_flops
from sparse_core.methods.base import MaskedMethod
from sparse_core.methods.registry import register_method
from sparse_core.sparsity.criteria import n_keep


@torch.no_grad()
def top_score_masks(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global", active: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Keep the connections of highest score: exact top-k, globally or per layer.

    Args:
        scores: ``{name: score tensor}`` of each weight's shape (higher = keep first; any real
            values, NaN not allowed).
        sparsity: target fraction of pruned connections (0-1) over all weights (``global``) or
            in each layer (``layerwise``); ``n_keep(N, sparsity)`` are kept.
        scope: ``"global"`` or ``"layerwise"``.
        active: optional ``{name: bool mask}``: only these positions may be kept (pruned
            positions never come back, whatever their score; iterative pruning, SynFlow).

    Returns:
        ``{name: bool mask}``, True = kept.

    Raises:
        ValueError: unknown scope, sparsity outside [0, 1), or fewer active positions than the
            number to keep.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")

    def pick(flat: torch.Tensor, allowed: torch.Tensor | None, k: int) -> torch.Tensor:
        flat = flat.double()
        if allowed is not None:
            if int(allowed.sum()) < k:
                raise ValueError(f"cannot keep {k} connections out of {int(allowed.sum())} active ones")
            flat = flat.masked_fill(~allowed, float("-inf"))
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if k > 0:
            keep[torch.topk(flat, k, sorted=False).indices] = True
        return keep

    if scope == "layerwise":
        return {
            n: pick(s.flatten(), None if active is None else active[n].flatten(), n_keep(s.numel(), sparsity)).view_as(s)
            for n, s in scores.items()
        }
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    allowed = None if active is None else torch.cat([active[n].flatten() for n in scores])
    keep = pick(flat, allowed, n_keep(flat.numel(), sparsity))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


class PruneAtInit(MaskedMethod):
    """Shared by the pruning-at-initialisation methods (``snip``, ``synflow``): a fixed mask
    set once from per-connection scores, then training with masked gradients (inherited hooks).

    Raises:
        ConfigError: ``train.pruning.granularity`` is ``structured`` (these methods score
            single connections).
    """

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        if pruning.granularity != "unstructured":
            raise ConfigError(
                f"method {self.name!r} prunes single connections: train.pruning.granularity must be 'unstructured', "
                f"got {pruning.granularity!r}"
            )
        super().__init__(model, total_steps, pruning)

    @torch.no_grad()
    def set_masks_from_scores(
        self, step: int, scores: dict[str, torch.Tensor], sparsity: float, active: dict[str, torch.Tensor] | None = None,
        **event: Any,
    ) -> None:  # fmt: skip
        """Keep the top-scored connections at ``sparsity`` (``train.pruning.scope``), zero the
        others, and log one event (step, target and realised sparsity, plus ``event``)."""
        new = top_score_masks(scores, sparsity, self.pruning.scope, active)
        layerwise = self.pruning.scope == "layerwise"
        for n, m in new.items():
            self.masks.masks[n] = m.to(self.masks.params[n].device)
            self.masks.target_density[n] = 1.0 - sparsity if layerwise else float(m.float().mean())
        self.masks.apply_()
        self.events.append({"step": int(step), **event, "target_sparsity": float(sparsity), "sparsity": self.masks.sparsity()})


@register_method(name="snip", family="pai", sparsity="pruning", start="init", sweep=True,
                 paper="Lee et al. 2019, \"SNIP: Single-shot Network Pruning based on Connection Sensitivity\" (ICLR)",
                 summary="prune at init: keep the global top-k of the connection sensitivity `|g ⊙ w|` of the first training "
                         "minibatch (computed in the first step, at the initial weights), then train under that fixed mask "
                         "(Lee et al. 2019, Eq. 3-6)")
class SNIP(PruneAtInit):
    """Connection-sensitivity pruning at initialisation (see the module docstring)."""

    name = "snip"

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        super().__init__(model, total_steps, pruning)
        #: Whether the mask has been set (at the first step with a non-zero gradient).
        self.scored = False

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """``(3 f_D + (T − 1) · 3 f_S) / T`` per example (RigL convention, App. H): the first of
        the ``T`` steps (the scoring pass) runs forward and backward at the dense initial
        network; the others at the final per-layer densities (``3 f_S``, a fixed mask)."""
        steps = max(int(cost.total_steps), 1)
        dense, sparse = fixed_mask_flops(cost.dense_flops, {}), fixed_mask_flops(cost.dense_flops, cost.densities)
        return (dense + (steps - 1) * sparse) / steps

    @torch.no_grad()
    def connection_sensitivity(self) -> dict[str, torch.Tensor]:
        """``|g ⊙ w|`` per prunable weight (Lee et al. 2019, Eq. 5-6 without the normalising
        sum, which does not change the ranking), from ``.grad`` (the minibatch's gradient,
        before masking) and the current weights; a weight without gradient scores 0."""
        return {
            n: (p.grad * p).abs() if p.grad is not None else torch.zeros_like(p) for n, p in self.masks.params.items()
        }

    def before_step(self, step: int) -> None:
        if not self.scored:
            scores = self.connection_sensitivity()
            if any(bool(s.any()) for s in scores.values()):  # all zero: a skipped fp16 step; wait
                self.set_masks_from_scores(step, scores, self.pruning.sparsity, kind="snip")
                self.scored = True
        self.masks.mask_grads_()

    def on_train_end(self) -> None:
        if not self.scored:
            raise RuntimeError(f"snip: no step of the {self.total_steps} had a non-zero gradient; the mask was never set")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scored": self.scored}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.scored = bool(sd["scored"])
