"""FLOPs and critical-path accounting of local training (Laskin et al. 2020, Sec. 5.1).

Convention as in :mod:`sparse_core.flops`: multiply-accumulates of conv and linear layers per
example; a training step costs 3× the forward FLOPs of what it trains (forward, activation
gradient, weight gradient).

- **Training FLOPs per example**: ``Σ_windows 3 (F(blocks of the window) + F(head))``. A
  block in two windows (``overlapping``) is counted in both; ``backprop`` is ``3 F(network)``.
  Heads are included here and excluded from inference FLOPs.
- **Critical path per step** (idealised time in FLOPs, perfect pipeline, no communication):
  ``backprop`` has to run the whole depth, ``3 F(network)``; a pipelined local variant is as
  slow as its slowest process, ``max_k 3 (F(blocks owned by k) + F(head k))`` (``overlapping``:
  the owner of a shared block also recomputes and backpropagates it for the next window,
  ``+ 3 F(shared block)``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparse_core.flops import layer_flops
from sparse_core.local.model import LocalNet


def _module_flops(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()):
        return 0.0
    import torch

    flops: dict[nn.Module, int] = {}
    hooks = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def fn(mod, inputs, output):  # noqa: ANN001
                per = mod.weight.numel() * (output.shape[2] * output.shape[3] if isinstance(mod, nn.Conv2d) else output.numel() // output.shape[-1] // output.shape[0])
                flops[mod] = int(per)
            hooks.append(m.register_forward_hook(fn))
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape, device=next(module.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        module.train(was)
    return float(sum(flops.values()))


def block_flops(local: LocalNet, input_shape: tuple[int, int, int]) -> list[float]:
    """Forward FLOPs per example of every block (from the network's own layer count)."""
    per_weight = layer_flops(local.net, input_shape)
    names = {id(p): n for n, p in local.net.named_parameters()}
    return [float(sum(per_weight.get(names.get(id(p), ""), 0) for p in b.parameters())) for b in local.blocks]


def head_flops(local: LocalNet, input_shape: tuple[int, int, int]) -> dict[int, float]:
    """Forward FLOPs per example of every auxiliary head ``{window: FLOPs}``."""
    shapes = local._feature_shapes(input_shape)
    return {int(k): _module_flops(h, shapes[local.windows[int(k)].end]) for k, h in local.heads.items()}


def step_accounting(local: LocalNet, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """``{"inference", "training", "critical_path", "training_ratio", "critical_path_ratio",
    "per_window": [...]}``, FLOPs per example; ratios against backprop of the same network."""
    fb = block_flops(local, input_shape)
    fh = head_flops(local, input_shape)
    inference = sum(fb)
    per_window, critical = [], 0.0
    for i, w in enumerate(local.windows):
        trained = sum(fb[w.start : w.end + 1]) + fh.get(i, 0.0)
        owned = sum(f for b, f in enumerate(fb) if local.owner[b] == i) + fh.get(i, 0.0)
        if i + 1 < len(local.windows) and local.owner[local.windows[i + 1].start] == i:
            owned += fb[local.windows[i + 1].start]  # overlapping: recomputes its shared block for window i+1
        per_window.append({"window": i, "blocks": f"{w.start}-{w.end}", "training": 3 * trained, "critical_path": 3 * owned})
        critical = max(critical, 3 * owned)
    training = sum(r["training"] for r in per_window)
    return {
        "inference": inference,
        "training": training,
        "critical_path": critical,
        "training_ratio": training / (3 * inference),
        "critical_path_ratio": critical / (3 * inference),
        "per_window": per_window,
    }


def minimax_split(block_costs: list[float], head_costs: list[float], chunks: int) -> list[int]:
    """Split points (block indices where chunks ``2 .. K`` start) that minimise the largest
    chunk cost, ``max_k (Σ block_costs of chunk k + head_costs[last block of k])``, where the
    last chunk has no head (it ends with the network's own classifier). Exact, by dynamic
    programming over contiguous partitions (the "linear partition" problem), O(K n²); among
    equally good splits the one with the earliest split points is returned.

    Args:
        block_costs: cost of every block, in forward order (any unit, e.g. FLOPs per example).
        head_costs: ``head_costs[b]`` = cost of an auxiliary head on block ``b``'s output
            (``len(block_costs) - 1`` entries at least; the last block never gets one).
        chunks: ``K``, the number of chunks, ``1 <= K <= len(block_costs)``.

    Returns:
        ``K - 1`` increasing block indices in ``1 .. n - 1`` (empty for ``K = 1``), the form of
        ``local.split_points``.

    Raises:
        ValueError: ``chunks`` out of range, or too few head costs.
    """
    n = len(block_costs)
    if not 1 <= chunks <= n:
        raise ValueError(f"chunks = {chunks}: must be between 1 and the number of blocks ({n})")
    if len(head_costs) < n - 1:
        raise ValueError(f"need a head cost for each of the first {n - 1} blocks, got {len(head_costs)}")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:  # chunk of blocks a .. b-1
        return prefix[b] - prefix[a] + (head_costs[b - 1] if b < n else 0.0)

    inf = float("inf")
    # best[k][b]: smallest achievable max cost of blocks 0 .. b-1 cut into k chunks; cut[k][b]: start of the k-th.
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, chunks + 1):
        for b in range(k, n + 1):
            for a in range(k - 1, b):  # ascending a, strict '<': the earliest start among ties
                value = max(best[k - 1][a], cost(a, b))
                if value < best[k][b]:
                    best[k][b], cut[k][b] = value, a
    starts, b = [], n
    for k in range(chunks, 1, -1):
        b = cut[k][b]
        starts.append(b)
    return starts[::-1]


def flops_balanced_split_points(model: nn.Module, input_shape: tuple[int, int, int], chunks: int, head: str = "linear",
                                head_hidden: int = 128) -> list[int]:  # fmt: skip
    """``local.split_points`` for ``chunks`` chunks of ``model`` with balanced training FLOPs:
    the split that minimises the critical path of :func:`step_accounting` for ``chunked``
    (each process trains its blocks and its auxiliary head, ``3 (F(blocks) + F(head))`` per
    example; Laskin et al. 2020, Sec. 5.1), by :func:`minimax_split` over the blocks of
    :func:`sparse_core.local.blocks.split_blocks`.

    The FLOPs are those of :mod:`sparse_core.flops` (conv and linear multiply-accumulates), so
    the balance ignores the memory-bound layers (batch norm, activations) and each chunk's
    start-up; a measured balance can differ. Neither ``model`` nor torch's random generator
    is changed (the heads built for counting are thrown away).

    Args:
        model: a registry model with a block decomposition.
        input_shape: ``(C, H, W)`` of one example.
        head, head_hidden: the auxiliary head of the chunks (``local.head``, ``local.head_hidden``).

    Raises:
        ValueError: the model has no block decomposition, or ``chunks`` is out of range.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        probe = LocalNet(model, "greedy", input_shape, _num_outputs(model, input_shape), head=head, head_hidden=head_hidden)
    fb = block_flops(probe, input_shape)
    fh = head_flops(probe, input_shape)
    return minimax_split(fb, [fh[b] for b in range(len(fb) - 1)], chunks)


def _num_outputs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(torch.zeros(1, *input_shape, device=next(model.parameters()).device)).shape[-1])
    finally:
        model.train(was)


def measured_block_costs(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int = 128, head: str = "linear",
                         head_hidden: int = 128, reps: int = 3) -> tuple[list[float], list[float]]:  # fmt: skip
    """Measured seconds of one training step of every block and of an auxiliary head on every
    block's output, in this process with its current thread count: forward and backward at
    ``batch_size`` on random inputs (the median of ``reps`` after one warm-up). Block 0 gets
    no input gradient (its input is the data), every later block does (inside a chunk it
    must pass one on), as in a pipeline.

    The costs the FLOPs count leaves out show here: batch norm, activations and the shortcut
    are memory-bound, so a block on large, thin feature maps (ResNet's first stage) costs more
    time per FLOP than a later one. The numbers vary with the machine and its load; batch-norm
    running statistics, parameters, gradients and torch's random generator are left as they
    were.

    Returns:
        ``(block seconds, head seconds)``: one entry per block, and one per block but the last.
    """
    import statistics
    import time

    import torch

    from sparse_core.local.model import frozen_bn_stats

    with torch.random.fork_rng(devices=[]):
        probe = LocalNet(model, "greedy", input_shape, _num_outputs(model, input_shape), head=head, head_hidden=head_hidden)
        h = torch.randn(batch_size, *input_shape, device=next(model.parameters()).device)
    grads = {id(p): p.grad for p in probe.parameters()}

    def timed(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        times, out = [], x
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            with frozen_bn_stats(module):
                out = module(x)
                out.sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), out.detach()

    was = model.training
    model.train()
    blocks, heads = [], []
    try:
        for b, block in enumerate(probe.blocks):
            seconds, out = timed(block, h.detach().requires_grad_(b > 0))
            blocks.append(seconds)
            if str(b) in probe.heads:
                heads.append(timed(probe.heads[str(b)], out)[0])
            h = out
    finally:
        model.train(was)
        for p in probe.parameters():
            p.grad = grads.get(id(p))
    return blocks, heads


def measured_balanced_split_points(model: nn.Module, input_shape: tuple[int, int, int], chunks: int, batch_size: int = 128,
                                   head: str = "linear", head_hidden: int = 128) -> list[int]:  # fmt: skip
    """``local.split_points`` that balance the *measured* step time of the chunks
    (:func:`measured_block_costs` in this process, then :func:`minimax_split`): the split to
    use when the FLOPs balance (:func:`flops_balanced_split_points`) leaves one chunk slower
    in practice. Measure with the thread count each pipeline process will use (1).

    Raises:
        ValueError: the model has no block decomposition, or ``chunks`` is out of range.
    """
    blocks, heads = measured_block_costs(model, input_shape, batch_size, head, head_hidden)
    return minimax_split(blocks, heads, chunks)
