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
