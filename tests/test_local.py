"""Local parallelism: block decomposition, window semantics, heads, the 2-process pipeline."""

from __future__ import annotations

import functools
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sparse_core.config import OptimSection
from sparse_core.data import BatchTransform, Split
from sparse_core.local import LocalNet, build_local, make_windows, owners, split_blocks
from sparse_core.local.accounting import step_accounting
from sparse_core.local.analysis import gradient_cosine, pareto_front, random_label_accuracy, steps_to_target
from sparse_core.local.chunk_processes import PipelineError, PipelineSpec, run_pipeline
from sparse_core.models import create_model

MODELS = {
    "lenet5": ({}, (1, 28, 28)),
    "lenet_300_100": ({}, (1, 28, 28)),
    "resnet8": ({}, (1, 28, 28)),
    "wrn": ({"depth": 10, "widen": 1}, (3, 16, 16)),
    "vgg16": ({}, (3, 16, 16)),
}


def _batch(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _local(name: str, variant: str, **kw) -> LocalNet:
    kwargs, shape = MODELS[name]
    return build_local(name, kwargs, shape, 10, variant, **kw)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_compose_to_the_network_bit_for_bit(name):
    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    net = create_model(name, in_channels=shape[0], num_classes=10, image_size=shape[1], **kwargs).eval()
    x, _ = _batch(shape)
    h = x
    for block in split_blocks(net):
        h = block(h)
    assert torch.equal(h, net(x))
    # every parameter belongs to exactly one block
    ids = [id(p) for b in split_blocks(net) for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())


@pytest.mark.parametrize("name", ["lenet5", "resnet8"])
def test_chunked_k1_equals_backprop_bit_for_bit(name):
    local = _local(name, "chunked", chunks=1)
    assert len(local.windows) == 1 and len(local.heads) == 0
    x, y = _batch(MODELS[name][1])
    ref = _local(name, "backprop")
    F.cross_entropy(ref.net(x), y).backward()
    losses, _ = local.local_losses(x, y)
    torch.stack(losses).sum().backward()
    for (n, p), (_, q) in zip(ref.net.named_parameters(), local.net.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def _by_hand(local: LocalNet, x, y) -> dict[int, torch.Tensor]:
    """Sum over windows of d(window loss)/d(param), each window computed from scratch."""
    params = list(local.parameters())
    total = {id(p): torch.zeros_like(p) for p in params}
    for i, w in enumerate(local.windows):
        with torch.no_grad():
            h = x
            for b in range(w.start):
                h = local.blocks[b](h)
        for b in range(w.start, w.end + 1):
            h = local.blocks[b](h)
        logits = local.heads[str(i)](h) if str(i) in local.heads else h
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                total[id(p)] += g
    return total


@pytest.mark.parametrize("variant,kw", [("greedy", {}), ("overlapping", {}), ("chunked", {"chunks": 2}), ("chunked", {"chunks": 3})])
@pytest.mark.parametrize("name", ["lenet5", "resnet8"])
def test_gradient_is_the_sum_of_per_window_gradients(name, variant, kw):
    local = _local(name, variant, head="mlp" if name == "resnet8" else "linear", **kw)
    x, y = _batch(MODELS[name][1])
    expected = _by_hand(local, x, y)
    local.zero_grad()
    losses, _ = local.local_losses(x, y)
    assert len(losses) == len(local.windows)
    torch.stack(losses).sum().backward()
    for n, p in local.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, expected[id(p)], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("variant", ["greedy", "overlapping", "chunked"])
def test_no_gradient_crosses_a_window_edge(variant):
    local = _local("lenet5", variant, chunks=2)
    x, y = _batch(MODELS["lenet5"][1])
    losses, _ = local.local_losses(x, y)
    for i, w in enumerate(local.windows):
        for b, block in enumerate(local.blocks):
            grads = torch.autograd.grad(losses[i], list(block.parameters()), allow_unused=True, retain_graph=True)
            if b in w:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), (i, b)
            else:
                assert all(g is None for g in grads), (variant, i, b)


def test_batchnorm_running_stats_update_once_per_step_when_overlapping():
    ref, local = _local("resnet8", "backprop"), _local("resnet8", "overlapping")
    x, y = _batch(MODELS["resnet8"][1])
    ref.net(x)
    local.local_losses(x, y)
    for (n, a), (_, b) in zip(ref.net.named_buffers(), local.net.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)


def test_windows_and_owners():
    assert make_windows(4, "backprop") == make_windows(4, "chunked", chunks=1)
    assert [(w.start, w.end) for w in make_windows(5, "chunked", chunks=2)] == [(0, 1), (2, 4)]
    assert [(w.start, w.end) for w in make_windows(5, "chunked", split_points=[1, 3])] == [(0, 0), (1, 2), (3, 4)]
    names = ["a", "b", "c", "d"]
    assert [(w.start, w.end) for w in make_windows(4, "chunked", split_points=["c"], block_names=names)] == [(0, 1), (2, 3)]
    over = make_windows(4, "overlapping")
    assert [(w.start, w.end) for w in over] == [(0, 1), (1, 2), (2, 3)]
    assert owners(over, 4) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="names no block"):
        make_windows(4, "chunked", split_points=["zz"], block_names=names)
    with pytest.raises(ValueError, match="increasing"):
        make_windows(4, "chunked", split_points=[3, 2])
    with pytest.raises(ValueError, match="local.chunks = 9"):
        make_windows(4, "chunked", chunks=9)
    with pytest.raises(ValueError, match="unknown local variant"):
        make_windows(4, "pipelined")


def test_heads_are_training_only():
    local = _local("lenet5", "greedy", head="mlp")
    assert len(local.heads) == 3  # 4 blocks; the last window uses the network's classifier
    assert set(local.exported_state_dict()) == set(local.net.state_dict())
    assert not any(k.startswith("heads") for k in local.exported_state_dict())
    acc = step_accounting(local, (1, 28, 28))
    plain = step_accounting(_local("lenet5", "backprop"), (1, 28, 28))
    assert acc["inference"] == plain["inference"]  # heads excluded from inference FLOPs
    assert acc["training"] > plain["training"] and plain["training_ratio"] == 1.0  # included in training FLOPs
    chunked = step_accounting(_local("resnet8", "chunked", chunks=2), (1, 28, 28))
    assert chunked["critical_path_ratio"] < 0.75


def test_gradient_cosine_is_one_where_local_equals_backprop():
    x, y = _batch((1, 28, 28))
    df = gradient_cosine(_local("lenet5", "chunked", chunks=1), x, y)
    assert (df["cosine"] - 1).abs().max() < 1e-5
    greedy = gradient_cosine(_local("lenet5", "greedy"), x, y)
    last = greedy[greedy["block"] == 3]
    assert (last["cosine"] - 1).abs().max() < 1e-5  # the last window's gradient is the true one
    assert (greedy[greedy["block"] == 0]["cosine"] < 0.99).all()


def _split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_sweep_points_and_pareto_front():
    build = functools.partial(build_local, "lenet_300_100", {}, (1, 28, 28), 10, "greedy")
    tf = BatchTransform([0.5], [0.25])
    out = steps_to_target(build, _split(), tf, 16, 0.05, target_loss=10.0, max_steps=5, seed=0)
    assert out["steps"] == 1 and out["training_flops"] > 0  # any loss is below 10
    never = steps_to_target(build, _split(), tf, 16, 0.05, target_loss=0.0, max_steps=5, seed=0)
    assert never["steps"] is None and never["examples"] == 5 * 16
    df = pd.DataFrame({"c": [1, 2, 3, 2], "t": [3, 2, 1, 3]})
    assert pareto_front(df, "c", "t").tolist() == [True, True, True, False]
    acc = random_label_accuracy(build, _split(32), tf, 16, 0.05, epochs=2, seed=0)
    assert 0.0 <= acc <= 1.0


# ----- the real pipeline -------------------------------------------------------------------------
def _spec(variant: str, steps: int, **kw) -> PipelineSpec:
    build = functools.partial(build_local, "lenet_300_100", {}, (1, 28, 28), 10, variant, chunks=2, seed=3)
    optim = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    return PipelineSpec(build=build, train=_split(64), transform=BatchTransform([0.5], [0.25]), optim=optim,
                        epochs=2, seed=0, max_steps=steps, **kw)  # fmt: skip


def _simulate(spec: PipelineSpec) -> LocalNet:
    from sparse_core.data import iterate_batches
    from sparse_core.engine import lr_at

    local = spec.build()
    local.train()
    opt = torch.optim.SGD(local.parameters(), lr=spec.optim.lr, momentum=spec.optim.momentum, weight_decay=spec.optim.weight_decay)
    step, per_epoch = 0, -(-len(spec.train) // spec.optim.batch_size)
    for epoch in range(spec.epochs):
        for x, y in iterate_batches(spec.train, spec.optim.batch_size, spec.transform, train=True, seed=spec.seed, epoch=epoch):
            if step >= spec.max_steps:
                return local
            for g in opt.param_groups:
                g["lr"] = lr_at(step, per_epoch, spec.epochs, spec.optim)
            losses, _ = local.local_losses(x, y)
            opt.zero_grad()
            torch.stack(losses).sum().backward()
            opt.step()
            step += 1
    return local


@pytest.mark.parametrize("variant", ["chunked", "greedy"])
def test_gloo_pipeline_matches_the_simulation(variant):
    spec = _spec(variant, steps=6)
    trained, info = run_pipeline(spec)
    assert len(info["losses"]) == len(trained.windows) and info["steps"] == 6
    reference = _simulate(spec)
    start = spec.build().state_dict()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
        if v.is_floating_point() and "weight" in k:
            assert not torch.equal(v, start[k]), k  # it trained


def test_pipeline_reports_threads_phases_and_step_clock():
    """One intra-op thread per process; per-step clock stamps in order; the phases add up to
    the loop's seconds (nothing of the step loop left out of the profile)."""
    spec = _spec("chunked", steps=6)
    _, info = run_pipeline(spec)
    assert info["threads"] == [1, 1]
    for k in range(2):
        stamps = info["step_end"][k]
        assert len(stamps) == 6 and stamps == sorted(stamps) and stamps[0] >= info["ready"][k]
        assert sum(info["phases"][k].values()) == pytest.approx(info["seconds"][k], rel=0.05, abs=2e-3)
    assert info["phases"][0]["recv_wait"] == 0.0 and info["phases"][1]["send"] == 0.0  # first chunk receives nothing


def test_later_chunks_read_the_loaders_labels_without_the_images():
    """Chunks after the first get labels only, in the loader's order, batch sizes and epochs
    (with crop and flip drawing from the same generator), not the images."""
    from sparse_core.data import iterate_batches
    from sparse_core.local.chunk_processes import _label_batches

    g = torch.Generator().manual_seed(1)
    train = Split(torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (70,), generator=g))
    tf = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True)
    spec = PipelineSpec(build=None, train=train, transform=tf, optim=OptimSection(batch_size=16), epochs=2, seed=5)
    for epoch in range(2):
        full = [y for _, y in iterate_batches(train, 16, tf, train=True, seed=5, epoch=epoch)]
        labels = [(x, y) for x, y in _label_batches(spec, epoch, torch.device("cpu"))]
        assert [len(y) for y in full] == [16, 16, 16, 16, 6]
        assert all(x is None for x, _ in labels)
        assert all(torch.equal(a, b) for a, (_, b) in zip(full, labels, strict=True))


def test_minimax_split_is_the_best_contiguous_split():
    """Exact against brute force; the last chunk has no head; ties go to the earliest split."""
    import itertools

    from sparse_core.local.accounting import minimax_split

    assert minimax_split([1, 1, 1, 1, 4], [0, 0, 0, 0], 2) == [4]
    assert minimax_split([1, 1, 1, 1, 4], [1, 1, 1, 1], 2) == [3]  # 3+1 | 1+4 ties 4+1 | 4: earliest
    assert minimax_split([5, 1, 1], [9, 0], 2) == [2]  # a costly head on block 0 moves the split
    assert minimax_split([1, 2, 3], [0, 0], 1) == []
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, k = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        k = min(k, n)
        blocks = torch.randint(1, 20, (n,), generator=g).tolist()
        heads = torch.randint(0, 5, (n - 1,), generator=g).tolist()

        def worst(starts):
            bounds = [0, *starts, n]
            return max(sum(blocks[a:b]) + (heads[b - 1] if b < n else 0) for a, b in zip(bounds[:-1], bounds[1:]))

        best = min(worst(list(c)) for c in itertools.combinations(range(1, n), k - 1))
        got = minimax_split(blocks, heads, k)
        assert len(got) == k - 1 and got == sorted(set(got)) and worst(got) == best
        assert got == min(list(c) for c in itertools.combinations(range(1, n), k - 1) if worst(list(c)) == best)
    with pytest.raises(ValueError, match="chunks = 4"):
        minimax_split([1, 1, 1], [0, 0], 4)


def test_flops_balanced_split_points_of_resnet20_and_lenet5():
    """ResNet-20's blocks: stem+layers.0 5.16 M MACs, then 4.72 M (3.54 M where a stage
    downsamples): the best 2-chunk split is at block 4 (18.1 M + head | 22.4 M). LeNet-5's
    conv2 dominates: conv1 alone is the first chunk. Neither the model nor the RNG changes."""
    from sparse_core.local.accounting import flops_balanced_split_points

    net = create_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert flops_balanced_split_points(net, (3, 32, 32), 2) == [4]
    assert flops_balanced_split_points(net, (3, 32, 32), 3) == [3, 6]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    lenet = create_model("lenet5", in_channels=1, num_classes=10, image_size=28)
    assert flops_balanced_split_points(lenet, (1, 28, 28), 2) == [1]
    # The chosen split has the smallest critical path of all 2-chunk splits (step_accounting).
    paths = {s: step_accounting(_local("lenet5", "chunked", split_points=[s]), (1, 28, 28))["critical_path"] for s in (1, 2, 3)}
    assert min(paths, key=paths.get) == 1


def test_measured_block_costs_leave_the_model_as_it_was():
    """One cost per block and per head (all blocks but the last), positive; weights, batch-norm
    statistics, gradients and the random generator unchanged; the split is a valid one."""
    from sparse_core.local.accounting import measured_balanced_split_points, measured_block_costs

    net = create_model("resnet8", in_channels=1, num_classes=10, image_size=28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    blocks, heads = measured_block_costs(net, (1, 28, 28), batch_size=8, reps=1)
    n = len(split_blocks(net))
    assert len(blocks) == n and len(heads) == n - 1 and min(blocks) > 0 and min(heads) > 0
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    (point,) = measured_balanced_split_points(net, (1, 28, 28), 2, batch_size=8)
    assert 1 <= point < n


def test_overlapping_pipeline_runs_with_one_step_stale_gradients():
    spec = _spec("overlapping", steps=4)
    trained, info = run_pipeline(spec)
    assert info["steps"] == 4 and all(torch.isfinite(v).all() for v in trained.state_dict().values())


def test_a_killed_worker_stops_the_run_with_a_clear_error():
    spec = _spec("chunked", steps=50, fault={"rank": 1, "step": 2}, timeout_s=60)
    t0 = time.perf_counter()
    with pytest.raises(PipelineError, match=r"chunk 1 \(blocks .*killed by SIGKILL"):
        run_pipeline(spec)
    assert time.perf_counter() - t0 < 30


def test_local_chunked_composes_with_dpf(tmp_path):
    """local_chunked + dpf: DPF's hooks act on the network only; masks reach the target sparsity,
    the heads stay dense and out of the prunable set, resume works as for any method."""
    from sparse_core.config import PruningSection
    from sparse_core.engine import fit
    from sparse_core.methods import create_method

    local = build_local("lenet_300_100", {}, (1, 28, 28), 10, "chunked", chunks=2, seed=0, per_chunk_optimizer=True)
    train, val = _split(96, 1), _split(32, 2)
    optim = OptimSection(batch_size=16, lr=0.05)
    pruning = PruningSection(sparsity=0.8, update_period=2, end_fraction=0.5)
    method = create_method("dpf", local.net, 12, pruning)
    assert all(not n.startswith("heads") for n in method.masks.params)
    head_before = {k: v.clone() for k, v in local.heads.state_dict().items()}
    fit(local, method, train, val, BatchTransform([0.5], [0.25]), optim, epochs=2, run_dir=tmp_path, seed=0,
        device=torch.device("cpu"), fingerprint="fp", progress=False)  # fmt: skip
    assert abs(method.masks.sparsity() - 0.8) < 1e-3
    with method.eval_weights():
        zeros = sum(int((p == 0).sum()) for p in method.masks.params.values())
    assert zeros / method.masks.numel() >= 0.8 - 1e-3
    assert any(not torch.equal(v, local.heads.state_dict()[k]) for k, v in head_before.items())  # heads trained
    assert len(local.param_groups()) == 2  # one optimizer group per chunk


def test_torchrun_launch_matches_the_simulation(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "state.pt"
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(repo / "tests" / "_torchrun_local.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = torch.load(out, weights_only=True)
    reference = _simulate(_spec("chunked", steps=6)).state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(trained[k], v, rtol=1e-5, atol=1e-6, msg=k)
