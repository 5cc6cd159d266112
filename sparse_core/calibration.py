"""Calibration metrics of class probabilities: ECE, MCE, Brier score, NLL, reliability bins.

Conventions (Guo et al. 2017, "On Calibration of Modern Neural Networks", Sec. 2;
Naeini et al. 2015):

- **Top-label confidence**: ``conf_n = max_c p_nc``; the prediction is ``argmax_c p_nc``
  (ties go to the lowest class index, as in ``numpy.argmax``).
- **Bins**: ``B`` equal-width bins with edges ``e_k = k / B`` (``k = 0..B``), computed as
  ``numpy.linspace(0, 1, B + 1)``. Bin ``k`` (1-based) is the interval ``(e_{k-1}, e_k]``:
  closed on the **right**, as in Guo et al.'s reference code. The first bin also holds a
  confidence of exactly 0 (``[0, e_1]``), and a confidence of exactly **1.0 falls in the
  last bin** ``(e_{B-1}, 1]``. A confidence equal to an inner edge ``e_k`` goes to bin ``k``,
  the bin below the edge.
- **ECE** ``= Σ_k (|B_k| / N) · |acc(B_k) − conf(B_k)|`` over non-empty bins (default
  ``B = 15``); **MCE** ``= max_k |acc(B_k) − conf(B_k)|`` over non-empty bins.
- **Brier score** (Brier 1950, multi-class form used by Ovadia et al. 2019):
  ``(1/N) Σ_n Σ_c (p_nc − y_nc)²`` with ``y`` one-hot; range ``[0, 2]``.
- **NLL**: ``−(1/N) Σ_n log p_{n, y_n}`` in nats, probabilities clipped below at 1e-12.

All functions take ``probs`` float ``(N, C)`` (rows summing to 1) and ``labels`` int ``(N,)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-12
DEFAULT_BINS = 15


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be (N, C) and labels (N,); got {probs.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("calibration metrics need at least one example")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}]; got [{labels.min()}, {labels.max()}]")
    return probs, labels.astype(np.int64)


def bin_edges(n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``n_bins + 1`` edges ``linspace(0, 1, n_bins + 1)``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def bin_index(confidence: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """0-based bin of each confidence under the right-closed convention (module docstring)."""
    edges = bin_edges(n_bins)
    # side="left": edges[i-1] < c <= edges[i]  ->  bin i-1; c == 0 lands in bin 0.
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """One row per bin: ``bin`` (0-based), ``lower``, ``upper``, ``count``, ``confidence``
    (mean top-label confidence, NaN when empty), ``accuracy`` (NaN when empty), ``gap``
    (``accuracy − confidence``). The data of a reliability diagram and confidence histogram."""
    probs, labels = _check(probs, labels)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        mean_acc = np.bincount(idx, correct, n_bins) / count
    edges = bin_edges(n_bins)
    return pd.DataFrame(
        {"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "count": count,
         "confidence": mean_conf, "accuracy": mean_acc, "gap": mean_acc - mean_conf}
    )  # fmt: skip


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE (fraction, 0-1) with ``n_bins`` equal-width bins; see the module docstring."""
    bins = reliability_bins(probs, labels, n_bins)
    full = bins[bins["count"] > 0]
    return float((full["count"] * full["gap"].abs()).sum() / bins["count"].sum())


def maximum_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """MCE (fraction, 0-1): the largest ``|accuracy − confidence|`` over non-empty bins."""
    bins = reliability_bins(probs, labels, n_bins)
    return float(bins.loc[bins["count"] > 0, "gap"].abs().max())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score ``mean_n Σ_c (p_nc − onehot_nc)²`` (range 0-2)."""
    probs, labels = _check(probs, labels)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL in nats of the true class (probabilities clipped at 1e-12)."""
    probs, labels = _check(probs, labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, None)).mean())


def calibration_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """``{"accuracy", "nll", "ece", "mce", "brier"}`` of probabilities ``(N, C)``."""
    probs, labels = _check(probs, labels)
    return {
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
    }
