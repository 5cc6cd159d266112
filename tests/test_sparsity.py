"""Masks, magnitude criteria and the cubic schedule."""

from __future__ import annotations

import pytest
import torch

from sparse_core.sparsity import (
    LAYER_TABLE_SCHEMA,
    MaskSet,
    cubic_sparsity,
    filter_masks,
    magnitude_masks,
    n_keep,
    prunable_parameters,
)


def test_global_topk_is_exact_even_with_ties():
    # 100 weights, all of magnitude 1 except four: a threshold rule would keep all ties.
    w = {"a.weight": torch.ones(10, 5), "b.weight": -torch.ones(50)}
    w["a.weight"][0, :4] = 3.0
    masks = magnitude_masks(w, 0.9, "global")
    assert sum(int(m.sum()) for m in masks.values()) == 10
    assert masks["a.weight"][0, :4].all()  # the four largest always survive


def test_global_keeps_largest_magnitudes_across_layers():
    torch.manual_seed(0)
    w = {"a": torch.randn(20, 7), "b": torch.randn(300)}
    masks = magnitude_masks(w, 0.75, "global")
    kept = torch.cat([w[n][masks[n]].abs() for n in w])
    dropped = torch.cat([w[n][~masks[n]].abs() for n in w])
    assert kept.min() >= dropped.max()
    assert kept.numel() == n_keep(440, 0.75)


def test_layerwise_sparsity_per_tensor():
    torch.manual_seed(1)
    w = {"a": torch.randn(33, 3), "b": torch.randn(17)}
    masks = magnitude_masks(w, 0.6, "layerwise")
    for n, m in masks.items():
        assert int(m.sum()) == n_keep(w[n].numel(), 0.6)


def test_filter_masks_prune_whole_filters_by_l2_norm():
    w = torch.ones(8, 3, 3, 3)
    for i in range(8):
        w[i] *= i + 1  # filter i has norm proportional to i+1
    m = filter_masks({"c": w}, 0.5)["c"]
    per_filter = m.flatten(1)
    assert (per_filter.all(1) | (~per_filter).all(1)).all(), "mask must be constant per filter"
    assert per_filter.all(1).tolist() == [False] * 4 + [True] * 4


def test_cubic_schedule_start_middle_end():
    T = 1000
    args = dict(total_steps=T, initial=0.0, final=0.9, start_fraction=0.0, end_fraction=0.75)
    assert cubic_sparsity(0, **args) == 0.0
    # Zhu & Gupta Eq. 1 at half-way through the ramp: s_f (1 - 0.5^3).
    assert cubic_sparsity(375, **args) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(750, **args) == pytest.approx(0.9)
    assert cubic_sparsity(999, **args) == pytest.approx(0.9)
    seq = [cubic_sparsity(t, **args) for t in range(0, T, 10)]
    assert all(b >= a for a, b in zip(seq, seq[1:]))


def test_cubic_schedule_respects_start_offset():
    args = dict(total_steps=100, initial=0.2, final=0.8, start_fraction=0.5, end_fraction=1.0)
    assert cubic_sparsity(30, **args) == 0.2
    assert cubic_sparsity(100, **args) == pytest.approx(0.8)


def test_prunable_set_excludes_bias_and_norm(tiny_net):
    names = list(prunable_parameters(tiny_net))
    assert names == ["conv.weight", "fc.weight"]
    assert list(prunable_parameters(tiny_net, keep_first_dense=True)) == ["fc.weight"]
    assert list(prunable_parameters(tiny_net, keep_last_dense=True)) == ["conv.weight"]


def test_mask_state_dict_and_safetensors_round_trip(tiny_net, tmp_path):
    masks = MaskSet(prunable_parameters(tiny_net))
    new = magnitude_masks({n: p.detach() for n, p in masks.params.items()}, 0.7)
    masks.masks.update(new)
    masks.target_density = {n: 0.3 for n in masks.params}
    other = MaskSet(prunable_parameters(tiny_net))
    other.load_state_dict(masks.state_dict())
    assert all(torch.equal(other.masks[n], masks.masks[n]) for n in masks.masks)
    masks.save(tmp_path / "masks.safetensors")
    third = MaskSet(prunable_parameters(tiny_net))
    third.load(tmp_path / "masks.safetensors")
    assert all(torch.equal(third.masks[n], masks.masks[n]) for n in masks.masks)
    assert third.target_density == masks.target_density


def test_mask_load_rejects_wrong_shape(tiny_net):
    masks = MaskSet(prunable_parameters(tiny_net))
    sd = masks.state_dict()
    sd["fc.weight"] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="fc.weight"):
        masks.load_state_dict(sd)


def test_layer_table_matches_masks(tiny_net):
    masks = MaskSet(prunable_parameters(tiny_net))
    masks.masks.update(magnitude_masks({n: p.detach() for n, p in masks.params.items()}, 0.5, "layerwise"))
    masks.apply_()
    table = LAYER_TABLE_SCHEMA.validate(masks.layer_table())
    for row in table.itertuples():
        assert row.nonzeros == int(masks.masks[row.name].sum())
        assert row.density == pytest.approx(row.nonzeros / row.numel)
