"""EDST Ensemble: phases, global exploration and tickets from one run."""

from __future__ import annotations

import pytest
import torch

from sparse_core.config import DSTSection, EDSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform
from sparse_core.engine import fit
from sparse_core.methods import create_method
from tests.conftest import TinyNet, make_split

EPOCHS = 7  # 1 exploration epoch + 3 phases of 2 epochs
EDST = EDSTSection(tickets=3, exploration_share=1 / 7, exploration_rate=0.8, refine_lr_multipliers=[0.1, 0.01], grow="random")


def _edst(model, steps=EPOCHS * 6, sparsity=0.7, **kw):
    dst = DSTSection(sparsity=sparsity, update_period=4, drop_fraction=0.3)
    return create_method("edst_ensemble", model, steps, PruningSection(), dst, seed=0, edst=EDST.model_copy(update=kw), epochs=EPOCHS)


def test_three_distinct_tickets_each_best_of_its_phase(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(64, seed=2)
    optim = OptimSection(batch_size=16, lr=0.1, schedule="constant")
    method = _edst(model)
    result = fit(
        model, method, train, val, BatchTransform([0.5], [0.25]), optim, epochs=EPOCHS, run_dir=tmp_path,
        seed=0, device=torch.device("cpu"), fingerprint="fp", progress=False,
    )  # fmt: skip
    hist = result.history
    assert len(method.tickets) == 3 and all(t is not None for t in method.tickets)
    for m, ticket in enumerate(method.tickets):
        phase_rows = hist[(hist.epoch > 1 + 2 * m) & (hist.epoch <= 3 + 2 * m)]
        assert ticket["epoch"] in set(phase_rows.epoch)
        assert ticket["val_accuracy"] == pytest.approx(phase_rows.val_accuracy.max())
    states = [t["state"] for t in method.tickets]
    for i in range(3):
        for j in range(i + 1, 3):
            assert any(not torch.equal(states[i][k], states[j][k]) for k in states[i]), (i, j)
    kinds = [e["kind"] for e in method.events]
    assert kinds.count("global_exploration") == 2  # before phases 2 and 3
    assert [e["step"] for e in method.events if e["kind"] == "global_exploration"] == [3 * 6, 5 * 6]


def test_global_exploration_moves_about_q_of_each_layer():
    torch.manual_seed(0)
    model = TinyNet(classes=10)
    method = _edst(model, sparsity=0.9)
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    scores = {k: torch.rand(p.shape) for k, p in method.masks.params.items()}
    method.update_topology(0, 0.8, scores, kind="global_exploration")
    for k, new in method.masks.masks.items():
        n_active = int(old[k].sum())
        moved = int((old[k] & ~new).sum()) / n_active
        assert int(new.sum()) == n_active
        # ⌈q·n⌉ dropped; a few just-dropped positions may be drawn again by the grow step.
        assert 0.8 - 0.2 <= moved <= 0.8 + 1 / n_active, (k, moved)


def test_learning_rate_per_phase():
    method = _edst(TinyNet())
    spe = method.steps_per_epoch
    assert spe == 6
    assert method.learning_rate(0, 0.123, 0.1) == pytest.approx(0.1)  # exploration: constant base
    assert method.learning_rate(spe * 1, 0.123, 0.1) == pytest.approx(0.01)  # phase 1, first half
    assert method.learning_rate(spe * 2, 0.123, 0.1) == pytest.approx(0.001)  # phase 1, second half
    assert method.learning_rate(spe * 3, 0.123, 0.1) == pytest.approx(0.01)  # phase 2 restarts


def test_edst_budget_too_small_for_its_tickets_is_refused(default_params_dict):
    from sparse_core.config import ConfigError, parse_params

    raw = default_params_dict
    raw["train"]["methods"] = ["edst_ensemble"]
    raw["train"]["epochs"] = 4
    raw["train"]["edst"] = {"tickets": 3, "budget": 0.5}  # 2 epochs for 3 phases
    raw["retrain"]["runs"] = []
    raw["evaluate"]["runs"] = []
    with pytest.raises(ConfigError, match=r"2 epochs cannot hold 3 refinement phases.*train\.edst\.budget"):
        parse_params(raw)
