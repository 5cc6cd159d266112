"""Reference fidelity of DST, EDST and gradual pruning (issue: the four defects of the review).

1. Layers at ERK density 1 come out of every topology update unchanged (RigL reference).
2. ``dst.reinit_when_same``: a connection dropped and regrown in place keeps its value (RigL
   default) or restarts at zero (FreeTickets code).
3. EDST follows the FreeTickets EDST script: random growth, constant drop fraction 0.5,
   updates through every phase; the moved fraction of a global exploration is logged and
   matches its hypergeometric expectation.
4. Gradual pruning reaches its target at a real mask update with training after it; a run too
   short for that is refused before training.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core.config import ConfigError, DSTSection, EDSTSection, PruningSection, edst_plan, parse_params
from sparse_core.engine import training_step
from sparse_core.methods import create_method
from sparse_core.models import create_model
from tests.conftest import TinyNet, make_split


def _lenet_rigl(**dst_kw):
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=28)
    dst = DSTSection(sparsity=0.8, distribution="erk", update_period=1000, drop_fraction=0.5, **dst_kw)
    method = create_method("rigl", model, 1000, PruningSection(), dst, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.bind_optimizer(opt)
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # nonzero weights everywhere, momentum buffers filled
        x = torch.randn(16, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        training_step(model, method, opt, x, y, step)
    return model, method


# ----- 1. dense (ERK-capped) layers -------------------------------------------------------------
@pytest.mark.parametrize("fraction,kind", [(0.5, "dst"), (0.8, "global_exploration")])
@pytest.mark.parametrize("reinit_when_same", [False, True])
def test_layers_at_density_one_are_unchanged_by_updates(fraction, kind, reinit_when_same):
    model, method = _lenet_rigl(reinit_when_same=reinit_when_same)
    dense = [n for n, d in method.masks.target_density.items() if d == 1.0]
    assert dense, "ERK at density 0.2 caps LeNet-5's conv1 and fc3 at density 1"
    before = {n: method.masks.params[n].detach().clone() for n in dense}
    scores = {n: torch.rand(p.shape) for n, p in method.masks.params.items()}
    method.update_topology(4, fraction, scores, kind=kind)
    for n in dense:
        assert bool(method.masks.masks[n].all()), n
        assert torch.equal(method.masks.params[n].detach(), before[n]), f"{n} changed by a {kind} update"
    # The sparse layers did take part.
    assert method.events[-1]["moved_fraction"] > 0
    assert all(f"moved_fraction/{n}" not in method.events[-1] for n in dense)


# ----- 2. same-position regrowth ----------------------------------------------------------------
@pytest.mark.parametrize("reinit_when_same", [False, True])
def test_same_position_regrowth_keeps_value_unless_reinit_when_same(reinit_when_same):
    torch.manual_seed(0)
    model = TinyNet()
    dst = DSTSection(sparsity=0.7, update_period=1000, drop_fraction=0.3, reinit_when_same=reinit_when_same, reset_momentum=True)
    method = create_method("rigl", model, 1000, PruningSection(), dst, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.bind_optimizer(opt)
    split = make_split(32)
    training_step(model, method, opt, split.images.float() / 255.0, split.labels, 0)
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    w_before = {k: p.detach().clone() for k, p in method.masks.params.items()}
    # Grow scores that pick exactly the just-dropped (previously active) positions again.
    method.update_topology(1, 0.3, {k: m.float() for k, m in old.items()})
    for k, p in method.masks.params.items():
        assert torch.equal(method.masks.masks[k], old[k])  # the topology did not change
        dropped = old[k] & (w_before[k].abs() <= w_before[k][old[k]].abs().kthvalue(math.ceil(0.3 * int(old[k].sum()))).values)
        assert dropped.any()
        buf = opt.state[p]["momentum_buffer"]
        if reinit_when_same:
            assert torch.count_nonzero(p.detach()[dropped]) == 0
            assert torch.count_nonzero(buf[dropped]) == 0  # reset_momentum follows the re-initialised set
        else:
            assert torch.equal(p.detach(), w_before[k]), "a connection regrown in place must keep its value"
            assert torch.count_nonzero(buf[dropped]) > 0
    assert method.events[-1]["moved_fraction"] == 0.0


def test_new_connections_start_at_zero_either_way():
    model, method = _lenet_rigl()
    old = {k: m.clone() for k, m in method.masks.masks.items()}
    method.update_topology(4, 0.5, {n: torch.rand(p.shape) for n, p in method.masks.params.items()})
    for n, p in method.masks.params.items():
        new = method.masks.masks[n] & ~old[n]
        assert torch.count_nonzero(p.detach()[new]) == 0


# ----- 3. EDST as in the FreeTickets README's command -------------------------------------------
def test_edst_defaults_are_the_freetickets_readme_command():
    e = EDSTSection()
    assert (e.grow, e.drop_fraction, e.drop_schedule, e.phase_stop_fraction) == ("gradient", 0.5, "constant", 1.0)
    assert (e.budget, e.tickets, e.exploration_rate) == (1.8, 3, 0.8)
    assert edst_plan(e, 450) == (450, 150, 100)  # --epochs 450 --epochs-explo 150 --model-num 3


def _edst(epochs=7, steps_per_epoch=10, **kw):
    torch.manual_seed(0)
    model = TinyNet()
    dst = DSTSection(sparsity=0.7, update_period=5, drop_fraction=0.3, drop_schedule="cosine", stop_fraction=0.5)
    edst = EDSTSection(tickets=3, exploration_share=1 / 7, **{"grow": "random", **kw})
    return create_method("edst_ensemble", model, epochs * steps_per_epoch, PruningSection(), dst, seed=0, edst=edst, epochs=epochs)


def test_edst_updates_continue_through_every_phase_at_constant_drop_fraction():
    method = _edst()
    total = method.total_steps
    planned = {s: method.planned_update(s) for s in range(1, total + 1)}
    due = [s for s, p in planned.items() if p is not None]
    # Every ΔT = 5 steps to the very end, dst.stop_fraction (0.5) notwithstanding.
    assert due == list(range(5, total + 1, 5))
    assert {p[0] for s, p in planned.items() if p and p[1] == "dst"} == {0.5}
    assert [s for s, p in planned.items() if p and p[1] == "global_exploration"] == [30, 50]


def test_edst_phase_stop_fraction_stops_updates_within_each_phase():
    method = _edst(phase_stop_fraction=0.5)  # exploration: steps 1-10; phases of 20 steps from 11, 31, 51
    due = [s for s in range(1, method.total_steps + 1) if method.planned_update(s) is not None]
    assert due == [5, 15, 20, 30, 35, 40, 50, 55, 60]  # 30 and 50: global explorations


@pytest.mark.parametrize("q", [0.8, 0.5])
def test_random_growth_moved_fraction_matches_its_expectation(q):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 100), torch.nn.Linear(100, 50))
    dst = DSTSection(sparsity=0.8, distribution="uniform", update_period=1000)
    method = create_method("edst_ensemble", model, 100, PruningSection(), dst, seed=3, edst=EDSTSection(tickets=1, exploration_share=0, grow="random"), epochs=1)
    with torch.no_grad():
        for p in method.masks.params.values():
            p.normal_()
        method.masks.apply_()
    method.update_topology(10, q, kind="global_exploration")
    event = method.events[-1]
    for name, p in method.masks.params.items():
        n = p.numel()
        a = int(method.masks.masks[name].sum())
        k = math.ceil(q * a)
        expected = k * (n - a) / (a * (n - a + k))
        # Hypergeometric: re-picked ~ HG(n − a + k, k, k); sd of the moved fraction below 0.01 here.
        sd = math.sqrt(k * (k / (n - a + k)) * ((n - a) / (n - a + k)) * ((n - a) / (n - a + k - 1))) / a
        assert abs(event[f"moved_fraction/{name}"] - expected) < 5 * sd + 1e-9, (name, event[f"moved_fraction/{name}"], expected)
        assert event[f"moved_fraction/{name}"] < q  # some dropped positions are re-picked in place


# ----- 4. gradual schedules reach the target at a real update ----------------------------------
def _steps(model, method, n):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    split = make_split(32)
    for step in range(n):
        training_step(model, method, opt, split.images.float() / 255.0, split.labels, step)


@pytest.mark.parametrize("name", ["gmp", "dpf"])
def test_gradual_target_reached_at_an_update_with_training_after(name):
    torch.manual_seed(0)
    model = TinyNet()
    # end_fraction x T = 30 falls between the updates at 16 and 32: the schedule ends at 16.
    method = create_method(name, model, total_steps=40, pruning=PruningSection(sparsity=0.9, update_period=16))
    _steps(model, method, 40)
    first_on_target = next(e["step"] for e in method.events if e["target_sparsity"] == 0.9)
    assert first_on_target == 16
    n_events = len(method.events)
    method.on_train_end()
    assert len(method.events) == n_events, "no mask may be rebuilt after the last step"
    n = method.masks.numel()
    assert method.masks.active() == n - round(0.9 * n)


@pytest.mark.parametrize("name", ["gmp", "dpf"])
def test_gradual_schedule_that_cannot_reach_target_is_refused(name):
    # 20 steps, ΔT = 16, end 0.75: the only update (16) is after end_fraction x T = 15.
    with pytest.raises(ConfigError, match=r"train\.pruning\.end_fraction.*train\.pruning\.update_period"):
        create_method(name, TinyNet(), total_steps=20, pruning=PruningSection(sparsity=0.9, update_period=16))
    # end_fraction 1.0 with T a multiple of ΔT: the target would come with the last step.
    with pytest.raises(ConfigError, match="no training after it"):
        create_method(name, TinyNet(), total_steps=64, pruning=PruningSection(sparsity=0.9, update_period=16, end_fraction=1.0))


def test_validation_refuses_a_schedule_too_short_for_its_updates(default_params_dict):
    raw = default_params_dict
    raw["data"]["train_subset"] = 600  # 540 training images -> 5 steps per epoch at batch 128
    raw["train"]["epochs"] = 4  # T = 20: end_fraction x T = 15 < update_period 16
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    msg = str(err.value)
    assert "params.yaml" in msg and "train.pruning.update_period" in msg and "train.epochs" in msg
    raw["train"]["pruning"]["update_period"] = 4
    parse_params(raw)  # 12 < 20: fine
