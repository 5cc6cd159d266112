"""Calibration and OOD metrics against independent implementations (torchmetrics, scikit-learn)
on random and edge-case inputs, plus hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
    multiclass_calibration_error,
)

from sparse_core.calibration import (
    bin_index,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from sparse_core.ood import entropy, mutual_information, ood_metrics, ood_scores


def _random_case(seed: int, n: int = 500, c: int = 10, sharp: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * sharp
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.where(rng.random(n) < 0.7, probs.argmax(1), rng.integers(0, c, n))
    return probs, labels


def _edge_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    probs, _ = _random_case(1, 200, 5)
    onehot = np.eye(5)[rng.integers(0, 5, 50)]
    return {
        "all_correct": (probs, probs.argmax(1)),
        "all_wrong": (probs, (probs.argmax(1) + 1) % 5),
        "confidence_exactly_one": (onehot, np.where(rng.random(50) < 0.6, onehot.argmax(1), 0)),
        "uniform_probs": (np.full((40, 4), 0.25), rng.integers(0, 4, 40)),
    }


def _tm_calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int, norm: str) -> float:
    return float(
        multiclass_calibration_error(
            torch.tensor(probs), torch.tensor(labels), num_classes=probs.shape[1], n_bins=n_bins, norm=norm
        )
    )


CASES = {f"random_{s}": _random_case(s) for s in range(3)} | _edge_cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n_bins", [15, 1])
def test_ece_mce_match_torchmetrics(case: str, n_bins: int) -> None:
    probs, labels = CASES[case]
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(_tm_calibration(probs, labels, n_bins, "l1"), abs=1e-6)
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(_tm_calibration(probs, labels, n_bins, "max"), abs=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_brier_and_nll_match_sklearn(case: str) -> None:
    probs, labels = CASES[case]
    classes = list(range(probs.shape[1]))
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=classes), abs=1e-10)
    expected_nll = log_loss(labels, np.clip(probs, 1e-12, None) / np.clip(probs, 1e-12, None).sum(1, keepdims=True), labels=classes)
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected_nll, rel=1e-6)


def test_edge_values_by_hand() -> None:
    probs, labels = CASES["all_correct"]
    m = calibration_metrics(probs, labels)
    assert m["accuracy"] == 1.0
    assert m["ece"] == pytest.approx(1.0 - probs.max(1).mean())  # every bin: accuracy 1 minus its confidence
    probs, labels = CASES["all_wrong"]
    m = calibration_metrics(probs, labels)
    assert m["accuracy"] == 0.0 and m["ece"] == pytest.approx(probs.max(1).mean())
    # A single bin: ECE = |accuracy - mean confidence| exactly.
    probs, labels = CASES["random_0"]
    acc = (probs.argmax(1) == labels).mean()
    assert expected_calibration_error(probs, labels, 1) == pytest.approx(abs(acc - probs.max(1).mean()))


def test_bin_convention_right_closed_and_one_in_last_bin() -> None:
    edges = np.linspace(0, 1, 16)
    conf = np.array([0.0, edges[1], np.nextafter(edges[1], 1), edges[7], 0.999, 1.0])
    assert bin_index(conf, 15).tolist() == [0, 0, 1, 6, 14, 14]
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    bins = reliability_bins(probs, np.array([0, 0]), 15)
    assert bins["count"].tolist() == [0] * 14 + [2]
    assert bins.loc[14, "accuracy"] == 0.5 and bins.loc[14, "confidence"] == 1.0
    assert bins["count"].sum() == 2 and bins.loc[0, "lower"] == 0.0 and bins.loc[14, "upper"] == 1.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        brier_score(np.full((2, 3), 1 / 3), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        expected_calibration_error(np.ones(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(np.full((2, 2), 0.5), np.array([0, 1]), 0)


# ----- OOD ----------------------------------------------------------------------------------
def _tm_fpr95(score_in: np.ndarray, score_out: np.ndarray) -> float:
    s = torch.tensor(np.concatenate([score_in, score_out]))
    y = torch.tensor(np.r_[np.ones(len(score_in)), np.zeros(len(score_out))]).long()
    fpr, tpr, _ = binary_roc(s, y)
    return float(fpr[tpr >= 0.95].min())


OOD_CASES = {
    "overlapping": (np.random.default_rng(0).normal(1.0, 1.0, 300), np.random.default_rng(1).normal(0.0, 1.0, 200)),
    "separable": (np.linspace(2, 3, 50), np.linspace(0, 1, 80)),
    "reversed": (np.linspace(0, 1, 50), np.linspace(2, 3, 80)),
    "ties": (np.r_[np.ones(30), np.zeros(10)], np.r_[np.ones(10), np.zeros(30)]),
}


@pytest.mark.parametrize("case", sorted(OOD_CASES))
def test_ood_metrics_match_torchmetrics(case: str) -> None:
    score_in, score_out = OOD_CASES[case]
    m = ood_metrics(score_in, score_out)
    s = torch.tensor(np.concatenate([score_in, score_out]))
    y = torch.tensor(np.r_[np.ones(len(score_in)), np.zeros(len(score_out))]).long()
    assert m["auroc"] == pytest.approx(float(binary_auroc(s, y)), abs=1e-6)
    assert m["aupr_in"] == pytest.approx(float(binary_average_precision(s, y)), abs=1e-6)
    assert m["aupr_out"] == pytest.approx(float(binary_average_precision(-s, 1 - y)), abs=1e-6)
    assert m["fpr95"] == pytest.approx(_tm_fpr95(score_in, score_out), abs=1e-6)  # torchmetrics: float32


def test_ood_metrics_by_hand() -> None:
    m = ood_metrics(OOD_CASES["separable"][0], OOD_CASES["separable"][1])
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    m = ood_metrics(*OOD_CASES["reversed"])
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0
    # 100 in-distribution scores 1..100, OOD scores 0.5 + 0..9: the threshold keeping 95 of the
    # in-distribution scores is 6, which accepts the 4 OOD scores 6.5..9.5 -> FPR 0.4.
    assert ood_metrics(np.arange(1, 101), np.arange(10) + 0.5)["fpr95"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="in- and out-distribution"):
        ood_metrics(np.ones(3), np.array([]))


def test_entropy_and_mutual_information_on_hand_made_arrays() -> None:
    # Two members, two examples, two classes.
    members = np.array(
        [
            [[1.0, 0.0], [0.5, 0.5]],
            [[0.0, 1.0], [0.5, 0.5]],
        ]
    )
    # Example 0: members certain and opposite -> mean (0.5, 0.5): H = log 2, member H = 0, MI = log 2.
    # Example 1: members agree at (0.5, 0.5): H = log 2, MI = 0.
    assert entropy(members.mean(0)) == pytest.approx([np.log(2), np.log(2)])
    assert mutual_information(members) == pytest.approx([np.log(2), 0.0])
    p = np.array([[0.7, 0.2, 0.1]])
    assert entropy(p) == pytest.approx([-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))])
    scores = ood_scores(members)
    assert set(scores) == {"msp", "entropy", "mi"}
    assert scores["msp"] == pytest.approx([0.5, 0.5]) and scores["mi"] == pytest.approx([-np.log(2), 0.0])
    assert set(ood_scores(members[:1])) == {"msp", "entropy"}  # one model: no MI
    with pytest.raises(ValueError, match=r"\(M, N, C\)"):
        mutual_information(p)
