"""Sparsity schedules."""

from __future__ import annotations

import math


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


def pruning_end_step(total_steps: int, end_fraction: float, update_period: int) -> int:
    """The step ``t1`` at which gradual pruning reaches its target: the last mask update (a
    multiple of ``update_period``) at or before ``end_fraction · T``.

    Zhu & Gupta (2017, Eq. 1) define the schedule on the pruning steps ``t0 + nΔt`` only, so its
    end is a pruning step by construction; snapping ``t1`` to the update grid keeps that when
    ``end_fraction · T`` falls between two updates (otherwise the target would be reached only
    at the next update, or, in a short run, never).
    """
    return update_period * math.floor(end_fraction * total_steps / update_period + 1e-9)


def gradual_schedule_problem(total_steps: int, start_fraction: float, end_fraction: float, update_period: int) -> str | None:
    """Why a gradual-pruning run of ``total_steps`` steps cannot reach its target sparsity at a
    mask update followed by training, or None when it can.

    The target must be reached at a real update ``t1`` (:func:`pruning_end_step`) with
    ``t0 < t1 < T`` (``t0 = start_fraction · T``): a mask first imposed after the last step
    would be a one-shot pruning with no training to recover from it.
    """
    t1 = pruning_end_step(total_steps, end_fraction, update_period)
    if t1 < update_period or t1 <= start_fraction * total_steps:
        return (f"the cubic schedule has no mask update between start_fraction x T = {start_fraction * total_steps:g} and "
                f"end_fraction x T = {end_fraction * total_steps:g} (T = {total_steps} steps, update_period = {update_period})")
    if t1 >= total_steps:
        return (f"the target is reached at step {t1}, the last of T = {total_steps} steps, with no training after it "
                f"(end_fraction = {end_fraction}, update_period = {update_period})")
    return None
