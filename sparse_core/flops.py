"""Inference FLOPs of conv and linear layers, dense and under a mask, and the training-FLOPs
rules the methods count their cost with (each method picks its rule in its
``training_flops_per_example``; :mod:`sparse_core.methods`).

Convention (as in RigL, Evci et al. 2020, App. H, and FreeTickets): one multiply-accumulate
counts as one FLOP, and only convolution and linear layers are counted (batch norm,
activations, pooling and additions are a small, method-independent remainder). A layer with
density ``d`` costs ``d`` times its dense FLOPs (unstructured sparse kernels assumed ideal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Dense MACs per conv/linear weight for one input of shape ``(C, H, W)``.

    Returns:
        ``{"<module>.weight": FLOPs}`` for one example.
    """
    flops: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                per_position = module.weight.numel()  # C_out · C_in/groups · k_h · k_w
                flops[name] = int(per_position * output.shape[2] * output.shape[3])
            else:
                flops[name] = int(module.weight.numel() * (output.numel() // output.shape[-1]) // output.shape[0])

        return fn

    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(f"{n}.weight")))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return flops


def inference_flops(model: nn.Module, input_shape: tuple[int, int, int], densities: dict[str, float] | None = None) -> dict[str, float]:
    """Total inference FLOPs per example, dense and sparse.

    Args:
        densities: ``{weight name: density 0-1}``; layers not named are dense.

    Returns:
        ``{"dense": FLOPs, "sparse": FLOPs, "ratio": sparse / dense}``.
    """
    per_layer = layer_flops(model, input_shape)
    densities = densities or {}
    dense = float(sum(per_layer.values()))
    sparse = float(sum(f * densities.get(n, 1.0) for n, f in per_layer.items()))
    return {"dense": dense, "sparse": sparse, "ratio": sparse / dense if dense else 1.0}


@dataclass
class TrainingCost:
    """What a method's training-FLOPs rule may read about one finished run.

    Attributes:
        dense_flops: dense forward FLOPs per example of each prunable weight (:func:`layer_flops`).
        densities: final density (0-1) of each prunable weight; weights not named are dense.
        total_steps: optimizer steps of the run.
        update_period: ΔT of ``train.dst`` (steps between topology updates).
        events: the run's mask-update log (``mask_updates.parquet`` rows, step order).
        train: the run's ``train`` params section (for rules that depend on other keys).
    """

    dense_flops: dict[str, int]
    densities: dict[str, float]
    total_steps: int = 1
    update_period: int = 100
    events: list[dict[str, Any]] = field(default_factory=list)
    train: Any = None


def _f_dense_sparse(dense_flops: dict[str, int], densities: dict[str, float]) -> tuple[float, float]:
    f_d = float(sum(dense_flops.values()))
    return f_d, float(sum(f * densities.get(n, 1.0) for n, f in dense_flops.items()))


def fixed_mask_flops(dense_flops: dict[str, int], densities: dict[str, float]) -> float:
    """Training FLOPs per example of a step under a fixed (or randomly regrown) mask, RigL
    convention (Evci et al. 2020, App. H): forward + backward ≈ 3× the forward, ``3 f_S`` with
    ``f_S`` the sparse forward FLOPs (per-layer density × dense FLOPs); ``3 f_D`` when
    ``densities`` is empty (dense training)."""
    return 3 * _f_dense_sparse(dense_flops, densities)[1]


def gradient_growth_flops(dense_flops: dict[str, int], densities: dict[str, float], update_period: int) -> float:
    """Training FLOPs per example of DST with gradient growth (RigL, App. H): every ``ΔT``-th
    step also pays one dense weight gradient, ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``."""
    f_d, f_s = _f_dense_sparse(dense_flops, densities)
    return (3 * f_s * update_period + 2 * f_s + f_d) / (update_period + 1)


def gradual_training_flops_per_example(
    dense_flops: dict[str, int],
    final_densities: dict[str, float],
    update_steps: list[int],
    update_sparsities: list[float],
    total_steps: int,
    feedback: bool = False,
) -> float:
    """Mean training FLOPs per example seen of a gradual pruning run (``gmp``, ``dpf``, ``oneshot``).

    The sparsity ``s(t)`` after each mask update is read from the run's mask-update log; between
    updates it is constant, and before the first update the model is dense. The forward FLOPs
    at step ``t`` are interpolated linearly in sparsity between dense and the final sparse
    model: ``f(t) = f_D − (s(t) / s_T) (f_D − f_S)`` (exact at both ends; an approximation in
    between, where per-layer densities are not logged). Per step (RigL convention, App. H):

    - without feedback (``gmp``, ``oneshot``): ``3 f(t)`` (pruned weights get no gradient);
    - with ``feedback`` (``dpf``): ``2 f(t) + f_D``: forward and activation gradients at the
      pruned model, but the weight gradient is needed for every weight, pruned or not (Lin et
      al. 2020, Alg. 1).

    Args:
        update_steps, update_sparsities: the mask-update log, in step order.
        total_steps: optimizer steps of the run.
    """
    f_d, f_s = _f_dense_sparse(dense_flops, final_densities)
    s_final = update_sparsities[-1] if update_sparsities else 0.0
    bounds = [0, *[min(max(int(t), 0), total_steps) for t in update_steps], total_steps]
    levels = [0.0, *update_sparsities]
    total = 0.0
    for lo, hi, s in zip(bounds[:-1], bounds[1:], levels):
        f_t = f_d - (s / s_final) * (f_d - f_s) if s_final > 0 else f_d
        per_step = 2 * f_t + f_d if feedback else 3 * f_t
        total += per_step * max(hi - lo, 0)
    return total / max(total_steps, 1)
