"""Semantics of dpf, gmp, oneshot and retrain through the engine's hooks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparse_core.config import PruningSection
from sparse_core.engine import training_step
from sparse_core.methods import create_method
from sparse_core.sparsity import magnitude_masks
from tests.conftest import TinyNet, make_split

LR, WD = 0.1, 5e-4


def _batch():
    split = make_split(32)
    return split.images.float() / 255.0, split.labels


def _one_step(model, method, step=0):
    """The engine's step (fresh optimizer: first-step SGD arithmetic), without the data loader."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    x, y = _batch()
    training_step(model, method, opt, x, y, step)


def _pruned_setup(name: str, period: int = 1000):
    torch.manual_seed(0)
    model = TinyNet()
    pruning = PruningSection(sparsity=0.8, update_period=period)
    method = create_method(name, model, total_steps=10_000, pruning=pruning)
    weights = {n: p.detach() for n, p in method.masks.params.items()}
    method.masks.masks.update(magnitude_masks(weights, 0.8))
    return model, method


def test_dpf_applies_gradient_at_pruned_weights_to_dense_weights():
    model, method = _pruned_setup("dpf")
    dense_before = {n: p.detach().clone() for n, p in method.masks.params.items()}
    mask = {n: m.clone() for n, m in method.masks.masks.items()}

    # Independent reference: gradient of the loss at m ⊙ w, computed on a copy.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in mask:
                p.mul_(mask[n])
    x, y = _batch()
    F.cross_entropy(ref(x), y).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}

    _one_step(model, method)
    params = dict(model.named_parameters())
    for n, m in mask.items():
        pruned = ~m
        assert pruned.any()
        # First SGD step with momentum: buf = g + wd·w, so w' = w − lr·(g(m⊙w) + wd·w).
        expected = dense_before[n] - LR * (grads[n] + WD * dense_before[n])
        torch.testing.assert_close(params[n].detach()[pruned], expected[pruned], rtol=1e-5, atol=1e-7)
        assert not torch.equal(params[n].detach()[pruned], dense_before[n][pruned]), "pruned dense values must move"


def test_gmp_holds_pruned_weights_at_zero():
    model, method = _pruned_setup("gmp")
    method.masks.apply_()
    _one_step(model, method)
    params = dict(model.named_parameters())
    for n, m in method.masks.masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0
        assert torch.count_nonzero(params[n].detach()[m]) > 0


def test_gmp_scores_the_masked_weights_so_a_pruned_weight_never_comes_back():
    """A pruned weight that the optimizer step moved (momentum gathered before it was pruned)
    stays out of the mask: GMP scores ``m ⊙ w`` (Zhu & Gupta 2017; torch.ao.pruning's
    WeightNormSparsifier does the same, benchmarks/parity.py)."""
    model, method = _pruned_setup("gmp", period=1)
    method.masks.apply_()
    before = {n: m.clone() for n, m in method.masks.masks.items()}
    with torch.no_grad():  # the step moved every pruned weight far beyond the active ones
        for n, p in method.masks.params.items():
            p[~before[n]] = 100.0
    step = method.end_step  # an update at the target sparsity (0.8, the masks' own)
    assert method.target_sparsity(step) == pytest.approx(0.8)
    method.after_step(step)
    for n, m in method.masks.masks.items():
        assert not (m & ~before[n]).any(), f"{n}: a pruned weight came back"
        assert torch.count_nonzero(method.masks.params[n].detach()[~m]) == 0


def test_masks_change_only_on_update_steps():
    model, method = _pruned_setup("dpf", period=4)
    method.pruning = PruningSection(sparsity=0.8, update_period=4, end_fraction=0.001)
    history = []
    for step in range(12):
        _one_step(model, method, step)
        history.append({n: m.clone() for n, m in method.masks.masks.items()})
    for step in range(1, 12):
        completed = step + 1
        same = all(torch.equal(history[step][n], history[step - 1][n]) for n in history[step])
        if completed % 4 != 0:
            assert same, f"mask changed after step {completed}, not an update step"
    assert [e["step"] for e in method.events] == [4, 8, 12]


def test_dpf_pruned_weights_can_come_back():
    """With feedback, a weight pruned at one update is active again at a later one."""
    torch.manual_seed(0)
    model = TinyNet()
    pruning = PruningSection(sparsity=0.8, update_period=5, end_fraction=0.01)
    method = create_method("dpf", model, total_steps=10_000, pruning=pruning)
    first = None
    came_back = False
    for step in range(200):
        _one_step(model, method, step)
        if first is None and method.events:
            first = {n: m.clone() for n, m in method.masks.masks.items()}
        elif first is not None:
            came_back = came_back or any(((~first[n]) & m).any() for n, m in method.masks.masks.items())
    assert came_back
    assert any(e["flip_fraction"] > 0 for e in method.events[1:])


def test_eval_weights_exposes_pruned_model_then_restores_dense():
    model, method = _pruned_setup("dpf")
    dense = {n: p.detach().clone() for n, p in method.masks.params.items()}
    with method.eval_weights():
        for n, p in method.masks.params.items():
            assert torch.equal(p.detach(), dense[n] * method.masks.masks[n])
    for n, p in method.masks.params.items():
        assert torch.equal(p.detach(), dense[n])


def test_gmp_and_dpf_end_on_target_sparsity():
    for name in ("gmp", "dpf"):
        torch.manual_seed(0)
        model = TinyNet()
        method = create_method(name, model, total_steps=24, pruning=PruningSection(sparsity=0.9, update_period=4))
        for step in range(24):
            _one_step(model, method, step)
        method.on_train_end()
        n = method.masks.numel()
        assert abs(method.masks.active() - (n - round(0.9 * n))) == 0


def test_oneshot_prunes_once_at_the_end():
    torch.manual_seed(0)
    model = TinyNet()
    method = create_method("oneshot", model, total_steps=5, pruning=PruningSection(sparsity=0.7))
    for step in range(5):
        _one_step(model, method, step)
        assert method.masks.sparsity() == 0.0
    method.on_train_end()
    assert len(method.events) == 1
    assert abs(method.masks.sparsity() - 0.7) * method.masks.numel() < 1
    for n, p in method.masks.params.items():
        assert torch.count_nonzero(p.detach()[~method.masks.masks[n]]) == 0


def test_structured_dpf_masks_whole_filters_and_keeps_classifier_dense():
    torch.manual_seed(0)
    model = TinyNet()
    pruning = PruningSection(sparsity=0.5, granularity="structured", update_period=1, end_fraction=0.01)
    method = create_method("dpf", model, total_steps=100, pruning=pruning)
    assert list(method.masks.masks) == ["conv.weight"]  # the classifier's outputs are classes
    _one_step(model, method, 0)
    m = method.masks.masks["conv.weight"].flatten(1)
    assert (m.all(1) | (~m).all(1)).all()
    assert int(m.all(1).sum()) == 2  # 4 filters at 50%


def test_mask_updates_stop_after_update_end_fraction():
    torch.manual_seed(0)
    model = TinyNet()
    pruning = PruningSection(sparsity=0.8, update_period=2, end_fraction=0.5, update_end_fraction=0.5)
    method = create_method("dpf", model, total_steps=20, pruning=pruning)
    for step in range(20):
        _one_step(model, method, step)
    assert [e["step"] for e in method.events] == [2, 4, 6, 8, 10]
