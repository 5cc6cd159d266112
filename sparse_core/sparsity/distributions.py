"""Layer-wise density distributions for sparse training: uniform, ER and ERK.

Erdős–Rényi(-Kernel) (Mocanu et al. 2018; Evci et al. 2020, "Rigging the Lottery", Sec. 3 and
App. C). Layer ``l`` with ``N_l`` weights gets density ``d_l = ε · s_l`` where the score is

    ERK, conv (n_out, n_in, k_h, k_w):  s_l = (n_out + n_in + k_h + k_w) / (n_out · n_in · k_h · k_w)
    ER (any) and linear (n_out, n_in):  s_l = (n_out + n_in) / (n_out · n_in)

Derivation of ε. We want the active weights to total ``D · N`` (``N = Σ N_l``). Layers in the
dense set ``𝒟`` (those whose density would exceed 1) keep all ``N_l`` weights, so

    Σ_{l∉𝒟} ε · s_l · N_l  =  D · N − Σ_{l∈𝒟} N_l
    ⇒  ε = (D · N − Σ_{l∈𝒟} N_l) / Σ_{l∉𝒟} s_l · N_l

Start with ``𝒟 = ∅``; while some ``l ∉ 𝒟`` has ``ε · s_l > 1``, add every such layer to ``𝒟``
and solve again (each pass only shrinks ε's budget, so it terminates in at most L passes).

Exact counts. Densities are turned into integer active counts ``n_l`` by largest-remainder
apportionment, so ``Σ n_l = round(D · N)`` exactly and ``0 <= n_l <= N_l``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Distribution = Literal["uniform", "er", "erk"]


def _score(shape: tuple[int, ...], kind: Distribution) -> float:
    if kind == "erk" and len(shape) == 4:
        return sum(shape) / math.prod(shape)
    n_out, n_in = shape[0], shape[1]  # ER on a conv layer counts channels only
    return (n_out + n_in) / (n_out * n_in)


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, kind: Distribution = "erk") -> dict[str, float]:
    """Per-layer densities (fractions 0-1) whose weighted total is ``density``.

    Args:
        shapes: ``{name: weight shape}``, conv ``(n_out, n_in, k_h, k_w)`` or linear ``(n_out, n_in)``.
        density: ``D = 1 - S`` over all listed weights, in (0, 1].
        kind: ``uniform`` (every layer ``D``), ``er`` or ``erk``.

    Raises:
        ValueError: density outside (0, 1] or unknown kind.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if kind == "uniform":
        return {n: density for n in shapes}
    if kind not in ("er", "erk"):
        raise ValueError(f"distribution must be uniform, er or erk, got {kind!r}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    score = {n: _score(s, kind) for n, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        denom = sum(score[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = {n for n in shapes if n not in dense and eps * score[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else eps * score[n] for n in shapes}


def active_counts(numel: dict[str, int], densities: dict[str, float], density: float) -> dict[str, int]:
    """Integer active weights per layer, summing exactly to ``round(density · Σ numel)``.

    Largest-remainder apportionment of the real-valued targets ``d_l · N_l``.
    """
    target_total = int(round(density * sum(numel.values())))
    raw = {n: densities[n] * numel[n] for n in numel}
    counts = {n: min(int(math.floor(v)), numel[n]) for n, v in raw.items()}
    short = target_total - sum(counts.values())
    order = sorted(numel, key=lambda n: raw[n] - counts[n], reverse=True)
    i = 0
    while short > 0 and order:
        n = order[i % len(order)]
        if counts[n] < numel[n]:
            counts[n] += 1
            short -= 1
        i += 1
    return counts


def random_masks(
    shapes: dict[str, tuple[int, ...]], counts: dict[str, int], generator: torch.Generator, bernoulli: bool = False
) -> dict[str, torch.Tensor]:
    """Random masks with exactly ``counts[name]`` active entries (uniform over positions).

    With ``bernoulli=True`` each entry is active independently with probability
    ``counts / numel`` (the FreeTickets/RigL code's behaviour; the count then varies).
    """
    out = {}
    for n, shape in shapes.items():
        numel = math.prod(shape)
        if bernoulli:
            out[n] = torch.rand(shape, generator=generator) < counts[n] / numel
            continue
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[: counts[n]]] = True
        out[n] = flat.view(shape)
    return out
