"""One evaluation for single models and ensembles: predicted probabilities on every
evaluation set -> calibration, corruption robustness and OOD detection metrics.

A single model is an ensemble of one (``M = 1``): every function takes member probabilities
``(M, N, C)`` and evaluates their mean, so runs and ensembles are measured on the same terms.

Probability sets (keys of the ``probs`` dictionaries):

==============================  ===========================================================
``val``, ``test``               the prepared splits
``ood/<set>``                   an OOD set of :mod:`sparse_core.evalsets` (no labels)
``corrupted/<name>/<severity>`` the first ``corrupt.test_subset`` test images, corrupted
==============================  ===========================================================

Metrics layout (merged into ``metrics/<model>.json``; fractions in 0-1, NLL in nats)::

    "test":       {"accuracy", "nll", "ece", "mce", "brier"}
    "val":        {"accuracy", "nll"}
    "corruption": {"accuracy", "nll", "ece",                 # mean over corruptions × severities
                   "type":     {"<corruption>": {"accuracy", "nll", "ece"}},   # mean over severities
                   "severity": {"s<k>": {"accuracy", "nll", "ece"}}}           # mean over corruptions
    "ood":        {"<set>": {"msp" | "entropy" | "mi": {"auroc", "aupr_in", "aupr_out", "fpr95"}},
                   "mean":  {...same, averaged over the sets present...}}

``mi`` (mutual information) exists for ensembles only. Per-(corruption, severity) values and
reliability bins are returned as tables for the plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_core.calibration import calibration_metrics, reliability_bins
from sparse_core.data import BatchTransform, Split
from sparse_core.engine import predict
from sparse_core.evalsets import EvalSets
from sparse_core.ood import ood_metrics, ood_scores
from sparse_core.precision import FP32, Precision

OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def set_probs(
    model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int, device: torch.device,
    precision: Precision = FP32,
) -> np.ndarray:  # fmt: skip
    """Softmax probabilities float32 ``(N, C)`` of uint8 images ``(N, C, H, W)``, batched, the
    logits computed in ``precision`` (:mod:`sparse_core.precision`) and the softmax in float64."""
    split = Split(images, torch.zeros(len(images), dtype=torch.int64))
    logits = predict(model, split, transform, batch_size, device, precision)
    return torch.softmax(logits.double(), 1).float().numpy()


def model_probs(
    model: nn.Module, splits: dict[str, Split], sets: EvalSets, transform: BatchTransform, batch_size: int,
    device: torch.device, precision: Precision = FP32,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Probabilities ``(N, C)`` of one model on the ``val``/``test`` splits, every OOD set and
    every corrupted set (module docstring for the keys)."""
    out = {name: set_probs(model, split.images, transform, batch_size, device, precision) for name, split in splits.items()}
    for name, images in sets.ood.items():
        out[f"ood/{name}"] = set_probs(model, images, transform, batch_size, device, precision)
    for (name, sev), images in sets.corrupted.items():
        out[f"corrupted/{name}/{sev}"] = set_probs(model, images, transform, batch_size, device, precision)
    return out


@dataclass
class Evaluation:
    """Metrics (layout in the module docstring) and the tables behind the plots."""

    metrics: dict[str, Any]
    reliability: pd.DataFrame  # bin, lower, upper, count, confidence, accuracy, gap (test split)
    corruption: pd.DataFrame  # corruption, severity, accuracy, nll, ece


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def evaluate_probs(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_bins: int = 15) -> Evaluation:
    """Evaluate member probabilities ``(M, N, C)`` per set (keys as in :func:`model_probs`).

    Args:
        labels: ``{"val", "test", "corrupted"}`` -> int ``(N,)`` (``corrupted``: the labels of
            the corrupted subset, shared by every corruption).
        n_bins: calibration bins.
    """
    metrics: dict[str, Any] = {}
    mean = {k: v.mean(0) for k, v in probs.items()}
    metrics["test"] = calibration_metrics(mean["test"], labels["test"], n_bins)
    val = calibration_metrics(mean["val"], labels["val"], n_bins)
    metrics["val"] = {"accuracy": val["accuracy"], "nll": val["nll"]}
    rows = []
    for key in sorted(k for k in probs if k.startswith("corrupted/")):
        _, name, sev = key.split("/")
        m = calibration_metrics(mean[key], labels["corrupted"], n_bins)
        rows.append({"corruption": name, "severity": int(sev), "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]})
    corruption = pd.DataFrame(rows, columns=["corruption", "severity", "accuracy", "nll", "ece"])
    if rows:
        cols = ["accuracy", "nll", "ece"]
        metrics["corruption"] = {
            **corruption[cols].mean().astype(float).to_dict(),
            "type": {n: g[cols].mean().astype(float).to_dict() for n, g in corruption.groupby("corruption", sort=True)},
            "severity": {f"s{s}": g[cols].mean().astype(float).to_dict() for s, g in corruption.groupby("severity", sort=True)},
        }
    ood_sets = sorted(k.removeprefix("ood/") for k in probs if k.startswith("ood/"))
    if ood_sets:
        in_scores = ood_scores(probs["test"])
        ood: dict[str, Any] = {}
        for name in ood_sets:
            out_scores = ood_scores(probs[f"ood/{name}"])
            ood[name] = {s: ood_metrics(in_scores[s], out_scores[s]) for s in in_scores}
        ood["mean"] = {s: _mean([ood[n][s] for n in ood_sets]) for s in in_scores}
        metrics["ood"] = ood
    return Evaluation(metrics, reliability_bins(mean["test"], labels["test"], n_bins), corruption)
