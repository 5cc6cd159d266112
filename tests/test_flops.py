"""Inference FLOPs (multiply-accumulates of conv and linear layers)."""

from __future__ import annotations

import pytest
from torch import nn

from sparse_core.flops import inference_flops
from sparse_core.models import create_model


def test_flops_of_known_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    # conv: 8·3·3·3 MACs at each of 4x4 output positions; linear: 128·10.
    expected = 8 * 3 * 3 * 3 * 16 + 128 * 10
    out = inference_flops(model, (3, 8, 8), {"0.weight": 0.5})
    assert out["dense"] == expected
    assert out["sparse"] == pytest.approx(8 * 3 * 3 * 3 * 16 * 0.5 + 128 * 10)


def test_resnet20_flops_match_published_count():
    # ResNet-20 on 32x32: about 41M MACs (He et al. 2016; commonly quoted 40.8M-41M).
    model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    dense = inference_flops(model, (3, 32, 32))["dense"]
    assert 40.5e6 < dense < 41.5e6


def _method_flops(name: str, per_layer, dens, **kw) -> float:
    """A registered method's own training-FLOPs rule, found through the registry."""
    from sparse_core.flops import TrainingCost
    from sparse_core.methods.registry import method_class

    return method_class(name).training_flops_per_example(TrainingCost(per_layer, dens, **kw))


def test_training_flops_match_hand_count_on_two_layers():
    from sparse_core.flops import layer_flops

    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    per_layer = layer_flops(model, (10,))
    assert per_layer == {"0.weight": 200, "2.weight": 100}
    dens = {"0.weight": 0.1, "2.weight": 0.5}
    f_d, f_s = 300, 200 * 0.1 + 100 * 0.5  # = 70
    assert _method_flops("dense", per_layer, dens) == 3 * f_d
    assert _method_flops("set", per_layer, dens) == pytest.approx(3 * f_s)
    assert _method_flops("retrain", per_layer, dens) == pytest.approx(3 * f_s)
    assert _method_flops("rigl", per_layer, dens, update_period=4) == pytest.approx((3 * f_s * 4 + 2 * f_s + f_d) / 5)


def test_edst_flops_follow_its_growth_criterion():
    """EDST with random growth (the FreeTickets script's default) pays no dense gradient: SET's
    rule; with gradient growth RigL's."""
    from sparse_core.config import EDSTSection, TrainSection

    per_layer, dens = {"a.weight": 100, "b.weight": 300}, {"a.weight": 0.5, "b.weight": 0.1}
    for grow, twin in (("random", "set"), ("gradient", "rigl")):
        train = TrainSection(edst=EDSTSection(grow=grow))
        got = _method_flops("edst_ensemble", per_layer, dens, update_period=4, train=train)
        assert got == pytest.approx(_method_flops(twin, per_layer, dens, update_period=4))
    assert _method_flops("set", per_layer, dens) != pytest.approx(_method_flops("rigl", per_layer, dens, update_period=4))


def test_gradual_training_flops_follow_the_sparsity_log():
    per_layer = {"a.weight": 100, "b.weight": 300}  # f_D = 400
    final = {"a.weight": 0.5, "b.weight": 0.1}  # f_S = 50 + 30 = 80

    def log(steps, sparsities):
        return [{"step": t, "sparsity": s} for t, s in zip(steps, sparsities)]

    # Never pruned: dense cost.
    assert _method_flops("gmp", per_layer, {}, total_steps=10) == pytest.approx(1200)
    # Pruned to the final sparsity at step 0: GMP pays 3 f_S, DPF 2 f_S + f_D.
    assert _method_flops("gmp", per_layer, final, total_steps=10, events=log([0], [0.8])) == pytest.approx(240)
    assert _method_flops("dpf", per_layer, final, total_steps=10, events=log([0], [0.8])) == pytest.approx(560)
    # Dense for 4 of 10 steps, half the final sparsity for 3, final for 3 (f at half = 240).
    expected = (4 * 1200 + 3 * 720 + 3 * 240) / 10
    assert _method_flops("gmp", per_layer, final, total_steps=10, events=log([4, 7], [0.4, 0.8])) == pytest.approx(expected)
    # oneshot: dense until its single update.
    assert _method_flops("oneshot", per_layer, final, total_steps=10, events=log([5], [0.8])) == pytest.approx(
        (5 * 1200 + 5 * 240) / 10
    )
