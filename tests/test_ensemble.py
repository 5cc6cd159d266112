"""Ensemble metrics from member probabilities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, log_loss

from sparse_core.ensemble import ensemble_metrics, probs_schema, stack_probs, symmetric_kl


def _probs(m: int, n: int = 50, c: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(m, n, c)) * 2
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def test_ensemble_of_one_member_equals_that_member():
    p = _probs(1)
    y = np.random.default_rng(1).integers(0, 4, 50)
    out = ensemble_metrics(p, y)
    assert out["accuracy"] == out["member_accuracy_mean"] == pytest.approx(accuracy_score(y, p[0].argmax(1)))
    assert out["nll"] == pytest.approx(out["member_nll_mean"])
    assert out["disagreement"] == 0.0 and out["kl"] == 0.0


def test_ensemble_nll_is_minus_log_of_mean_probability():
    p = _probs(3)
    y = np.random.default_rng(2).integers(0, 4, 50)
    out = ensemble_metrics(p, y)
    assert out["nll"] == pytest.approx(log_loss(y, p.mean(0), labels=range(4)))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p.mean(0).argmax(1)))
    # Jensen: the NLL of the mean prediction never exceeds the members' mean NLL.
    assert out["nll"] <= out["member_nll_mean"] + 1e-12


def test_disagreement_and_kl_by_hand():
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    b = np.array([[0.6, 0.4], [0.7, 0.3]])
    out = ensemble_metrics(np.stack([a, b]), np.array([0, 1]))
    assert out["disagreement"] == pytest.approx(0.5)  # second example flips
    kl = lambda p, q: (p * np.log(p / q)).sum(1)  # noqa: E731
    assert symmetric_kl(a, b) == pytest.approx(((kl(a, b) + kl(b, a)) / 2).mean())
    assert out["kl"] == pytest.approx(symmetric_kl(a, b))


def test_probs_cache_schema_and_stacking():
    p = _probs(2, n=5, c=3)
    rows = [
        {"member": m, "split": "test", "index": i, "label": i % 3, "probs": p[m, i]} for m in range(2) for i in range(5)
    ]
    df = pd.DataFrame(rows).astype({"member": "int64", "index": "int64", "label": "int64"})
    probs_schema(3).validate(df)
    stacked, labels = stack_probs(df.sample(frac=1.0, random_state=0), "test")
    np.testing.assert_allclose(stacked, p)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    bad = df.copy()
    bad.at[0, "probs"] = np.array([0.5, 0.6, 0.2])
    with pytest.raises(Exception, match="sum to 1"):
        probs_schema(3).validate(bad)
