"""The training loop: resume equals an uninterrupted run; schedules; metrics vs scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from sparse_core.artifacts import load_checkpoint
from sparse_core.config import DSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform, iterate_batches
from sparse_core.engine import evaluate, fit, lr_at, predict
from sparse_core.methods import create_method
from tests.conftest import TinyNet, make_split

OPTIM = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
TRANSFORM = BatchTransform([0.5], [0.25], crop_padding=1, flip=True)


def _run(run_dir, method_name, stop_after=None, epochs=4):
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = -(-len(train) // OPTIM.batch_size) * epochs
    dst = DSTSection(sparsity=0.8, update_period=4)
    method = create_method(
        method_name, model, steps, PruningSection(sparsity=0.8, update_period=4), dst, seed=3, epochs=epochs
    )
    fit(
        model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=run_dir, seed=7,
        device=torch.device("cpu"), fingerprint="fp", progress=False, stop_after_epoch=stop_after,
    )  # fmt: skip
    return model, method


@pytest.mark.parametrize("method_name", ["dpf", "gmp", "set", "rigl", "edst_ensemble"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, method_name):
    full_model, full_method = _run(tmp_path / "full", method_name)
    _run(tmp_path / "killed", method_name, stop_after=2)  # "killed" after epoch 2
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    resumed_model, resumed_method = _run(tmp_path / "killed", method_name)  # restart with resume
    for (n, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    for n in full_method.masks.masks:
        assert torch.equal(full_method.masks.masks[n], resumed_method.masks.masks[n])
    assert full_method.events == resumed_method.events
    assert full_method.events, "the run must include mask updates for the check to mean anything"
    for a, b in zip(getattr(full_method, "tickets", []), getattr(resumed_method, "tickets", [])):
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_checkpoint_with_other_fingerprint_is_not_resumed(tmp_path):
    _run(tmp_path / "r", "dense", stop_after=2)
    torch.manual_seed(0)
    model = TinyNet()
    method = create_method("dense", model, 24, PruningSection())
    result = fit(
        model, method, make_split(96, 1), make_split(32, 2), TRANSFORM, OPTIM, epochs=1, run_dir=tmp_path / "r",
        seed=7, device=torch.device("cpu"), fingerprint="other", progress=False,
    )  # fmt: skip
    assert result.resumed_from_epoch == 0


def test_lr_schedules():
    cos = OptimSection(lr=0.2, schedule="cosine")
    assert lr_at(0, 10, 10, cos) == pytest.approx(0.2)
    assert lr_at(50, 10, 10, cos) == pytest.approx(0.1)
    ms = OptimSection(lr=0.2, schedule="multistep", milestones=[150, 225], gamma=0.1)
    assert lr_at(149 * 10, 10, 300, ms) == pytest.approx(0.2)
    assert lr_at(150 * 10, 10, 300, ms) == pytest.approx(0.02)
    assert lr_at(225 * 10, 10, 300, ms) == pytest.approx(0.002)


def test_augmentation_is_seeded_per_epoch_and_crops_correctly():
    split = make_split(40)
    a = [x for x, _ in iterate_batches(split, 16, TRANSFORM, train=True, seed=3, epoch=5)]
    b = [x for x, _ in iterate_batches(split, 16, TRANSFORM, train=True, seed=3, epoch=5)]
    c = [x for x, _ in iterate_batches(split, 16, TRANSFORM, train=True, seed=3, epoch=6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    # With padding 1, every crop is the image shifted by at most one pixel: the centre 6x6 of
    # the original appears somewhere in the 8x8 crop (up to the flip).
    t = BatchTransform([0.0], [1.0], crop_padding=1, flip=False)
    x = split.images[:8]
    out = t.augment(x, torch.Generator().manual_seed(0))
    for i in range(8):
        centre = x[i, :, 1:7, 1:7]
        found = any(torch.equal(out[i, :, dy : dy + 6, dx : dx + 6], centre) for dy in range(3) for dx in range(3))
        assert found


def test_evaluate_matches_scikit_learn():
    torch.manual_seed(0)
    model = TinyNet()
    split = make_split(64, seed=4)
    t = BatchTransform([0.5], [0.25])
    ours = evaluate(model, split, t, 20, torch.device("cpu"))
    probs = torch.softmax(predict(model, split, t, 20, torch.device("cpu")).double(), 1).numpy()
    y = split.labels.numpy()
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert ours["loss"] == pytest.approx(log_loss(y, probs, labels=np.arange(3)), rel=1e-5)
