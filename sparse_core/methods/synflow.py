"""SynFlow: data-free iterative pruning at initialisation by synaptic flow (``synflow``).

Tanaka, Kunin, Yamins & Ganguli 2020, "Pruning neural networks without any data by
iteratively conserving synaptic flow" (NeurIPS), Sec. 6 and Algorithm 1. With the mask ``μ``
(all ones at the start) and the initial weights ``θ₀``, for ``k = 1 … n``:

1. ``θ_μ ← μ ⊙ θ₀`` (mask the parameters);
2. ``R = 1ᵀ (∏_l |θ_μ^[l]|) 1`` (the synaptic flow objective): the network's output summed,
   evaluated on an all-ones input with every weight replaced by its absolute value, so every
   ReLU is the identity and ``R`` is the sum over all input-output paths of the products of
   the absolute weights along them;
3. ``S(θ_μ) = ∂R/∂θ_μ ⊙ θ_μ`` (the synaptic saliency score; non-negative);
4. keep the connections of highest score so that the density is ``d^{k/n}`` (the
   exponential schedule: the compression ``ρ = 1/d`` is reached as ``ρ^{k/n}``; Alg. 1 line 6,
   ``τ`` the ``(1 − ρ^{−k/n})`` percentile of ``S``).

No data is used: the mask depends only on the initial weights, the architecture and the input
shape (``MethodContext.input_shape``). The paper uses ``n = 100`` rounds
(``train.synflow.rounds``, declared here as :class:`SynFlow.Options`). Scoring happens when the
method is built, before training; the network then trains under the fixed mask (masked
gradients, pruned weights re-zeroed after every step) from its original, signed initial
weights at the kept positions.

What we do, following the authors' code (``ganguli-lab/Synaptic-Flow``, ``Pruners/pruners.py``
class ``SynFlow`` and ``prune.py`` ``prune_loop``), and where we differ:

- Scores come from a deep copy of the model; the model itself is never modified (its signed
  weights, batch-norm statistics and train/eval mode stay as they were; only the final mask is
  applied to it). The authors take ``abs_()`` of every entry of ``model.state_dict()`` in place
  and multiply the signs back afterwards; the copy gives the same numbers with nothing to undo.
- Like the authors' ``linearize``, every floating entry of the copy's state (weights, biases,
  batch-norm affine parameters and running statistics) is replaced by its absolute value.
- The copy runs in **eval mode** (``prune_loop``'s default ``prune_train_mode=False``): batch
  norm normalises with its running statistics (at initialisation mean 0 and variance 1), not
  with the statistics of the single all-ones input, which would be degenerate.
- The copy runs in **float64**. The authors' code computes in float32 (its ``model.double()``
  is commented out); ``R`` is a sum of products of ``L`` weights over all paths and can leave
  float32's range in deep or wide networks, where the ranking would become meaningless.
  A non-finite ``R`` in float64 is an error.
- Masked weights are set to 0 in the copy each round (the authors' masked layers compute with
  ``mask * weight``), so a pruned connection scores 0. The selection is an exact top-k over the
  connections still active (:func:`~sparse_core.methods.snip.top_score_masks`), so a pruned
  connection never returns and every round keeps exactly ``N − round((1 − d^{k/n}) N)``
  connections; the authors' threshold ``score <= τ`` prunes every tie at ``τ`` too. The last
  round targets ``train.pruning.sparsity`` itself (no floating-point drift from ``d^{n/n}``).
- ``train.pruning.scope: layerwise`` gives every layer the density ``d^{k/n}`` (the authors'
  ``mask_scope: local``); global (one threshold over all layers) is the default, as in the paper.
- The prunable set is every conv and linear weight (``keep_first_dense`` / ``keep_last_dense``
  remove the first conv / last linear), as the authors' default (biases, batch norm and
  residual shortcuts are not pruned).

Each round is logged as an event (``mask_updates.parquet``: step 0, ``round``, target and
realised sparsity).
"""

from __future__ import annotations

import copy

import pydantic
import torch
from torch import nn

from sparse_core.config import PruningSection
from sparse_core.flops import TrainingCost, fixed_mask_flops
from sparse_core.methods.base import MethodContext
from sparse_core.methods.registry import register_method
from sparse_core.methods.snip import PruneAtInit


def linearised_copy(model: nn.Module, names: list[str]) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A float64, eval-mode deep copy of ``model`` with every floating state entry replaced by
    its absolute value (Tanaka et al. 2020, Alg. 1; the authors' ``linearize``), and its
    parameters ``names`` (the only ones that require a gradient)."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    for p in net.parameters():
        p.requires_grad_(False)
    params = {n: net.get_parameter(n) for n in names}
    for p in params.values():
        p.requires_grad_(True)
    return net, params


def synflow_scores(net: nn.Module, params: dict[str, nn.Parameter], input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Synaptic saliency ``|∂R/∂θ ⊙ θ|`` of ``params`` with ``R`` the sum of ``net``'s output on
    one all-ones input of shape ``(1, *input_shape)`` (Tanaka et al. 2020, Sec. 6).

    ``net`` is a :func:`linearised_copy` (all weights non-negative, so the scores are too).

    Returns:
        ``{name: float64 tensor}`` of each parameter's shape.

    Raises:
        TypeError: the network's output is not a tensor.
        RuntimeError: ``R`` is not finite (float64 overflow).
    """
    for p in params.values():
        p.grad = None
    first = next(iter(params.values()))
    out = net(torch.ones((1, *input_shape), dtype=torch.float64, device=first.device))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"synflow: the model's output must be a tensor to sum, got {type(out).__name__}")
    flow = out.sum()
    if not bool(torch.isfinite(flow)):
        raise RuntimeError(f"synflow: the synaptic flow R = {float(flow)} is not finite in float64")
    flow.backward()
    return {n: (p.grad * p).detach().abs() if p.grad is not None else torch.zeros_like(p.detach()) for n, p in params.items()}


@register_method(name="synflow", family="pai", sparsity="pruning", start="init", sweep=True, params_key="synflow",
                 paper="Tanaka et al. 2020, \"Pruning neural networks without any data by iteratively conserving synaptic "
                       "flow\" (NeurIPS)",
                 summary="prune at init without data: `train.synflow.rounds` (100) rounds of scoring `|∂R/∂θ ⊙ θ|`, R the "
                         "summed output of the |θ|-network on an all-ones input (float64, batch norm in eval mode), keeping "
                         "density `d^(k/n)` after round k; then train under that fixed mask (Tanaka et al. 2020, Alg. 1)")
class SynFlow(PruneAtInit):
    """Iterative synaptic-flow pruning at construction (see the module docstring).

    Args:
        model: the network at its initial weights; its pruned weights are zeroed here.
        total_steps: optimizer steps of the run.
        pruning: ``train.pruning`` (``sparsity``, ``scope``, ``keep_first_dense``, ``keep_last_dense``).
        input_shape: ``(C, H, W)`` of one example (the all-ones input's shape).
        rounds: ``n``, the number of pruning rounds.

    Raises:
        ConfigError: structured granularity (:class:`~sparse_core.methods.snip.PruneAtInit`).
        ValueError: ``rounds`` < 1.
    """

    name = "synflow"

    class Options(pydantic.BaseModel):
        """``train.synflow``: the method's own keys."""

        model_config = pydantic.ConfigDict(extra="forbid")
        #: ``n``: pruning rounds of Algorithm 1 (the paper uses 100).
        rounds: int = pydantic.Field(100, gt=0)

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "SynFlow":
        """Build from the run's context; ``ctx.input_shape`` is required.

        Raises:
            ValueError: ``ctx.input_shape`` is None.
            ConfigError: a bad ``train.synflow`` key or value.
        """
        if ctx.input_shape is None:
            raise ValueError("synflow needs the shape (C, H, W) of one input example for its all-ones input: "
                             "pass input_shape to create_method / MethodContext")  # fmt: skip
        return cls(ctx.model, ctx.total_steps, ctx.pruning, tuple(ctx.input_shape), cls.options(ctx).rounds)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """``3 f_S`` per example (a fixed mask, RigL convention App. H), plus the one-off scoring
        cost spread over the run's examples: ``n`` rounds of one forward and backward pass on a
        single input, counted at the dense ``3 f_D`` each (an upper bound: the masked copy
        computes densely), over ``total_steps · batch_size`` examples (``train.optim``). Without
        ``cost.train`` the scoring cost (negligible: 100 · 3 f_D against millions of ``3 f_S``)
        is left out."""
        per_step = fixed_mask_flops(cost.dense_flops, cost.densities)
        if cost.train is None:
            return per_step
        rounds = cls.Options.model_validate((cost.train.model_extra or {}).get(cls.spec.params_key) or {}).rounds
        examples = max(int(cost.total_steps), 1) * cost.train.optim.batch_size
        return per_step + rounds * fixed_mask_flops(cost.dense_flops, {}) / examples

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection, input_shape: tuple[int, ...],
                 rounds: int = 100):  # fmt: skip
        if rounds < 1:
            raise ValueError(f"synflow: rounds must be >= 1, got {rounds}")
        super().__init__(model, total_steps, pruning)
        self.input_shape = tuple(input_shape)
        self.rounds = int(rounds)
        self.prune()

    def round_sparsity(self, k: int) -> float:
        """Target sparsity after round ``k`` (1 … n): ``1 − d^{k/n}`` with ``d = 1 − S``, and
        exactly ``S`` at ``k = n`` (Tanaka et al. 2020, Alg. 1, exponential schedule)."""
        if k >= self.rounds:
            return float(self.pruning.sparsity)
        return 1.0 - (1.0 - self.pruning.sparsity) ** (k / self.rounds)

    def prune(self) -> None:
        """Run the ``n`` rounds on a linearised copy and apply the final mask to the model."""
        names = list(self.masks.params)
        net, params = linearised_copy(self.model, names)
        magnitude = {n: p.detach().clone() for n, p in params.items()}  # |θ₀|
        for k in range(1, self.rounds + 1):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(magnitude[n] * self.masks.masks[n].to(p.device))
            scores = synflow_scores(net, params, self.input_shape)
            self.set_masks_from_scores(0, scores, self.round_sparsity(k), active=self.masks.masks, kind="synflow", round=k)
