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


def test_training_flops_match_hand_count_on_two_layers():
    from sparse_core.flops import layer_flops, training_flops_per_example

    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    per_layer = layer_flops(model, (10,))
    assert per_layer == {"0.weight": 200, "2.weight": 100}
    dens = {"0.weight": 0.1, "2.weight": 0.5}
    f_d, f_s = 300, 200 * 0.1 + 100 * 0.5  # = 70
    assert training_flops_per_example(per_layer, dens, "dense") == 3 * f_d
    assert training_flops_per_example(per_layer, dens, "set") == pytest.approx(3 * f_s)
    assert training_flops_per_example(per_layer, dens, "rigl", update_period=4) == pytest.approx(
        (3 * f_s * 4 + 2 * f_s + f_d) / 5
    )


def test_gradual_training_flops_follow_the_sparsity_log():
    from sparse_core.flops import gradual_training_flops_per_example

    per_layer = {"a.weight": 100, "b.weight": 300}  # f_D = 400
    final = {"a.weight": 0.5, "b.weight": 0.1}  # f_S = 50 + 30 = 80
    # Never pruned: dense cost.
    assert gradual_training_flops_per_example(per_layer, {}, "gmp", [], [], 10) == pytest.approx(1200)
    # Pruned to the final sparsity at step 0: GMP pays 3 f_S, DPF 2 f_S + f_D.
    assert gradual_training_flops_per_example(per_layer, final, "gmp", [0], [0.8], 10) == pytest.approx(240)
    assert gradual_training_flops_per_example(per_layer, final, "dpf", [0], [0.8], 10) == pytest.approx(560)
    # Dense for 4 of 10 steps, half the final sparsity for 3, final for 3 (f at half = 240).
    expected = (4 * 1200 + 3 * 720 + 3 * 240) / 10
    assert gradual_training_flops_per_example(per_layer, final, "gmp", [4, 7], [0.4, 0.8], 10) == pytest.approx(expected)
    # oneshot: dense until its single update.
    assert gradual_training_flops_per_example(per_layer, final, "oneshot", [5], [0.8], 10) == pytest.approx((5 * 1200 + 5 * 240) / 10)
    with pytest.raises(ValueError, match="gradual"):
        gradual_training_flops_per_example(per_layer, final, "rigl", [], [], 10)
