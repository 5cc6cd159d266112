"""Out-of-distribution detection from predicted probabilities.

Scores (higher = "more in-distribution", so every score is used the same way):

- ``msp``: maximum softmax probability ``max_c p_c`` (Hendrycks & Gimpel 2017);
- ``entropy``: negative predictive entropy ``Σ_c p_c log p_c`` of the (ensemble-mean)
  prediction;
- ``mi`` (ensembles only): negative mutual information between the prediction and the
  member, ``−(H[mean_m p_m] − mean_m H[p_m])`` (the epistemic part of the entropy; Depeweg
  et al. 2018, Malinin & Gales 2018).

Metrics, computed with scikit-learn with the in-distribution test set as the positive class:
``auroc`` (``roc_auc_score``), ``aupr_in`` (``average_precision_score``, in-distribution
positive), ``aupr_out`` (out-distribution positive, score negated) and ``fpr95``: the false
positive rate (fraction of OOD examples accepted) at the first ROC threshold whose true
positive rate reaches 95% (``roc_curve`` without dropping intermediate thresholds).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats: ``(..., C) -> (...)``; ``0 · log 0 = 0``."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.clip(p, EPS, None))).sum(-1)


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """Mutual information ``H[mean_m p_m] − mean_m H[p_m]`` (nats) of ``(M, N, C) -> (N,)``.

    Zero when all members agree exactly; at most ``log M`` and ``log C``.
    """
    p = np.asarray(member_probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"member_probs must be (M, N, C), got shape {p.shape}")
    return np.clip(entropy(p.mean(0)) - entropy(p).mean(0), 0.0, None)


def ood_scores(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """In-distribution scores ``(N,)`` of member probabilities ``(M, N, C)`` (``M = 1`` for a
    single model): ``msp`` and ``entropy`` of the mean prediction, and ``mi`` when ``M > 1``."""
    p = np.asarray(member_probs, dtype=np.float64)
    mean = p.mean(0)
    scores = {"msp": mean.max(-1), "entropy": -entropy(mean)}
    if p.shape[0] > 1:
        scores["mi"] = -mutual_information(p)
    return scores


def fpr_at_tpr(score_in: np.ndarray, score_out: np.ndarray, tpr: float = 0.95) -> float:
    """False positive rate at the first threshold reaching true positive rate ``tpr``."""
    y, s = _labels_scores(score_in, score_out)
    from sklearn.metrics import roc_curve  # imported here: scikit-learn costs ~1 s to import, and training never needs it

    fpr_curve, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fpr_curve[np.searchsorted(tpr_curve, tpr - 1e-12, side="left")])


def _labels_scores(score_in: np.ndarray, score_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score_in, score_out = np.asarray(score_in, dtype=np.float64), np.asarray(score_out, dtype=np.float64)
    if score_in.size == 0 or score_out.size == 0:
        raise ValueError(f"OOD metrics need in- and out-distribution examples; got {score_in.size} and {score_out.size}")
    y = np.concatenate([np.ones(score_in.size), np.zeros(score_out.size)])
    return y, np.concatenate([score_in.ravel(), score_out.ravel()])


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` (fractions, 0-1) of scores ``(N_in,)``,
    ``(N_out,)`` where higher means more in-distribution.

    Raises:
        ValueError: either set is empty.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = _labels_scores(score_in, score_out)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95": fpr_at_tpr(score_in, score_out, 0.95),
    }
