"""``sparse_core.api.sparsify``: any method inside a plain PyTorch loop that sparseflow did not write.

ResNet-18 (torchvision) on small random input for rigl and dpf, LeNet-5 elsewhere; a plain loop
and the engine's ``train_one_epoch`` give bit-identical weights, masks and events.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparse_core.api import SparseOptimizer, sparsify, unsupported_reason
from sparse_core.config import DSTSection, EDSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform, Split, iterate_batches
from sparse_core.engine import make_optimizer, train_one_epoch
from sparse_core.methods import create_method, registry
from sparse_core.models import create_model
from sparse_core.sparsity import prunable_parameters
from sparse_core.sparsity.criteria import n_keep
from sparse_core.sparsity.distributions import active_counts, layer_densities


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _lenet():
    torch.manual_seed(0)
    return create_model("lenet5", in_channels=1, num_classes=10, image_size=28)


def _batches(n: int, shape=(3, 32, 32), batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    """The user's loop: nothing sparseflow-specific in it."""
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _prunable(model):
    return {n: p.detach().clone() for n, p in prunable_parameters(model).items()}


# ----- ResNet-18: rigl and dpf ---------------------------------------------------------------
def test_rigl_resnet18_keeps_layer_counts_moves_topology_and_reaches_erk_target():
    model = _resnet18()
    shapes = {n: tuple(p.shape) for n, p in prunable_parameters(model).items()}
    numel = {n: p.numel() for n, p in prunable_parameters(model).items()}
    expected = active_counts(numel, layer_densities(shapes, 0.1, "erk"), 0.1)  # ERK allotment at S = 0.9
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), "rigl",
                   total_steps=6, sparsity=0.9, update_period=2, stop_fraction=1.0)  # fmt: skip  (updates after steps 2, 4, 6)
    assert isinstance(opt, torch.optim.Optimizer)
    moved = []
    for t, batch in enumerate(_batches(6)):
        before = {n: m.clone() for n, m in opt.masks.items()}
        _train(model, opt, [batch])
        assert {n: int(m.sum()) for n, m in opt.masks.items()} == expected, f"per-layer active counts changed at step {t + 1}"
        params = prunable_parameters(model)
        assert all(torch.count_nonzero(params[n].detach()[~m]) == 0 for n, m in opt.masks.items()), "inactive weights nonzero"
        changed = sum(int((before[n] != m).sum()) for n, m in opt.masks.items())
        if (t + 1) in (2, 4, 6):
            moved.append(changed)
        else:
            assert changed == 0, f"the topology changed after step {t + 1}, not an update step"
    assert len(opt.method.events) == 3 and max(moved) > 0, f"no update moved a position: {moved}"
    n = sum(numel.values())
    assert opt.finished and opt.sparsity() == pytest.approx(1 - round(0.1 * n) / n, abs=1e-12)
    assert abs(opt.sparsity() - 0.9) < 1 / n


def test_dpf_resnet18_applies_gradient_at_pruned_weights_to_dense_weights_and_reaches_target():
    model = _resnet18()
    lr = 0.05  # plain SGD (no momentum, no decay): the step is exactly w - lr * g
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=lr), "dpf", total_steps=8, sparsity=0.9,
                   update_period=2, end_fraction=0.5)  # fmt: skip  (target at step 4; updates after 2, 4, 6, 8)
    batches = _batches(8)
    _train(model, opt, batches[:4])
    n = opt.method.masks.numel()
    assert opt.method.events[-1]["target_sparsity"] == 0.9
    assert opt.sparsity() == pytest.approx(1 - n_keep(n, 0.9) / n, abs=1e-12)

    # Step 5 (no mask update after it): an independent reference gradient at m ⊙ w.
    dense, masks = _prunable(model), {k: m.clone() for k, m in opt.masks.items()}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in prunable_parameters(ref).items():
            p.mul_(masks[name])
    x, y = batches[4]
    F.cross_entropy(ref(x), y).backward()
    grads = {name: p.grad for name, p in prunable_parameters(ref).items()}
    _train(model, opt, [batches[4]])
    assert all(torch.equal(masks[k], m) for k, m in opt.masks.items())
    after = _prunable(model)
    moved, pushed = 0, 0
    for name, m in masks.items():
        torch.testing.assert_close(after[name], dense[name] - lr * grads[name], rtol=1e-5, atol=1e-7)
        moved += int((after[name][~m] != dense[name][~m]).sum())
        pushed += int((grads[name][~m] != 0).sum())  # (layer4's 3x3 kernels see 1x1 maps: only their centre tap has a gradient)
    assert moved > 0 and moved >= 0.99 * pushed, f"pruned weights must keep moving: {moved} moved, {pushed} with a gradient"

    with opt.eval_weights():  # m ⊙ w inside, the dense w outside
        inside = _prunable(model)
    assert all(torch.equal(inside[k], after[k] * m) for k, m in masks.items())
    assert all(torch.equal(v, after[k]) for k, v in _prunable(model).items())

    _train(model, opt, batches[5:])
    assert opt.finished and opt.sparsity() == pytest.approx(1 - n_keep(n, 0.9) / n, abs=1e-12)
    final = prunable_parameters(model)  # after the last step the model holds m ⊙ w for good
    assert all(torch.count_nonzero(final[k].detach()[~m]) == 0 for k, m in opt.masks.items())


# ----- gmp, hooks ----------------------------------------------------------------------------
def test_gmp_pruned_weights_stay_zero():
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), "gmp",
                   total_steps=12, sparsity=0.8, update_period=2, end_fraction=0.5)  # fmt: skip
    sparsities = []
    for batch in _batches(12, (1, 28, 28)):
        _train(model, opt, [batch])
        params = prunable_parameters(model)
        assert all(torch.count_nonzero(params[n].detach()[~m]) == 0 for n, m in opt.masks.items())
        sparsities.append(opt.sparsity())
    assert sparsities[0] == 0.0 and 0.0 < sparsities[1] < sparsities[3] < 0.8 and sparsities[-1] == pytest.approx(0.8, abs=1e-4)


def test_a_deep_copy_of_the_model_never_moves_the_original_and_the_wrapper_is_not_copied():
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "dpf", total_steps=8, sparsity=0.8,
                   update_period=2, end_fraction=0.5)  # fmt: skip
    _train(model, opt, _batches(3, (1, 28, 28)))
    assert opt.sparsity() > 0
    dense = _prunable(model)
    clone = copy.deepcopy(model)  # e.g. an EMA copy: its forward must not swap the original's weights
    clone(torch.randn(2, 1, 28, 28))
    assert all(torch.equal(v, dense[k]) for k, v in _prunable(model).items())
    model(torch.randn(2, 1, 28, 28))  # the model's own forward does: dpf forwards at m ⊙ w
    assert all(torch.equal(v, dense[k] * opt.masks[k]) for k, v in _prunable(model).items())
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_step_with_a_closure_equals_the_plain_loop():
    batches = _batches(6, (1, 28, 28))
    finals = []
    for use_closure in (False, True):
        model = _lenet()
        opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "dpf", total_steps=6,
                       sparsity=0.8, update_period=2, end_fraction=0.5)  # fmt: skip
        for x, y in batches:
            if use_closure:
                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                assert torch.is_tensor(opt.step(closure))
            else:
                _train(model, opt, [(x, y)])
        finals.append(model.state_dict())
    assert all(torch.equal(v, finals[1][k]) for k, v in finals[0].items())


# ----- the engine's order --------------------------------------------------------------------
PRUNING, DST, EDST = {"sparsity": 0.9, "update_period": 4, "end_fraction": 0.5}, {"sparsity": 0.9, "update_period": 4, "stop_fraction": 0.75}, {"exploration_share": 1 / 3, "tickets": 2}  # fmt: skip
EPOCHS, BATCH = 3, 8
#: Every built-in method that can run in a user's loop, read from the registry.
SUPPORTED = [n for n, s in registry.specs().items() if s.module.startswith("sparse_core.methods.") and unsupported_reason(s) is None]


def test_the_supported_methods_are_every_single_run_method():
    assert {"dense", "gmp", "dpf", "oneshot", "set", "rigl", "edst_ensemble"} <= set(SUPPORTED)
    assert not {"dst_ensemble", "local_greedy", "local_overlap", "local_chunked", "retrain"} & set(SUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
def test_plain_loop_equals_the_engine(name):
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (48, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (48,), generator=g))
    transform = BatchTransform([0.5], [0.25], crop_padding=2)
    cfg = OptimSection(batch_size=BATCH, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant")
    total = EPOCHS * len(split) // BATCH
    val = [{"accuracy": a, "loss": 1.0} for a in (0.5, 0.7, 0.6)]
    model0 = _lenet()

    # sparseflow's engine
    engine_model = copy.deepcopy(model0)
    method = create_method(
        name=name, model=engine_model, total_steps=total, seed=3, epochs=EPOCHS, pruning=PruningSection(**PRUNING),
        dst=DSTSection(**DST), edst=EDSTSection(**EDST), input_shape=(1, 28, 28),
    )  # fmt: skip
    engine_opt = make_optimizer(engine_model, cfg)
    method.bind_optimizer(engine_opt)
    step = 0
    for epoch in range(EPOCHS):
        _, step = train_one_epoch(engine_model, method, engine_opt, split, transform, cfg, epoch=epoch, epochs=EPOCHS,
                                  step=step, seed=5, device=torch.device("cpu"), progress=False)  # fmt: skip
        with method.eval_weights():
            method.on_epoch_end(epoch, val[epoch])
    method.on_train_end()
    with method.eval_weights():
        engine_final = {k: v.clone() for k, v in engine_model.state_dict().items()}

    # the user's loop
    model = copy.deepcopy(model0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = sparsify(model, opt, name, total_steps=total, seed=3, epochs=EPOCHS, input_shape=(1, 28, 28),
                   pruning=PRUNING, dst=DST, edst=EDST)  # fmt: skip
    for epoch in range(EPOCHS):
        for x, y in iterate_batches(split, BATCH, transform, train=True, seed=5, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.on_epoch_end(epoch, val[epoch])

    assert opt.finished and opt.steps_done == step == total
    for k, v in model.state_dict().items():
        assert torch.equal(v, engine_final[k]), f"{name}: {k} differs from the engine's"
    assert method.events == opt.method.events
    if method.masks is not None:
        assert all(torch.equal(m, opt.masks[k]) for k, m in method.masks.masks.items())
        assert opt.sparsity() == pytest.approx(0.9, abs=1e-3)
    for mine, theirs in zip(getattr(opt.method, "tickets", []), getattr(method, "tickets", [])):
        assert mine["epoch"] == theirs["epoch"] and all(torch.equal(v, theirs["state"][k]) for k, v in mine["state"].items())


# ----- learning rate -------------------------------------------------------------------------
def _lrs_seen(opt):
    seen = []
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    return seen


def test_an_lr_scheduler_drives_the_wrapped_optimizer():
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "rigl", total_steps=10, update_period=3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    seen = _lrs_seen(opt)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=10)
    expected = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in _batches(10, (1, 28, 28)):
            _train(model, opt, [batch])
            scheduler.step()
            expected.append(reference_opt.param_groups[0]["lr"])
            reference_opt.step()
            reference.step()
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []
    assert seen == expected and seen[0] == 0.1 and seen[-1] < 0.01
    assert scheduler.get_last_lr() == reference.get_last_lr()


def test_a_method_that_sets_the_learning_rate_is_honoured_and_the_scheduler_keeps_its_own():
    # edst_ensemble, 3 epochs of 4 steps: exploration epoch at the base lr, then 2 refinement
    # phases of 1 epoch each at base x 0.1 (first half) and base x 0.01 (second half).
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.2), "edst_ensemble", total_steps=12, epochs=3,
                   exploration_share=1 / 3, tickets=2, update_period=5)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen, after = _lrs_seen(opt), []
    for batch in _batches(12, (1, 28, 28)):
        _train(model, opt, [batch])
        after.append(opt.param_groups[0]["lr"])
        scheduler.step()
    assert seen == pytest.approx([0.2] * 4 + [0.02, 0.02, 0.002, 0.002] * 2, rel=1e-12)
    assert after == pytest.approx([0.2 * 0.5**t for t in range(12)], rel=1e-12), "the scheduler's lr was not put back"


# ----- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["set", "dpf"])
def test_state_dict_round_trip_resumes_identically(name):
    def build():
        model = _lenet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return model, sparsify(model, opt, name, total_steps=16, sparsity=0.8, update_period=3, end_fraction=0.5, seed=1)

    batches = _batches(16, (1, 28, 28))
    model, opt = build()
    _train(model, opt, batches)
    uninterrupted = copy.deepcopy(model.state_dict())

    model, opt = build()
    _train(model, opt, batches[:7])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _train(*build(), batches[:2])  # another run in between: nothing shared through globals
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps_done == 7
    _train(model, opt, batches[7:])
    assert opt.finished
    for k, v in model.state_dict().items():
        assert torch.equal(v, uninterrupted[k]), f"{name}: {k} differs after resuming"

    other_model = _lenet()
    other = sparsify(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), "gmp", total_steps=16, update_period=3)
    with pytest.raises(ValueError, match="method"):
        other.load_state_dict(saved["optimizer"])
    plain = {k: v for k, v in saved["optimizer"].items() if k != "sparseflow"}
    with pytest.raises(ValueError, match="sparseflow"):
        opt.load_state_dict(plain)


# ----- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("nope",), {"total_steps": 10}, ValueError, "unknown method 'nope'.*rigl"),
        (("retrain",), {"total_steps": 10}, ValueError, "'retrain' is not supported.*internal"),
        (("dst_ensemble",), {"total_steps": 10}, ValueError, "'dst_ensemble' is not supported.*once per member"),
        (("local_greedy",), {"total_steps": 10}, ValueError, "'local_greedy' is not supported.*LocalNet"),
        (("rigl",), {"total_steps": 10, "sparsty": 0.9}, TypeError, "sparsty.*allowed:.*drop_fraction"),
        (("rigl",), {"total_steps": 10, "sparsity": 1.0}, ValueError, r"sparsity must be a fraction in \[0, 1\), got 1.0"),
        (("gmp",), {"total_steps": 10, "sparsity": -0.1}, ValueError, r"sparsity must be a fraction in \[0, 1\)"),
        (("dense",), {"total_steps": 10, "sparsity": 0.5}, ValueError, "'dense' has no sparsity target"),
        (("rigl",), {"total_steps": 0}, ValueError, "total_steps must be a positive integer"),
        (("rigl",), {"total_steps": -5}, ValueError, "total_steps must be a positive integer"),
        (("rigl",), {"total_steps": 10.0}, ValueError, "total_steps must be a positive integer"),
        (("rigl",), {"total_steps": True}, ValueError, "total_steps must be a positive integer"),
        (("rigl",), {"total_steps": 10, "drop_fraction": 1.5}, ValueError, "drop_fraction=1.5"),
        (("gmp",), {"total_steps": 10, "update_period": 16}, ValueError, "'gmp' with total_steps=10.*no mask update"),
        (("edst_ensemble",), {"total_steps": 12}, ValueError, "'edst_ensemble' with epochs=None.*cannot hold 3 refinement phases"),
        (("edst_ensemble",), {"total_steps": 12, "epochs": 5}, ValueError, "epochs must be a positive integer dividing"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(args, kwargs, error, match):
    model = _lenet()
    with pytest.raises(error, match=match):
        sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), *args, **kwargs)


def test_a_methods_own_keys_are_keywords_too_flat_or_per_section():
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "mest", total_steps=20, sparsity=0.8, lam=0.25)
    assert opt.method.opts.lam == 0.25 and opt.method.dst.sparsity == 0.8
    model = _lenet()  # update_period is in pruning, dst and topkast: flat sets all, a mapping one only
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "topkast", total_steps=20, update_period=5, dst={"update_period": 7})
    assert (opt.method.opts.update_period, opt.method.dst.update_period) == (5, 7)
    with pytest.raises(ValueError, match="train.mest.lam"):
        sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "mest", total_steps=20, lam=-1.0)
    with pytest.raises(TypeError, match="lam for method 'rigl'"):  # another method's key
        sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", total_steps=20, lam=0.5)
    with pytest.raises(ValueError, match="synflow.*input_shape"):
        sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "synflow", total_steps=20)
    model = _lenet()
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "synflow", total_steps=20, sparsity=0.9,
                   input_shape=(1, 28, 28), rounds=5)  # fmt: skip
    assert opt.sparsity() == pytest.approx(0.9, abs=1e-4) and opt.method.rounds == 5


def test_wrong_objects_and_steps_past_the_end_are_refused():
    model = _lenet()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sparsify(model, "sgd", "rigl", total_steps=4)
    head_only = torch.optim.SGD(model.fc3.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold these prunable weights.*conv1.weight"):
        sparsify(model, head_only, "rigl", total_steps=4)
    opt = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", total_steps=2)
    assert isinstance(opt, SparseOptimizer)
    with pytest.raises(TypeError, match="already wrapped"):
        sparsify(model, opt, "rigl", total_steps=4)
    _train(model, opt, _batches(2, (1, 28, 28)))
    with pytest.raises(RuntimeError, match="has finished.*total_steps=2"):
        _train(model, opt, _batches(1, (1, 28, 28)))
