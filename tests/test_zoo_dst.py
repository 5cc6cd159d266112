"""GraNet, MEST and Top-KAST (issue 14, part 4): each method's defining property, checked
against an independent computation, plus construction through the registry and a short
engine run that reaches the target sparsity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparse_core.config import ConfigError, DSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform
from sparse_core.engine import fit, make_optimizer, training_step
from sparse_core.flops import TrainingCost
from sparse_core.methods import create_method, registry
from sparse_core.sparsity.criteria import n_keep
from tests.conftest import TinyNet, make_split

OPTIM = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
TRANSFORM = BatchTransform([0.5], [0.25], crop_padding=1, flip=True)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    split = make_split(32, seed=100 + step)
    return split.images.float() / 255.0, split.labels


def _optimizer(model: nn.Module, method, lr=0.05, momentum=0.9, weight_decay=5e-4) -> torch.optim.SGD:
    opt = make_optimizer(model, OptimSection(lr=lr, momentum=momentum, weight_decay=weight_decay))
    method.bind_optimizer(opt)
    return opt


def _fit(tmp_path, name: str, epochs: int = 4, stop_after: int | None = None, **options):
    """A short engine run of ``name`` on TinyNet (96 images, batch 16: 6 steps per epoch)."""
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = 6 * epochs
    pruning = PruningSection(sparsity=0.8, update_period=2, end_fraction=0.5)
    dst = DSTSection(sparsity=0.8, update_period=2, distribution="uniform")
    method = create_method(name, model, steps, pruning, dst, seed=3, epochs=epochs, options=options)
    fit(model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=tmp_path, seed=7, device=torch.device("cpu"),
        fingerprint="fp", progress=False, stop_after_epoch=stop_after)  # fmt: skip
    return model, method


# ----- registry --------------------------------------------------------------------------------
def test_declarations():
    specs = registry.specs()
    assert (specs["granet"].family, specs["granet"].sparsity, specs["granet"].start) == ("gradual", "pruning", "init")
    assert specs["granet"].pruning_schedule and specs["granet"].params_key == "granet"
    assert (specs["mest"].family, specs["mest"].sparsity, specs["mest"].params_key) == ("dst", "dst", "mest")
    assert (specs["topkast"].family, specs["topkast"].sparsity, specs["topkast"].params_key) == ("dst", "dst", "topkast")
    assert all(specs[n].sweep and specs[n].start == "init" for n in ("granet", "mest", "topkast"))


@pytest.mark.parametrize("name, options, attr, value", [
    ("granet", {"granet": {"initial_sparsity": 0.0, "regeneration_fraction": 0.3}}, "regeneration_fraction", 0.3),
    ("mest", {"mest": {"lam": 2.5}}, "lam", 2.5),
    ("topkast", {"topkast": {"extra_density": 0.2, "penalty": 0.01}}, "extra_density", 0.2),
])  # fmt: skip
def test_create_method_builds_through_the_registry_with_options(name, options, attr, value):
    method = create_method(name, _mlp(), 100, options=options)
    assert type(method).__name__.lower() == name and method.spec.name == name
    assert getattr(method.opts, attr) == value
    default = create_method(name, _mlp(), 100)
    assert getattr(default.opts, attr) == getattr(type(default).Options(), attr)


@pytest.mark.parametrize("name, section, expect", [
    ("granet", {"regeneration_fraction": 0.1, "regeneration_floor": 0.2}, r"train\.granet.*regeneration_floor \(0\.2\) must not exceed"),
    ("granet", {"initial_sparsity": 0.95}, r"train\.granet\.initial_sparsity \(0\.95\) exceeds the target"),
    ("mest", {"lam": -1}, r"train\.mest\.lam: Input should be greater than or equal to 0"),
    ("mest", {"mutation_fractions": [0.2]}, r"train\.mest.*needs exactly one more entry than decay_fractions"),
    ("mest", {"decay_fractions": [0.7], "mutation_fractions": [0.2, 0.1], "x": 1}, r"train\.mest\.x: Extra inputs"),
    ("topkast", {"update_period": 0}, r"train\.topkast\.update_period: Input should be greater than 0"),
])  # fmt: skip
def test_bad_options_are_refused_naming_the_key(name, section, expect):
    with pytest.raises(ConfigError, match=expect):
        create_method(name, _mlp(), 100, options={name: section})


# ----- GraNet ----------------------------------------------------------------------------------
def _cubic(t: int, s_i: float, s_f: float, t1: int) -> float:
    """Zhu & Gupta (2017), Eq. 1 with t0 = 0, written out independently."""
    return s_f if t >= t1 else s_f + (s_i - s_f) * (1 - t / t1) ** 3


def test_granet_sparsity_follows_the_cubic_schedule_exactly_while_regrowing():
    """At every update the sparsity is exactly the schedule's (exact counts) although each
    update also drops and regrows weights; between updates the masks do not change."""
    model = _mlp()
    T, period = 60, 5
    method = create_method("granet", model, T, PruningSection(sparsity=0.9, update_period=period, end_fraction=0.5),
                           options={"granet": {"initial_sparsity": 0.5}})  # fmt: skip
    opt = _optimizer(model, method)
    N = method.masks.numel()
    assert method.masks.active() == n_keep(N, 0.5)  # the random ERK start at s_i
    t1 = period * math.floor(0.5 * T / period)
    for step in range(T):
        before = {n: m.clone() for n, m in method.masks.masks.items()}
        training_step(model, method, opt, *_batch(step), step)
        t = step + 1
        if t % period or t == T:  # no update after the last step: nothing would train what it regrows
            assert all(torch.equal(before[n], method.masks.masks[n]) for n in before), t
            continue
        assert method.masks.active() == n_keep(N, _cubic(t, 0.5, 0.9, t1)), t
        event = method.events[-1]
        assert event["step"] == t and event["regrown"] > 0 and event["regrown_new"] > 0, event
        # Connections inactive before this update are active with weight 0 right after it.
        for n, p in method.masks.params.items():
            new = method.masks.masks[n] & ~before[n]
            assert torch.count_nonzero(p.detach()[new]) == 0, n
            assert torch.count_nonzero(p.detach()[~method.masks.masks[n]]) == 0, n
    assert method.masks.sparsity() == pytest.approx(1 - n_keep(N, 0.9) / N, abs=0)
    method.on_train_end()  # the last update targeted the final sparsity
    # Regeneration goes on after the schedule ends (t1 = 30), with a decaying fraction.
    late = [e for e in method.events if e["step"] > t1]
    assert late and all(e["regrown"] > 0 for e in late)
    fractions = [e["regeneration_fraction"] for e in method.events if "regeneration_fraction" in e]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] == pytest.approx(
        0.005 + (0.5 - 0.005) * 0.5 * (1 + math.cos(math.pi * period / T)))


def test_granet_regrows_where_the_dense_gradient_is_largest_at_zero():
    """One update step checked against the gradient of its minibatch: every connection that
    became active has a dense-gradient magnitude at least that of every position left inactive,
    and starts at 0 with zero momentum."""
    model = _mlp()
    T, period = 40, 10
    method = create_method("granet", model, T, PruningSection(sparsity=0.9, update_period=period, end_fraction=0.5),
                           options={"granet": {"initial_sparsity": 0.5}})  # fmt: skip
    opt = _optimizer(model, method)
    for step in range(period - 1):
        training_step(model, method, opt, *_batch(step), step)
    # Step number `period`, by hand, keeping the dense gradient of its minibatch.
    step = period - 1
    x, y = _batch(step)
    method.before_forward(step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dense_grad = {n: p.grad.detach().abs().clone() for n, p in method.masks.params.items()}
    before = {n: m.clone() for n, m in method.masks.masks.items()}
    method.before_step(step)
    opt.step()
    method.after_step(step + 1)
    assert method.events[-1]["step"] == period and method.events[-1]["regrown"] > 0
    fresh_total = 0
    for n, p in method.masks.params.items():
        after = method.masks.masks[n]
        fresh, left_out = after & ~before[n], ~after
        fresh_total += int(fresh.sum())
        if fresh.any():
            assert dense_grad[n][fresh].min() >= dense_grad[n][left_out].max(), n
            assert torch.count_nonzero(p.detach()[fresh]) == 0, n
            assert torch.count_nonzero(opt.state[p]["momentum_buffer"][fresh]) == 0, n
    assert fresh_total > 0


def test_granet_dense_to_sparse_setting_starts_dense():
    method = create_method("granet", _mlp(), 40, PruningSection(sparsity=0.9, update_period=10),
                           options={"granet": {"initial_sparsity": 0.0}})  # fmt: skip
    assert method.masks.sparsity() == 0.0 and method.events == []


def test_granet_update_period_of_its_own_is_checked_against_the_run():
    with pytest.raises(ConfigError, match="train.pruning"):
        create_method("granet", _mlp(), 40, PruningSection(sparsity=0.9, update_period=2),
                      options={"granet": {"update_period": 40}})  # fmt: skip


def test_granet_training_flops_add_the_dense_gradient_of_each_regeneration_step():
    """``3 f(t)`` per step at the logged sparsity (dense before the first event), plus
    ``f_D − f(t)`` at each regeneration step; hand-computed on two layers."""
    dense = {"a": 1000, "b": 100}
    final = {"a": 0.1, "b": 0.5}  # f_S = 150, f_D = 1100, final sparsity 0.8 (logged)
    events = [{"step": 0, "sparsity": 0.4}, {"step": 10, "sparsity": 0.8, "regrown": 5}, {"step": 20, "sparsity": 0.8, "regrown": 3}]
    cost = TrainingCost(dense, final, total_steps=40, events=events)
    f_d, f_s = 1100.0, 150.0
    f_04 = f_d - 0.5 * (f_d - f_s)  # s/s_final = 0.5
    expected = (3 * f_04 * 10 + 3 * f_s * 30 + 2 * (f_d - f_s)) / 40
    assert registry.method_class("granet").training_flops_per_example(cost) == pytest.approx(expected)


def test_granet_engine_run_reaches_the_target(tmp_path):
    model, method = _fit(tmp_path, "granet", granet={"initial_sparsity": 0.5})
    method.on_train_end()
    N = method.masks.numel()
    assert method.masks.active() == n_keep(N, 0.8)
    with method.eval_weights():
        nonzero = sum(int(torch.count_nonzero(p)) for p in method.masks.params.values())
    assert n_keep(N, 0.8) - 3 <= nonzero <= n_keep(N, 0.8)  # an active weight may sit at exactly 0
    assert any(e.get("regrown", 0) > 0 for e in method.events) and method.events[-1]["step"] < 24


# ----- MEST ------------------------------------------------------------------------------------
def _mest(seed: int = 0, lam: float = 3.0):
    model = _mlp()
    dst = DSTSection(sparsity=0.5, distribution="uniform", update_period=4)
    return model, create_method("mest", model, 100, dst=dst, seed=seed, options={"mest": {"lam": lam}})


def _with_gradient(model, method) -> None:
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    method.masks.mask_grads_()  # as at the update: the gradient at the active positions


def test_mest_drops_the_lowest_weight_plus_lambda_gradient():
    """The positions that leave are exactly the k active ones of lowest |w| + λ|g|, an
    independent top-k (growth is steered to the positions inactive before the update, so no
    dropped position can come back in place)."""
    model, method = _mest(lam=3.0)
    _with_gradient(model, method)
    before = {n: m.clone() for n, m in method.masks.masks.items()}
    weights = {n: p.detach().clone() for n, p in method.masks.params.items()}
    grads = {n: p.grad.detach().clone() for n, p in method.masks.params.items()}
    grow = {n: (~m).float() for n, m in before.items()}  # only previously inactive positions
    method.update_topology(4, 0.25, scores=grow)
    differs = False
    for n, old in before.items():
        k = math.ceil(0.25 * int(old.sum()))
        importance = (weights[n].abs() + 3.0 * grads[n].abs())[old]
        expected = set(torch.topk(importance, k, largest=False).indices.tolist())
        left = set(torch.nonzero(~method.masks.masks[n][old]).flatten().tolist())
        assert left == expected, n
        differs |= expected != set(torch.topk(weights[n].abs()[old], k, largest=False).indices.tolist())
    assert differs, "the check needs a case where |w| alone would drop other weights"


def test_mest_grows_at_random_and_regrown_weights_start_at_zero():
    """Same network, mask, weights and gradients; two draws of the method's generator: the
    positions that grow differ (random growth), they are not the largest-gradient ones (the
    criterion of RigL/GraNet), and new connections start at 0."""
    grown, not_by_gradient = [], False
    for draw in (1, 2):
        model, method = _mest(seed=0)
        x, y = _batch(0)
        nn.functional.cross_entropy(model(x), y).backward()
        dense_grad = {n: p.grad.detach().abs().clone() for n, p in method.masks.params.items()}
        method.masks.mask_grads_()  # as at the update: the gradient at the active positions
        method.generator.manual_seed(draw)
        before = {n: m.clone() for n, m in method.masks.masks.items()}
        method.update_topology(4, 0.25)
        grown.append({n: method.masks.masks[n] & ~before[n] for n in before})
        for n, p in method.masks.params.items():
            new, left_out = grown[-1][n], ~method.masks.masks[n]
            assert new.any() and torch.count_nonzero(p.detach()[new]) == 0, n
            not_by_gradient |= bool(dense_grad[n][new].min() < dense_grad[n][left_out].max())
    assert any(not torch.equal(grown[0][n], grown[1][n]) for n in grown[0])
    assert not_by_gradient


def test_mest_mutation_fraction_decays_and_stops():
    dst = DSTSection(sparsity=0.8, update_period=10, stop_fraction=0.75)
    method = create_method("mest", _mlp(), 160, dst=dst)  # defaults: 0.2 then 0.1 from 90/160, none from 120/160
    assert [method.drop_fraction(t) for t in (0, 80, 89, 90, 119)] == [0.2, 0.2, 0.2, 0.1, 0.1]
    assert method.update_due(120) and not method.update_due(130)
    custom = create_method("mest", _mlp(), 100, dst=dst,
                           options={"mest": {"mutation_fractions": [0.3, 0.2, 0.05], "decay_fractions": [0.25, 0.5]}})
    assert [custom.drop_fraction(t) for t in (10, 25, 49, 50, 70)] == [0.3, 0.2, 0.2, 0.05, 0.05]


def test_mest_engine_run_keeps_the_target_and_mutates_on_schedule(tmp_path):
    model, method = _fit(tmp_path, "mest", epochs=4, mest={"mutation_fractions": [0.4, 0.2], "decay_fractions": [0.5]})
    N = method.masks.numel()
    assert method.masks.active() == N - round(0.8 * N)
    steps = [e["step"] for e in method.events]
    assert steps == list(range(2, int(0.75 * 24) + 1, 2))
    assert [e["drop_fraction"] for e in method.events] == [0.4 if s < 12 else 0.2 for s in steps]
    # Each update regrows ⌈p · n_active⌉ per layer (layers at density 1 excepted).
    per_layer = {n: int(m.sum()) for n, m in method.masks.masks.items() if not m.all()}
    for e in method.events:
        assert e["regrown"] == sum(math.ceil(e["drop_fraction"] * a) for a in per_layer.values())


# ----- Top-KAST --------------------------------------------------------------------------------
def _topkast(period: int = 1000, extra: float = 0.2, penalty: float = 0.01, sparsity: float = 0.8):
    model = _mlp()
    dst = DSTSection(sparsity=sparsity, distribution="uniform")
    method = create_method("topkast", model, 1000, dst=dst,
                           options={"topkast": {"extra_density": extra, "penalty": penalty, "update_period": period}})
    return model, method


def test_topkast_sets_are_nested_top_k_of_magnitude():
    model, method = _topkast(extra=0.2)
    total = method.masks.numel()
    assert method.masks.active() == round(0.2 * total)  # exact overall count (largest remainder)
    for n, p in method.masks.params.items():
        a, b = method.masks.masks[n], method.backward_masks[n]
        N = p.numel()
        assert abs(int(a.sum()) - 0.2 * N) <= 1 and int(b.sum()) == min(N, int(a.sum()) + round(0.2 * N))
        assert not (a & ~b).any()
        mag = p.detach().abs()
        assert mag[a].min() >= mag[~a].max() and mag[b].min() >= mag[~b].max()


def test_topkast_forward_uses_only_the_top_d_set():
    """The logits of a training step equal those of a copy with every weight outside A zeroed
    (and differ from the dense θ's)."""
    model, method = _topkast()
    opt = _optimizer(model, method)
    for step in range(3):
        training_step(model, method, opt, *_batch(step), step)
    x, y = _batch(3)
    sparse_copy, dense_copy = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for (n, p), q in zip(method.masks.params.items(), [dict(sparse_copy.named_parameters())[n] for n in method.masks.params]):
            q.mul_(method.masks.masks[n])
    _, logits = training_step(model, method, opt, x, y, 3)
    with torch.no_grad():
        assert torch.allclose(logits, sparse_copy(x), atol=1e-6)
        assert not torch.allclose(logits, dense_copy(x), atol=1e-3)


def test_topkast_gradient_reaches_the_backward_set_and_nothing_outside_it():
    """One SGD step (no momentum) moves θ by exactly −lr · (∂L/∂α ⊙ m_B + penalty), with
    ∂L/∂α from an independent autograd pass at α = m_A ⊙ θ and the penalty c·θ on A, c·θ/D on
    B∖A; weights outside B stay bit for bit, even under weight decay."""
    lr, c = 0.1, 0.01
    model, method = _topkast(penalty=c)
    opt = _optimizer(model, method, lr=lr, momentum=0.0, weight_decay=0.0)
    x, y = _batch(0)
    theta = {n: p.detach().clone() for n, p in method.masks.params.items()}
    a = {n: m.clone() for n, m in method.masks.masks.items()}
    b = {n: m.clone() for n, m in method.backward_masks.items()}
    alpha_model = copy.deepcopy(model)
    alpha_params = dict(alpha_model.named_parameters())
    with torch.no_grad():
        for n in theta:
            alpha_params[n].mul_(a[n])
    nn.functional.cross_entropy(alpha_model(x), y).backward()
    training_step(model, method, opt, x, y, 0)
    for n, p in method.masks.params.items():
        d = int(a[n].sum()) / p.numel()
        penalty = c * theta[n] * (a[n].float() + (b[n] & ~a[n]).float() / d)
        expected = theta[n] - lr * (alpha_params[n].grad * b[n] + penalty)
        assert torch.allclose(p.detach(), expected, atol=1e-6), n
        assert torch.equal(p.detach()[~b[n]], theta[n][~b[n]]), n
        moved = p.detach() != theta[n]
        assert moved[b[n] & ~a[n]].float().mean() > 0.9, "B∖A must be trained although it is not in the forward"
    # Under weight decay and momentum the weights outside B still do not move.
    opt = _optimizer(model, method, lr=lr, momentum=0.9, weight_decay=0.1)
    for step in range(1, 4):
        outside = {n: (p.detach().clone(), ~method.backward_masks[n]) for n, p in method.masks.params.items()}
        training_step(model, method, opt, *_batch(step), step)
        for n, p in method.masks.params.items():
            old, out = outside[n]
            assert torch.equal(p.detach()[out], old[out]), (n, step)


def test_topkast_sets_are_recomputed_on_schedule_from_the_magnitudes():
    model, method = _topkast(period=3)
    opt = _optimizer(model, method, lr=0.5)  # a large lr so the sets do change
    changed = 0
    for step in range(9):
        before = {n: m.clone() for n, m in method.masks.masks.items()}
        training_step(model, method, opt, *_batch(step), step)
        same = all(torch.equal(before[n], method.masks.masks[n]) for n in before)
        if (step + 1) % 3:
            assert same, step
            continue
        changed += not same
        for n, p in method.masks.params.items():
            mag = p.detach().abs()
            a, b = method.masks.masks[n], method.backward_masks[n]
            assert mag[a].min() >= mag[~a].max() and mag[b].min() >= mag[~b].max()
    assert changed > 0 and [e["step"] for e in method.events] == [3, 6, 9]


def test_topkast_evaluates_alpha_and_keeps_theta_between_steps():
    model, method = _topkast()
    opt = _optimizer(model, method)
    training_step(model, method, opt, *_batch(0), 0)
    theta = {n: p.detach().clone() for n, p in method.masks.params.items()}
    assert all(bool((theta[n][~m] != 0).any()) for n, m in method.masks.masks.items())  # θ stays dense
    with method.eval_weights():
        for n, p in method.masks.params.items():
            assert torch.equal(p.detach(), theta[n] * method.masks.masks[n])
    assert all(torch.equal(p.detach(), theta[n]) for n, p in method.masks.params.items())


def test_topkast_training_flops_forward_at_d_backward_into_d_plus_m():
    class Train:
        model_extra = {"topkast": {"extra_density": 0.3}}

    cost = TrainingCost({"a": 1000, "b": 100}, {"a": 0.1, "b": 0.8}, train=Train())
    f_a, f_b = 1000 * 0.1 + 100 * 0.8, 1000 * 0.4 + 100 * 1.0
    assert registry.method_class("topkast").training_flops_per_example(cost) == pytest.approx(2 * f_a + f_b)


def test_topkast_engine_run_reaches_the_target(tmp_path):
    model, method = _fit(tmp_path, "topkast", topkast={"extra_density": 0.1})
    N = method.masks.numel()
    assert method.masks.active() == N - round(0.8 * N)
    with method.eval_weights():
        nonzero = sum(int(torch.count_nonzero(p)) for p in method.masks.params.values())
    assert nonzero == method.masks.active()
    assert method.events and method.events[-1]["step"] == 24


# ----- all three -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["granet", "mest", "topkast"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, name):
    full_model, full_method = _fit(tmp_path / "full", name)
    _fit(tmp_path / "killed", name, stop_after=2)
    resumed_model, resumed_method = _fit(tmp_path / "killed", name)
    for (n, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert all(torch.equal(full_method.masks.masks[n], resumed_method.masks.masks[n]) for n in full_method.masks.masks)
    assert full_method.events == resumed_method.events and full_method.events
