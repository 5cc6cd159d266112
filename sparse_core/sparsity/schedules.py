"""Sparsity schedules."""

from __future__ import annotations


def cubic_sparsity(step: int, total_steps: int, initial: float, final: float, start_fraction: float, end_fraction: float) -> float:
    """Gradual pruning schedule of Zhu & Gupta (2017), Eq. 1.

    With ``t0 = start_fraction · T`` and ``t1 = end_fraction · T``::

        s(t) = s_f + (s_i - s_f) · (1 - (t - t0) / (t1 - t0))³   for t0 <= t <= t1
        s(t) = s_i  for t < t0;   s(t) = s_f  for t > t1

    Sparsity rises fast at first (many redundant weights) and slowly near the target. DPF
    (Lin et al. 2020, Sec. 4) uses it from 0 with ``t1`` at 75% of training.

    Args:
        step: iterations completed (0-based count).
        total_steps: ``T``, iterations of the whole run.
        initial, final: ``s_i``, ``s_f`` as fractions 0-1.
        start_fraction, end_fraction: ``t0 / T`` and ``t1 / T``, ``start < end``.

    Returns:
        Target sparsity at ``step``, a fraction 0-1.
    """
    t0, t1 = start_fraction * total_steps, end_fraction * total_steps
    if step <= t0:
        return initial
    if step >= t1:
        return final
    frac = (step - t0) / (t1 - t0)
    return final + (initial - final) * (1.0 - frac) ** 3
