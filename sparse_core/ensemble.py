"""Ensemble predictions and diversity from cached member probabilities.

The ensemble predicts the mean of its members' softmax probabilities (Lakshminarayanan et al.
2017; FreeTickets, Sec. 4). Diversity (FreeTickets, Sec. 5.3; Fort et al. 2019):

- prediction disagreement of members i, j: fraction of examples whose top-1 classes differ;
- KL divergence, averaged over both directions: ``(KL(p_i‖p_j) + KL(p_j‖p_i)) / 2`` per
  example, then over examples;

each averaged over all member pairs.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pandera.pandas as pa

EPS = 1e-12


def probs_schema(num_classes: int) -> pa.DataFrameSchema:
    """Member probabilities cache: one row per (member, split, example)."""
    return pa.DataFrameSchema(
        {
            "member": pa.Column("int64", pa.Check.ge(0)),
            "split": pa.Column(str, pa.Check.isin(("val", "test"))),
            "index": pa.Column("int64", pa.Check.ge(0)),
            "label": pa.Column("int64", pa.Check.in_range(0, num_classes - 1)),
            "probs": pa.Column(
                object,
                [
                    pa.Check(lambda s: s.map(len) == num_classes, error=f"probs must have {num_classes} entries"),
                    pa.Check(lambda s: s.map(lambda p: abs(float(np.sum(p)) - 1.0) < 1e-3), error="probs must sum to 1"),
                ],
            ),
        },
        checks=pa.Check(lambda df: not df.duplicated(["member", "split", "index"]).any(), error="duplicate rows"),
        strict=True,
    )


def stack_probs(df: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (M, N, C) float64, labels (N,))`` of one split, members and examples in order."""
    part = df[df["split"] == split].sort_values(["member", "index"])
    members = sorted(part["member"].unique())
    probs = np.stack([np.stack(part.loc[part.member == m, "probs"].to_numpy()) for m in members]).astype(np.float64)
    labels = part.loc[part.member == members[0], "label"].to_numpy()
    return probs, labels


def accuracy_nll(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean NLL (nats) of probabilities (N, C)."""
    acc = float((probs.argmax(1) == labels).mean())
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, None)).mean())
    return acc, nll


def disagreement(p: np.ndarray, q: np.ndarray) -> float:
    """Fraction of examples where the top-1 predictions of (N, C) arrays ``p`` and ``q`` differ."""
    return float((p.argmax(1) != q.argmax(1)).mean())


def symmetric_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over examples of ``(KL(p‖q) + KL(q‖p)) / 2`` (nats)."""
    p, q = np.clip(p, EPS, None), np.clip(q, EPS, None)
    kl_pq = (p * (np.log(p) - np.log(q))).sum(1)
    kl_qp = (q * (np.log(q) - np.log(p))).sum(1)
    return float(((kl_pq + kl_qp) / 2).mean())


def ensemble_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of an ensemble from member probabilities (M, N, C).

    Returns:
        ``accuracy`` and ``nll`` of the mean prediction (NLL = ``-log`` of the mean
        probability of the true class), ``member_accuracy_mean/std``, ``member_nll_mean/std``,
        pair-averaged ``disagreement`` and ``kl`` (0 for one member), and
        ``member: {"m<i>": {"accuracy", "nll"}}`` for every member.
    """
    acc, nll = accuracy_nll(probs.mean(0), labels)
    members = [accuracy_nll(p, labels) for p in probs]
    pairs = list(combinations(range(len(probs)), 2))
    return {
        "accuracy": acc,
        "nll": nll,
        "member_accuracy_mean": float(np.mean([a for a, _ in members])),
        "member_accuracy_std": float(np.std([a for a, _ in members])),
        "member_nll_mean": float(np.mean([n for _, n in members])),
        "member_nll_std": float(np.std([n for _, n in members])),
        "disagreement": float(np.mean([disagreement(probs[i], probs[j]) for i, j in pairs])) if pairs else 0.0,
        "kl": float(np.mean([symmetric_kl(probs[i], probs[j]) for i, j in pairs])) if pairs else 0.0,
        "member": {f"m{i}": {"accuracy": a, "nll": n} for i, (a, n) in enumerate(members)},
    }
