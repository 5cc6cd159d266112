"""Magnitude criteria: which weights to keep for a target sparsity.

All selections are exact top-k (``torch.topk`` returns exactly k indices), so ties at the
threshold never prune more (or fewer) weights than asked: for ``N`` weights and sparsity
``S`` exactly ``N - round(S·N)`` are kept. Scores are ``|w|`` (Han et al. 2015; Zhu & Gupta
2017; Lin et al. 2020, Sec. 3).
"""

from __future__ import annotations

import torch


def n_keep(numel: int, sparsity: float) -> int:
    """Number of weights kept out of ``numel`` at ``sparsity`` (fraction 0-1)."""
    return numel - int(round(sparsity * numel))


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


@torch.no_grad()
def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Unstructured magnitude pruning.

    Args:
        weights: ``{name: w}`` of any shapes.
        sparsity: target fraction of zeros, over all weights (``global``: one threshold across
            layers) or in every layer (``layerwise``).
        scope: ``"global"`` or ``"layerwise"``.

    Returns:
        ``{name: bool mask}`` with exactly ``n_keep(N, sparsity)`` True entries over all
        weights (global) or per layer (layerwise).

    Raises:
        ValueError: unknown ``scope`` or sparsity outside [0, 1).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layerwise":
        return {n: _topk_mask(w.abs(), n_keep(w.numel(), sparsity)) for n, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep = _topk_mask(flat, n_keep(flat.numel(), sparsity))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return out


@torch.no_grad()
def filter_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Structured pruning: whole output filters (rows of a linear layer) by L2 norm, per layer.

    In each layer ``round(S · n_out)`` output filters with the smallest ``‖w_i‖₂`` are pruned
    (Li et al. 2017's filter ranking; DPF's structured variant, Lin et al. 2020 Sec. 5), so
    every layer's realised sparsity is within one filter of ``S``.

    Returns:
        ``{name: bool mask}`` of each weight's shape, constant over each filter.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = {}
    for n, w in weights.items():
        norms = w.flatten(1).norm(dim=1)
        keep = _topk_mask(norms, n_keep(norms.numel(), sparsity))
        out[n] = keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
    return out
