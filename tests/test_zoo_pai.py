"""Pruning at initialisation and static sparse training (issue 14, part 4): ``static``, ``snip``,
``synflow``. Each method's defining property is checked against an independent computation;
each is built through the registry and trained by the engine to its target sparsity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_core.config import ConfigError, DSTSection, OptimSection, PruningSection, parse_params
from sparse_core.data.loader import BatchTransform
from sparse_core.engine import fit, training_step
from sparse_core.flops import TrainingCost
from sparse_core.methods import registry
from sparse_core.methods.base import create_method
from sparse_core.sparsity.criteria import n_keep
from tests.conftest import TinyNet, make_split

OPTIM = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
TRANSFORM = BatchTransform([0.5], [0.25], crop_padding=1, flip=True)
SHAPE = (1, 8, 8)


def _batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    split = make_split(n, seed=seed)
    return TRANSFORM.normalize(split.images.float()), split.labels


def _topk_mask(scores: dict[str, torch.Tensor], keep: int, active: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Independent global selection: sort every score (pruned positions last), keep the first ``keep``."""
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    if active is not None:
        flat = flat.masked_fill(~torch.cat([active[n].flatten() for n in scores]), -math.inf)
    order = torch.argsort(flat, descending=True, stable=True)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order[:keep]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = kept[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


# ----- snip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_snip_mask_is_the_top_k_of_the_first_minibatch_connection_sensitivity(scope):
    """Lee et al. 2019, Eq. 6: keep the top-k of |∂L/∂w ⊙ w| of one minibatch at the initial
    weights; the first training batch is that minibatch, and the mask never changes after it."""
    torch.manual_seed(0)
    model = TinyNet()
    initial = copy.deepcopy(model)
    sparsity = 0.8
    method = create_method("snip", model, 20, PruningSection(sparsity=sparsity, scope=scope))
    assert all(bool(m.all()) for m in method.masks.masks.values())  # nothing is known before the first batch
    x, y = _batch(seed=1)

    # Independently: the gradient of the loss on that batch at the initial weights, train mode.
    names = list(method.masks.params)
    weights = [initial.get_parameter(n) for n in names]
    grads = torch.autograd.grad(F.cross_entropy(initial(x), y), weights)
    scores = {n: (g * w).abs().detach() for n, g, w in zip(names, grads, weights)}
    if scope == "global":
        expected = _topk_mask(scores, n_keep(sum(s.numel() for s in scores.values()), sparsity))
    else:
        expected = {n: _topk_mask({n: s}, n_keep(s.numel(), sparsity))[n] for n, s in scores.items()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.bind_optimizer(optimizer)
    training_step(model, method, optimizer, x, y, 0)
    for n in names:
        assert torch.equal(method.masks.masks[n], expected[n]), n
        assert not bool(model.get_parameter(n)[~expected[n]].any()), n  # pruned weights are zero
    assert method.masks.sparsity() == pytest.approx(sparsity, abs=1 / 228)
    first = {n: m.clone() for n, m in method.masks.masks.items()}
    for step in range(1, 6):  # later batches, other data: the mask is fixed
        training_step(model, method, optimizer, *_batch(seed=10 + step), step)
    for n in names:
        assert torch.equal(method.masks.masks[n], first[n]), n
        assert not bool(model.get_parameter(n)[~first[n]].any()), n
    assert len(method.events) == 1 and method.events[0]["step"] == 0


def test_snip_waits_for_a_nonzero_gradient():
    """A step whose gradients were zeroed (an fp16 step the scaler skips) scores nothing."""
    torch.manual_seed(0)
    model = TinyNet()
    method = create_method("snip", model, 10, PruningSection(sparsity=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    method.before_step(0)
    assert not method.scored and method.masks.sparsity() == 0.0
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    method.before_step(1)
    assert method.scored and method.masks.sparsity() == pytest.approx(0.5, abs=1 / 228)
    assert method.state_dict()["scored"] is True


def test_snip_and_synflow_refuse_structured_pruning():
    for name in ("snip", "synflow"):
        with pytest.raises(ConfigError, match="train.pruning.granularity must be 'unstructured'"):
            create_method(name, TinyNet(), 10, PruningSection(granularity="structured"), input_shape=SHAPE)


# ----- synflow -------------------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _analytic_synflow_scores(model: nn.Sequential, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SynFlow scores of an MLP written out (Tanaka et al. 2020, Sec. 6): with every weight and
    bias made non-negative and an all-ones input every ReLU is the identity, the forward pass
    is ``h_l = |W_l| h_{l-1} + |b_l|``, ``R = 1ᵀ h_L``, the backward pass ``δ_L = 1``,
    ``δ_{l-1} = |W_l|ᵀ δ_l``, so ``∂R/∂|W_l| = δ_l h_{l-1}ᵀ`` and the score is that times ``|W_l|``."""
    linears = [(f"{i}.weight", m) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    W = {n: m.weight.detach().double().abs() * masks[n] for n, m in linears}
    b = {n: m.bias.detach().double().abs() for n, m in linears}
    h = [torch.ones(linears[0][1].in_features, dtype=torch.float64)]
    for n, _ in linears:
        h.append(W[n] @ h[-1] + b[n])
    delta = torch.ones(linears[-1][1].out_features, dtype=torch.float64)
    scores = {}
    for i in range(len(linears) - 1, -1, -1):
        n = linears[i][0]
        scores[n] = torch.outer(delta, h[i]) * W[n]
        delta = W[n].T @ delta
    return {n: scores[n] for n, _ in linears}


@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_synflow_equals_the_algorithm_written_out(rounds):
    """Alg. 1: per round, masked |θ|-scores, keep density d^(k/n) among the active connections;
    the mask equals an independent computation, and every round's realised count is exact."""
    model, sparsity = _mlp(), 0.7
    initial = copy.deepcopy(model)
    method = create_method("synflow", model, 10, PruningSection(sparsity=sparsity), options={"synflow": {"rounds": rounds}},
                           input_shape=(6,))  # fmt: skip
    names = list(method.masks.params)
    numel = sum(method.masks.params[n].numel() for n in names)
    masks = {n: torch.ones_like(method.masks.params[n], dtype=torch.bool) for n in names}
    assert len(method.events) == rounds
    for k in range(1, rounds + 1):
        target = 1 - (1 - sparsity) ** (k / rounds)
        masks = _topk_mask(_analytic_synflow_scores(initial, masks), n_keep(numel, target), active=masks)
        event = method.events[k - 1]
        assert event["round"] == k and event["target_sparsity"] == pytest.approx(target, abs=1e-12)
        assert event["sparsity"] == 1 - n_keep(numel, target) / numel  # exact count every round
    assert method.events[-1]["target_sparsity"] == sparsity
    for n in names:
        assert torch.equal(method.masks.masks[n], masks[n]), (n, rounds)
        # The model keeps its signed initial weights at the kept positions, zeros elsewhere.
        assert torch.equal(method.masks.params[n].detach(), initial.get_parameter(n).detach() * masks[n]), n
    for (n, p), q in zip(model.named_parameters(), initial.parameters()):
        if n not in names:
            assert torch.equal(p, q), n  # biases untouched


def _authors_synflow_round(model: nn.Module, names: list[str], sparsity: float) -> dict[str, torch.Tensor]:
    """One round as in ganguli-lab/Synaptic-Flow (Pruners/pruners.py SynFlow.score, prune.py
    prune_loop): eval mode, abs_() of every state_dict entry, all-ones input, sum, backward;
    here on a float64 copy (our precision)."""
    net = copy.deepcopy(model).double()
    net.eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net(torch.ones(1, *SHAPE, dtype=torch.float64)).sum().backward()
    scores = {n: (net.get_parameter(n).grad * net.get_parameter(n)).detach().abs() for n in names}
    return _topk_mask(scores, n_keep(sum(s.numel() for s in scores.values()), sparsity))


def test_synflow_batch_norm_runs_in_eval_mode_with_absolute_statistics_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # running statistics that matter (fresh ones are 0 and 1)
        model.bn.running_mean.uniform_(-2, 2)
        model.bn.running_var.uniform_(0.1, 3)
        model.bn.weight.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
    before = copy.deepcopy(model.state_dict())
    method = create_method("synflow", model, 10, PruningSection(sparsity=0.8), options={"synflow": {"rounds": 1}},
                           input_shape=SHAPE)  # fmt: skip
    expected = _authors_synflow_round(_loaded(before), list(method.masks.params), 0.8)
    for n, m in method.masks.masks.items():
        assert torch.equal(m, expected[n]), n
    assert model.training  # the mode the model came in
    for k, v in model.state_dict().items():
        ref = before[k] * method.masks.masks[k] if k in method.masks.masks else before[k]
        assert torch.equal(v, ref), k  # signed weights, BN statistics and buffers as they were


def _loaded(state: dict[str, torch.Tensor]) -> TinyNet:
    net = TinyNet()
    net.load_state_dict(state)
    return net


def test_synflow_needs_no_data_whatever_training_follows(tmp_path):
    """The score is data-free: the same init gives the same mask, which stays through training on any data."""
    masks = []
    for i, data_seed in enumerate((1, 5)):
        torch.manual_seed(0)
        model = TinyNet()
        method = create_method("synflow", model, 12, PruningSection(sparsity=0.9), input_shape=SHAPE)
        at_init = {n: m.clone() for n, m in method.masks.masks.items()}
        fit(model, method, make_split(96, seed=data_seed), make_split(32, seed=2), TRANSFORM, OPTIM, epochs=2,
            run_dir=tmp_path / str(i), seed=data_seed, device=torch.device("cpu"), fingerprint="fp", progress=False)  # fmt: skip
        for n, m in method.masks.masks.items():
            assert torch.equal(m, at_init[n]), n
            assert not bool(method.masks.params[n][~m].any()), n
        masks.append(at_init)
    for n in masks[0]:
        assert torch.equal(masks[0][n], masks[1][n]), n


def test_synflow_options_and_input_shape_are_checked(default_params_dict):
    with pytest.raises(ValueError, match="synflow needs the shape"):
        create_method("synflow", TinyNet(), 10)
    for bad, expect in (({"rounds": 0}, r"train\.synflow\.rounds: Input should be greater than 0"),
                        ({"round": 5}, r"train\.synflow\.round: Extra inputs are not permitted")):  # fmt: skip
        raw = copy.deepcopy(default_params_dict)
        raw["train"]["synflow"] = bad
        options = parse_params(raw, "params.yaml").train.model_extra
        with pytest.raises(ConfigError, match=expect):
            create_method("synflow", TinyNet(), 10, options=options, input_shape=SHAPE)
    raw = copy.deepcopy(default_params_dict)
    raw["train"]["synflow"] = {"rounds": 4}
    method = create_method("synflow", TinyNet(), 10, options=parse_params(raw, "params.yaml").train.model_extra, input_shape=SHAPE)
    assert method.rounds == 4 and [e["round"] for e in method.events] == [1, 2, 3, 4]


# ----- static --------------------------------------------------------------------------------
class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


def test_static_mask_has_erk_densities_and_is_set_s_initial_mask():
    """ERK (Evci et al. 2020, App. C): d_l = ε (Σ dims) / (Π dims) with one ε giving the overall
    density (no layer capped here); exact counts; the same mask as set's for the same seed."""
    density = 0.1
    torch.manual_seed(0)
    method = create_method("static", ThreeLayers(), 100, dst=DSTSection(sparsity=1 - density), seed=4)
    shapes = {n: tuple(p.shape) for n, p in method.masks.params.items()}
    score = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    total = sum(math.prod(s) for s in shapes.values())
    eps = density * total / sum(score[n] * math.prod(s) for n, s in shapes.items())
    assert all(eps * score[n] < 1 for n in shapes)  # no capped layer: the formula holds as written
    for n, s in shapes.items():
        assert float(method.masks.masks[n].float().mean()) == pytest.approx(eps * score[n], abs=1.5 / math.prod(s)), n
    assert method.masks.active() == round(density * total)
    torch.manual_seed(0)
    set_ = create_method("set", ThreeLayers(), 100, dst=DSTSection(sparsity=1 - density), seed=4)
    for n in shapes:
        assert torch.equal(method.masks.masks[n], set_.masks.masks[n]), n


def _train(tmp_path, name: str, epochs: int = 3, stop: int | None = None, options: dict | None = None):
    torch.manual_seed(0)
    model = TinyNet()
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = -(-len(train) // OPTIM.batch_size) * epochs
    method = create_method(name, model, steps, PruningSection(sparsity=0.9), DSTSection(sparsity=0.9, update_period=2),
                           seed=3, epochs=epochs, options=options, input_shape=SHAPE)  # fmt: skip
    start = {n: m.clone() for n, m in method.masks.masks.items()}
    fit(model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=tmp_path / name, seed=7,
        device=torch.device("cpu"), fingerprint="fp", progress=False, stop_after_epoch=stop)  # fmt: skip
    return model, method, start


def test_static_mask_never_changes_where_set_s_does(tmp_path):
    _, static, start = _train(tmp_path, "static")
    for n, m in static.masks.masks.items():
        assert torch.equal(m, start[n]), n
        assert not bool(static.masks.params[n][~m].any()), n
    assert static.events == []
    _, set_, set_start = _train(tmp_path, "set")  # same settings: 9 updates due (ΔT = 2, 18 steps × 0.75)
    assert set_.events and any(not torch.equal(m, set_start[n]) for n, m in set_.masks.masks.items())
    assert all(torch.equal(start[n], set_start[n]) for n in start)


# ----- all three: registry, engine, FLOPs, resume ---------------------------------------------
@pytest.mark.parametrize("name", ["static", "snip", "synflow"])
def test_built_through_the_registry_and_trained_to_the_target(tmp_path, name):
    spec = registry.spec(name)
    assert (spec.family, spec.start, spec.sweep) == ("pai", "init", True)
    model, method, _ = _train(tmp_path, name)
    numel = method.masks.numel()
    assert method.masks.active() == n_keep(numel, 0.9)  # exact: 228 - round(0.9 · 228) = 23 (ERK: round(0.1 · 228))
    assert sum(int(torch.count_nonzero(p)) for p in method.masks.params.values()) <= method.masks.active()
    method.on_train_end()


def test_training_flops_rules():
    dense_flops = {"a.weight": 1000, "b.weight": 200}
    densities = {"a.weight": 0.1, "b.weight": 0.5}
    f_d, f_s = 1200.0, 200.0
    cost = TrainingCost(dense_flops, densities, total_steps=50)
    assert registry.method_class("static").training_flops_per_example(cost) == 3 * f_s
    assert registry.method_class("snip").training_flops_per_example(cost) == pytest.approx((3 * f_d + 49 * 3 * f_s) / 50)
    synflow = registry.method_class("synflow")
    assert synflow.training_flops_per_example(cost) == 3 * f_s  # no train section: scoring cost left out
    train = parse_params(_params_with({"synflow": {"rounds": 7}}), "params.yaml").train
    cost.train = train
    expected = 3 * f_s + 7 * 3 * f_d / (50 * train.optim.batch_size)
    assert synflow.training_flops_per_example(cost) == pytest.approx(expected)


def _params_with(extra: dict) -> dict:
    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(extra)
    return raw


@pytest.mark.parametrize("name", ["static", "snip", "synflow"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, name):
    fewer = {"synflow": {"rounds": 10}}  # the rounds' count does not matter here
    full_model, full_method, _ = _train(tmp_path / "full", name, epochs=4, options=fewer)
    _train(tmp_path / "killed", name, epochs=4, stop=2, options=fewer)
    resumed_model, resumed_method, _ = _train(tmp_path / "killed", name, epochs=4, options=fewer)
    for (n, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), n
    for n, m in full_method.masks.masks.items():
        assert torch.equal(m, resumed_method.masks.masks[n]), n
    assert full_method.events == resumed_method.events
