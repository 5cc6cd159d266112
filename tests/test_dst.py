"""ERK distributions and dynamic sparse training (set, rigl)."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core.config import DSTSection, PruningSection
from sparse_core.engine import training_step
from sparse_core.methods import create_method
from sparse_core.sparsity.distributions import active_counts, layer_densities, random_masks
from tests.conftest import TinyNet, make_split


def test_erk_hand_computed_without_capping():
    # A: (10, 10) score 20/100 = 0.2; B: (20, 5) score 25/100 = 0.25; D = 0.1 of 200 -> 20 active.
    # ε = 20 / (0.2·100 + 0.25·100) = 4/9, so d_A = 0.8/9, d_B = 1/9.
    shapes = {"A": (10, 10), "B": (20, 5)}
    d = layer_densities(shapes, 0.1, "erk")
    assert d["A"] == pytest.approx(0.8 / 9) and d["B"] == pytest.approx(1 / 9)
    # 8.89 and 11.11 active: floors 8 + 11 = 19, the larger remainder (A) gets the last one.
    assert active_counts({"A": 100, "B": 100}, d, 0.1) == {"A": 9, "B": 11}


def test_erk_caps_dense_layers_and_resolves():
    # A: (2, 2) score 1.0 would get density 4.9 > 1 -> dense; then
    # ε = (0.1·10004 − 4) / (0.02·10000) = 4.982, d_B = 0.09964.
    shapes = {"A": (2, 2), "B": (100, 100)}
    d = layer_densities(shapes, 0.1, "erk")
    assert d["A"] == 1.0
    assert d["B"] == pytest.approx((0.1 * 10004 - 4) / 200 * 0.02)
    counts = active_counts({"A": 4, "B": 10000}, d, 0.1)
    assert counts == {"A": 4, "B": 996} and sum(counts.values()) == round(0.1 * 10004)


def test_erk_conv_score_uses_kernel_size_and_er_does_not():
    shapes = {"conv": (4, 2, 3, 3), "fc": (10, 20)}
    erk = layer_densities(shapes, 0.3, "erk")
    er = layer_densities(shapes, 0.3, "er")
    # ERK: conv (4+2+3+3)/72 = 1/6, fc 30/200 = 0.15; ER: conv (4+2)/8 = 0.75.
    assert erk["conv"] / erk["fc"] == pytest.approx((1 / 6) / 0.15)
    assert er["conv"] / er["fc"] == pytest.approx(0.75 / 0.15)


def test_random_masks_have_exact_counts():
    g = torch.Generator().manual_seed(0)
    masks = random_masks({"a": (7, 9), "b": (30,)}, {"a": 10, "b": 3}, g)
    assert int(masks["a"].sum()) == 10 and int(masks["b"].sum()) == 3


def _setup(name: str, period: int = 3, **kw):
    torch.manual_seed(0)
    model = TinyNet()
    dst = DSTSection(sparsity=0.7, update_period=period, drop_fraction=0.3, drop_schedule="constant", **kw)
    method = create_method(name, model, 1000, PruningSection(), dst, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.bind_optimizer(opt)
    return model, method, opt


def _step(model, method, opt, step):
    split = make_split(32, seed=step)
    training_step(model, method, opt, split.images.float() / 255.0, split.labels, step)


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_topology_update_semantics(name):
    model, method, opt = _setup(name)
    n = method.masks.numel()
    assert method.masks.active() == n - round(0.7 * n)  # exact total at init
    counts = {k: int(m.sum()) for k, m in method.masks.masks.items()}
    before = None
    for step in range(9):
        if (step + 1) % 3 == 0:
            before = {k: m.clone() for k, m in method.masks.masks.items()}
        _step(model, method, opt, step)
        after = method.masks.masks
        assert {k: int(m.sum()) for k, m in after.items()} == counts, "per-layer active counts changed"
        if (step + 1) % 3 != 0:
            continue
        for k, p in method.masks.params.items():
            grown = after[k] & ~before[k]
            assert grown.any()
            assert torch.count_nonzero(p.detach()[grown]) == 0, "regrown weights must start at zero"
            assert torch.count_nonzero(p.detach()[~after[k]]) == 0
    assert [e["step"] for e in method.events] == [3, 6, 9]
    assert method.exploration_rate() > 1 - 0.7


def test_masks_do_not_change_between_updates():
    model, method, opt = _setup("set", period=5)
    prev = {k: m.clone() for k, m in method.masks.masks.items()}
    for step in range(4):
        _step(model, method, opt, step)
        assert all(torch.equal(prev[k], method.masks.masks[k]) for k in prev)


def test_set_grows_only_at_inactive_positions():
    model, method, opt = _setup("set")
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    scores = {k: torch.rand(p.shape) for k, p in method.masks.params.items()}
    method.update_topology(0, 0.3, scores)
    for k, new in method.masks.masks.items():
        grown = new & ~old[k]
        dropped = old[k] & ~new
        # Grown positions were inactive (or just dropped); the number grown equals the number dropped.
        assert int(grown.sum()) == int(dropped.sum())
        assert not (grown & old[k]).any()


def test_rigl_grows_where_dense_gradient_is_largest():
    model, method, opt = _setup("rigl")
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    grads = {k: torch.rand(p.shape) for k, p in method.masks.params.items()}
    method.update_topology(0, 0.3, grads)
    for k, new in method.masks.masks.items():
        kept_after_drop = new & old[k]
        grown = new & ~kept_after_drop
        candidates = ~kept_after_drop
        g = grads[k]
        k_grow = int(grown.sum())
        expected = torch.topk(g[candidates], k_grow).values
        assert torch.equal(torch.sort(g[grown]).values, torch.sort(expected).values)


def test_cosine_drop_fraction_and_stop():
    torch.manual_seed(0)
    dst = DSTSection(drop_fraction=0.5, drop_fraction_floor=0.1, stop_fraction=0.5, update_period=10)
    method = create_method("rigl", TinyNet(), 1000, PruningSection(), dst)
    assert method.drop_fraction(0) == pytest.approx(0.5)
    assert method.drop_fraction(250) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert method.drop_fraction(500) == pytest.approx(0.1)
    assert method.update_due(500) and not method.update_due(510)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_momentum_zeroes_buffer_at_reinitialised_positions(reset):
    # reinit_when_same: the dropped-and-regrown-in-place weights restart at zero, and
    # reset_momentum zeroes their buffers (tests/test_fidelity.py covers the RigL default).
    model, method, opt = _setup("rigl", period=1000, reset_momentum=reset, reinit_when_same=True)
    _step(model, method, opt, 0)  # momentum buffers are nonzero at active positions
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    # Scores that make the grow step pick exactly the just-dropped (previously active) weights.
    scores = {k: m.float() for k, m in old.items()}
    method.update_topology(1, 0.3, scores)
    for k, p in method.masks.params.items():
        assert torch.equal(method.masks.masks[k], old[k])  # same topology, but regrown at zero
        buf = opt.state[p]["momentum_buffer"]
        dropped_and_regrown = p.detach() == 0
        dropped_and_regrown &= old[k]
        assert dropped_and_regrown.any()
        if reset:
            assert torch.count_nonzero(buf[dropped_and_regrown]) == 0
        else:
            assert torch.count_nonzero(buf[dropped_and_regrown]) > 0
