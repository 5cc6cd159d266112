"""Mechanics of ``benchmarks/parity.py``: our methods against independent implementations on the
same weights (not accuracy; the benchmark itself measures that).

- ``oneshot``'s global magnitude mask equals ``torch.nn.utils.prune.global_unstructured(...,
  L1Unstructured)``'s entry for entry (and a swapped pair of weights is detected);
- ``gmp`` with ``scope="layerwise"``: per-layer masks equal ``torch.ao.pruning``'s
  ``WeightNormSparsifier`` (through the benchmark's conv adapter) at every level, the
  ``CubicSL`` levels at the update steps equal our cubic schedule, and a short training run
  ends with the same per-layer densities and masks on both sides;
- ``rigl`` against ``rigl-torch`` (skipped when it is not installed; ``pip install -e '.[parity]'``):
  same update steps, drop fractions and per-layer densities from the same initial mask;
- the paired TOST verdicts on known inputs, and ``--smoke`` writing JSON and Markdown with the
  expected keys.

Everything runs on synthetic tensors except the smoke run, which reads the offline mirror.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from torch.nn.utils import prune

from sparse_core.api import sparsify
from sparse_core.methods import create_method
from sparse_core.config import PruningSection
from sparse_core.models import create_model
from sparse_core.sparsity import magnitude_masks
from tests.conftest import REPO


@pytest.fixture(scope="module")
def parity():
    """``benchmarks/parity.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("parity_benchmark", REPO / "benchmarks" / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _lenet(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("lenet5", in_channels=1, num_classes=10, image_size=28)


def _synthetic(n: int = 256, n_test: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x_train": torch.randn(n, 1, 28, 28, generator=g), "y_train": torch.randint(0, 10, (n,), generator=g),
            "x_test": torch.randn(n_test, 1, 28, 28, generator=g), "y_test": torch.randint(0, 10, (n_test,), generator=g)}


# ----- oneshot ↔ torch.nn.utils.prune.global_unstructured ------------------------------------------
def _torch_global_masks(model, names, amount):
    pairs = [(model.get_submodule(n.rpartition(".")[0]), "weight") for n in names]
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=amount)
    return {n: m.weight_mask.bool() for n, (m, _) in zip(names, pairs)}


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_oneshot_global_mask_equals_torch_global_unstructured(parity, sparsity):
    ours_model = _lenet()
    peer_model = _lenet()  # the same weights
    names = parity.layer_names(ours_model)
    opt = sparsify(ours_model, torch.optim.SGD(ours_model.parameters(), lr=0.1), "oneshot", total_steps=10, sparsity=sparsity)
    opt.finish()  # oneshot prunes at the end of the run
    ours = opt.masks
    theirs = _torch_global_masks(peer_model, names, sparsity)
    for n in names:
        assert torch.equal(ours[n], theirs[n]), n
    assert parity.overlap(ours, theirs) == {"jaccard": 1.0, "fraction_equal": 1.0}
    total = sum(m.numel() for m in ours.values())
    assert sum(int(m.sum()) for m in ours.values()) == total - round(sparsity * total)

    # Negative control: swap the smallest kept and the largest pruned weight (over all layers) in
    # the peer's copy: the masks must then differ at exactly those two positions.
    mutated = _lenet()
    params = dict(mutated.named_parameters())
    sizes = [params[n].numel() for n in names]
    flat_w = torch.cat([params[n].detach().view(-1) for n in names])
    flat_m = torch.cat([ours[n].view(-1) for n in names])
    i = int(torch.where(flat_m, flat_w.abs(), torch.inf).argmin())  # smallest kept
    j = int(torch.where(~flat_m, flat_w.abs(), -torch.inf).argmax())  # largest pruned
    flat_w[i], flat_w[j] = flat_w[j].clone(), flat_w[i].clone()
    with torch.no_grad():
        for n, chunk in zip(names, flat_w.split(sizes)):
            params[n].copy_(chunk.view_as(params[n]))
    moved = _torch_global_masks(mutated, names, sparsity)
    flipped = torch.where(flat_m != torch.cat([moved[n].view(-1) for n in names]))[0].tolist()
    assert sorted(flipped) == sorted([i, j])
    assert parity.overlap(ours, moved)["jaccard"] < 1.0


# ----- gmp ↔ torch.ao.pruning WeightNormSparsifier + CubicSL ---------------------------------------
@pytest.mark.parametrize("level", [0.0, 0.3, 0.9, 0.99])
def test_weight_norm_sparsifier_adapter_equals_our_layerwise_magnitude_masks(parity, level):
    Sparsifier, _ = parity._torch_ao()
    model = _lenet(1)
    names = parity.layer_names(model)
    ours = magnitude_masks({n: p.detach().clone() for n, p in model.named_parameters() if n in names}, level, "layerwise")
    sp = Sparsifier(sparsity_level=level, sparse_block_shape=(1, 1), zeros_per_block=1, norm=1)
    sp.prepare(model, [{"tensor_fqn": n} for n in names])
    sp.step()
    for n in names:
        theirs = sp.state[n]["mask"].bool()
        assert theirs.shape == ours[n].shape
        assert torch.equal(theirs, ours[n]), (n, level)


def test_cubic_sl_levels_equal_our_cubic_schedule_at_every_update(parity):
    _, CubicSL = parity._torch_ao()
    Sparsifier, _ = parity._torch_ao()
    s = parity.Settings(train_subset=128 * 10, epochs=10, batch_size=128, gmp_period=16)
    total = s.epochs * s.steps_per_epoch()  # 100 steps
    plan = parity.gmp_schedule(s, total)
    model = _lenet()
    ours = create_method("gmp", _lenet(), total, PruningSection(sparsity=s.gmp_sparsity, scope="layerwise",
                                                                   update_period=s.gmp_period, end_fraction=s.gmp_end_fraction))
    sp = Sparsifier(sparsity_level=s.gmp_sparsity, sparse_block_shape=(1, 1), zeros_per_block=1, norm=1)
    sp.prepare(model, [{"tensor_fqn": n} for n in parity.layer_names(model)])
    with pytest.warns(UserWarning):  # torch.ao asks for sparsifier.step() first; the benchmark's order is on purpose
        cubic = CubicSL(sp, init_sl=0.0, init_t=0, delta_t=plan["delta_t"], total_t=plan["total_t"])
        cubic.step()
    for k in range(2, total + 1):
        cubic.step()
        if k % s.gmp_period == 0:
            assert cubic.get_last_sl()[0] == pytest.approx(ours.target_sparsity(k), abs=1e-12), k
    assert ours.end_step == plan["end_step"] == 64
    assert ours.target_sparsity(plan["end_step"]) == s.gmp_sparsity


def test_gmp_short_run_same_masks_and_densities_as_torch_ao(parity):
    s = parity.Settings(train_subset=256, test_subset=128, epochs=2, batch_size=32, gmp_period=2)  # 16 steps, end at 12
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in _lenet().state_dict().items()}
    r = parity.run_gmp(0, init, _synthetic(), s, None)
    assert r["updates_ours"] == r["updates_peer"] == 8
    assert r["density_ours"] == r["density_peer"]
    assert all(d == pytest.approx(1 - s.gmp_sparsity, abs=0.01) for d in r["density_ours"].values())
    assert r["max_layer_density_gap_over_updates"] == 0.0
    assert r["mask_overlap_final"]["jaccard"] == 1.0
    assert r["max_abs_weight_diff_final"] <= 1e-6


# ----- rigl ↔ rigl-torch -------------------------------------------------------------------------
def test_rigl_same_schedule_and_densities_as_rigl_torch(parity):
    pytest.importorskip("rigl_torch")
    s = parity.Settings(train_subset=256, test_subset=128, epochs=2, batch_size=32, rigl_period=5)  # 16 steps, T_end 12
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in _lenet().state_dict().items()}
    r = parity.run_rigl(0, init, _synthetic(), s, None)
    assert r["initial_mask_overlap"] == {"jaccard": 1.0, "fraction_equal": 1.0}
    assert r["update_steps_ours"] == r["update_steps_peer"] == [5, 10]  # k % ΔT == 0 and k < T_end (ours: k <= T_end)
    assert r["drop_fraction_ours"] == pytest.approx(r["drop_fraction_peer"], abs=1e-12)
    assert r["density_ours"] == r["density_peer"]
    assert r["density_ours"]["conv1.weight"] == 1.0  # rigl-torch keeps the first layer dense under "uniform"
    assert all(d == pytest.approx(0.2, abs=0.01) for n, d in r["density_ours"].items() if n != "conv1.weight")
    assert r["moved_fraction_ours"] == pytest.approx(r["moved_fraction_ours_logged"], abs=1e-12)
    # Same initial mask and the same growth gradient: the first updates almost coincide (drops
    # differ by one SGD step and floor vs ceil of p * n_active).
    assert r["first_update_mask_overlap"]["jaccard"] > 0.95


# ----- statistics ----------------------------------------------------------------------------------
def test_tost_verdicts_on_known_inputs(parity):
    assert parity.tost([0.0, 0.0, 0.0])["verdict"] == "equivalent"
    assert parity.tost([0.001, -0.001, 0.0005, 0.0])["verdict"] == "equivalent"
    assert parity.tost([0.02, 0.021, 0.019])["verdict"] == "not equivalent (difference beyond ±0.5 points)"
    wide = parity.tost([0.01, -0.01, 0.005])
    assert wide["verdict"].startswith("inconclusive (interval wider than ±0.5 points; need about n = ")
    n = int(wide["verdict"].rsplit("= ", 1)[1].rstrip(")"))
    assert parity.t_half_width(wide["diff_std"], n) < 0.005 <= parity.t_half_width(wide["diff_std"], n - 1)
    one = parity.tost([0.001])
    assert one["half_width"] == math.inf and one["verdict"].startswith("inconclusive")


# ----- the script ----------------------------------------------------------------------------------
FAMILY_KEYS = {"ours", "peer", "n", "seeds", "acc_ours", "acc_peer", "diff_mean", "diff_std", "ci90_low", "ci90_high",
               "half_width", "margin", "verdict", "mechanics", "settings", "differences"}


def test_smoke_run_writes_json_and_markdown_with_expected_keys(parity, tmp_path, mirror):
    out = parity.main(["--smoke", "--out", str(tmp_path), "--seeds", "2", "--no-progress", "--data", str(mirror)])
    on_disk = json.loads((tmp_path / "parity.json").read_text())
    assert on_disk == json.loads(json.dumps(out))
    assert {"gmp", "oneshot", "oneshot_finetune", "rigl", "not_covered", "command"} <= set(on_disk)
    assert set(on_disk["not_covered"]) == {"dpf", "edst_ensemble"}
    assert "--smoke" in on_disk["command"]
    families = ["gmp", "oneshot", "oneshot_finetune"] + (["rigl"] if "skipped" not in on_disk["rigl"] else [])
    for fam in families:
        f = on_disk[fam]
        assert FAMILY_KEYS <= set(f), fam
        assert f["n"] == 2 and f["seeds"] == [0, 1] and len(f["acc_ours"]) == len(f["acc_peer"]) == 2
        assert f["margin"] == 0.005
        assert {"updates_ours", "updates_peer", "density_ours", "density_peer", "mask_overlap_final"} <= set(f["mechanics"])
    for fam in ("gmp", "oneshot"):  # same algorithm, same weights: the same masks
        assert all(o["jaccard"] == 1.0 for o in on_disk[fam]["mechanics"]["mask_overlap_final"])
    if "skipped" in on_disk["rigl"]:
        assert "rigl-torch" in on_disk["rigl"]["skipped"]
    else:
        assert {"moved_fraction_ours", "moved_fraction_peer"} <= set(on_disk["rigl"]["mechanics"])
    md = (tmp_path / "parity.md").read_text()
    assert on_disk["command"] in md and "| gmp |" in md and "dpf" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file

    # --rerender rewrites the texts from the stored numbers; numbers and command are unchanged.
    again = parity.main(["--rerender", "--out", str(tmp_path)])
    for fam in families:
        for key in FAMILY_KEYS - {"differences"}:
            assert again[fam][key] == on_disk[fam][key], (fam, key)
    assert again["command"] == on_disk["command"]
    assert json.loads((tmp_path / "parity.json").read_text()) == json.loads(json.dumps(again))
