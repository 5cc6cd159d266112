"""Per-step training time of dpf, gmp, set and rigl relative to dense: ResNet-20, 32x32x3, batch 128.

Measured in one process with the engine's own ``train_one_epoch`` (augmentation, hooks and
optimizer included) on synthetic images, so only the methods' overhead differs. Rounds
interleave the methods, in an order rotated every round, to cancel drift (thermal, other
load); the median per-step time of each method is reported. Each timed block is 32 steps, so it includes two mask updates
(ΔT = 16) for dpf and gmp. For set and rigl the steps are timed without topology updates and
the measured cost of one update (grow scores + drop/grow of every layer) is amortised over
``--dst-period`` steps (ΔT = 100 by default): ``step + update / ΔT``.

    python benchmarks/step_time.py [--device cpu] [--rounds 3] [--steps 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparse_core.config import DSTSection, OptimSection, PruningSection
from sparse_core.data.loader import BatchTransform, Split
from sparse_core.engine import make_optimizer, train_one_epoch
from sparse_core.methods import create_method
from sparse_core.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dst-period", type=int, default=100)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
    transform = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=4, flip=True)
    optim = OptimSection(batch_size=args.batch_size, lr=0.1, schedule="constant")
    pruning = PruningSection(sparsity=0.9, update_period=16, end_fraction=0.5)
    # Updates are timed separately, so no topology update falls inside a timed block.
    dst = DSTSection(sparsity=0.9, update_period=10**9)
    setups = {}
    for name in ("dense", "dpf", "gmp", "set", "rigl"):
        torch.manual_seed(0)
        model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32).to(device)
        total = args.steps * (args.rounds + 1)
        setups[name] = (model, create_method(name, model, total, pruning, dst), make_optimizer(model, optim))
        setups[name][1].bind_optimizer(setups[name][2])
    times: dict[str, list[float]] = {k: [] for k in setups}
    step = {k: 0 for k in setups}
    names = list(setups)
    for r in range(args.rounds + 1):  # round 0 warms up allocators and caches
        # Rotate the order every round so no method always runs first (or after the same one).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, method, opt = setups[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, step[name] = train_one_epoch(
                model, method, opt, split, transform, optim, epoch=r, epochs=args.rounds + 1,
                step=step[name], seed=0, device=device, progress=False,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
    update_cost = {}
    for name in ("set", "rigl"):
        model, method, _ = setups[name]
        costs = []
        for _ in range(5):  # .grad still holds the last minibatch's dense gradient
            t0 = time.perf_counter()
            method.update_topology(0, 0.3, method.grow_scores())
            costs.append(time.perf_counter() - t0)
        update_cost[name] = statistics.median(costs)
        times[name] = [t + update_cost[name] / args.dst_period for t in times[name]]
    dense = statistics.median(times["dense"])
    print(f"ResNet-20, 32x32x3, batch {args.batch_size}, device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, cost in update_cost.items():
        print(f"{name}: one topology update {cost:.4f} s, amortised over ΔT = {args.dst_period}")
    print(f"{'method':8s} {'s/step':>8s} {'ratio to dense':>15s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:8s} {med:8.4f} {med / dense:15.3f}")


if __name__ == "__main__":
    main()
